//! NEON kernels (aarch64) for the interleaved eight-row layout, and their variant with the
//! dot-product extension's `sdot` (Armv8.2 and later: Cortex-A76/A78/X1, Neoverse N1/V1,
//! Graviton 2 and later, Apple M1 and later), chosen at run time.
//!
//! The layout is the AVX2 kernels' (`super::slot_map`): per block, eight rows' four-byte runs
//! side by side, 32 bytes. On 128-bit registers one run is two loads, rows 0..4 and rows 4..8,
//! each 32-bit lane one row, so the products of a row's four bytes and four activation bytes
//! (repeated in every lane) sum into its own lane with no horizontal sums:
//!
//! - with `sdot`, one instruction per 16 bytes;
//! - on plain NEON, `smull`/`smull2` to 16-bit products, one pairwise add into 16-bit sums
//!   (kept in 16 bits over a block where they cannot overflow, as AVX2's `maddubs`), then a
//!   pairwise widening add into the rows' 32-bit lanes.
//!
//! Integer sums are exact and the f32 steps run in the AVX2 kernels' order (scale products,
//! then one fused multiply-add per block), so every path gives the same results as AVX2's.

use super::{Isa, QActs, QWeight};

/// NEON is part of the aarch64 baseline (Rust's aarch64 targets assume it).
pub fn supported() -> bool {
    cfg!(target_arch = "aarch64")
}

/// The dot-product extension (`sdot`, FEAT_DotProd).
pub fn dotprod_supported() -> bool {
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("dotprod")
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        false
    }
}

/// Fill `res[k]` with the dot products of the eight rows of interleaved group `g` and
/// activation row `j + k` (`k < a`, `a` 1..=4), with the integer sums of `isa` (`Neon` or
/// `NeonDot`).
pub fn tile_x8(
    w: &QWeight,
    g: usize,
    acts: &QActs,
    j: usize,
    a: usize,
    isa: Isa,
    res: &mut [[f32; 8]; 4],
) {
    #[cfg(target_arch = "aarch64")]
    {
        assert!(match isa {
            Isa::Neon => supported(),
            Isa::NeonDot => dotprod_supported(),
            _ => false,
        });
        // SAFETY: the instruction set is checked above; the group holds `nb` interleaved
        // blocks and each activation row `nb` (times the format's blocks per weight block).
        unsafe { arm::tile_x8(w, g, acts, j, a, isa, res) }
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        let _ = (w, g, acts, j, a, isa, res);
        unreachable!("NEON kernels on a non-Arm CPU")
    }
}

/// Eight f16 values as two f32 vectors (values 0..4 and 4..8). `fcvtl` is in the Armv8.0
/// baseline; its intrinsic needs Rust's unstable f16 type, hence the assembly.
///
/// # Safety
/// None beyond running on aarch64 (which has NEON).
#[cfg(target_arch = "aarch64")]
#[inline(always)]
pub(crate) unsafe fn widen8(
    h: std::arch::aarch64::uint16x8_t,
) -> [std::arch::aarch64::float32x4_t; 2] {
    use std::arch::aarch64::float32x4_t;
    let (lo, hi): (float32x4_t, float32x4_t);
    std::arch::asm!(
        "fcvtl {lo:v}.4s, {h:v}.4h",
        "fcvtl2 {hi:v}.4s, {h:v}.8h",
        h = in(vreg) h,
        lo = out(vreg) lo,
        hi = out(vreg) hi,
        options(pure, nomem, nostack, preserves_flags)
    );
    [lo, hi]
}

#[cfg(target_arch = "aarch64")]
// The kernels index parallel arrays of registers (per activation row, per half of the group).
#[allow(clippy::needless_range_loop)]
mod arm {
    use std::arch::aarch64::*;
    use std::arch::asm;

    use super::*;
    use crate::ops::quant::{q6k_high_at, q6k_low_at, q6k_slot, ActBlock, QKind};

