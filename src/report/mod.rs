//! `loraga report`: the loss curves of several runs in one PNG, and a markdown table.
//!
//! A run is a folder with `metrics.jsonl` (see [`crate::metrics`]) and optionally `run.json`
//! (whose `name` labels the run). Training losses are noisy per step, so curves and the table use
//! an exponential moving average with TensorBoard's bias correction:
//!
//!   m_t = w m_{t-1} + (1 - w) loss_t,   smoothed_t = m_t / (1 - w^t),   w = 0.9 by default.
//!
//! "Steps to reach" is the first step at which a run's smoothed training loss is at or below the
//! reference run's final smoothed training loss (the convergence-speed comparison of LoRA-GA's
//! paper, with vanilla LoRA as the reference). With `--seeds`, runs repeated over seeds are
//! reported per group (see [`seeds`]).

pub mod seeds;

use std::path::{Path, PathBuf};

use loraga_core::{Error, Result};
use plotters::prelude::*;

use crate::metrics::{self, Record};

/// DejaVu Sans (Bitstream Vera licence, assets/fonts/DejaVuSans.LICENSE): bundled so that
/// plots render on machines without system fonts.
const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

pub struct Run {
    pub name: String,
    pub records: Vec<Record>,
}

#[derive(serde::Deserialize)]
struct RunInfo {
    name: Option<String>,
}

impl Run {
    /// Reads a run folder; its label is `run.json`'s `name`, else the folder's name.
    pub fn load(dir: &Path) -> Result<Run> {
        let records = metrics::read(&dir.join("metrics.jsonl"))?;
        let info = dir.join("run.json");
        let name = if info.exists() { metrics::read_json::<RunInfo>(&info)?.name } else { None };
        let name =
            name.unwrap_or_else(|| dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        Ok(Run { name, records })
    }

    /// (step, loss) of every step that has a training loss.
    pub fn train_loss(&self) -> Vec<(usize, f64)> {
        self.records.iter().filter_map(|r| Some((r.step, r.loss?))).collect()
    }

    pub fn eval_loss(&self) -> Vec<(usize, f64)> {
        self.records.iter().filter_map(|r| Some((r.step, r.eval_loss?))).collect()
    }

    pub fn smoothed_train_loss(&self, weight: f64) -> Vec<(usize, f64)> {
        let points = self.train_loss();
        let values: Vec<f64> = points.iter().map(|p| p.1).collect();
        points.iter().map(|p| p.0).zip(ema(&values, weight)).collect()
    }
}

/// Bias-corrected exponential moving average.
pub fn ema(values: &[f64], weight: f64) -> Vec<f64> {
    let mut m = 0.0;
    let mut correction = 1.0;
    values
        .iter()
        .map(|&v| {
            m = weight * m + (1.0 - weight) * v;
            correction *= weight;
            m / (1.0 - correction)
        })
        .collect()
}

/// The first step whose value is at or below `target`.
pub fn steps_to_reach(curve: &[(usize, f64)], target: f64) -> Option<usize> {
    curve.iter().find(|p| p.1 <= target).map(|p| p.0)
}

pub(crate) fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "-".into())
}

/// One row per run: steps, final smoothed training loss, last and best eval loss, and steps to
/// reach the reference run's final smoothed training loss.
pub fn table(runs: &[Run], reference: Option<&Run>, weight: f64) -> String {
    let target = reference.and_then(|r| r.smoothed_train_loss(weight).last().map(|p| p.1));
    let mut out = String::from(
        "| run | steps | final train loss (smoothed) | last eval loss | best eval loss | steps to reach reference |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    for run in runs {
        let smoothed = run.smoothed_train_loss(weight);
        let evals = run.eval_loss();
        let best = evals.iter().map(|p| p.1).fold(None, |b: Option<f64>, v| Some(b.map_or(v, |b| b.min(v))));
        let reach = match target {
            Some(t) => steps_to_reach(&smoothed, t).map(|s| s.to_string()).unwrap_or_else(|| "not reached".into()),
            None => "-".into(),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            run.name,
            run.records.iter().map(|r| r.step).max().unwrap_or(0),
            fmt(smoothed.last().map(|p| p.1), 4),
            fmt(evals.last().map(|p| p.1), 4),
            fmt(best, 4),
            reach
        ));
    }
    if let (Some(r), Some(t)) = (reference, target) {
        out.push_str(&format!("\nReference: {} (final smoothed training loss {t:.4}; EMA weight {weight}).\n", r.name));
    }
    out
}

