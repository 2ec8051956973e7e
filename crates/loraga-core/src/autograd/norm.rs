//! RMSNorm as Hugging Face Llama computes it (in f32): `w * x / sqrt(mean(x^2) + eps)` per row.
//!
//! On the CPU x and w are f32. On CUDA (`kernels/rms_norm.cu`) they are f32 or bf16, of one
//! dtype; y and dx have x's dtype, dw is f32.

use super::data::{cuda, cuda_tensor, dims2, expect_shape, f32s, on_cuda, tensor};
use super::tape::{Tape, Var};
use crate::cuda::ops::rms_norm as cuda_norm;
use crate::error::Result;
use crate::tensor::Tensor;

impl Tape {
    /// RMSNorm of each row of x [n, d] with weight w \[d\].
    pub fn rms_norm(&mut self, x: Var, w: Var, eps: f32) -> Result<Var> {
        let (xv, wv) = (self.value(x), self.value(w));
        let (n, d) = dims2(xv, "rms_norm", "x")?;
        expect_shape(wv, &[d], "rms_norm", "weight")?;
        if on_cuda("rms_norm", &[xv, wv])? {
            // 1 / rms per row (f32, on the device), saved for the backward pass.
            let (y, inv) = cuda_norm::forward(cuda(xv, "rms_norm")?, cuda(wv, "rms_norm")?, n, d, eps)?;
            let back = Box::new(move |dy: &Tensor, inp: &[&Tensor], needs: &[bool]| {
                on_cuda("rms_norm", &[dy, inp[0]])?;
                let (g, xs, ws) = (cuda(dy, "rms_norm")?, cuda(inp[0], "rms_norm")?, cuda(inp[1], "rms_norm")?);
                let (dx, dw) = cuda_norm::backward(g, xs, ws, &inv, n, d, needs)?;
                Ok(vec![
                    dx.map(|s| cuda_tensor(s, &[n, d])).transpose()?,
                    dw.map(|s| cuda_tensor(s, &[d])).transpose()?,
                ])
            });
            return Ok(self.push_op("rms_norm", cuda_tensor(y, &[n, d])?, &[x, w], back));
        }
        let (xs, ws) = (f32s(xv, "rms_norm")?, f32s(wv, "rms_norm")?);
        // 1 / rms per row, saved for the backward pass.
        let inv: Vec<f32> = xs.chunks_exact(d).map(|row| inv_rms(row, eps)).collect();
        let mut out = Vec::with_capacity(n * d);
        for (row, &r) in xs.chunks_exact(d).zip(&inv) {
            out.extend(row.iter().zip(ws).map(|(x, w)| w * (x * r)));
        }
        let y = tensor(out, &[n, d])?;
        let back = Box::new(move |dy: &Tensor, inp: &[&Tensor], needs: &[bool]| {
            let (g, xs, ws) = (f32s(dy, "rms_norm")?, f32s(inp[0], "rms_norm")?, f32s(inp[1], "rms_norm")?);
            let mut dx = needs[0].then(|| vec![0.0f32; n * d]);
            let mut dw = needs[1].then(|| vec![0.0f32; d]);
            for i in 0..n {
                let (row, gr, r) = (&xs[i * d..(i + 1) * d], &g[i * d..(i + 1) * d], inv[i]);
                if let Some(dw) = dw.as_mut() {
                    dw.iter_mut().zip(row).zip(gr).for_each(|((dw, x), g)| *dw += g * x * r);
                }
                if let Some(dx) = dx.as_mut() {
                    // y = w x r with r = (mean x^2 + eps)^-1/2, so dr/dx_j = -r^3 x_j / d.
                    let dot: f32 = gr.iter().zip(ws).zip(row).map(|((g, w), x)| g * w * x).sum();
                    let c = r * r * r * dot / d as f32;
                    let dst = &mut dx[i * d..(i + 1) * d];
                    for j in 0..d {
                        dst[j] = gr[j] * ws[j] * r - row[j] * c;
                    }
                }
            }
            Ok(vec![dx.map(|v| tensor(v, &[n, d])).transpose()?, dw.map(|v| tensor(v, &[d])).transpose()?])
        });
        Ok(self.push_op("rms_norm", y, &[x, w], back))
    }
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ms = row.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>() / row.len() as f64;
    1.0 / ((ms as f32) + eps).sqrt()
}