    pub unsafe fn tile_x8(
        w: &QWeight,
        g: usize,
        acts: &QActs,
        j: usize,
        a: usize,
        isa: Isa,
        res: &mut [[f32; 8]; 4],
    ) {
        let nb = w.cols / w.kind.block_len();
        let grp = w.group(g).as_ptr();
        macro_rules! go {
            ($kern:ty, $A:literal) => {{
                let ap: [*const ActBlock; $A] = std::array::from_fn(|k| acts.row(j + k).as_ptr());
                let out = match isa {
                    Isa::NeonDot => on_dotprod::<$kern, $A>(grp, ap, nb),
                    _ => <$kern>::run::<$A, Pairs>(grp, ap, nb),
                };
                res[..$A].copy_from_slice(&out);
            }};
        }
        macro_rules! acts {
            ($kern:ty) => {
                match a {
                    1 => go!($kern, 1),
                    2 => go!($kern, 2),
                    3 => go!($kern, 3),
                    4 => go!($kern, 4),
                    _ => unreachable!("{a} activation rows"),
                }
            };
        }
        match w.kind {
            QKind::Q4_0 => acts!(Q40),
            QKind::Q4_1 => acts!(Q41),
            QKind::Q5_0 => acts!(Q50),
            QKind::Q5_1 => acts!(Q51),
            QKind::Q8_0 => acts!(Q80),
            QKind::Q4K => acts!(Q4K),
            QKind::Q5K => acts!(Q5K),
            QKind::Q6K => acts!(Q6K),
        }
    }