fn plot_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Format { file: path.to_path_buf(), msg: format!("plotting failed: {e}") }
}

/// Draws the smoothed training loss (left) and the eval loss (right) of every run.
pub fn plot(runs: &[Run], weight: f64, title: &str, path: &Path) -> Result<()> {
    // Registering the same font twice is harmless; only the first call does work.
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| plot_error(path, "the bundled font could not be loaded"))?;
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_error(path, e))?;
    let root = root.titled(title, ("sans-serif", 24)).map_err(|e| plot_error(path, e))?;
    let (left, right) = root.split_horizontally(700);
    let curves: Vec<Vec<(usize, f64)>> = runs.iter().map(|r| r.smoothed_train_loss(weight)).collect();
    panel(&left, &format!("training loss (EMA {weight})"), runs, &curves, path)?;
    let evals: Vec<Vec<(usize, f64)>> = runs.iter().map(|r| r.eval_loss()).collect();
    panel(&right, "eval loss", runs, &evals, path)?;
    root.present().map_err(|e| plot_error(path, e))
}

fn panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    caption: &str,
    runs: &[Run],
    curves: &[Vec<(usize, f64)>],
    path: &Path,
) -> Result<()> {
    let points = curves.iter().flatten();
    let max_step = points.clone().map(|p| p.0).max().unwrap_or(1).max(1);
    let (lo, hi) = points.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0..max_step, (lo - pad)..(hi + pad))
        .map_err(|e| plot_error(path, e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| plot_error(path, e))?;
    for (i, (run, curve)) in runs.iter().zip(curves).enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(curve.iter().copied(), color.stroke_width(2)))
            .map_err(|e| plot_error(path, e))?
            .label(run.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| plot_error(path, e))
}

/// `loraga report`: loads the runs, writes `<out>.png` and `<out>.md`, returns the table. With
/// `by_seed`, runs named `<group>-s<seed>` are reported per group, and `reference` names a group.
pub fn run(
    dirs: &[PathBuf],
    reference: Option<&str>,
    weight: f64,
    by_seed: bool,
    title: &str,
    out: &Path,
) -> Result<String> {
    if dirs.is_empty() {
        return Err(Error::InvalidArgument("report: give at least one run folder".into()));
    }
    if !(0.0..1.0).contains(&weight) {
        return Err(Error::InvalidArgument(format!("report: the EMA weight must be in [0, 1), got {weight}")));
    }
    let runs: Vec<Run> = dirs.iter().map(|d| Run::load(d)).collect::<Result<_>>()?;
    let (table, curves) = if by_seed {
        let groups = seeds::group(runs);
        let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
        let reference = find(&names, reference)?.map(|i| &groups[i]);
        (seeds::table(&groups, reference, weight), groups.iter().map(|g| g.mean_run()).collect())
    } else {
        let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
        let reference = find(&names, reference)?.map(|i| &runs[i]);
        (table(&runs, reference, weight), runs)
    };
    let png = out.with_extension("png");
    plot(&curves, weight, title, &png)?;
    loraga_core::io::atomic::write(&out.with_extension("md"), table.as_bytes())?;
    Ok(table)
}

/// The index of the run (or group) named `name`, if a name is given.
fn find(names: &[&str], name: Option<&str>) -> Result<Option<usize>> {
    let Some(name) = name else { return Ok(None) };
    match names.iter().position(|n| *n == name) {
        Some(i) => Ok(Some(i)),
        None => Err(Error::InvalidArgument(format!("report: nothing is named '{name}' (runs: {names:?})"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_is_bias_corrected_and_tracks_a_constant_exactly() {
        let s = ema(&[2.0, 2.0, 2.0], 0.9);
        assert!(s.iter().all(|v| (v - 2.0).abs() < 1e-12), "{s:?}");
        let s = ema(&[1.0, 3.0], 0.5);
        // m1 = 0.5, m2 = 0.25 + 1.5 = 1.75; corrections 0.5 and 0.75.
        assert!((s[0] - 1.0).abs() < 1e-12 && (s[1] - 1.75 / 0.75).abs() < 1e-12, "{s:?}");
    }

    #[test]
    fn steps_to_reach_finds_the_first_step_at_or_below() {
        let c = [(1, 3.0), (2, 2.5), (3, 2.0), (4, 2.2), (5, 1.0)];
        assert_eq!(steps_to_reach(&c, 2.2), Some(3));
        assert_eq!(steps_to_reach(&c, 0.5), None);
    }
}
