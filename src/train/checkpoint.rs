//! A run's checkpoint: everything `--resume` needs to continue exactly where the run stopped.
//!
//! `OUT/checkpoint/` holds the trainable parameters (`trainable.safetensors`, f32), AdamW's state
//! (`optimizer.safetensors`) and where the run stands (`state.json`: optimizer steps done, the
//! data position of the next batch). The base weights are not saved: they are the model file's,
//! or for LoRA-GA and PiSSA rebuilt bit for bit from it and `OUT/init/` (written once, after
//! initialisation).
//!
//! A new checkpoint is written into `OUT/.checkpoint.tmp/` and swapped in by two renames
//! (`checkpoint` -> `.checkpoint.old`, `.checkpoint.tmp` -> `checkpoint`), so a crash at any point
//! leaves a complete checkpoint: [`load`] falls back to `.checkpoint.old` if the second rename
//! never happened.

use std::path::{Path, PathBuf};

use loraga_core::autograd::Params;
use loraga_core::data::Position;
use loraga_core::io::{SafetensorsCheckpoint, save_safetensors};
use loraga_core::optim::AdamW;
use loraga_core::{Error, Result};
use serde::{Deserialize, Serialize};

const CURRENT: &str = "checkpoint";
const OLD: &str = ".checkpoint.old";
const TMP: &str = ".checkpoint.tmp";
const TRAINABLE: &str = "trainable.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunState {
    /// Optimizer steps done.
    pub step: u64,
    pub epoch: u64,
    /// The next batch of `epoch`.
    pub batch: usize,
    /// Tokens (padding excluded) trained on so far.
    pub tokens: u64,
}

impl RunState {
    pub fn position(&self) -> Position {
        Position { epoch: self.epoch, batch: self.batch }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// Writes a checkpoint of `params`' trainable parameters, the optimizer and `state` into `out`.
pub fn save(out: &Path, params: &Params, opt: &AdamW, state: &RunState) -> Result<()> {
    let tmp = out.join(TMP);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let trainable: Vec<(&str, &loraga_core::Tensor)> =
        params.iter().filter(|p| p.trainable()).map(|p| (p.name(), p.value())).collect();
    save_safetensors(tmp.join(TRAINABLE), &trainable, None)?;
    opt.save_state(tmp.join(OPTIMIZER))?;
    let text = serde_json::to_string_pretty(state).expect("RunState always serialises");
    loraga_core::io::atomic::write(&tmp.join(STATE), text.as_bytes())?;

    let (current, old) = (out.join(CURRENT), out.join(OLD));
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    if current.exists() {
        std::fs::rename(&current, &old).map_err(io(&current))?;
    }
    std::fs::rename(&tmp, &current).map_err(io(&tmp))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    Ok(())
}

/// The folder of the newest complete checkpoint in `out`, if any.
pub fn latest(out: &Path) -> Option<PathBuf> {
    [CURRENT, OLD].iter().map(|d| out.join(d)).find(|d| d.join(STATE).is_file())
}

/// Loads the newest checkpoint into `params` (its trainable values) and `opt`, and returns where
/// the run stood. Every trainable parameter must be in it, with its shape.
pub fn load(out: &Path, params: &mut Params, opt: &mut AdamW) -> Result<RunState> {
    let dir = latest(out)
        .ok_or_else(|| Error::format(out, "no checkpoint to resume from (checkpoint/state.json is missing)"))?;
    let state_path = dir.join(STATE);
    let text = std::fs::read_to_string(&state_path).map_err(io(&state_path))?;
    let state: RunState = serde_json::from_str(&text).map_err(|e| Error::format(&state_path, e.to_string()))?;
    let file = SafetensorsCheckpoint::open(dir.join(TRAINABLE))?;
    let names: Vec<String> = params.iter().filter(|p| p.trainable()).map(|p| p.name().to_string()).collect();
    if file.names().count() != names.len() {
        return Err(Error::format(
            file.path(),
            format!("{} tensors, but the run trains {} parameters", file.names().count(), names.len()),
        ));
    }
    params.load_from(&file, &names)?;
    opt.load_state(dir.join(OPTIMIZER), params)?;
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use loraga_core::optim::AdamWConfig;
    use loraga_core::{Device, Tensor};

    fn params(v: f32) -> Params {
        let mut p = Params::new();
        p.insert("w", Tensor::from_vec(vec![v; 6], [2, 3], &Device::Cpu).unwrap(), true).unwrap();
        p.insert("frozen", Tensor::from_vec(vec![9.0f32; 4], [4], &Device::Cpu).unwrap(), false).unwrap();
        p
    }

    #[test]
    fn round_trip_and_recovery_from_an_interrupted_swap() {
        let dir = tempfile::tempdir().unwrap();
        let opt = AdamW::new(AdamWConfig::new(1e-3)).unwrap();
        let state = RunState { step: 7, epoch: 1, batch: 3, tokens: 1234 };
        save(dir.path(), &params(1.5), &opt, &state).unwrap();
        let state2 = RunState { step: 8, ..state };
        save(dir.path(), &params(2.5), &opt, &state2).unwrap();

        let mut p = params(0.0);
        let mut opt2 = AdamW::new(AdamWConfig::new(1e-3)).unwrap();
        assert_eq!(load(dir.path(), &mut p, &mut opt2).unwrap(), state2);
        assert_eq!(p.get("w").unwrap().to_vec::<f32>().unwrap(), vec![2.5; 6]);
        assert_eq!(p.get("frozen").unwrap().to_vec::<f32>().unwrap(), vec![9.0; 4]);

        // A crash between the two renames leaves only the old checkpoint.
        std::fs::rename(dir.path().join(CURRENT), dir.path().join(OLD)).unwrap();
        assert_eq!(load(dir.path(), &mut p, &mut opt2).unwrap(), state2);
    }

    #[test]
    fn a_checkpoint_of_other_parameters_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let opt = AdamW::new(AdamWConfig::new(1e-3)).unwrap();
        save(dir.path(), &params(1.0), &opt, &RunState { step: 1, epoch: 0, batch: 1, tokens: 1 }).unwrap();
        let mut other = Params::new();
        other.insert("v", Tensor::from_vec(vec![0.0f32; 6], [2, 3], &Device::Cpu).unwrap(), true).unwrap();
        let mut opt2 = AdamW::new(AdamWConfig::new(1e-3)).unwrap();
        let err = load(dir.path(), &mut other, &mut opt2).unwrap_err().to_string();
        assert!(err.contains("'v'") || err.contains("v"), "{err}");
        let empty = tempfile::tempdir().unwrap();
        let err = load(empty.path(), &mut other, &mut opt2).unwrap_err().to_string();
        assert!(err.contains("no checkpoint"), "{err}");
    }
}
