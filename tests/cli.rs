//! The `loraga` binary as a user runs it.

use std::process::Command;

/// The binary under test: `LORAGA_BIN` when a staged copy runs elsewhere (scripts/gpu-run.sh),
/// else the one cargo built beside this test.
fn loraga() -> Command {
    Command::new(std::env::var_os("LORAGA_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_loraga").into()))
}

#[test]
fn info_reports_devices_and_checks_the_cpu_gemm() {
    let out = loraga().arg("info").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "loraga info failed: {text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("cpu gemm self-check: f32"), "{text}");
    assert!(!text.contains("FAILED"), "{text}");
    // Either a GPU report or the reason there is none, never silence.
    assert!(text.contains("gpu: none usable (") || text.contains("gpu gemm naive"), "{text}");
}

#[test]
fn kernels_rejects_a_bad_arch() {
    let out = loraga().args(["kernels", "--arch", "sm_xx"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sm_xx") || err.contains("NVRTC not found"), "{err}");
}

#[test]
fn report_plots_and_tabulates_runs() {
    let dir = tempfile::tempdir().unwrap();
    let mut runs = Vec::new();
    for (name, rate) in [("lora", 0.01), ("lora-ga", 0.03)] {
        let run = dir.path().join(name);
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(run.join("run.json"), format!("{{\"name\":\"{name}\"}}")).unwrap();
        let mut lines = String::new();
        for step in 1..=100 {
            let loss = 1.0 + 2.0 * (-rate * step as f64).exp();
            lines.push_str(&format!("{{\"step\":{step},\"loss\":{loss}}}\n"));
            if step % 25 == 0 {
                lines.push_str(&format!("{{\"step\":{step},\"eval_loss\":{}}}\n", loss + 0.1));
            }
        }
        std::fs::write(run.join("metrics.jsonl"), lines).unwrap();
        runs.push(run);
    }
    let out = dir.path().join("cmp");
    let status = loraga().arg("report").args(&runs).args(["--reference", "lora", "--out"]).arg(&out).output().unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{text}\n{}", String::from_utf8_lossy(&status.stderr));
    let png = std::fs::read(out.with_extension("png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let md = std::fs::read_to_string(out.with_extension("md")).unwrap();
    assert_eq!(md, text);
    // LoRA-GA's curve decays 3x faster, so it reaches LoRA's final loss well before step 100.
    let row = md.lines().find(|l| l.starts_with("| lora-ga |")).unwrap();
    let reach: usize = row.split('|').nth(6).unwrap().trim().parse().unwrap();
    assert!((20..60).contains(&reach), "{row}");
}

#[test]
fn bench_without_a_gpu_says_so() {
    // No visible device (or no driver at all, on a machine without one): a clear error, no panic.
    let out = loraga().args(["bench", "--quick"]).env("CUDA_VISIBLE_DEVICES", "").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("error: loraga bench needs a CUDA GPU, and none is usable: "), "{err}");
    assert!(err.contains("no CUDA GPU") || err.contains("no NVIDIA driver"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn bench_quick_times_every_kernel_against_its_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let md = dir.path().join("bench.md");
    let out = loraga().args(["bench", "--quick", "--out"]).arg(&md).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(&md).unwrap(), text);
    // Every table row: | problem | implementation | median ms | TFLOP/s | ratio |.
    let rows: Vec<Vec<&str>> = text
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| problem "))
        .map(|l| l.trim_matches('|').split(" | ").map(str::trim).collect())
        .collect();
    for r in &rows {
        assert_eq!(r.len(), 5, "{r:?}");
        for cell in [r[2], r[3], r[4]] {
            let v: f64 = cell.parse().unwrap_or_else(|_| panic!("not a number in {r:?}"));
            assert!(v.is_finite() && v > 0.0, "{r:?}");
        }
    }
    let lora = "M=8192 K=4096 N=4096 r=16";
    let expected: Vec<(String, &[&str])> = vec![
        ("8192x4096x4096 NT".into(), &["cublas", "cublaslt", "engine"]),
        ("4096x4096x4096 NT".into(), &["cublas", "cublaslt", "engine"]),
        (format!("forward {lora}"), &["cublas base GEMM", "lora cublas-peft", "lora cublas-folded", "lora fused"]),
        (
            format!("forward+backward {lora}"),
            &["cublas base GEMM", "lora cublas-peft", "lora cublas-folded", "lora fused"],
        ),
        ("G += dYᵀ X, M=8192, G 4096x4096 f32".into(), &["cublas", "engine"]),
        ("4096x4096 q=32".into(), &["loraga fp32", "loraga tf32"]),
        ("4096x4096 q=128".into(), &["loraga fp32", "loraga tf32"]),
    ];
    for (problem, impls) in &expected {
        for imp in *impls {
            assert!(rows.iter().any(|r| r[0] == problem && r[1] == *imp), "no row {problem} / {imp} in\n{text}");
        }
    }
    assert_eq!(rows.len(), expected.iter().map(|(_, i)| i.len()).sum::<usize>(), "{text}");
}

#[test]
fn train_rejects_bad_data_options_before_loading_anything() {
    let run = |extra: &[&str]| {
        let o = loraga()
            .args(["train", "--model", "missing.gguf", "--data", "missing.jsonl", "--out", "x"])
            .args(extra)
            .output()
            .unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let e = run(&["--bucket-batches", "0"]);
    assert!(e.contains("--bucket-batches must be positive") && e.contains("--no-bucketing"), "{e}");
    let e = run(&["--chat-template", "chatml", "--template", "Q: {prompt}"]);
    assert!(e.contains("--chat-template") && e.contains("cannot be used with"), "{e}");
    let e = run(&["--chat-template", "jinja"]);
    assert!(e.contains("invalid value 'jinja'") && e.contains("chatml") && e.contains("model"), "{e}");
    let help = String::from_utf8_lossy(&loraga().args(["train", "--help"]).output().unwrap().stdout).to_string();
    for opt in
        ["--no-bucketing", "--bucket-batches <BUCKET_BATCHES>", "--chat-template <CHAT_TEMPLATE>", "[default: 50]"]
    {
        assert!(help.contains(opt), "no {opt} in\n{help}");
    }
}