    /// How a kernel sums the products of weight bytes and activation bytes, four to each
    /// 32-bit lane (one row).
    trait IntDot {
        /// `s` plus the products of `w` and `x`, in this method's running-sum form.
        unsafe fn add(s: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t;
        /// A running sum as four i32 lanes.
        unsafe fn finish(s: int32x4_t) -> int32x4_t;
        /// `s` (i32 lanes) plus the products of `w` and `x`.
        unsafe fn add32(s: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t;
    }

    /// Plain NEON: byte products widened to 16 bits and summed in pairs; the running sum is
    /// eight 16-bit lanes (two per row) until `finish` adds each pair into 32 bits.
    struct Pairs;

    impl Pairs {
        #[inline(always)]
        unsafe fn pairs(w: int8x16_t, x: int8x16_t) -> int16x8_t {
            vpaddq_s16(
                vmull_s8(vget_low_s8(w), vget_low_s8(x)),
                vmull_high_s8(w, x),
            )
        }
    }

    impl IntDot for Pairs {
        #[inline(always)]
        unsafe fn add(s: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
            vreinterpretq_s32_s16(vaddq_s16(vreinterpretq_s16_s32(s), Self::pairs(w, x)))
        }
        #[inline(always)]
        unsafe fn finish(s: int32x4_t) -> int32x4_t {
            vpaddlq_s16(vreinterpretq_s16_s32(s))
        }
        #[inline(always)]
        unsafe fn add32(s: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
            vpadalq_s16(s, Self::pairs(w, x))
        }
    }

    /// The dot-product extension: one `sdot` sums four products into each 32-bit lane. (Its
    /// intrinsic is not stable in Rust yet, hence the one instruction of assembly; it is only
    /// reached from `on_dotprod`, compiled with the feature.)
    struct Sdot;

    impl IntDot for Sdot {
        #[inline(always)]
        unsafe fn add(mut s: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
            asm!(
                "sdot {s:v}.4s, {w:v}.16b, {x:v}.16b",
                s = inout(vreg) s,
                w = in(vreg) w,
                x = in(vreg) x,
                options(pure, nomem, nostack, preserves_flags)
            );
            s
        }
        #[inline(always)]
        unsafe fn finish(s: int32x4_t) -> int32x4_t {
            s
        }
        #[inline(always)]
        unsafe fn add32(s: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
            Self::add(s, w, x)
        }
    }

    /// An interleaved eight-row kernel for one format, generic over the integer sums.
    trait X8 {
        unsafe fn run<const A: usize, D: IntDot>(
            grp: *const u8,
            ap: [*const ActBlock; A],
            nb: usize,
        ) -> [[f32; 8]; A];
    }

    macro_rules! x8 {
        ($name:ident, |$grp:ident, $ap:ident, $nb:ident| $body:expr) => {
            struct $name;
            impl X8 for $name {
                #[inline(always)]
                unsafe fn run<const A: usize, D: IntDot>(
                    $grp: *const u8,
                    $ap: [*const ActBlock; A],
                    $nb: usize,
                ) -> [[f32; 8]; A] {
                    $body
                }
            }
        };
    }
    x8!(Q40, |g, a, n| q4_x8::<A, false, false, D>(g, a, n));
    x8!(Q41, |g, a, n| q4_x8::<A, true, false, D>(g, a, n));
    x8!(Q50, |g, a, n| q4_x8::<A, false, true, D>(g, a, n));
    x8!(Q51, |g, a, n| q4_x8::<A, true, true, D>(g, a, n));
    x8!(Q80, |g, a, n| q8_0_x8::<A, D>(g, a, n));
    x8!(Q4K, |g, a, n| q4k_x8::<A, false, D>(g, a, n));
    x8!(Q5K, |g, a, n| q4k_x8::<A, true, D>(g, a, n));
    x8!(Q6K, |g, a, n| q6k_x8::<A, D>(g, a, n));

    /// The kernels compiled with the dot-product extension, where `sdot` is inlined.
    #[target_feature(enable = "dotprod")]
    unsafe fn on_dotprod<K: X8, const A: usize>(
        grp: *const u8,
        ap: [*const ActBlock; A],
        nb: usize,
    ) -> [[f32; 8]; A] {
        K::run::<A, Sdot>(grp, ap, nb)
    }

    /// Eight f16 values (one per row) as two f32 vectors, rows 0..4 and 4..8.
    #[inline(always)]
    unsafe fn f16x8(p: *const u8) -> [float32x4_t; 2] {
        super::widen8(vld1q_u16(p as *const u16))
    }

    /// Four activation bytes `at..at + 4`, repeated in every 32-bit lane.
    #[inline(always)]
    unsafe fn bcast4(ab: &ActBlock, at: usize) -> int8x16_t {
        vreinterpretq_s8_s32(vld1q_dup_s32(ab.qs.as_ptr().add(at) as *const i32))
    }

    /// The 16 bytes of rows `4h..4h + 4` of the 32-byte run at `p`.
    #[inline(always)]
    unsafe fn run16(p: *const u8, h: usize) -> uint8x16_t {
        vld1q_u8(p.add(16 * h))
    }

    /// Eight rows' bytes (a `u64` plane of an interleaved header) as two f32 vectors.
    #[inline(always)]
    unsafe fn plane_f32(x: u64) -> [float32x4_t; 2] {
        let w = vmovl_u8(vcreate_u8(x));
        [
            vcvtq_f32_u32(vmovl_u16(vget_low_u16(w))),
            vcvtq_f32_u32(vmovl_high_u16(w)),
        ]
    }

    /// Eight rows' signed bytes (a plane) as two i32 vectors.
    #[inline(always)]
    unsafe fn plane_i32(x: u64) -> [int32x4_t; 2] {
        let w = vmovl_s8(vreinterpret_s8_u64(vcreate_u64(x)));
        [vmovl_s16(vget_low_s16(w)), vmovl_high_s16(w)]
    }

    /// Byte `k` of eight rows as the eight bytes of a `u64`.
    #[inline(always)]
    unsafe fn plane(p: *const u8, k: usize) -> u64 {
        (p.add(8 * k) as *const u64).read_unaligned()
    }

    #[inline(always)]
    unsafe fn lanes<const A: usize>(acc: [[float32x4_t; 2]; A]) -> [[f32; 8]; A] {
        let mut out = [[0f32; 8]; A];
        for k in 0..A {
            vst1q_f32(out[k].as_mut_ptr(), acc[k][0]);
            vst1q_f32(out[k].as_mut_ptr().add(4), acc[k][1]);
        }
        out
    }

    /// Eight interleaved rows of 4-bit values: per run `s`, low nibbles are values `4s..4s + 4`,
    /// high nibbles `16 + 4s..`. Sums stay in 16 bits over a block on plain NEON (at most
    /// 8 · 2 · 15 · 127 = 30,480).
    ///
    /// With `FIVE` (Q5_0, Q5_1), each byte's fifth bit comes from the rows' reordered high bits
    /// ([`crate::ops::quant::q5_spread`]): for run `r` that word shifted by `4 − r` (left, or
    /// right where negative) and masked to bit 4 of each byte. The 16-bit sums then take two
    /// runs at a time (2 · 2 · 2 · 31 · 127 = 31,496).
    #[inline(always)]
    unsafe fn q4_x8<const A: usize, const HAS_MIN: bool, const FIVE: bool, D: IntDot>(
        grp: *const u8,
        ap: [*const ActBlock; A],
        nb: usize,
    ) -> [[f32; 8]; A] {
        let hdr = if HAS_MIN { 32 } else { 16 } + if FIVE { 32 } else { 0 };
        let bytes = hdr + 128;
        let mask = vdupq_n_u8(0x0F);
        let bit4 = vdupq_n_u8(0x10);
        let runs = if FIVE { 2 } else { 4 };
        let mut acc = [[vdupq_n_f32(0.0); 2]; A];
        for b in 0..nb {
            let p = grp.add(b * bytes);
            let d = f16x8(p);
            let m = if HAS_MIN {
                f16x8(p.add(16))
            } else {
                let f = if FIVE { -16.0 } else { -8.0 };
                [vmulq_n_f32(d[0], f), vmulq_n_f32(d[1], f)]
            };
            let mut isum = [[vdupq_n_s32(0); 2]; A];
            for h in 0..2 {
                let qh = if FIVE {
                    vreinterpretq_u32_u8(run16(p.add(hdr - 32), h))
                } else {
                    vdupq_n_u32(0)
                };
                let high = |r: usize| {
                    let x = vshlq_u32(qh, vdupq_n_s32(4 - r as i32));
                    vandq_u8(vreinterpretq_u8_u32(x), bit4)
                };
                for s0 in (0..4).step_by(runs) {
                    let mut part = [vdupq_n_s32(0); A];
                    for s in s0..s0 + runs {
                        let q = run16(p.add(hdr + 32 * s), h);
                        let (mut lo, mut hi) = (vandq_u8(q, mask), vshrq_n_u8::<4>(q));
                        if FIVE {
                            lo = vorrq_u8(lo, high(s));
                            hi = vorrq_u8(hi, high(s + 4));
                        }
                        let (lo, hi) = (vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi));
                        for k in 0..A {
                            let ab = &*ap[k].add(b);
                            part[k] = D::add(part[k], lo, bcast4(ab, 4 * s));
                            part[k] = D::add(part[k], hi, bcast4(ab, 16 + 4 * s));
                        }
                    }
                    for k in 0..A {
                        isum[k][h] = vaddq_s32(isum[k][h], D::finish(part[k]));
                    }
                }
            }
            for k in 0..A {
                let ab = &*ap[k].add(b);
                for h in 0..2 {
                    let dot = vcvtq_f32_s32(isum[k][h]);
                    acc[k][h] = vfmaq_f32(acc[k][h], vmulq_n_f32(d[h], ab.d), dot);
                    acc[k][h] = vfmaq_n_f32(acc[k][h], m[h], ab.s);
                }
            }
        }
        lanes(acc)
    }

