//! Quantised matrix multiplication on the CPU: GGUF weight blocks (Q4_0, Q4_1, Q5_0, Q5_1,
//! Q8_0, Q4_K, Q5_K, Q6_K) times activations quantised once per step to 8-bit blocks of 32.
//!
//! The weights stay in the GGUF file's block layout (no repacking, no extra memory). The
//! activations of a step are quantised once ([`QActs`]) and read by every weight matrix that
//! takes that input (Q, K and V; gate and up). Integer dot products per block of 32 are scaled
//! to f32 and summed, as llama.cpp does.
//!
//! Kernels: AVX2+FMA+F16C, the same with AVX-VNNI's or AVX-512 VNNI's integer dot products
//! (chosen at run time), and a portable scalar path; [`set_isa`] forces
//! one, so tests cover every path the machine has. Both shapes are served by one tiled driver:
//! matrix × vector for a single decode stream (four weight rows per pass, for independent
//! accumulators) and matrix × small matrix for batches and prefill chunks (each weight block is
//! loaded once and used for up to four activation rows). Work is split by output rows (and by
//! activation rows for long prefill chunks) on candle's persistent thread pool.

mod acts;
mod avx2;
pub(crate) mod neon;
mod portable;

pub use acts::{ActBlock, QActs};

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;

/// Values per activation block (and per block of the 32-value weight formats).
pub const QK: usize = 32;
/// Values per super-block of the K formats.
pub const QK_K: usize = 256;

/// The GGUF block formats we have kernels for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QKind {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl QKind {
    /// Every format with kernels here (tests and benches go through them all).
    pub const ALL: [QKind; 8] = [
        QKind::Q4_0,
        QKind::Q4_1,
        QKind::Q5_0,
        QKind::Q5_1,
        QKind::Q8_0,
        QKind::Q4K,
        QKind::Q5K,
        QKind::Q6K,
    ];

    /// The GGUF type this is.
    pub fn ggml(self) -> GgmlDType {
        match self {
            QKind::Q4_0 => GgmlDType::Q4_0,
            QKind::Q4_1 => GgmlDType::Q4_1,
            QKind::Q5_0 => GgmlDType::Q5_0,
            QKind::Q5_1 => GgmlDType::Q5_1,
            QKind::Q8_0 => GgmlDType::Q8_0,
            QKind::Q4K => GgmlDType::Q4K,
            QKind::Q5K => GgmlDType::Q5K,
            QKind::Q6K => GgmlDType::Q6K,
        }
    }

    pub fn from_ggml(t: GgmlDType) -> Option<QKind> {
        QKind::ALL.into_iter().find(|k| k.ggml() == t)
    }

    /// Values per block.
    pub fn block_len(self) -> usize {
        match self {
            QKind::Q4_0 | QKind::Q4_1 | QKind::Q5_0 | QKind::Q5_1 | QKind::Q8_0 => QK,
            QKind::Q4K | QKind::Q5K | QKind::Q6K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            QKind::Q4_0 => 18,
            QKind::Q4_1 => 20,
            QKind::Q5_0 => 22,
            QKind::Q5_1 => 24,
            QKind::Q8_0 => 34,
            QKind::Q4K => 144,
            QKind::Q5K => 176,
            QKind::Q6K => 210,
        }
    }
}

/// A weight matrix `[rows, cols]` (output features × input features) in GGUF blocks.
///
/// For the SIMD kernels, the rows are stored interleaved in groups of
/// eight ([`GROUP`]): per block, the eight rows' scales side by side, then their values four
/// at a time, row after row. One 32-byte load then feeds eight rows at once, each 32-bit lane
/// one row, and the block's dot products come out as one vector with no horizontal sums. Rows
/// past the last full group stay in the file's layout. Same bytes, another order (and Q5's
/// 32 high bits of a block reordered within their word, [`q5_spread`]).
pub struct QWeight {
    pub kind: QKind,
    pub rows: usize,
    pub cols: usize,
    /// Rows `0..packed_rows` in the interleaved layout, then the rest in GGUF layout.
    packed_rows: usize,
    data: Vec<u8>,
}

/// Rows per interleaved group.
pub const GROUP: usize = 8;

