//! Learning-rate schedules: linear warmup, then constant, linear or cosine decay, exactly as
//! transformers' `get_constant_schedule_with_warmup`, `get_linear_schedule_with_warmup` and
//! `get_cosine_schedule_with_warmup` (num_cycles = 0.5) under torch's `LambdaLR`.
//!
//! With k the number of optimizer steps already taken, W the warmup steps and T the total steps,
//! the learning rate of step k + 1 is `base_lr * lambda(k)`:
//!
//! ```text
//! k < W:      lambda = k / max(1, W)                                (all three kinds)
//! Constant:   lambda = 1
//! Linear:     lambda = max(0, (T - k) / max(1, T - W))
//! Cosine:     lambda = max(0, 0.5 (1 + cos(pi * 2 * 0.5 * progress))),  progress = (k - W) / max(1, T - W)
//! ```
//!
//! So the very first step runs at lr 0 when W > 0, as in transformers' Trainer. Everything is
//! computed in f64, as Python does; the result is the f64 learning rate that torch would hold
//! (AdamW takes its hyper-parameters as f64 for the same reason).

use crate::error::{Error, Result};

/// What happens after the warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decay {
    Constant,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub decay: Decay,
}

/// transformers' `num_cycles` default for the cosine schedule: half a cosine, from 1 down to 0.
const NUM_CYCLES: f64 = 0.5;

impl LrSchedule {
    pub fn new(base_lr: f64, warmup_steps: u64, total_steps: u64, decay: Decay) -> Result<LrSchedule> {
        if !(base_lr.is_finite() && base_lr >= 0.0) {
            return Err(Error::InvalidArgument(format!("learning rate {base_lr} must be finite and >= 0")));
        }
        if warmup_steps > total_steps {
            return Err(Error::InvalidArgument(format!(
                "{warmup_steps} warmup steps exceed the {total_steps} training steps"
            )));
        }
        Ok(LrSchedule { base_lr, warmup_steps, total_steps, decay })
    }

    /// The learning rate of the step that follows `steps_done` optimizer steps.
    pub fn lr_at(&self, steps_done: u64) -> f64 {
        self.base_lr * self.lambda(steps_done)
    }

    /// The multiplier of `base_lr` (transformers' `lr_lambda(current_step)`).
    pub fn lambda(&self, k: u64) -> f64 {
        let (w, t) = (self.warmup_steps, self.total_steps);
        if k < w {
            return k as f64 / w.max(1) as f64;
        }
        // T - k and T - W as Python's signed integers: past T the linear schedule clamps at 0.
        let after_warmup = (t as f64 - w as f64).max(1.0);
        match self.decay {
            Decay::Constant => 1.0,
            Decay::Linear => ((t as f64 - k as f64) / after_warmup).max(0.0),
            Decay::Cosine => {
                let progress = (k - w) as f64 / after_warmup;
                (0.5 * (1.0 + (std::f64::consts::PI * NUM_CYCLES * 2.0 * progress).cos())).max(0.0)
            }
        }
    }
}

