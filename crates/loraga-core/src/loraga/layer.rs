//! One target layer's LoRA-GA initialisation (spec §3, §4, §8). W0 and G are [m = out, n = in];
//! G ≈ U diag(σ) Vᵀ keeps its top 2r triplets; [`Selection`] names the triplets of A (rows) and
//! B (columns); then, with s the LoRA scaling and m = d_out:
//!
//! ```text
//!   [REF]  A[k] = c·v_{a_k}ᵀ          B[:, k] = c·u_{b_k}
//!          c = m^(1/4)/sqrt(γ) (stable), 1/s (gd), 1 (unit), mean_{i<r} sqrt(S_W[i]/s) (weight)
//!   [UP]   A[k] = c_A·v_{a_k}ᵀ        B[:, k] = c_B·σ_{b_k}·u_{b_k}
//!          c_B = m^(1/4)/sqrt(γ) (stable), 1/s (gd, and c_A = 1/s), S_W[0]/σ_{b_0} (weight), 1
//!
//!   W_frz = round(W0 − s·B·A)
//! ```
//!
//! A and B are rounded to f32 (what both implementations produce) and then to the adapter dtype;
//! the offset is computed from those stored values and W_frz is rounded once to W0's dtype
//! (`super::offset`), so W_frz + s·B·A equals W0 up to that one rounding.
//!
//! Devices: the randomized SVDs run where G and W are (CPU or GPU); A and B are assembled on the
//! host (r rows and columns) and stored on W's device; the exact SVD is host-only and refuses
//! GPU tensors.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::offset::{host_f32, offset_weight};
use super::{Direction, LoraGaConfig, Scale, SvdMethod, Variant};
use crate::cpu::CpuStorage;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::linalg::{MatrixRef, RsvdConfig, TruncatedSvd, svd_exact, svd_lowrank_tensor};
use crate::tensor::Tensor;

const OP: &str = "LoRA-GA init";

/// A layer's adapter and its new base weight.
#[derive(Debug)]
pub struct LayerInit {
    /// [r, in]
    pub a: Tensor,
    /// [out, r]
    pub b: Tensor,
    /// The base weight to use from now on (W_frz); None: unchanged (vanilla LoRA).
    pub weight: Option<Tensor>,
}

/// The singular triplets (0-based, < 2r) that A's rows and B's columns are built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub a: Vec<usize>,
    pub b: Vec<usize>,
}

impl Selection {
    /// The split for `direction`. [`Direction::Random`] draws from a ChaCha8 stream seeded by
    /// `seed` and the layer's name, so each layer gets its own split and a seed repeats it.
    pub fn new(direction: Direction, variant: Variant, r: usize, seed: u64, name: &str) -> Selection {
        match direction {
            Direction::ArB2r => Selection { a: (0..r).collect(), b: (r..2 * r).collect() },
            Direction::A2rBr => Selection { a: (r..2 * r).collect(), b: (0..r).collect() },
            Direction::ArBr => Selection { a: (1..2 * r).step_by(2).collect(), b: (0..2 * r).step_by(2).collect() },
            Direction::Random => {
                let mut perm: Vec<usize> = (0..2 * r).collect();
                perm.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ fnv1a(name)));
                match variant {
                    // random.sample(range(2r), 2r): A the first half, B the second.
                    Variant::Reference => Selection { a: perm[..r].to_vec(), b: perm[r..].to_vec() },
                    // torch.randperm(2r)[:r] for both.
                    Variant::Peft => Selection { a: perm[..r].to_vec(), b: perm[..r].to_vec() },
                }
            }
        }
    }

    fn check(&self, name: &str, r: usize) -> Result<()> {
        if self.a.len() != r || self.b.len() != r || self.a.iter().chain(&self.b).any(|&i| i >= 2 * r) {
            return Err(Error::layer(OP, name, format!("selection {self:?} is not r = {r} indices below 2r each")));
        }
        Ok(())
    }
}