    /// Eight interleaved Q8_0 rows: eight runs of 32 bytes, four values per row each.
    #[inline(always)]
    unsafe fn q8_0_x8<const A: usize, D: IntDot>(
        grp: *const u8,
        ap: [*const ActBlock; A],
        nb: usize,
    ) -> [[f32; 8]; A] {
        let mut acc = [[vdupq_n_f32(0.0); 2]; A];
        for b in 0..nb {
            let p = grp.add(b * 272);
            let d = f16x8(p);
            let mut isum = [[vdupq_n_s32(0); 2]; A];
            for s in 0..8 {
                for h in 0..2 {
                    let q = vreinterpretq_s8_u8(run16(p.add(16 + 32 * s), h));
                    for k in 0..A {
                        let ab = &*ap[k].add(b);
                        isum[k][h] = D::add32(isum[k][h], q, bcast4(ab, 4 * s));
                    }
                }
            }
            for k in 0..A {
                let ab = &*ap[k].add(b);
                for h in 0..2 {
                    let dot = vcvtq_f32_s32(isum[k][h]);
                    acc[k][h] = vfmaq_f32(acc[k][h], vmulq_n_f32(d[h], ab.d), dot);
                }
            }
        }
        lanes(acc)
    }

    /// Eight interleaved Q4_K rows: scales, mins and the packed 6-bit sub-scales of all eight
    /// rows (decoded eight bytes to a `u64`), then sub-blocks `2p` (low nibbles) and `2p + 1`
    /// (high nibbles) in runs of four per row, summed in 16 bits over a sub-block on plain NEON.
    #[inline(always)]
    unsafe fn q4k_x8<const A: usize, const FIVE: bool, D: IntDot>(
        grp: *const u8,
        ap: [*const ActBlock; A],
        nb: usize,
    ) -> [[f32; 8]; A] {
        const LO6: u64 = 0x3F3F_3F3F_3F3F_3F3F;
        const LO4: u64 = 0x0F0F_0F0F_0F0F_0F0F;
        const LO2: u64 = 0x0303_0303_0303_0303;
        let mask = vdupq_n_u8(0x0F);
        let mut acc = [[vdupq_n_f32(0.0); 2]; A];
        for b in 0..nb {
            let p = grp.add(b * if FIVE { 1408 } else { 1152 });
            let d = f16x8(p);
            let dmin = f16x8(p.add(16));
            let pl = p.add(32);
            let scale_min = |j: usize| -> (u64, u64) {
                if j < 4 {
                    (plane(pl, j) & LO6, plane(pl, j + 4) & LO6)
                } else {
                    (
                        (plane(pl, j + 4) & LO4) | (((plane(pl, j - 4) >> 6) & LO2) << 4),
                        ((plane(pl, j + 4) >> 4) & LO4) | (((plane(pl, j) >> 6) & LO2) << 4),
                    )
                }
            };
            for pair in 0..4 {
                let mut lo_sum = [[vdupq_n_s32(0); 2]; A];
                let mut hi_sum = [[vdupq_n_s32(0); 2]; A];
                let q0 = p.add(if FIVE { 384 } else { 128 } + 256 * pair);
                // Q5_K's values reach 31: four runs at a time in 16 bits (4 · 2 · 31 · 127).
                let runs = if FIVE { 4 } else { 8 };
                for t0 in (0..8).step_by(runs) {
                    let mut lo_part = [[vdupq_n_s32(0); 2]; A];
                    let mut hi_part = [[vdupq_n_s32(0); 2]; A];
                    for t in t0..t0 + runs {
                        for h in 0..2 {
                            let q = run16(q0.add(32 * t), h);
                            let (mut lo, mut hi) = (vandq_u8(q, mask), vshrq_n_u8::<4>(q));
                            if FIVE {
                                // Bits 2p and 2p + 1 of the high-bit bytes, moved to bit 4.
                                let hb = vreinterpretq_u32_u8(run16(p.add(128 + 32 * t), h));
                                let at = |bit: usize| {
                                    let x = vshlq_u32(hb, vdupq_n_s32(4 - bit as i32));
                                    vandq_u8(vreinterpretq_u8_u32(x), vdupq_n_u8(0x10))
                                };
                                lo = vorrq_u8(lo, at(2 * pair));
                                hi = vorrq_u8(hi, at(2 * pair + 1));
                            }
                            let (lo, hi) = (vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi));
                            for k in 0..A {
                                let a0 = &*ap[k].add(b * 8 + 2 * pair);
                                let a1 = &*ap[k].add(b * 8 + 2 * pair + 1);
                                lo_part[k][h] = D::add(lo_part[k][h], lo, bcast4(a0, 4 * t));
                                hi_part[k][h] = D::add(hi_part[k][h], hi, bcast4(a1, 4 * t));
                            }
                        }
                    }
                    for k in 0..A {
                        for h in 0..2 {
                            lo_sum[k][h] = vaddq_s32(lo_sum[k][h], D::finish(lo_part[k][h]));
                            hi_sum[k][h] = vaddq_s32(hi_sum[k][h], D::finish(hi_part[k][h]));
                        }
                    }
                }
                for (half, sums) in [lo_sum, hi_sum].iter().enumerate() {
                    let sub = 2 * pair + half;
                    let (sc, mn) = scale_min(sub);
                    let (sc, mn) = (plane_f32(sc), plane_f32(mn));
                    for k in 0..A {
                        let ab = &*ap[k].add(b * 8 + sub);
                        for h in 0..2 {
                            let scale = vmulq_f32(d[h], sc[h]);
                            let min = vmulq_f32(dmin[h], mn[h]);
                            let dot = vcvtq_f32_s32(sums[k][h]);
                            let f = vmulq_n_f32(scale, ab.d);
                            acc[k][h] = vfmaq_f32(acc[k][h], f, dot);
                            acc[k][h] = vfmsq_f32(acc[k][h], min, vdupq_n_f32(ab.s));
                        }
                    }
                }
            }
        }
        lanes(acc)
    }