/// Warmup steps from a warmup ratio, as transformers' `TrainingArguments.get_warmup_steps`:
/// `ceil(total_steps * ratio)` (so 3% of 1000 steps is 30, of 1001 steps 31).
pub fn warmup_steps_from_ratio(total_steps: u64, ratio: f64) -> Result<u64> {
    if !(0.0..=1.0).contains(&ratio) {
        return Err(Error::InvalidArgument(format!("warmup ratio {ratio} must lie in [0, 1]")));
    }
    Ok((total_steps as f64 * ratio).ceil() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(decay: Decay) -> LrSchedule {
        LrSchedule::new(2e-4, 30, 1000, decay).unwrap()
    }

    #[test]
    fn warmup_is_linear_from_zero_and_ends_at_the_base_rate() {
        for decay in [Decay::Constant, Decay::Linear, Decay::Cosine] {
            let s = sched(decay);
            assert_eq!(s.lr_at(0), 0.0, "{decay:?}: the first step runs at lr 0");
            assert_eq!(s.lr_at(1), 2e-4 * (1.0 / 30.0), "{decay:?}");
            assert_eq!(s.lr_at(15), 2e-4 * 0.5, "{decay:?}");
            assert_eq!(s.lr_at(29), 2e-4 * (29.0 / 30.0), "{decay:?}");
            assert_eq!(s.lr_at(30), 2e-4, "{decay:?}: the warmup boundary is the peak");
        }
    }

    #[test]
    fn decays_match_the_closed_forms() {
        let (w, t) = (30.0f64, 1000.0f64);
        let (c, l, co) = (sched(Decay::Constant), sched(Decay::Linear), sched(Decay::Cosine));
        for k in [31u64, 200, 515, 777, 999] {
            let kf = k as f64;
            assert_eq!(c.lambda(k), 1.0);
            let lin = (t - kf) / (t - w);
            assert!((l.lambda(k) - lin).abs() <= 1e-15, "linear at {k}: {} vs {lin}", l.lambda(k));
            let cos = 0.5 * (1.0 + (std::f64::consts::PI * (kf - w) / (t - w)).cos());
            assert!((co.lambda(k) - cos).abs() <= 1e-15, "cosine at {k}: {} vs {cos}", co.lambda(k));
        }
        // Midpoint of the decay: the cosine is at 1/2 and so is the linear ramp.
        assert!((co.lambda(515) - 0.5).abs() < 1e-15);
        assert!((l.lambda(515) - 0.5).abs() < 1e-15);
        // The end: both reach 0; past it the linear one stays at 0 and the constant at 1.
        assert!(co.lambda(1000) < 1e-15, "cosine at the end: {}", co.lambda(1000));
        for k in [1000, 1001, 5000] {
            assert_eq!(l.lambda(k), 0.0, "linear at {k}");
            assert_eq!(c.lambda(k), 1.0);
        }
        // Past the end transformers' cosine comes back up (its formula has no clamp there);
        // follow it rather than invent one.
        let past = 0.5 * (1.0 + (std::f64::consts::PI * 971.0 / 970.0).cos());
        assert!((co.lambda(1001) - past).abs() < 1e-15 && past > 0.0);
        assert!((co.lambda(1970) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn no_warmup_and_degenerate_lengths() {
        let s = LrSchedule::new(1.0, 0, 10, Decay::Linear).unwrap();
        assert_eq!(s.lr_at(0), 1.0);
        assert_eq!(s.lr_at(5), 0.5);
        // W = T: transformers divides by max(1, T - W) = 1.
        let s = LrSchedule::new(1.0, 10, 10, Decay::Linear).unwrap();
        assert_eq!(s.lr_at(9), 0.9);
        assert_eq!(s.lr_at(10), 0.0);
        let e = LrSchedule::new(1.0, 11, 10, Decay::Cosine).unwrap_err();
        assert!(e.to_string().contains("11 warmup steps exceed the 10 training steps"), "{e}");
        assert!(LrSchedule::new(f64::NAN, 0, 10, Decay::Cosine).is_err());
    }

    #[test]
    fn warmup_ratio_rounds_up_like_transformers() {
        assert_eq!(warmup_steps_from_ratio(1000, 0.03).unwrap(), 30);
        assert_eq!(warmup_steps_from_ratio(1001, 0.03).unwrap(), 31);
        assert_eq!(warmup_steps_from_ratio(100, 0.0).unwrap(), 0);
        assert_eq!(warmup_steps_from_ratio(7, 1.0).unwrap(), 7);
        // 934 * 0.03 = 28.02 -> 29.
        assert_eq!(warmup_steps_from_ratio(934, 0.03).unwrap(), 29);
        assert!(warmup_steps_from_ratio(10, 1.5).is_err());
    }
}