/// 64-bit FNV-1a: a stable hash of a layer name (std's hasher may change between releases).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

/// The top 2r triplets of G: randomized (q = min(4r, m, n), `cfg.niter`, on G's device) or exact.
pub fn gradient_svd(name: &str, grad: &Tensor, r: usize, cfg: &LoraGaConfig) -> Result<TruncatedSvd> {
    let (m, n) = grad.shape().dims2(OP, name)?;
    if r == 0 || 2 * r > m.min(n) {
        return Err(Error::layer(
            OP,
            name,
            format!("LoRA-GA at rank r = {r} needs 2r = {} singular vectors; the layer is [{m}, {n}]", 2 * r),
        ));
    }
    match cfg.svd {
        SvdMethod::Randomized => {
            let rsvd = RsvdConfig { q: 4 * r, niter: cfg.niter, k: 2 * r, seed: cfg.seed, clamp_to_shape: true };
            svd_lowrank_tensor(name, grad, &rsvd)
        }
        SvdMethod::Exact => svd_exact(name, MatrixRef::new(&host_f32(grad, name)?, m, n)?, 2 * r),
    }
}

/// W's leading singular values for [`Scale::WeightSvd`]: \[REF\] r of them from
/// svd_lowrank(W, q = min(4r, m, n)); \[UP\] from svd_lowrank(W, q = min(r, m, n)).
pub fn weight_singular_values(name: &str, w: &Tensor, r: usize, cfg: &LoraGaConfig) -> Result<Vec<f32>> {
    let (m, n) = w.shape().dims2(OP, name)?;
    let q = match cfg.variant {
        Variant::Reference => 4 * r,
        Variant::Peft => r,
    };
    let svd = match cfg.svd {
        SvdMethod::Randomized => svd_lowrank_tensor(
            name,
            w,
            &RsvdConfig { q, niter: cfg.niter, k: r, seed: cfg.seed, clamp_to_shape: true },
        )?,
        SvdMethod::Exact => svd_exact(name, MatrixRef::new(&host_f32(w, name)?, m, n)?, r.min(m.min(n)))?,
    };
    Ok(svd.s().to_vec())
}

/// The whole layer from its weight and gradient: SVD, selection, scales, offset.
pub fn lora_ga_layer(name: &str, w: &Tensor, grad: &Tensor, r: usize, s: f64, cfg: &LoraGaConfig) -> Result<LayerInit> {
    cfg.validate()?;
    if grad.dims() != w.dims() {
        return Err(Error::layer(OP, name, format!("gradient {:?} for a weight {:?}", grad.dims(), w.dims())));
    }
    let svd = gradient_svd(name, grad, r, cfg)?;
    let sel = Selection::new(cfg.direction, cfg.variant, r, cfg.seed, name);
    let weight_s = match cfg.scale {
        Scale::WeightSvd => Some(weight_singular_values(name, w, r, cfg)?),
        _ => None,
    };
    build(name, w, &svd, &sel, weight_s.as_deref(), r, s, cfg)
}