impl QKind {
    /// Bytes of the eight rows' scales (and mins, and Q5's high bits) at the head of an
    /// interleaved block of the 32-value formats: where the runs of values start.
    fn group_header(self) -> usize {
        match self {
            QKind::Q4_1 => 32,
            QKind::Q5_0 => 48,
            QKind::Q5_1 => 64,
            _ => 16,
        }
    }

    /// Whether the model should use our kernels for this format rather than candle's. Q6_K's
    /// only on x86: there ours beat candle's for one activation row and for sixteen
    /// (benches/kernels.rs, on AVX2 and on AVX-512); the NEON and portable ones have not been
    /// timed against candle's.
    pub fn beats_candle(self) -> bool {
        self != QKind::Q6K || matches!(isa(), Isa::Avx2 | Isa::AvxVnni | Isa::Avx512)
    }

    /// Whether this format has the interleaved eight-row kernels (the fastest path).
    pub fn interleaves(self) -> bool {
        matches!(
            self,
            QKind::Q4_0
                | QKind::Q4_1
                | QKind::Q5_0
                | QKind::Q5_1
                | QKind::Q8_0
                | QKind::Q4K
                | QKind::Q5K
                | QKind::Q6K
        )
    }
}

impl QWeight {
    /// Take a 2-D quantised tensor whose format we have kernels for; `None` otherwise (the
    /// caller keeps candle's matmul for it). Interleaved when the kernels in use read that layout.
    pub fn from_qtensor(t: &QTensor) -> Option<QWeight> {
        let kind = QKind::from_ggml(t.dtype())?;
        let (rows, cols) = t.shape().dims2().ok()?;
        if !cols.is_multiple_of(kind.block_len()) {
            return None;
        }
        let data = t.data().ok()?.into_owned();
        let w = QWeight::from_bytes(kind, rows, cols, data)?;
        Some(if isa().interleaves() {
            w.interleaved()
        } else {
            w
        })
    }

    /// Wrap raw GGUF blocks; `None` when the shape and byte count disagree.
    pub fn from_bytes(kind: QKind, rows: usize, cols: usize, data: Vec<u8>) -> Option<QWeight> {
        if !cols.is_multiple_of(kind.block_len())
            || data.len() != rows * cols / kind.block_len() * kind.block_bytes()
        {
            return None;
        }
        Some(QWeight {
            kind,
            rows,
            cols,
            packed_rows: 0,
            data,
        })
    }

    /// The same weights with full groups of eight rows interleaved (formats that have an
    /// interleaved kernel; others are returned unchanged).
    pub fn interleaved(self) -> QWeight {
        if !self.kind.interleaves() || self.packed_rows > 0 {
            return self;
        }
        let packed_rows = self.rows / GROUP * GROUP;
        let mut data = Vec::with_capacity(self.data.len());
        let nb = self.blocks_per_row();
        let bb = self.kind.block_bytes();
        let mut block = vec![0u8; bb * GROUP];
        for g in 0..packed_rows / GROUP {
            for b in 0..nb {
                for i in 0..GROUP {
                    let src = &self.row(g * GROUP + i)[b * bb..][..bb];
                    interleave_block(self.kind, src, i, &mut block);
                }
                data.extend_from_slice(&block);
            }
        }
        data.extend_from_slice(&self.data[packed_rows * self.row_bytes()..]);
        QWeight {
            packed_rows,
            data,
            ..self
        }
    }

    fn blocks_per_row(&self) -> usize {
        self.cols / self.kind.block_len()
    }

    fn row_bytes(&self) -> usize {
        self.blocks_per_row() * self.kind.block_bytes()
    }

    /// Row `r` (past the interleaved groups) in GGUF layout.
    fn row(&self, r: usize) -> &[u8] {
        debug_assert!(r >= self.packed_rows);
        let n = self.row_bytes();
        let at = self.packed_rows * n + (r - self.packed_rows) * n;
        &self.data[at..at + n]
    }

