//! Where a run's wall time goes, phase by phase: printed at the end (or on interruption) and
//! written to the run folder as `timings.json`. They cover this process only (a resumed run
//! starts counting again).
//!
//! `train_steps_s` sums the optimizer steps as each step's loop measures it (forward, backward,
//! clipping, AdamW; the loss read back each micro-batch synchronises the device); `other_s` is
//! what no phase covers (metrics lines, the progress bar, freeing memory).

use std::path::Path;
use std::time::Instant;

use loraga_core::Result;
use serde::Serialize;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    /// Opening the device (CUDA context, driver libraries).
    pub device_s: f64,
    /// Reading the model and moving its weights to the device.
    pub model_load_s: f64,
    /// Reading and tokenizing the training and eval data.
    pub tokenize_s: f64,
    /// LoRA-GA's gradient estimation.
    pub estimate_s: f64,
    /// Creating the adapters (LoRA-GA's SVDs, PiSSA's), saving the initial state, f32 masters.
    pub init_s: f64,
    pub steps: u64,
    pub train_steps_s: f64,
    /// The first step alone (kernel compiles and module loads, first allocations).
    pub first_step_s: f64,
    pub evals: u64,
    pub eval_s: f64,
    pub checkpoints: u64,
    pub checkpoint_s: f64,
    /// Writing the adapter or the model.
    pub export_s: f64,
    pub other_s: f64,
    pub total_s: f64,
    #[serde(skip)]
    started: Option<Instant>,
}

/// Seconds since `t`.
pub fn since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

impl Timings {
    pub fn start() -> Timings {
        Timings { started: Some(Instant::now()), ..Timings::default() }
    }

    pub fn step(&mut self, seconds: f64) {
        if self.steps == 0 {
            self.first_step_s = seconds;
        }
        self.steps += 1;
        self.train_steps_s += seconds;
    }

    /// Sets the total (wall time since `start`) and what no phase covers.
    fn close(&mut self) {
        self.total_s = self.started.map_or(0.0, since);
        let phases = self.device_s
            + self.model_load_s
            + self.tokenize_s
            + self.estimate_s
            + self.init_s
            + self.train_steps_s
            + self.eval_s
            + self.checkpoint_s
            + self.export_s;
        self.other_s = (self.total_s - phases).max(0.0);
    }

    /// One line for the log.
    pub fn line(&self) -> String {
        format!(
            "timings: device {:.1} s, model load {:.1} s, tokenize {:.1} s, estimate {:.1} s, init {:.1} s, \
             {} steps {:.1} s (first {:.1} s), {} evals {:.1} s, {} checkpoints {:.1} s, export {:.1} s, \
             other {:.1} s; total {:.1} s",
            self.device_s,
            self.model_load_s,
            self.tokenize_s,
            self.estimate_s,
            self.init_s,
            self.steps,
            self.train_steps_s,
            self.first_step_s,
            self.evals,
            self.eval_s,
            self.checkpoints,
            self.checkpoint_s,
            self.export_s,
            self.other_s,
            self.total_s
        )
    }

    /// Closes the account, prints its line to stderr and writes `timings.json` into `out`.
    pub fn finish(&mut self, out: &Path) -> Result<()> {
        self.close();
        eprintln!("{}", self.line());
        let text = serde_json::to_string_pretty(self).expect("timings always serialise");
        loraga_core::io::atomic::write(&out.join("timings.json"), text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_is_the_wall_time_no_phase_covers() {
        let mut t = Timings::start();
        std::thread::sleep(std::time::Duration::from_millis(30));
        t.model_load_s = 0.01;
        t.step(0.004);
        t.step(0.002);
        t.close();
        assert_eq!((t.steps, t.first_step_s, t.train_steps_s), (2, 0.004, 0.006));
        assert!(t.total_s >= 0.03, "{t:?}");
        assert!((t.total_s - t.other_s - 0.016).abs() < 1e-12, "{t:?}");
        let json: serde_json::Value = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(json["steps"], 2);
        assert!(json.get("started").is_none());
    }
}
