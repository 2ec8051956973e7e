//! The initialisations LoRA-GA is compared with, per layer, with LoRA-GA's interface
//! ([`LayerInit`]):
//!
//! - vanilla LoRA (PEFT's `init_lora_weights=True`): A ~ U(-1/sqrt(in), 1/sqrt(in))
//!   (`kaiming_uniform_(a=sqrt(5))`), B = 0; the base weight stays W0.
//! - PiSSA (PEFT's `init_lora_weights="pissa"` / `"pissa_niter_k"`): W = U S Vᵀ, top r, with
//!   S_r' = S_r / s:  A = diag(sqrt(S_r')) V_rᵀ,  B = U_r diag(sqrt(S_r')),
//!   W_res = round(W − s·B·A) = round(W − U_r S_r V_rᵀ). "pissa" uses the exact SVD;
//!   "pissa_niter_k" torch.svd_lowrank(W, q = r, niter = k) (no oversampling).
//!
//! Where PEFT differs: it computes W_res from the f32 factors and only then casts A and B to the
//! base weight's dtype; here the offset comes from the stored A and B (as for LoRA-GA), so a
//! bf16 model starts exactly at W0 up to W_res's rounding.

use rand::Rng;

use super::layer::{LayerInit, factors_to_layer};
use super::offset::host_f32;
use crate::cpu::CpuStorage;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::linalg::{MatrixRef, RsvdConfig, svd_exact, svd_lowrank_tensor};
use crate::lora::kaiming_uniform_a;
use crate::tensor::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PissaSvd {
    /// torch.linalg.svd: PEFT's "pissa".
    Exact,
    /// torch.svd_lowrank(W, q = r, niter): PEFT's "`pissa_niter_<niter>`".
    Fast { niter: usize },
}

#[derive(Debug, Clone, PartialEq)]
pub struct PissaConfig {
    pub svd: PissaSvd,
    /// Ω of the fast SVD.
    pub seed: u64,
    /// None: the base weight's dtype.
    pub adapter_dtype: Option<DType>,
}

impl Default for PissaConfig {
    fn default() -> Self {
        PissaConfig { svd: PissaSvd::Exact, seed: 0, adapter_dtype: None }
    }
}

/// Vanilla LoRA for a layer with weight `w` [out, in]: A and B in W's dtype.
pub fn lora_layer(name: &str, w: &Tensor, r: usize, rng: &mut impl Rng) -> Result<LayerInit> {
    let (out, inp) = w.shape().dims2("LoRA init", name)?;
    if r == 0 || r > out.min(inp) {
        return Err(Error::layer(
            "LoRA init",
            name,
            format!("rank {r} must be in 1..={} for [{out}, {inp}]", out.min(inp)),
        ));
    }
    // On W's device: nothing here needs the host but drawing A.
    let a = CpuStorage::from_f32_vec(w.dtype(), kaiming_uniform_a(r, inp, rng)?);
    Ok(LayerInit {
        a: Tensor::from_cpu(a, [r, inp].into(), &w.device())?,
        b: Tensor::zeros([out, r], w.dtype(), &w.device())?,
        weight: None,
    })
}

/// PiSSA for a layer: the principal r singular triplets of W move into the adapter.
pub fn pissa_layer(name: &str, w: &Tensor, r: usize, s: f64, cfg: &PissaConfig) -> Result<LayerInit> {
    const OP: &str = "PiSSA init";
    let (m, n) = w.shape().dims2(OP, name)?;
    if r == 0 || r > m.min(n) {
        return Err(Error::layer(OP, name, format!("rank {r} must be in 1..={} for [{m}, {n}]", m.min(n))));
    }
    let svd = match cfg.svd {
        PissaSvd::Exact => svd_exact(name, MatrixRef::new(&host_f32(w, name)?, m, n)?, r)?,
        // On W's device.
        PissaSvd::Fast { niter } => svd_lowrank_tensor(name, w, &RsvdConfig::new(r, r, niter, cfg.seed))?,
    };
    let root: Vec<f64> = svd.s().iter().map(|&x| (x as f64 / s).sqrt()).collect();
    let (u, vt) = (svd.u(), svd.vt());
    let a = (0..r * n).map(|idx| root[idx / n] * vt[idx] as f64).collect();
    let b = (0..m * r).map(|idx| u[idx] as f64 * root[idx % r]).collect();
    factors_to_layer(name, w, a, b, r, s, cfg.adapter_dtype)
}