    /// Row `r` in GGUF layout, gathered from its group when interleaved.
    fn gguf_row(&self, r: usize) -> std::borrow::Cow<'_, [u8]> {
        if r >= self.packed_rows {
            return self.row(r).into();
        }
        let bb = self.kind.block_bytes();
        let (g, i) = (r / GROUP, r % GROUP);
        let nb = self.blocks_per_row();
        let mut out = vec![0u8; nb * bb];
        for b in 0..nb {
            let group = &self.data[(g * nb + b) * bb * GROUP..][..bb * GROUP];
            deinterleave_block(self.kind, group, i, &mut out[b * bb..][..bb]);
        }
        out.into()
    }

    /// The interleaved blocks of group `g` (rows `8g..8g + 8`).
    fn group(&self, g: usize) -> &[u8] {
        let n = self.row_bytes() * GROUP;
        &self.data[g * n..(g + 1) * n]
    }

    /// Bytes of weight data (for bandwidth figures).
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// `y = x · Wᵀ`: `[acts.rows, self.rows]`, row-major.
    pub fn matmul(&self, acts: &QActs) -> Vec<f32> {
        self.matmul_with(isa(), acts)
    }

    /// [`QWeight::matmul`] on a given instruction set (one of [`Isa::available`]).
    pub fn matmul_with(&self, isa: Isa, acts: &QActs) -> Vec<f32> {
        assert!(Isa::available().contains(&isa), "{isa:?} is not available");
        let mut out = vec![0f32; acts.rows * self.rows];
        matmul_many_with(isa, &mut [(self, &mut out[..])], acts);
        out
    }
}

/// Bytes of the values of one block (after its scales) in GGUF layout.
fn scale_bytes(kind: QKind) -> usize {
    match kind {
        QKind::Q4_1 | QKind::Q5_1 => 4,
        _ => 2,
    }
}

/// Q5's high bits (bit `j` of a block's 32-bit `qh`: value `j`'s fifth bit), reordered for
/// the interleaved layout: bit `r` of byte `k` is value `4r + k`'s, so that one shift and mask
/// of a row's 32-bit lane put run `r`'s four high bits at bit 4 of its four bytes (runs 0-3
/// are the low nibbles of the value runs, 4-7 the high nibbles).
pub(crate) fn q5_spread(qh: u32) -> u32 {
    let mut out = 0;
    for r in 0..8 {
        for k in 0..4 {
            out |= ((qh >> (4 * r + k)) & 1) << (8 * k + r);
        }
    }
    out
}

/// The inverse of [`q5_spread`].
fn q5_gather(spread: u32) -> u32 {
    let mut out = 0;
    for r in 0..8 {
        for k in 0..4 {
            out |= ((spread >> (8 * k + r)) & 1) << (4 * r + k);
        }
    }
    out
}

/// The place of Q6_K's run `t` (values `4t..4t + 4` of a chunk of 32) among its chunk's eight
/// runs in the interleaved layout: runs `t` and `t + 4`, the same place in the chunk's two
/// sub-blocks, side by side (order 0, 4, 1, 5, 2, 6, 3, 7), so one 64-byte load holds both.
pub(crate) const fn q6k_slot(t: usize) -> usize {
    2 * (t % 4) + t / 4
}

/// Where half `n` of an interleaved Q6_K group block keeps its low-bit runs of chunks
/// `4n + h` and `4n + h + 2` (eight runs of 32 bytes, in [`q6k_slot`] order).
pub(crate) const fn q6k_low_at(n: usize, h: usize) -> usize {
    144 + 768 * n + 256 * (1 + h)
}

/// Where half `n` of an interleaved Q6_K group block keeps its high-bit runs, just before
/// its low-bit runs, so that a kernel reads a block front to back.
pub(crate) const fn q6k_high_at(n: usize) -> usize {
    144 + 768 * n
}

