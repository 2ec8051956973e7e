//! A run's metrics: one JSON object per line in `metrics.jsonl`, one line per optimizer step
//! (and per evaluation), flushed as it is written so that a killed run keeps every finished step.
//!
//! Resuming a run truncates the file after the last step the checkpoint covers, so a resumed run
//! never shows the same step twice. A killed process can leave a last line without its newline:
//! the reader ignores exactly that (an unfinished write), and rejects anything else malformed.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};

use loraga_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// One line of `metrics.jsonl`. Absent fields were not measured at that step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Optimizer steps done (1 after the first update).
    pub step: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// Reads every complete record of a metrics file.
pub fn read(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let complete = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    complete
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line)
                .map_err(|e| Error::Format { file: path.to_path_buf(), msg: format!("line {}: {e}", i + 1) })
        })
        .collect()
}

/// Appends records to a run's metrics file.
pub struct Writer {
    path: PathBuf,
    file: File,
}

impl Writer {
    /// Starts a fresh file (a new run).
    pub fn create(path: &Path) -> Result<Writer> {
        let file = File::create(path).map_err(io(path))?;
        Ok(Writer { path: path.to_path_buf(), file })
    }

    /// Reopens a run's file for a run resumed after `step`: records of later steps (written
    /// after the checkpoint, then lost with the process) are dropped.
    pub fn resume(path: &Path, step: usize) -> Result<Writer> {
        let kept: Vec<Record> = if path.exists() { read(path)? } else { Vec::new() };
        let mut text = String::new();
        for r in kept.iter().filter(|r| r.step <= step) {
            text.push_str(&serde_json::to_string(r).expect("a Record always serialises"));
            text.push('\n');
        }
        loraga_core::io::atomic::write(path, text.as_bytes())?;
        let file = OpenOptions::new().append(true).open(path).map_err(io(path))?;
        Ok(Writer { path: path.to_path_buf(), file })
    }

    pub fn write(&mut self, record: &Record) -> Result<()> {
        let mut line = serde_json::to_string(record).expect("a Record always serialises");
        line.push('\n');
        self.file.write_all(line.as_bytes()).and_then(|_| self.file.flush()).map_err(io(&self.path))
    }
}

/// Reads a small JSON file (a run's `run.json`).
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let file = File::open(path).map_err(io(path))?;
    serde_json::from_reader(BufReader::new(file))
        .map_err(|e| Error::Format { file: path.to_path_buf(), msg: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(step: usize, loss: f64) -> Record {
        Record { step, loss: Some(loss), ..Record::default() }
    }

    #[test]
    fn resume_drops_steps_after_the_checkpoint_and_an_unfinished_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut w = Writer::create(&path).unwrap();
        for s in 1..=5 {
            w.write(&rec(s, 10.0 - s as f64)).unwrap();
        }
        drop(w);
        // A process killed mid-write leaves half a line.
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"step\":6,\"lo").unwrap();
        assert_eq!(read(&path).unwrap().len(), 5);

        let mut w = Writer::resume(&path, 3).unwrap();
        w.write(&rec(4, 0.5)).unwrap();
        let got = read(&path).unwrap();
        assert_eq!(got.iter().map(|r| r.step).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert_eq!(got[3].loss, Some(0.5));
    }

    #[test]
    fn a_malformed_complete_line_is_an_error_naming_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(&path, "{\"step\":1}\nnot json\n").unwrap();
        let err = read(&path).unwrap_err().to_string();
        assert!(err.contains("metrics.jsonl") && err.contains("line 2"), "{err}");
    }
}
