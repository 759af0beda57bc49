//! The portable kernels: one weight row against one activation row, block by block, in plain
//! Rust. The reference for the SIMD paths and the path for CPUs without them.

use super::{f16_at, q4k_scale_min, ActBlock, QKind, QK};

/// Dot product of one weight row (GGUF blocks) with one quantised activation row.
pub fn dot(kind: QKind, w: &[u8], a: &[ActBlock]) -> f32 {
    match kind {
        QKind::Q4_0 => q4_0(w, a),
        QKind::Q4_1 => q4_1(w, a),
        QKind::Q5_0 => q5::<false>(w, a),
        QKind::Q5_1 => q5::<true>(w, a),
        QKind::Q8_0 => q8_0(w, a),
        QKind::Q4K => q4k::<false>(w, a),
        QKind::Q5K => q4k::<true>(w, a),
        QKind::Q6K => q6k(w, a),
    }
}

/// `Σ (nibbles of qs) · a`, low nibbles against values 0..16, high against 16..32.
fn nibble_dot(qs: &[u8], a: &[i8; QK]) -> i32 {
    let mut s = 0i32;
    for i in 0..16 {
        s += (qs[i] & 0xF) as i32 * a[i] as i32 + (qs[i] >> 4) as i32 * a[i + 16] as i32;
    }
    s
}

fn q4_0(w: &[u8], a: &[ActBlock]) -> f32 {
    let mut acc = 0f32;
    for (b, ab) in w.chunks_exact(18).zip(a) {
        let d = f16_at(b, 0);
        // Values are q - 8: Σ (q - 8) a = Σ q a - 8 Σ a.
        acc += d * (ab.d * nibble_dot(&b[2..18], &ab.qs) as f32 - 8.0 * ab.s);
    }
    acc
}

fn q4_1(w: &[u8], a: &[ActBlock]) -> f32 {
    let mut acc = 0f32;
    for (b, ab) in w.chunks_exact(20).zip(a) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        acc += d * ab.d * nibble_dot(&b[4..20], &ab.qs) as f32 + m * ab.s;
    }
    acc
}

/// Q5_0 (`d·(q − 16)`) and Q5_1 (`HAS_MIN`: `d·q + m`): four low bits as in Q4, the fifth
/// bit of value `j` bit `j` of the 32-bit `qh` after the scales.
fn q5<const HAS_MIN: bool>(w: &[u8], a: &[ActBlock]) -> f32 {
    let (bytes, sb) = if HAS_MIN { (24, 4) } else { (22, 2) };
    let mut acc = 0f32;
    for (b, ab) in w.chunks_exact(bytes).zip(a) {
        let d = f16_at(b, 0);
        let qh = u32::from_le_bytes(b[sb..sb + 4].try_into().expect("four bytes"));
        let mut high = 0i32;
        for (j, &x) in ab.qs.iter().enumerate() {
            high += ((qh >> j) & 1) as i32 * 16 * x as i32;
        }
        let s = nibble_dot(&b[sb + 4..bytes], &ab.qs) + high;
        acc += if HAS_MIN {
            d * ab.d * s as f32 + f16_at(b, 2) * ab.s
        } else {
            d * (ab.d * s as f32 - 16.0 * ab.s)
        };
    }
    acc
}

fn q8_0(w: &[u8], a: &[ActBlock]) -> f32 {
    let mut acc = 0f32;
    for (b, ab) in w.chunks_exact(34).zip(a) {
        let d = f16_at(b, 0);
        let s: i32 = b[2..34]
            .iter()
            .zip(&ab.qs)
            .map(|(&q, &x)| q as i8 as i32 * x as i32)
            .sum();
        acc += d * ab.d * s as f32;
    }
    acc
}

/// Q4_K, and Q5_K (`FIVE`): the same sub-blocks with a fifth bit per value, bit `j` of
/// high-bit byte `l` for value `l` of sub-block `j`.
fn q4k<const FIVE: bool>(w: &[u8], a: &[ActBlock]) -> f32 {
    let (bytes, qs_at) = if FIVE { (176, 48) } else { (144, 16) };
    let mut acc = 0f32;
    for (b, ab) in w.chunks_exact(bytes).zip(a.chunks_exact(8)) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let scales = &b[4..16];
        let qh = if FIVE { &b[16..48] } else { &[0u8; 32][..] };
        let qs = &b[qs_at..bytes];
        for (j, ab) in ab.iter().enumerate() {
            let (sc, m) = q4k_scale_min(j, scales);
            // Sub-blocks 2i and 2i+1 share 32 bytes: low nibbles, then high nibbles.
            let q = &qs[32 * (j / 2)..][..32];
            let shift = 4 * (j % 2);
            let s: i32 = q
                .iter()
                .zip(qh)
                .zip(&ab.qs)
                .map(|((&q, &h), &x)| {
                    let v = ((q >> shift) & 0xF) | (((h >> j) & 1) << 4);
                    v as i32 * x as i32
                })
                .sum();
            acc += d * sc as f32 * ab.d * s as f32 - dmin * m as f32 * ab.s;
        }
    }
    acc
}

/// Q6_K's 6-bit value `l` (0..32) of chunk `c` (0..8, 32 values each) of a super-block.
#[inline(always)]
pub(super) fn q6k_value(ql: &[u8], qh: &[u8], c: usize, l: usize) -> i32 {
    let (n, t) = (c / 4, c % 4);
    let lo = ql[64 * n + 32 * (t % 2) + l];
    let lo = if t < 2 { lo & 0xF } else { lo >> 4 };
    let hi = (qh[32 * n + l] >> (2 * t)) & 3;
    (lo | (hi << 4)) as i32
}

fn q6k(w: &[u8], a: &[ActBlock]) -> f32 {
    let mut acc = 0f32;
    for (b, ab) in w.chunks_exact(210).zip(a.chunks_exact(8)) {
        let (ql, qh, sc) = (&b[..128], &b[128..192], &b[192..208]);
        let d = f16_at(b, 208);
        for (c, ab) in ab.iter().enumerate() {
            let mut s = [0i32; 2];
            for l in 0..QK {
                s[l / 16] += (q6k_value(ql, qh, c, l) - 32) * ab.qs[l] as i32;
            }
            let isum = sc[2 * c] as i8 as i32 * s[0] + sc[2 * c + 1] as i8 as i32 * s[1];
            acc += d * ab.d * isum as f32;
        }
    }
    acc
}