/// Where the bytes of row slot `i`'s GGUF block go in an interleaved group block:
/// `(offset in the GGUF block, offset in the group block, length)`.
///
/// - Q4_0, Q4_1, Q8_0: scales at `2i` (Q4_1's mins at `16 + 2i`), then the values in runs of
///   four bytes at `hdr + 32s + 4i`.
/// - Q5_0, Q5_1: the same, with the row's 32 high bits (reordered by [`q5_spread`] when
///   interleaved) at `hdr - 32 + 4i`.
/// - Q4_K: scales at `2i`, mins at `16 + 2i`, the 12 packed scale bytes as planes
///   (`32 + 8k + i`), then for each 32-byte quarter `p` of the values, runs of four at
///   `128 + 256p + 32t + 4i` (low nibbles: sub-block `2p`, high: `2p + 1`).
/// - Q5_K: as Q4_K, with the high-bit bytes in runs of four at `128 + 32t + 4i` (bit `2p`
///   of a byte is the fifth bit of its low nibble in quarter `p`, bit `2p + 1` of its high
///   nibble) and the quarters of values moved up to `384 + 256p + 32t + 4i`.
/// - Q6_K: scale at `2i`, the 16 sub-scales as planes (`16 + 8s + i`), the low-bit bytes in
///   runs of four at `q6k_low_at(n, h) + 32u + 4i`, the high-bit bytes at
///   `q6k_high_at(n) + 32u + 4i`, where `u` is run `t`'s place ([`q6k_slot`]).
fn slot_map(kind: QKind, i: usize) -> Vec<(usize, usize, usize)> {
    let mut m = Vec::new();
    match kind {
        QKind::Q4_0 | QKind::Q4_1 | QKind::Q5_0 | QKind::Q5_1 | QKind::Q8_0 => {
            m.push((0, 2 * i, 2));
            let mut sb = scale_bytes(kind);
            if sb == 4 {
                m.push((2, 16 + 2 * i, 2));
            }
            let hdr = kind.group_header();
            if matches!(kind, QKind::Q5_0 | QKind::Q5_1) {
                m.push((sb, hdr - 32 + 4 * i, 4));
                sb += 4;
            }
            for s in 0..(kind.block_bytes() - sb) / 4 {
                m.push((sb + 4 * s, hdr + 32 * s + 4 * i, 4));
            }
        }
        QKind::Q4K | QKind::Q5K => {
            m.push((0, 2 * i, 2));
            m.push((2, 16 + 2 * i, 2));
            for k in 0..12 {
                m.push((4 + k, 32 + 8 * k + i, 1));
            }
            // Q5_K: the 32 high-bit bytes after the scales, the values after them.
            let (qs, at) = if kind == QKind::Q5K {
                for t in 0..8 {
                    m.push((16 + 4 * t, 128 + 32 * t + 4 * i, 4));
                }
                (48, 384)
            } else {
                (16, 128)
            };
            for p in 0..4 {
                for t in 0..8 {
                    m.push((qs + 32 * p + 4 * t, at + 256 * p + 32 * t + 4 * i, 4));
                }
            }
        }
        QKind::Q6K => {
            m.push((208, 2 * i, 2));
            for s in 0..16 {
                m.push((192 + s, 16 + 8 * s + i, 1));
            }
            for n in 0..2 {
                for h in 0..2 {
                    for t in 0..8 {
                        let at = q6k_low_at(n, h) + 32 * q6k_slot(t) + 4 * i;
                        m.push((64 * n + 32 * h + 4 * t, at, 4));
                    }
                }
                for t in 0..8 {
                    let at = q6k_high_at(n) + 32 * q6k_slot(t) + 4 * i;
                    m.push((128 + 32 * n + 4 * t, at, 4));
                }
            }
        }
    }
    m
}

/// Where Q5's high bits sit in a group block for slot `i`.
fn q5_bits_at(kind: QKind, i: usize) -> Option<usize> {
    matches!(kind, QKind::Q5_0 | QKind::Q5_1).then(|| kind.group_header() - 32 + 4 * i)
}

/// The 32-bit word at `at`, rewritten by `f`.
fn map_u32(bytes: &mut [u8], at: usize, f: fn(u32) -> u32) {
    let w = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("four bytes"));
    bytes[at..at + 4].copy_from_slice(&f(w).to_le_bytes());
}

