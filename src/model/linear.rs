//! Linear layers: our quantised CPU kernels where we have one for the weight's format, candle's
//! `QMatMul` otherwise (dense safetensors weights, other GGUF formats, non-CPU devices).

use std::cell::OnceCell;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

use crate::ops::quant::{matmul_many, QActs, QKind, QWeight};

pub enum Weight {
    Ours(QWeight),
    Candle(QMatMul),
}

/// A linear layer `y = x · Wᵀ (+ b)`; `b` is Qwen2's QKV bias.
pub struct Linear {
    pub w: Weight,
    pub b: Option<Vec<f32>>,
    pub out_features: usize,
}

/// The input of one or more linear layers: `rows × cols` activations, quantised at most once
/// (for our kernels) and wrapped as a tensor at most once (for candle's).
pub struct Input<'a> {
    x: &'a [f32],
    rows: usize,
    cols: usize,
    q8: OnceCell<QActs>,
}

impl<'a> Input<'a> {
    pub fn new(x: &'a [f32], rows: usize, cols: usize) -> Input<'a> {
        debug_assert_eq!(x.len(), rows * cols);
        Input {
            x,
            rows,
            cols,
            q8: OnceCell::new(),
        }
    }

    fn q8(&self) -> &QActs {
        self.q8
            .get_or_init(|| QActs::quantize(self.x, self.rows, self.cols))
    }
}

/// Whether the user asked candle to dequantise every weight (`CANDLE_DEQUANTIZE_ALL`): then
/// candle's dense matmul runs, as it would for candle's own models.
fn dequantize_all() -> bool {
    std::env::var_os("CANDLE_DEQUANTIZE_ALL").is_some()
}

impl Linear {
    /// A GGUF weight `[out, in]`: our kernels on the CPU for the formats they cover.
    pub fn quantized(
        w: Arc<QTensor>,
        b: Option<Tensor>,
        dev: &Device,
    ) -> candle_core::Result<Linear> {
        let out_features = w.shape().dims()[0];
        // Our kernels where they beat candle's (all our formats but Q6_K for now).
        let ours = match QKind::from_ggml(w.dtype()) {
            Some(k) if k.beats_candle() && dev.is_cpu() && !dequantize_all() => {
                QWeight::from_qtensor(&w)
            }
            _ => None,
        };
        let w = match ours {
            Some(q) => Weight::Ours(q),
            None => Weight::Candle(QMatMul::from_arc(w)?),
        };
        Ok(Linear {
            w,
            b: b.map(|b| b.flatten_all()?.to_vec1()).transpose()?,
            out_features,
        })
    }

    /// A dense weight `[out, in]` (safetensors).
    pub fn dense(w: Tensor, b: Option<Tensor>) -> candle_core::Result<Linear> {
        let out_features = w.dims()[0];
        Ok(Linear {
            w: Weight::Candle(QMatMul::Tensor(w)),
            b: b.map(|b| b.flatten_all()?.to_vec1()).transpose()?,
            out_features,
        })
    }

    /// `[rows, out_features]`, row-major.
    pub fn forward(&self, x: &Input, dev: &Device) -> candle_core::Result<Vec<f32>> {
        let mut out = [Vec::new()];
        forward_many(&[self], x, dev, &mut out)?;
        let [out] = out;
        Ok(out)
    }
}

/// Several layers over the same input, into `outs` (one per layer, each resized to `[rows,
/// out_features]`); our kernels run as one parallel pass. The buffers are meant to be reused
/// from layer to layer: our kernels overwrite every value, so only growth is zeroed (zeroing a
/// prefill chunk's fresh outputs took as long as some of its matmuls).
pub fn forward_many(
    layers: &[&Linear],
    x: &Input,
    dev: &Device,
    outs: &mut [Vec<f32>],
) -> candle_core::Result<()> {
    assert_eq!(layers.len(), outs.len(), "one output per layer");
    let mut ours: Vec<(&QWeight, &mut [f32])> = Vec::new();
    for (l, out) in layers.iter().zip(outs.iter_mut()) {
        if let Weight::Ours(q) = &l.w {
            out.resize(x.rows * l.out_features, 0.0);
            ours.push((q, &mut out[..]));
        }
    }
    if !ours.is_empty() {
        matmul_many(&mut ours, x.q8());
    }
    let mut xt: Option<Tensor> = None;
    for (l, out) in layers.iter().zip(outs.iter_mut()) {
        if let Weight::Candle(m) = &l.w {
            if xt.is_none() {
                xt = Some(Tensor::from_slice(x.x, (x.rows, x.cols), dev)?);
            }
            let y = m.forward(xt.as_ref().expect("set above"))?;
            *out = y
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?;
        }
        if let Some(b) = &l.b {
            for row in out.chunks_exact_mut(l.out_features) {
                for (y, b) in row.iter_mut().zip(b) {
                    *y += b;
                }
            }
        }
    }
    Ok(())
}
