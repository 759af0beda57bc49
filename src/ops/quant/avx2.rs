//! AVX2 + FMA + F16C kernels, chosen at run time, and their VNNI variants (AVX-VNNI, or
//! AVX-512 VNNI on 256-bit registers) for the interleaved formats.
//!
//! Each kernel computes an `R × A` tile: `R` weight rows against `A` activation rows, all
//! accumulators in registers. A weight block is unpacked once and multiplied into every
//! activation row of the tile (`_mm256_maddubs_epi16`, or `vpdpbusd` with VNNI: unsigned
//! weight nibbles × signed 8-bit activations), then the integer sums are scaled and
//! accumulated in f32 lanes.

use super::{Isa, QActs, QKind, QWeight};

/// AVX-512 (F, and VNNI on 256-bit registers with VL) besides AVX2: `vpdpbusd` for the
/// interleaved kernels' integer sums, 512-bit attention (its 8-bit kernels: BW and VNNI).
pub fn avx512_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        supported()
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AVX-VNNI (the VEX-encoded `vpdpbusd`, without AVX-512) besides AVX2.
pub fn avx_vnni_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        supported() && std::arch::is_x86_feature_detected!("avxvnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Fill `res[i][k]` with the dot products of weight rows `r + i` (`i < rr`) and activation rows
/// `j + k` (`k < a`); `rr` is 1, 2 or 4 and `a` 1..=4, with `rr == 4` only when `a == 1`.
#[allow(clippy::too_many_arguments)]
pub fn tile(
    w: &QWeight,
    r: usize,
    rr: usize,
    acts: &QActs,
    j: usize,
    a: usize,
    res: &mut [[f32; 4]; 4],
) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(supported());
        // SAFETY: the CPU has AVX2, FMA and F16C (checked above); pointers come from rows
        // of matching width, read for `nb` blocks.
        unsafe { x86::tile(w, r, rr, acts, j, a, res) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w, r, rr, acts, j, a, res);
        unreachable!("AVX2 kernels on a non-x86 CPU")
    }
}

/// Fill `res[k]` with the dot products of the eight rows of interleaved group `g` and
/// activation row `j + k` (`k < a`, `a` 1..=4), with the integer sums of `isa` (one of the
/// AVX2 family).
pub fn tile_x8(
    w: &QWeight,
    g: usize,
    acts: &QActs,
    j: usize,
    a: usize,
    isa: Isa,
    res: &mut [[f32; 8]; 4],
) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(match isa {
            Isa::Avx2 => supported(),
            Isa::AvxVnni => avx_vnni_supported(),
            Isa::Avx512 => avx512_supported(),
            _ => false,
        });
        // SAFETY: as for `tile`, and the instruction set checked above; the group holds `nb`
        // interleaved blocks.
        unsafe { x86::tile_x8(w, g, acts, j, a, isa, res) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w, g, acts, j, a, isa, res);
        unreachable!("AVX2 kernels on a non-x86 CPU")
    }
}

/// Whether `kind` has the AVX-512 kernels that take two interleaved groups at once
/// ([`tile_x16`]).
pub fn pairs_groups(kind: QKind) -> bool {
    kind.interleaves() && kind != QKind::Q6K
}

/// Fill `res[k]` with the dot products of the sixteen rows of interleaved groups `g` and
/// `g + 1` and activation row `j + k` (`k < a`, `a` 1..=4), on 512-bit registers.
pub fn tile_x16(w: &QWeight, g: usize, acts: &QActs, j: usize, a: usize, res: &mut [[f32; 16]; 4]) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(avx512_supported() && pairs_groups(w.kind));
        // SAFETY: the CPU has AVX-512F, VL and VNNI besides AVX2 (checked above); both groups
        // hold `nb` interleaved blocks.
        unsafe { x86::tile_x16(w, g, acts, j, a, res) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w, g, acts, j, a, res);
        unreachable!("AVX-512 kernels on a non-x86 CPU")
    }
}