    /// Eight interleaved Q6_K rows (layout in `super::slot_map`). Values are 0..63, stored
    /// minus 32: Σ (q − 32)·x = Σ q·x − 32 Σ x, with Σ x per 16 values kept in the activation
    /// blocks. Per 16 values (one sub-scale) the four runs' products are summed in 32 bits
    /// (two runs at a time in 16 bits on plain NEON: at most 2 · 2 · 63 · 127 = 32,004), scaled
    /// by the rows' sub-scales, and a chunk's total (two sub-blocks) converted to f32.
    #[inline(always)]
    unsafe fn q6k_x8<const A: usize, D: IntDot>(
        grp: *const u8,
        ap: [*const ActBlock; A],
        nb: usize,
    ) -> [[f32; 8]; A] {
        let m4 = vdupq_n_u8(0x0F);
        let m2 = vdupq_n_u8(0x03);
        let mut acc = [[vdupq_n_f32(0.0); 2]; A];
        for b in 0..nb {
            let p = grp.add(b * 1680);
            let d = f16x8(p);
            for n in 0..2 {
                for hb in 0..2 {
                    // Chunk `c0` in the low nibbles, `c1` in the high; their high bits at
                    // shifts 2·hb and 2·hb + 4 of the high-bit bytes.
                    let (c0, c1) = (4 * n + hb, 4 * n + hb + 2);
                    let mut i0 = [[vdupq_n_s32(0); 2]; A];
                    let mut i1 = [[vdupq_n_s32(0); 2]; A];
                    for half in 0..2 {
                        let sc0 = plane_i32(plane(p.add(16), 2 * c0 + half));
                        let sc1 = plane_i32(plane(p.add(16), 2 * c1 + half));
                        for h in 0..2 {
                            let mut s0 = [vdupq_n_s32(0); A];
                            let mut s1 = [vdupq_n_s32(0); A];
                            for pair in 0..2 {
                                let mut x0 = [vdupq_n_s32(0); A];
                                let mut x1 = [vdupq_n_s32(0); A];
                                for u in 0..2 {
                                    let t = 4 * half + 2 * pair + u;
                                    let slot = q6k_slot(t);
                                    let ql = run16(p.add(q6k_low_at(n, hb) + 32 * slot), h);
                                    let qh = run16(p.add(q6k_high_at(n) + 32 * slot), h);
                                    let qh = vshlq_u8(qh, vdupq_n_s8(-2 * hb as i8));
                                    let q0 = vorrq_u8(
                                        vandq_u8(ql, m4),
                                        vshlq_n_u8::<4>(vandq_u8(qh, m2)),
                                    );
                                    let q1 = vorrq_u8(
                                        vshrq_n_u8::<4>(ql),
                                        vshlq_n_u8::<4>(vandq_u8(vshrq_n_u8::<4>(qh), m2)),
                                    );
                                    let (q0, q1) =
                                        (vreinterpretq_s8_u8(q0), vreinterpretq_s8_u8(q1));
                                    let at = 16 * half + 4 * (2 * pair + u);
                                    for k in 0..A {
                                        let a0 = &*ap[k].add(b * 8 + c0);
                                        let a1 = &*ap[k].add(b * 8 + c1);
                                        x0[k] = D::add(x0[k], q0, bcast4(a0, at));
                                        x1[k] = D::add(x1[k], q1, bcast4(a1, at));
                                    }
                                }
                                for k in 0..A {
                                    s0[k] = vaddq_s32(s0[k], D::finish(x0[k]));
                                    s1[k] = vaddq_s32(s1[k], D::finish(x1[k]));
                                }
                            }
                            for k in 0..A {
                                let a0 = &*ap[k].add(b * 8 + c0);
                                let a1 = &*ap[k].add(b * 8 + c1);
                                let o0 =
                                    vsubq_s32(s0[k], vdupq_n_s32(32 * a0.half_sums[half] as i32));
                                let o1 =
                                    vsubq_s32(s1[k], vdupq_n_s32(32 * a1.half_sums[half] as i32));
                                i0[k][h] = vmlaq_s32(i0[k][h], o0, sc0[h]);
                                i1[k][h] = vmlaq_s32(i1[k][h], o1, sc1[h]);
                            }
                        }
                    }
                    for k in 0..A {
                        let a0 = &*ap[k].add(b * 8 + c0);
                        let a1 = &*ap[k].add(b * 8 + c1);
                        for h in 0..2 {
                            let f0 = vmulq_n_f32(d[h], a0.d);
                            let f1 = vmulq_n_f32(d[h], a1.d);
                            acc[k][h] = vfmaq_f32(acc[k][h], f0, vcvtq_f32_s32(i0[k][h]));
                            acc[k][h] = vfmaq_f32(acc[k][h], f1, vcvtq_f32_s32(i1[k][h]));
                        }
                    }
                }
            }
        }
        lanes(acc)
    }
}
