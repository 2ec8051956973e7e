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