#[cfg(target_arch = "x86_64")]
mod rows;

#[cfg(target_arch = "x86_64")]
mod wide;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::rows::{q4_0, q4_1, q4k, q6k, q8_0};
    use super::*;
    use crate::ops::quant::{ActBlock, QKind, QK};

    /// The K formats' kernels.
    mod kquants;
    pub(super) use kquants::q4k_scale_min;
    use kquants::{q4k_x8, q5k_x8, q6k_x8};

    /// `$go!($($arg,)* A)` for the `$a` (1..=4) activation rows of a tile, `A` a literal.
    macro_rules! by_rows {
        ($a:expr, $go:ident $(, $arg:tt)*) => {
            match $a {
                1 => $go!($($arg,)* 1),
                2 => $go!($($arg,)* 2),
                3 => $go!($($arg,)* 3),
                4 => $go!($($arg,)* 4),
                a => unreachable!("{a} activation rows"),
            }
        };
    }

    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile(
        w: &QWeight,
        r: usize,
        rr: usize,
        acts: &QActs,
        j: usize,
        a: usize,
        res: &mut [[f32; 4]; 4],
    ) {
        let nb = w.cols / w.kind.block_len();
        macro_rules! go {
            ($kern:ident, $R:literal, $A:literal) => {{
                let wp: [*const u8; $R] = std::array::from_fn(|i| w.row(r + i).as_ptr());
                let ap: [*const ActBlock; $A] = std::array::from_fn(|k| acts.row(j + k).as_ptr());
                let out = $kern::<$R, $A>(wp, ap, nb);
                for i in 0..$R {
                    res[i][..$A].copy_from_slice(&out[i]);
                }
            }};
        }
        macro_rules! shapes {
            ($kern:ident) => {
                match (rr, a) {
                    (4, 1) => go!($kern, 4, 1),
                    (2, 1) => go!($kern, 2, 1),
                    (1, 1) => go!($kern, 1, 1),
                    (2, 2) => go!($kern, 2, 2),
                    (1, 2) => go!($kern, 1, 2),
                    (2, 3) => go!($kern, 2, 3),
                    (1, 3) => go!($kern, 1, 3),
                    (2, 4) => go!($kern, 2, 4),
                    (1, 4) => go!($kern, 1, 4),
                    _ => unreachable!("tile shape {rr}x{a}"),
                }
            };
        }
        match w.kind {
            QKind::Q4_0 => shapes!(q4_0),
            QKind::Q4_1 => shapes!(q4_1),
            QKind::Q5_0 | QKind::Q5_1 | QKind::Q5K => {
                unreachable!("Q5 rows in GGUF layout run portably")
            }
            QKind::Q8_0 => shapes!(q8_0),
            QKind::Q4K => shapes!(q4k),
            QKind::Q6K => shapes!(q6k),
        }
    }

    pub unsafe fn tile_x16(
        w: &QWeight,
        g: usize,
        acts: &QActs,
        j: usize,
        a: usize,
        res: &mut [[f32; 16]; 4],
    ) {
        let nb = w.cols / w.kind.block_len();
        let g0 = w.group(g).as_ptr();
        let g1 = w.group(g + 1).as_ptr();
        macro_rules! go {
            ($A:literal) => {{
                let ap: [*const ActBlock; $A] = std::array::from_fn(|k| acts.row(j + k).as_ptr());
                res[..$A].copy_from_slice(&super::wide::x16::<$A>(w.kind, g0, g1, ap, nb));
            }};
        }
        by_rows!(a, go);
    }

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
        if w.kind == QKind::Q6K && isa == Isa::Avx512 {
            macro_rules! wide {
                ($A:literal) => {{
                    let ap: [*const ActBlock; $A] =
                        std::array::from_fn(|k| acts.row(j + k).as_ptr());
                    res[..$A].copy_from_slice(&super::wide::q6k_x8::<$A>(grp, ap, nb));
                }};
            }
            by_rows!(a, wide);
            return;
        }
        macro_rules! go {
            ($kern:ty, $A:literal) => {{
                let ap: [*const ActBlock; $A] = std::array::from_fn(|k| acts.row(j + k).as_ptr());
                let out = match isa {
                    Isa::Avx512 => on_avx512::<$kern, $A>(grp, ap, nb),
                    Isa::AvxVnni => on_avx_vnni::<$kern, $A>(grp, ap, nb),
                    _ => on_avx2::<$kern, $A>(grp, ap, nb),
                };
                res[..$A].copy_from_slice(&out);
            }};
        }
        macro_rules! acts {
            ($kern:ty) => {
                by_rows!(a, go, $kern)
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

    /// Bytes ahead of the block in use that a kernel asks the caches for. A decode step's
    /// matrices are small (a task streams 20-300 KB), and the hardware prefetchers, which start
    /// afresh on each task's stream, left a core waiting for memory: asked ahead by 1 KB, the
    /// default model's decode step took 9-15% less time on an AMD Zen 3 (512 B or 2 KB: less).
    /// The AVX-512 kernels (`wide.rs`) ask the same way on both their groups' streams: on a
    /// Sapphire Rapids VM, decode 4-5% faster, Q6_K matrix × vector 25%.
    const PREFETCH_AHEAD: usize = 1024;

    /// Ask for the lines of the `bytes`-byte block [`PREFETCH_AHEAD`] bytes after `p` (reads
    /// past a matrix's end are only hints, never faults).
    #[inline(always)]
    pub(super) unsafe fn prefetch_ahead(p: *const u8, bytes: usize) {
        let ahead = p.wrapping_add(PREFETCH_AHEAD);
        for l in (0..bytes).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(l) as *const i8);
        }
    }

    /// How a kernel sums the products of unsigned weight bytes and signed activation bytes,
    /// four to each 32-bit lane.
    trait IntDot {
        /// Whether the weight bytes may take the whole range 0..=255 (no 16-bit saturation).
        const FULL_RANGE: bool;
        /// `s` plus the products of `w` and `x`, in this method's running-sum form.
        unsafe fn add(s: __m256i, w: __m256i, x: __m256i) -> __m256i;
        /// A running sum as eight i32 lanes.
        unsafe fn finish(s: __m256i) -> __m256i;
        /// `s` (i32 lanes) plus the products of `w` and `x`.
        unsafe fn add32(s: __m256i, w: __m256i, x: __m256i) -> __m256i;
    }

    /// AVX2: products summed in pairs into 16-bit lanes (`vpmaddubsw`); the running sum stays
    /// in 16 bits (callers keep it from overflowing) until `finish` pairs it into 32.
    struct Avx2Dot;

    impl IntDot for Avx2Dot {
        const FULL_RANGE: bool = false;
        #[inline(always)]
        unsafe fn add(s: __m256i, w: __m256i, x: __m256i) -> __m256i {
            _mm256_add_epi16(s, _mm256_maddubs_epi16(w, x))
        }
        #[inline(always)]
        unsafe fn finish(s: __m256i) -> __m256i {
            _mm256_madd_epi16(s, _mm256_set1_epi16(1))
        }
        #[inline(always)]
        unsafe fn add32(s: __m256i, w: __m256i, x: __m256i) -> __m256i {
            _mm256_add_epi32(s, Self::finish(_mm256_maddubs_epi16(w, x)))
        }
    }

    /// VNNI: one `vpdpbusd` sums four products into each 32-bit lane (`$dp`: the AVX-512
    /// encoding or the VEX one).
    macro_rules! vnni_dot {
        ($name:ident, $dp:ident) => {
            struct $name;

            impl IntDot for $name {
                const FULL_RANGE: bool = true;
                #[inline(always)]
                unsafe fn add(s: __m256i, w: __m256i, x: __m256i) -> __m256i {
                    $dp(s, w, x)
                }
                #[inline(always)]
                unsafe fn finish(s: __m256i) -> __m256i {
                    s
                }
                #[inline(always)]
                unsafe fn add32(s: __m256i, w: __m256i, x: __m256i) -> __m256i {
                    $dp(s, w, x)
                }
            }
        };
    }
    vnni_dot!(Avx512Dot, _mm256_dpbusd_epi32);
    vnni_dot!(AvxVnniDot, _mm256_dpbusd_avx_epi32);

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
    x8!(Q4K, |g, a, n| q4k_x8::<A, D>(g, a, n));
    x8!(Q5K, |g, a, n| q5k_x8::<A, D>(g, a, n));
    // Q6_K's sums are scaled per 16 values in 16-bit lanes: AVX2's way either way (with
    // AVX-512, `wide::q6k_x8` runs instead).
    x8!(Q6K, |g, a, n| q6k_x8::<A>(g, a, n));

    /// An entry point compiled for one instruction set, where a kernel body and its summing
    /// method are inlined.
    macro_rules! entry {
        ($name:ident, $features:literal, $dot:ty) => {
            #[target_feature(enable = $features)]
            unsafe fn $name<K: X8, const A: usize>(
                grp: *const u8,
                ap: [*const ActBlock; A],
                nb: usize,
            ) -> [[f32; 8]; A] {
                K::run::<A, $dot>(grp, ap, nb)
            }
        };
    }
    entry!(on_avx2, "avx2,fma,f16c", Avx2Dot);
    entry!(on_avx_vnni, "avx2,fma,f16c,avxvnni", AvxVnniDot);
    entry!(
        on_avx512,
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        Avx512Dot
    );

    /// The eight lanes of each accumulator (one per interleaved row).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn lanes<const A: usize>(acc: [__m256; A]) -> [[f32; 8]; A] {
        let mut out = [[0f32; 8]; A];
        for k in 0..A {
            _mm256_storeu_ps(out[k].as_mut_ptr(), acc[k]);
        }
        out
    }

    /// Four activation bytes `at..at + 4`, repeated in every 32-bit lane.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn bcast4(ab: &ActBlock, at: usize) -> __m256i {
        _mm256_set1_epi32((ab.qs.as_ptr().add(at) as *const i32).read_unaligned())
    }

    /// Eight interleaved rows of 4-bit values against `A` activation rows. Each 32-byte run
    /// holds, per row (32-bit lane), four bytes: low nibbles are values `4s..4s + 4`, high
    /// nibbles `16 + 4s..`. Products are summed in 16-bit lanes over the whole block (at most
    /// 8 · 2 · 15 · 127 = 30,480, no overflow), then once in 32 bits.
    ///
    /// With `FIVE` (Q5_0, Q5_1), each byte's fifth bit (bit 4) comes from the rows' reordered
    /// high bits ([`crate::ops::quant::q5_spread`]): for run `r`, that word shifted left by
    /// `4 − r` (or right by `r − 4`) and masked to bit 4 of each byte. The 16-bit sums then
    /// take two runs at a time (2 · 2 · 2 · 31 · 127 = 31,496).
    #[inline(always)]
    unsafe fn q4_x8<const A: usize, const HAS_MIN: bool, const FIVE: bool, D: IntDot>(
        grp: *const u8,
        ap: [*const ActBlock; A],
        nb: usize,
    ) -> [[f32; 8]; A] {
        let hdr = if HAS_MIN { 32 } else { 16 } + if FIVE { 32 } else { 0 };
        let bytes = hdr + 128;
        let mask = _mm256_set1_epi8(0x0F);
        let bit4 = _mm256_set1_epi8(0x10);
        let count = |n: usize| _mm_cvtsi32_si128(n as i32);
        let runs = if FIVE { 2 } else { 4 };
        let mut acc = [_mm256_setzero_ps(); A];
        for b in 0..nb {
            let p = grp.add(b * bytes);
            prefetch_ahead(p, bytes);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
            let m = if HAS_MIN {
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i))
            } else {
                _mm256_mul_ps(d, _mm256_set1_ps(if FIVE { -16.0 } else { -8.0 }))
            };
            let qh = if FIVE {
                _mm256_loadu_si256(p.add(hdr - 32) as *const __m256i)
            } else {
                _mm256_setzero_si256()
            };
            let mut isum = [_mm256_setzero_si256(); A];
            for s0 in (0..4).step_by(runs) {
                let mut part = [_mm256_setzero_si256(); A];
                for s in s0..s0 + runs {
                    let q = _mm256_loadu_si256(p.add(hdr + 32 * s) as *const __m256i);
                    let mut lo = _mm256_and_si256(q, mask);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), mask);
                    if FIVE {
                        let hl = _mm256_sll_epi32(qh, count(4 - s));
                        let hh = _mm256_srl_epi32(qh, count(s));
                        lo = _mm256_or_si256(lo, _mm256_and_si256(hl, bit4));
                        hi = _mm256_or_si256(hi, _mm256_and_si256(hh, bit4));
                    }
                    for k in 0..A {
                        let ab = &*ap[k].add(b);
                        part[k] = D::add(part[k], lo, bcast4(ab, 4 * s));
                        part[k] = D::add(part[k], hi, bcast4(ab, 16 + 4 * s));
                    }
                }
                for k in 0..A {
                    isum[k] = _mm256_add_epi32(isum[k], D::finish(part[k]));
                }
            }
            for k in 0..A {
                let ab = &*ap[k].add(b);
                let dot = _mm256_cvtepi32_ps(isum[k]);
                acc[k] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(ab.d)), dot, acc[k]);
                acc[k] = _mm256_fmadd_ps(m, _mm256_set1_ps(ab.s), acc[k]);
            }
        }
        lanes(acc)
    }

    /// Eight interleaved Q8_0 rows: eight runs of 32 bytes, four values per row each.
    ///
    /// With VNNI the signed weights are made unsigned by flipping their top bit (`q + 128`),
    /// and the sums start from `-128 Σ x`: one instruction per run and activation row. AVX2's
    /// `maddubs` would saturate on that range, so there each activation takes the weight's
    /// sign and the weight its magnitude (two instructions per run and row). Both give the
    /// exact integer sums.
    #[inline(always)]
    unsafe fn q8_0_x8<const A: usize, D: IntDot>(
        grp: *const u8,
        ap: [*const ActBlock; A],
        nb: usize,
    ) -> [[f32; 8]; A] {
        let mut acc = [_mm256_setzero_ps(); A];
        for b in 0..nb {
            let p = grp.add(b * 272);
            prefetch_ahead(p, 272);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
            let mut isum: [__m256i; A] = std::array::from_fn(|k| {
                let hs = (*ap[k].add(b)).half_sums;
                if D::FULL_RANGE {
                    _mm256_set1_epi32(-128 * (hs[0] as i32 + hs[1] as i32))
                } else {
                    _mm256_setzero_si256()
                }
            });
            for s in 0..8 {
                let q = _mm256_loadu_si256(p.add(16 + 32 * s) as *const __m256i);
                if D::FULL_RANGE {
                    let qu = _mm256_xor_si256(q, _mm256_set1_epi8(-128));
                    for k in 0..A {
                        isum[k] = D::add32(isum[k], qu, bcast4(&*ap[k].add(b), 4 * s));
                    }
                } else {
                    let qa = _mm256_sign_epi8(q, q);
                    for k in 0..A {
                        let x = _mm256_sign_epi8(bcast4(&*ap[k].add(b), 4 * s), q);
                        isum[k] = D::add32(isum[k], qa, x);
                    }
                }
            }
            for k in 0..A {
                let ab = &*ap[k].add(b);
                let dot = _mm256_cvtepi32_ps(isum[k]);
                acc[k] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(ab.d)), dot, acc[k]);
            }
        }
        lanes(acc)
    }

    #[allow(dead_code)]
    const _: () = assert!(QK == 32);
}