/// [`slot_map`] of each slot of `kind`, made once per process: interleaving a weight at load
/// copies every block through it (building the map for each block and row was two thirds of
/// the default model's load time).
fn slot_maps(kind: QKind) -> &'static [Vec<(usize, usize, usize)>; GROUP] {
    type Maps = [Vec<(usize, usize, usize)>; GROUP];
    static MAPS: [std::sync::OnceLock<Maps>; QKind::ALL.len()] =
        [const { std::sync::OnceLock::new() }; QKind::ALL.len()];
    let k = QKind::ALL
        .iter()
        .position(|&x| x == kind)
        .expect("every kind is in ALL");
    MAPS[k].get_or_init(|| std::array::from_fn(|i| slot_map(kind, i)))
}

/// `dst.copy_from_slice(src)` for the few bytes of one entry of a slot map, without a call
/// to `memmove` for the usual lengths (four or two bytes).
#[inline(always)]
fn copy_run(src: &[u8], dst: &mut [u8]) {
    match (src.len(), dst.len()) {
        (4, 4) => dst.copy_from_slice(&<[u8; 4]>::try_from(src).expect("four bytes")),
        (2, 2) => dst.copy_from_slice(&<[u8; 2]>::try_from(src).expect("two bytes")),
        _ => dst.copy_from_slice(src),
    }
}

/// Copy GGUF block `src` into slot `i` of an interleaved group block.
fn interleave_block(kind: QKind, src: &[u8], i: usize, dst: &mut [u8]) {
    for &(from, to, len) in &slot_maps(kind)[i] {
        copy_run(&src[from..from + len], &mut dst[to..to + len]);
    }
    if let Some(at) = q5_bits_at(kind, i) {
        map_u32(dst, at, q5_spread);
    }
}

/// The inverse of [`interleave_block`].
fn deinterleave_block(kind: QKind, src: &[u8], i: usize, dst: &mut [u8]) {
    for &(from, to, len) in &slot_maps(kind)[i] {
        copy_run(&src[to..to + len], &mut dst[from..from + len]);
    }
    if q5_bits_at(kind, i).is_some() {
        map_u32(dst, scale_bytes(kind), q5_gather);
    }
}

/// Instruction sets the kernels can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Portable,
    Avx2,
    /// The AVX2 kernels with AVX-VNNI's `vpdpbusd` summing the 8-bit products straight into
    /// 32-bit lanes, where AVX2 needs three instructions (Alder Lake and later client CPUs).
    AvxVnni,
    /// The same with AVX-512 VNNI's `vpdpbusd` (on 256-bit registers, AVX512VL), and
    /// attention on 512-bit registers (AVX-512F): Ice Lake, Sapphire Rapids, Zen 4 and later.
    Avx512,
    /// aarch64's NEON (every 64-bit Arm CPU), on the same interleaved layout.
    Neon,
    /// NEON with the dot-product extension's `sdot` (Armv8.2 and later).
    NeonDot,
}

impl Isa {
    /// Every path this machine can run, portable first.
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Portable];
        if avx2::supported() {
            v.push(Isa::Avx2);
        }
        if avx2::avx_vnni_supported() {
            v.push(Isa::AvxVnni);
        }
        if avx2::avx512_supported() {
            v.push(Isa::Avx512);
        }
        if neon::supported() {
            v.push(Isa::Neon);
        }
        if neon::dotprod_supported() {
            v.push(Isa::NeonDot);
        }
        v
    }

    fn best() -> Isa {
        *Isa::available()
            .last()
            .expect("portable is always available")
    }

    /// Whether this path uses the AVX2 kernels.
    pub fn is_avx2(self) -> bool {
        matches!(self, Isa::Avx2 | Isa::AvxVnni | Isa::Avx512)
    }

    /// Whether this path uses the NEON kernels.
    pub fn is_neon(self) -> bool {
        matches!(self, Isa::Neon | Isa::NeonDot)
    }

    /// Whether this path's kernels read weights in the interleaved eight-row layout.
    pub fn interleaves(self) -> bool {
        self.is_avx2() || self.is_neon()
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::AvxVnni => "avxvnni",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
            Isa::NeonDot => "neondot",
        }
    }

    pub fn parse(s: &str) -> Option<Isa> {
        match s {
            "portable" => Some(Isa::Portable),
            "avx2" if avx2::supported() => Some(Isa::Avx2),
            "avxvnni" if avx2::avx_vnni_supported() => Some(Isa::AvxVnni),
            "avx512" if avx2::avx512_supported() => Some(Isa::Avx512),
            "neon" if neon::supported() => Some(Isa::Neon),
            "neondot" if neon::dotprod_supported() => Some(Isa::NeonDot),
            _ => None,
        }
    }
}

