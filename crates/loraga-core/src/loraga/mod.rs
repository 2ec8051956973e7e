//! LoRA-GA (Wang, Yu, Li, NeurIPS 2024): LoRA adapters initialised from the gradient of the full
//! weights, so that the first LoRA step follows full fine-tuning's. research/loraga-spec.md is the
//! specification; \[REF\] is the authors' PEFT fork, \[UP\] upstream PEFT (0.19+), whose behaviour
//! [`Variant::Peft`] reproduces.
//!
//! For every target linear layer W0 [m = out, n = in], with s the LoRA scaling (alpha/r, or
//! alpha/sqrt(r) with rsLoRA):
//!
//! 1. [`estimate`]: G = (1/N) Σ_b ∂L_b/∂W at W0, L_b the mean token loss of micro-batch b,
//!    accumulated in f32 buffers as each layer's gradient appears during the backward pass.
//! 2. [`layer`]: G ≈ U diag(σ) Vᵀ by the randomized SVD (q = min(4r, m, n), niter = 4), top 2r
//!    triplets. A takes r right vectors, B r left vectors, from index sets I_A, I_B
//!    ([`Direction`]), scaled ([`Scale`]); the base weight is offset so that the model's function
//!    does not change (formulas below).
//! 3. [`model`]: the same for every target of a Llama; [`state`]: what it leaves
//!    ([`InitState`]), its save/resume, and the rank-2r adapter that gives the same model on the
//!    original W0.
//!
//! ```text
//! [REF]  A = c·V_Aᵀ      B = c·U_B
//! [UP]   A = c_A·V_Aᵀ    B = c_B·U_B·diag(σ_B)
//! W_frz = round(W0 − s·B·A)      (f64 arithmetic, one rounding to the storage dtype)
//! ```
//!
//! Why (spec §6): at init ∇_A = s·BᵀG and ∇_B = s·G·Aᵀ, so one SGD step of rate λ moves the
//! effective weight W_frz + s·B·A by −λ·s²·(G·AᵀA + B·Bᵀ·G) + O(λ²), which for \[REF\] is
//! −λ·s²c²·G_2r: the best rank-2r approximation of the full fine-tuning step.
//!
//! [`baselines`] gives vanilla LoRA and PiSSA behind the same interface ([`InitMethod`]).
//!
//! Devices: everything runs on the CPU and is tested there. With the model on a CUDA device, the
//! estimation accumulates on the device (the tape's in-place add) or on the host, the randomized
//! SVDs run on the device, A and B are assembled on the host (they are small) and the offset is a
//! GEMM on the device; those paths have GPU tests (tests/loraga_cuda.rs). The exact SVDs (for
//! tests, and PiSSA's "pissa") are host-only and refuse GPU tensors by name.

pub mod baselines;
pub mod estimate;
pub mod layer;
pub mod model;
mod offset;
pub mod state;

pub use baselines::{PissaConfig, PissaSvd};
pub use estimate::{
    AccumulatorPlacement, EstimateOptions, GradientEstimate, GradientEstimator, MemoryPlan, estimate_gradients,
};
pub use layer::{LayerInit, Selection};
pub use model::{initialize, target_modules, target_weights};
pub use state::{InitLayer, InitState};

use crate::dtype::DType;
use crate::error::{Error, Result};

/// Which singular triplets go to A and which to B (spec §4.1); indices are 0-based into the top 2r.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// A = top r right vectors (0..r), B = left vectors r..2r. The paper's choice and the default.
    ArB2r,
    /// A = r..2r, B = 0..r.
    A2rBr,
    /// A = odd indices, B = even indices.
    ArBr,
    /// A random split of 0..2r (\[REF\]: disjoint halves; \[UP\]: the same r indices for A and B).
    Random,
}

/// How A and B are scaled (spec §4.2, §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// c = m^(1/4)/sqrt(gamma), m = d_out (\[REF\]: A and B; \[UP\]: B only).
    Stable,
    /// c = 1/s on A and B: the first step is exactly full fine-tuning's on the top-2r spectrum.
    Gd,
    /// c = 1.
    Unit,
    /// From W's singular values S_W. \[REF\] (`weightS`): c = `mean_{i<r} sqrt(S_W[i]/s)` on A and B,
    /// S_W from svd_lowrank(W, q = min(4r, m, n)). \[UP\] (`weight_svd`): `B *= S_W[0]/σ_B[0]`,
    /// S_W from svd_lowrank(W, q = r).
    WeightSvd,
}

/// Whose formulas: the reference code (the paper) or upstream PEFT's variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// \[REF\]: A and B orthonormal bases times one constant; the §6 first-step property holds.
    Reference,
    /// \[UP\] (PEFT 0.19-0.21): B carries the singular values, `stable` scales B only, `random`
    /// uses the same indices for A and B. The §6 property does not hold (spec §8).
    Peft,
}

