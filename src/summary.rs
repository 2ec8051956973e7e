//! The one-page benchmark summary: a markdown table of shape, implementation, median time,
//! TFLOP/s and the ratio to a baseline measured in the same run. Every bench prints one.

use std::fmt::Write as _;

/// One measured implementation on one problem.
#[derive(Debug, Clone)]
pub struct Row {
    /// The problem, e.g. `4096x4096x4096 bf16`. Rows with the same problem share a baseline.
    pub problem: String,
    /// The implementation, e.g. `naive`, `cublas`.
    pub implementation: String,
    /// Median time of one run in milliseconds (CUDA events).
    pub median_ms: f64,
    /// Floating-point operations of one run.
    pub flops: f64,
}

/// The table; `baseline` names the implementation the ratios divide by (time / baseline time).
pub fn markdown(title: &str, rows: &[Row], baseline: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "### {title}\n");
    let _ = writeln!(out, "| problem | implementation | median ms | TFLOP/s | time / {baseline} |");
    let _ = writeln!(out, "|---|---|---:|---:|---:|");
    // A row without a time (a Criterion filter skipped it, see benches/common) is left out.
    let rows: Vec<&Row> = rows.iter().filter(|r| r.median_ms.is_finite()).collect();
    for r in rows.iter().copied() {
        let base = rows.iter().find(|b| b.problem == r.problem && b.implementation == baseline);
        let ratio = base.map_or("-".to_string(), |b| format!("{:.3}", r.median_ms / b.median_ms));
        let tflops = r.flops / (r.median_ms * 1e-3) / 1e12;
        let _ =
            writeln!(out, "| {} | {} | {:.4} | {:.1} | {} |", r.problem, r.implementation, r.median_ms, tflops, ratio);
    }
    out
}

/// Prints the table and, when `LORAGA_BENCH_OUT` names a folder, also writes it there as
/// `<file>.md` so a remote runner can collect every bench's summary.
pub fn emit(file: &str, title: &str, rows: &[Row], baseline: &str) {
    let table = markdown(title, rows, baseline);
    println!("\n{table}");
    save(file, &table);
}

/// Writes `text` atomically to `$LORAGA_BENCH_OUT/<file>.md` when that folder is named; a bench
/// reports a failure to write and goes on.
pub fn save(file: &str, text: &str) {
    if let Some(dir) = std::env::var_os("LORAGA_BENCH_OUT") {
        let path = std::path::PathBuf::from(dir).join(format!("{file}.md"));
        if let Err(e) = loraga_core::io::atomic::write(&path, text.as_bytes()) {
            eprintln!("could not write {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_divide_by_the_baseline_of_the_same_problem() {
        let rows = vec![
            Row { problem: "p1".into(), implementation: "cublas".into(), median_ms: 2.0, flops: 2e12 },
            Row { problem: "p1".into(), implementation: "naive".into(), median_ms: 8.0, flops: 2e12 },
            Row { problem: "p2".into(), implementation: "naive".into(), median_ms: 1.0, flops: 1e12 },
        ];
        let t = markdown("gemm", &rows, "cublas");
        assert!(t.contains("| p1 | cublas | 2.0000 | 1000.0 | 1.000 |"), "{t}");
        assert!(t.contains("| p1 | naive | 8.0000 | 250.0 | 4.000 |"), "{t}");
        assert!(t.contains("| p2 | naive | 1.0000 | 1000.0 | - |"), "{t}");
    }

    #[test]
    fn rows_without_a_time_are_left_out() {
        let rows = vec![
            Row { problem: "p1".into(), implementation: "cublas".into(), median_ms: f64::NAN, flops: 2e12 },
            Row { problem: "p1".into(), implementation: "engine".into(), median_ms: 2.0, flops: 2e12 },
        ];
        let t = markdown("gemm", &rows, "cublas");
        assert!(!t.contains("| p1 | cublas"), "{t}");
        assert!(t.contains("| p1 | engine | 2.0000 | 1000.0 | - |"), "{t}");
    }
}