/// 0 = not chosen yet; otherwise `1 + Isa as u8`.
static ISA: AtomicU8 = AtomicU8::new(0);

/// The instruction set the kernels use: forced by [`set_isa`] or `AIOS_CPU_KERNELS`
/// (`portable`, `avx2`, `avxvnni`, `avx512`, `neon`, `neondot`), else the best this CPU has.
pub fn isa() -> Isa {
    match ISA.load(Ordering::Relaxed) {
        1 => Isa::Portable,
        2 => Isa::Avx2,
        3 => Isa::AvxVnni,
        4 => Isa::Avx512,
        5 => Isa::Neon,
        6 => Isa::NeonDot,
        _ => {
            let asked = std::env::var("AIOS_CPU_KERNELS").ok();
            let chosen = asked.as_deref().and_then(Isa::parse).unwrap_or_else(|| {
                if let Some(a) = &asked {
                    tracing::warn!(
                        "AIOS_CPU_KERNELS={a}: not a kernel set this CPU runs; using {}",
                        Isa::best().name()
                    );
                }
                Isa::best()
            });
            set_isa(chosen);
            chosen
        }
    }
}

/// Force an instruction set (it must be one of [`Isa::available`]).
pub fn set_isa(isa: Isa) {
    assert!(Isa::available().contains(&isa), "{isa:?} is not available");
    ISA.store(
        match isa {
            Isa::Portable => 1,
            Isa::Avx2 => 2,
            Isa::AvxVnni => 3,
            Isa::Avx512 => 4,
            Isa::Neon => 5,
            Isa::NeonDot => 6,
        },
        Ordering::Relaxed,
    );
}

/// Threads of candle's pool (read once: candle re-reads /proc/cpuinfo on every call).
fn pool_threads() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("CANDLE_NUM_THREADS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(candle_core::utils::get_num_threads)
            .max(1)
    })
}

/// Activation rows per task when a weight's rows alone give too few tasks (long prefill).
const ACT_ROWS_PER_TASK: usize = 64;

#[derive(Clone, Copy)]
struct Task {
    w: usize,
    r0: usize,
    r1: usize,
    j0: usize,
    j1: usize,
}

struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint (row, column) cells of each output.
unsafe impl Sync for OutPtr {}

/// Several products of the same activations in one parallel pass: for each `(w, out)`,
/// `out = acts · wᵀ` as `[acts.rows, w.rows]`, row-major.
pub fn matmul_many(outs: &mut [(&QWeight, &mut [f32])], acts: &QActs) {
    matmul_many_with(isa(), outs, acts)
}

fn matmul_many_with(isa: Isa, outs: &mut [(&QWeight, &mut [f32])], acts: &QActs) {
    let threads = pool_threads();
    let mut tasks = Vec::new();
    let total_rows: usize = outs.iter().map(|(w, _)| w.rows).sum();
    // Aim for a few tasks per thread; rows in whole pairs of interleaved groups (the AVX-512
    // kernels take two at once).
    let per_task = (total_rows / (threads * 4)).clamp(2 * GROUP, 128) / (2 * GROUP) * (2 * GROUP);
    let act_chunk = if acts.rows > ACT_ROWS_PER_TASK && total_rows / per_task < threads * 4 {
        ACT_ROWS_PER_TASK
    } else {
        acts.rows.max(1)
    };
    for (wi, (w, out)) in outs.iter().enumerate() {
        assert_eq!(w.cols, acts.cols, "weight and activation widths differ");
        assert_eq!(out.len(), acts.rows * w.rows, "output shape");
        for r0 in (0..w.rows).step_by(per_task) {
            for j0 in (0..acts.rows).step_by(act_chunk) {
                tasks.push(Task {
                    w: wi,
                    r0,
                    r1: (r0 + per_task).min(w.rows),
                    j0,
                    j1: (j0 + act_chunk).min(acts.rows),
                });
            }
        }
    }
    let ptrs: Vec<(&QWeight, OutPtr)> = outs
        .iter_mut()
        .map(|(w, o)| (&**w, OutPtr(o.as_mut_ptr())))
        .collect();
    let run = |t: &Task| {
        let (w, out) = (&ptrs[t.w].0, &ptrs[t.w].1);
        // SAFETY: this task alone writes cells (j, r) with j in j0..j1, r in r0..r1.
        unsafe { tile(isa, w, t, acts, out.0) };
    };
    if tasks.len() == 1 {
        run(&tasks[0]);
        return;
    }
    candle_core::utils::barrier_pool().execute_chunked(tasks.len(), |range| {
        for i in range {
            run(&tasks[i]);
        }
    });
}