/// The SVD used for G (and for W under [`Scale::WeightSvd`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SvdMethod {
    /// torch.svd_lowrank semantics, Ω drawn from the config's seed (the reference's choice).
    Randomized,
    /// The exact SVD (O(mn·min(m, n)); for tests and small layers).
    Exact,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraGaConfig {
    pub direction: Direction,
    pub scale: Scale,
    /// gamma of [`Scale::Stable`]; the reference default is 16 (the paper's runs used 64).
    pub stable_gamma: f32,
    pub variant: Variant,
    pub svd: SvdMethod,
    /// Subspace iterations of the randomized SVD (4 in \[REF\] and \[UP\]).
    pub niter: usize,
    /// Seeds Ω of the randomized SVD and the split of [`Direction::Random`].
    pub seed: u64,
    /// The dtype A and B are stored in; None: the base weight's (\[UP\]). \[REF\]'s default
    /// `dtype="fp32"` is Some(F32). The offset is always computed from the stored A and B, so the
    /// initialised model equals the original up to W_frz's rounding (\[REF\] computes it from the
    /// values before the cast, which breaks that for bf16 adapters; not reproduced).
    pub adapter_dtype: Option<DType>,
}

impl Default for LoraGaConfig {
    fn default() -> Self {
        LoraGaConfig {
            direction: Direction::ArB2r,
            scale: Scale::Stable,
            stable_gamma: 16.0,
            variant: Variant::Reference,
            svd: SvdMethod::Randomized,
            niter: 4,
            seed: 0,
            adapter_dtype: None,
        }
    }
}

impl LoraGaConfig {
    /// PEFT 0.21's `LoraGAConfig()` defaults in [`Variant::Peft`].
    pub fn peft() -> Self {
        LoraGaConfig { variant: Variant::Peft, ..Default::default() }
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.stable_gamma > 0.0 && self.stable_gamma.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "LoRA-GA: stable_gamma must be positive, got {}",
                self.stable_gamma
            )));
        }
        Ok(())
    }
}

/// How the adapters of a model are initialised: every experiment can compare these.
#[derive(Debug, Clone, PartialEq)]
pub enum InitMethod {
    /// PEFT's default: A Kaiming-uniform (bound 1/sqrt(in)), B = 0; the base stays W0.
    Lora {
        seed: u64,
    },
    LoraGa(LoraGaConfig),
    Pissa(PissaConfig),
}

impl InitMethod {
    /// Whether the method changes the base weights (then an adapter for the original model is
    /// the rank-2r conversion).
    pub fn modifies_base(&self) -> bool {
        !matches!(self, InitMethod::Lora { .. })
    }

    /// The name PEFT uses for it in `init_lora_weights`.
    pub fn peft_name(&self) -> &'static str {
        match self {
            InitMethod::Lora { .. } => "true",
            InitMethod::LoraGa(_) => "lora_ga",
            InitMethod::Pissa(_) => "pissa",
        }
    }
}

/// Names as in PEFT's `LoraGAConfig` (and the reference's), for configs and saved state.
impl Direction {
    pub const ALL: [Direction; 4] = [Direction::ArB2r, Direction::A2rBr, Direction::ArBr, Direction::Random];

    pub fn name(self) -> &'static str {
        match self {
            Direction::ArB2r => "ArB2r",
            Direction::A2rBr => "A2rBr",
            Direction::ArBr => "ArBr",
            Direction::Random => "random",
        }
    }

    pub fn from_name(s: &str) -> Result<Direction> {
        Direction::ALL.into_iter().find(|d| d.name() == s).ok_or_else(|| {
            Error::InvalidArgument(format!("unknown LoRA-GA direction '{s}' (ArB2r, A2rBr, ArBr, random)"))
        })
    }
}

impl Scale {
    pub const ALL: [Scale; 4] = [Scale::Stable, Scale::Gd, Scale::Unit, Scale::WeightSvd];

    /// PEFT's names (\[REF\] says `gd` for `gd_scale` and `weightS` for `weight_svd`; both are read).
    pub fn name(self) -> &'static str {
        match self {
            Scale::Stable => "stable",
            Scale::Gd => "gd_scale",
            Scale::Unit => "unit",
            Scale::WeightSvd => "weight_svd",
        }
    }

    pub fn from_name(s: &str) -> Result<Scale> {
        match s {
            "gd" => Ok(Scale::Gd),
            "weightS" => Ok(Scale::WeightSvd),
            _ => Scale::ALL.into_iter().find(|x| x.name() == s).ok_or_else(|| {
                Error::InvalidArgument(format!("unknown LoRA-GA scale '{s}' (stable, gd_scale, unit, weight_svd)"))
            }),
        }
    }
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Reference => "reference",
            Variant::Peft => "peft",
        }
    }

    pub fn from_name(s: &str) -> Result<Variant> {
        match s {
            "reference" => Ok(Variant::Reference),
            "peft" => Ok(Variant::Peft),
            _ => Err(Error::InvalidArgument(format!("unknown LoRA-GA variant '{s}' (reference, peft)"))),
        }
    }
}