/// A, B and W_frz from G's SVD (at least 2r triplets), the selection and, for
/// [`Scale::WeightSvd`], W's leading singular values.
#[allow(clippy::too_many_arguments)]
pub fn build(
    name: &str,
    w: &Tensor,
    svd: &TruncatedSvd,
    sel: &Selection,
    weight_s: Option<&[f32]>,
    r: usize,
    s: f64,
    cfg: &LoraGaConfig,
) -> Result<LayerInit> {
    cfg.validate()?;
    let (m, n) = w.shape().dims2(OP, name)?;
    if (svd.rows(), svd.cols()) != (m, n) || svd.k() < 2 * r {
        return Err(Error::layer(
            OP,
            name,
            format!(
                "the SVD is rank {} of a [{}, {}] matrix; W is [{m}, {n}] and 2r = {}",
                svd.k(),
                svd.rows(),
                svd.cols(),
                2 * r
            ),
        ));
    }
    sel.check(name, r)?;
    let sigma: Vec<f64> = svd.s().iter().map(|&x| x as f64).collect();
    let (ca, cb) = scales(name, m, r, s, &sigma, sel, weight_s, cfg)?;
    let (k, u, vt) = (svd.k(), svd.u(), svd.vt());
    let mut a = vec![0.0f64; r * n];
    let mut b = vec![0.0f64; m * r];
    for (row, (&i, &c)) in sel.a.iter().zip(&ca).enumerate() {
        for j in 0..n {
            a[row * n + j] = c * vt[i * n + j] as f64;
        }
    }
    for (col, (&i, &c)) in sel.b.iter().zip(&cb).enumerate() {
        for row in 0..m {
            b[row * r + col] = c * u[row * k + i] as f64;
        }
    }
    factors_to_layer(name, w, a, b, r, s, cfg.adapter_dtype)
}

/// Per-row scales of A and per-column scales of B (the table in the module docs).
#[allow(clippy::too_many_arguments)]
fn scales(
    name: &str,
    m: usize,
    r: usize,
    s: f64,
    sigma: &[f64],
    sel: &Selection,
    weight_s: Option<&[f32]>,
    cfg: &LoraGaConfig,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let stable = (m as f64).powf(0.25) / (cfg.stable_gamma as f64).sqrt();
    let weight = || -> Result<&[f32]> {
        weight_s.filter(|w| !w.is_empty()).ok_or_else(|| {
            Error::layer(OP, name, "scale WeightSvd needs the weight's singular values (weight_singular_values)")
        })
    };
    Ok(match cfg.variant {
        Variant::Reference => {
            let c = match cfg.scale {
                Scale::Stable => stable,
                Scale::Gd => 1.0 / s,
                Scale::Unit => 1.0,
                Scale::WeightSvd => {
                    let sw = weight()?;
                    if sw.len() < r {
                        return Err(Error::layer(OP, name, format!("{} weight singular values for r = {r}", sw.len())));
                    }
                    sw[..r].iter().map(|&x| (x as f64 / s).sqrt()).sum::<f64>() / r as f64
                }
            };
            (vec![c; r], vec![c; r])
        }
        Variant::Peft => {
            let (ca, cb) = match cfg.scale {
                Scale::Stable => (1.0, stable),
                Scale::Gd => (1.0 / s, 1.0 / s),
                Scale::Unit => (1.0, 1.0),
                // PEFT leaves B unscaled when σ_B[0] is 0 (a zero gradient).
                Scale::WeightSvd => {
                    let first = sigma[sel.b[0]];
                    (1.0, if first > 0.0 { weight()?[0] as f64 / first } else { 1.0 })
                }
            };
            (vec![ca; r], sel.b.iter().map(|&i| cb * sigma[i]).collect())
        }
    })
}

/// Stores A [r, n] and B [m, r] (f32, then the adapter dtype, default W's; on W's device) and
/// offsets W by them.
pub(crate) fn factors_to_layer(
    name: &str,
    w: &Tensor,
    a: Vec<f64>,
    b: Vec<f64>,
    r: usize,
    s: f64,
    adapter_dtype: Option<DType>,
) -> Result<LayerInit> {
    let (m, n) = w.shape().dims2(OP, name)?;
    let dtype = adapter_dtype.unwrap_or(w.dtype());
    // Made on the host (they are small), stored on W's device.
    let store = |v: Vec<f64>, shape: [usize; 2]| {
        let cpu = CpuStorage::from_f32_vec(dtype, v.into_iter().map(|x| x as f32).collect());
        Tensor::from_cpu(cpu, shape.into(), &w.device())
    };
    let (a, b) = (store(a, [r, n])?, store(b, [m, r])?);
    let weight = offset_weight(name, w, &a, &b, s)?;
    Ok(LayerInit { a, b, weight: Some(weight) })
}