/// Compute cells `(j, r)` of one task, writing `out[j * w.rows + r]`.
///
/// # Safety
/// `out` must point to `acts.rows * w.rows` floats, and no other thread may write this task's
/// cells at the same time.
unsafe fn tile(isa: Isa, w: &QWeight, t: &Task, acts: &QActs, out: *mut f32) {
    // Interleaved groups first (tasks start on group boundaries), then GGUF-layout rows.
    let mid = t.r1.min(w.packed_rows).max(t.r0);
    let mut j = t.j0;
    while j < t.j1 {
        let a = (t.j1 - j).min(4);
        if isa.interleaves() {
            let mut g = t.r0 / GROUP;
            if isa == Isa::Avx512 && avx2::pairs_groups(w.kind) {
                // Two groups at a time, one per half of a 512-bit register; the same sums,
                // in the same order, as one group at a time.
                while g + 2 <= mid / GROUP {
                    let mut res = [[0f32; 2 * GROUP]; 4];
                    avx2::tile_x16(w, g, acts, j, a, &mut res);
                    for (k, row) in res.iter().enumerate().take(a) {
                        let dst = out.add((j + k) * w.rows + g * GROUP);
                        std::ptr::copy_nonoverlapping(row.as_ptr(), dst, 2 * GROUP);
                    }
                    g += 2;
                }
            }
            for g in g..mid / GROUP {
                let mut res = [[0f32; GROUP]; 4];
                if isa.is_neon() {
                    neon::tile_x8(w, g, acts, j, a, isa, &mut res);
                } else {
                    avx2::tile_x8(w, g, acts, j, a, isa, &mut res);
                }
                for (k, row) in res.iter().enumerate().take(a) {
                    let dst = out.add((j + k) * w.rows + g * GROUP);
                    std::ptr::copy_nonoverlapping(row.as_ptr(), dst, GROUP);
                }
            }
        } else {
            for r in t.r0..mid {
                let row = w.gguf_row(r);
                for k in 0..a {
                    *out.add((j + k) * w.rows + r) = portable::dot(w.kind, &row, acts.row(j + k));
                }
            }
        }
        let mut r = mid;
        while r < t.r1 {
            let rr = if a == 1 { 4 } else { 2 }.min(t.r1 - r);
            let rr = if rr == 3 { 2 } else { rr };
            let mut res = [[0f32; 4]; 4];
            match isa {
                Isa::Avx2 | Isa::AvxVnni | Isa::Avx512
                    if !matches!(w.kind, QKind::Q5_0 | QKind::Q5_1 | QKind::Q5K) =>
                {
                    avx2::tile(w, r, rr, acts, j, a, &mut res)
                }
                // Rows past the last group of eight: few, in the file's layout.
                _ => {
                    for (i, row) in res.iter_mut().enumerate().take(rr) {
                        for (k, cell) in row.iter_mut().enumerate().take(a) {
                            *cell = portable::dot(w.kind, w.row(r + i), acts.row(j + k));
                        }
                    }
                }
            }
            for (i, row) in res.iter().enumerate().take(rr) {
                for (k, cell) in row.iter().enumerate().take(a) {
                    *out.add((j + k) * w.rows + r + i) = *cell;
                }
            }
            r += rr;
        }
        j += a;
    }
}

#[inline(always)]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Q4_K's 6-bit scale and min of sub-block `j` (0..8) from its 12 packed bytes.
#[inline(always)]
fn q4k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}
