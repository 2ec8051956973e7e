//! Runs repeated over seeds: `loraga report --seeds` groups the runs named `<group>-s<seed>`
//! and reports each group's mean and spread instead of every run.
//!
//! A group's curve is the step-wise mean over its seeds. The EMA is linear and its bias
//! correction the same for every seed, so smoothing the mean curve equals averaging the smoothed
//! curves. "Steps to reach" is computed per seed against the reference group's mean final
//! smoothed training loss, and reported per seed.

use std::collections::BTreeMap;

use super::{Run, fmt, steps_to_reach};
use crate::metrics::Record;

pub struct Group {
    pub name: String,
    pub runs: Vec<Run>,
}

/// `name` without a trailing `-s<digits>`, the group it belongs to.
pub fn group_name(name: &str) -> &str {
    match name.rsplit_once("-s") {
        Some((head, seed)) if !seed.is_empty() && seed.bytes().all(|b| b.is_ascii_digit()) => head,
        _ => name,
    }
}

/// The runs grouped by [`group_name`], groups in the order of their first run.
pub fn group(runs: Vec<Run>) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    for run in runs {
        let name = group_name(&run.name).to_string();
        match groups.iter_mut().find(|g| g.name == name) {
            Some(g) => g.runs.push(run),
            None => groups.push(Group { name, runs: vec![run] }),
        }
    }
    groups
}

fn mean_sd(v: &[f64]) -> Option<(f64, f64)> {
    if v.is_empty() {
        return None;
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let var = if v.len() > 1 { v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (v.len() - 1) as f64 } else { 0.0 };
    Some((mean, var.sqrt()))
}

fn fmt_mean_sd(v: &[f64]) -> String {
    match mean_sd(v) {
        Some((m, s)) if v.len() > 1 => format!("{m:.4} ± {s:.4}"),
        m => fmt(m.map(|m| m.0), 4),
    }
}

impl Group {
    /// A run whose training and eval losses are the step-wise means over the seeds (steps that
    /// every seed logged).
    pub fn mean_run(&self) -> Run {
        let mut train: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        let mut eval: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        for run in &self.runs {
            for (step, v) in run.train_loss() {
                train.entry(step).or_default().push(v);
            }
            for (step, v) in run.eval_loss() {
                eval.entry(step).or_default().push(v);
            }
        }
        let n = self.runs.len();
        let mean = |v: &Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
        let mut records: Vec<Record> = train
            .iter()
            .filter(|(_, v)| v.len() == n)
            .map(|(&step, v)| Record { step, loss: Some(mean(v)), ..Record::default() })
            .collect();
        records.extend(eval.iter().filter(|(_, v)| v.len() == n).map(|(&step, v)| Record {
            step,
            eval_loss: Some(mean(v)),
            ..Record::default()
        }));
        Run { name: format!("{} (mean of {n})", self.name), records }
    }

    fn final_smoothed(&self, weight: f64) -> Vec<f64> {
        self.runs.iter().filter_map(|r| r.smoothed_train_loss(weight).last().map(|p| p.1)).collect()
    }

    fn final_eval(&self) -> Vec<f64> {
        self.runs.iter().filter_map(|r| r.eval_loss().last().map(|p| p.1)).collect()
    }
}

/// One row per group: seeds, final smoothed training loss and final eval loss (mean ± sample
/// standard deviation over seeds), and each seed's steps to reach the reference group's mean
/// final smoothed training loss.
pub fn table(groups: &[Group], reference: Option<&Group>, weight: f64) -> String {
    let target = reference.and_then(|r| mean_sd(&r.final_smoothed(weight)).map(|m| m.0));
    let mut out = String::from(
        "| runs | seeds | final train loss (smoothed) | final eval loss | steps to reach reference (per seed) |\n\
         |---|---:|---:|---:|---|\n",
    );
    for g in groups {
        let reach = match target {
            Some(t) => g
                .runs
                .iter()
                .map(|r| steps_to_reach(&r.smoothed_train_loss(weight), t).map_or("-".into(), |s| s.to_string()))
                .collect::<Vec<_>>()
                .join(", "),
            None => "-".into(),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            g.name,
            g.runs.len(),
            fmt_mean_sd(&g.final_smoothed(weight)),
            fmt_mean_sd(&g.final_eval()),
            reach
        ));
    }
    if let (Some(r), Some(t)) = (reference, target) {
        out.push_str(&format!(
            "\nReference: {} (mean final smoothed training loss {t:.4} over {} seeds; EMA weight {weight}; \
             '-': not reached in the run). Spreads are sample standard deviations over seeds.\n",
            r.name,
            r.runs.len()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str, losses: &[f64]) -> Run {
        let records = losses
            .iter()
            .enumerate()
            .map(|(i, &l)| Record { step: i + 1, loss: Some(l), ..Record::default() })
            .chain([Record { step: losses.len(), eval_loss: Some(losses[losses.len() - 1]), ..Record::default() }])
            .collect();
        Run { name: name.into(), records }
    }

    #[test]
    fn seeds_group_by_suffix_only() {
        assert_eq!(group_name("lora-ga-lr3e-4-s12"), "lora-ga-lr3e-4");
        assert_eq!(group_name("lora-s"), "lora-s");
        assert_eq!(group_name("lora-sx1"), "lora-sx1");
        assert_eq!(group_name("full"), "full");
        let g = group(vec![run("a-s0", &[1.0]), run("b-s0", &[1.0]), run("a-s1", &[1.0])]);
        let names: Vec<(&str, usize)> = g.iter().map(|g| (g.name.as_str(), g.runs.len())).collect();
        assert_eq!(names, [("a", 2), ("b", 1)]);
    }

    #[test]
    fn the_mean_run_averages_steps_every_seed_has() {
        let g = group(vec![run("a-s0", &[3.0, 1.0, 5.0]), run("a-s1", &[1.0, 3.0])]);
        let m = g[0].mean_run();
        assert_eq!(m.train_loss(), [(1, 2.0), (2, 2.0)]);
        // Eval: step 3 (seed 0) and step 2 (seed 1) are not shared.
        assert!(m.eval_loss().is_empty());
    }

    #[test]
    fn table_reports_mean_spread_and_per_seed_steps() {
        let groups = group(vec![
            run("lora-s0", &[3.0, 2.0, 1.0]),
            run("lora-s1", &[3.0, 2.0, 1.0]),
            run("ga-s0", &[1.0, 0.5, 0.5]),
            run("ga-s1", &[3.0, 3.0, 3.0]),
        ]);
        let t = table(&groups, Some(&groups[0]), 0.0);
        assert!(t.contains("| lora | 2 | 1.0000 ± 0.0000 | 1.0000 ± 0.0000 | 3, 3 |"), "{t}");
        // Seed 0 reaches 1.0 at step 1, seed 1 never; eval mean 1.75, sd sqrt(3.125).
        assert!(
            t.contains(&format!(
                "| ga | 2 | 1.7500 ± {:.4} | 1.7500 ± {:.4} | 1, - |",
                3.125f64.sqrt(),
                3.125f64.sqrt()
            )),
            "{t}"
        );
    }
}
