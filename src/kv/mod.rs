//! KV storage: where each sequence's keys and values live between steps.
//!
//! This module owns the memory; the model only writes new rows and reads them back through
//! [`KvSeq`]. Today a sequence owns one contiguous, growable f16 buffer per layer; the paged
//! pool (fixed 16-token blocks, block tables, sharing) replaces the storage behind the same
//! seam: attention reads a sequence as a list of row segments, so a block table is just a
//! longer list.

use half::f16;

/// The element type KV rows are stored in.
pub type KvElem = f16;

/// Widen stored KV elements to f32 (vectorised F16C conversion where the CPU has it).
#[inline]
pub fn widen(src: &[KvElem], dst: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    src.convert_to_f32_slice(dst);
}

/// Narrow one f32 value to the stored element type.
#[inline]
fn narrow(x: f32) -> KvElem {
    f16::from_f32(x)
}

/// Shape of the KV rows a model writes: one row per token, layer and KV head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl KvLayout {
    /// Bytes one token occupies across all layers (K and V, f16).
    pub fn bytes_per_token(&self) -> usize {
        2 * self.n_layers * self.n_kv_heads * self.head_dim * std::mem::size_of::<KvElem>()
    }
}

/// One sequence's keys and values: per layer, per KV head, `capacity` rows of `head_dim`.
///
/// Layout of a layer buffer: `[n_kv_heads][capacity][head_dim]`, so the rows one attention head
/// reads are contiguous. Growth doubles the capacity (amortised O(1) per token).
#[derive(Debug)]
pub struct KvSeq {
    layout: KvLayout,
    capacity: usize,
    len: usize,
    k: Vec<Vec<KvElem>>,
    v: Vec<Vec<KvElem>>,
}

impl KvSeq {
    pub fn new(layout: KvLayout, capacity: usize) -> Self {
        let capacity = capacity.max(16);
        let per_layer = layout.n_kv_heads * capacity * layout.head_dim;
        let zeros = || vec![narrow(0.0); per_layer];
        Self {
            layout,
            capacity,
            len: 0,
            k: (0..layout.n_layers).map(|_| zeros()).collect(),
            v: (0..layout.n_layers).map(|_| zeros()).collect(),
        }
    }

    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    /// Tokens whose K/V are stored (all layers have been written up to here).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by this sequence's buffers.
    pub fn bytes(&self) -> usize {
        self.capacity * self.layout.bytes_per_token()
    }

    /// Make room for `n` more tokens.
    pub fn reserve(&mut self, n: usize) {
        let need = self.len + n;
        if need <= self.capacity {
            return;
        }
        let new_cap = need.max(self.capacity * 2);
        let (h, d) = (self.layout.n_kv_heads, self.layout.head_dim);
        for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
            let mut grown = vec![narrow(0.0); h * new_cap * d];
            for head in 0..h {
                let src = &buf[head * self.capacity * d..][..self.len * d];
                grown[head * new_cap * d..][..self.len * d].copy_from_slice(src);
            }
            *buf = grown;
        }
        self.capacity = new_cap;
    }

    /// Write the K and V rows of `n` tokens at positions `len..len+n` of `layer`.
    /// `k` and `v` are `[n][n_kv_heads][head_dim]` in f32. Call [`KvSeq::advance`] after
    /// every layer has been written.
    pub fn write(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let (h, d) = (self.layout.n_kv_heads, self.layout.head_dim);
        let n = k.len() / (h * d);
        debug_assert!(self.len + n <= self.capacity, "reserve() before write()");
        for (src, dst) in [(k, &mut self.k[layer]), (v, &mut self.v[layer])] {
            for t in 0..n {
                for head in 0..h {
                    let row = &src[(t * h + head) * d..][..d];
                    let at = (head * self.capacity + self.len + t) * d;
                    for (o, x) in dst[at..at + d].iter_mut().zip(row) {
                        *o = narrow(*x);
                    }
                }
            }
        }
    }

    /// Mark `n` tokens written by [`KvSeq::write`] as stored.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
        debug_assert!(self.len <= self.capacity);
    }

    /// Forget everything after the first `len` tokens.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The first `upto` rows of K and V for one layer and KV head, as segments of whole rows.
    /// Contiguous storage yields one segment; paged storage yields one per block.
    pub fn segments(
        &self,
        layer: usize,
        kv_head: usize,
        upto: usize,
    ) -> [(&[KvElem], &[KvElem]); 1] {
        let d = self.layout.head_dim;
        let at = kv_head * self.capacity * d;
        [(
            &self.k[layer][at..at + upto * d],
            &self.v[layer][at..at + upto * d],
        )]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_grow_and_read_back() {
        let layout = KvLayout {
            n_layers: 2,
            n_kv_heads: 2,
            head_dim: 4,
        };
        let mut kv = KvSeq::new(layout, 1);
        // 20 tokens, more than the initial capacity of 16, written in two steps.
        for (start, n) in [(0usize, 17usize), (17, 3)] {
            kv.reserve(n);
            for layer in 0..2 {
                let vals: Vec<f32> = (0..n * 8)
                    .map(|i| (layer * 1000 + start * 8 + i) as f32)
                    .collect();
                kv.write(layer, &vals, &vals);
            }
            kv.advance(n);
        }
        assert_eq!(kv.len(), 20);
        let [(k, v)] = kv.segments(1, 1, 20);
        assert_eq!(k.len(), 80);
        // token t, head 1, element e was written as 1000 + t*8 + 4 + e
        for t in 0..20 {
            for e in 0..4 {
                let want = (1000 + t * 8 + 4 + e) as f32;
                assert_eq!(k[t * 4 + e].to_f32(), want);
                assert_eq!(v[t * 4 + e].to_f32(), want);
            }
        }
    }
}
