//! The `loraga` command line.

use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use loraga_core::cuda::{Arch, kernels, nvrtc};

#[derive(Parser)]
#[command(name = "loraga", version, about = "LoRA-GA fine-tuning with hand-written CUDA kernels")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Report the CPU and GPU loraga can use, and check the GEMM on each (runs on the CPU alone
    /// when there is no GPU).
    Info,
    /// Compile every kernel in kernels/ with NVRTC for the given architectures, without a GPU
    /// (needs only libnvrtc and the CUDA headers). Fails on the first compile error.
    Kernels {
        /// Target architectures, e.g. sm_80 sm_90a.
        #[arg(long = "arch", default_values = ["sm_80", "sm_90a"])]
        arches: Vec<String>,
        /// Also print ptxas's report per kernel: registers, shared memory, stack, spills.
        #[arg(long)]
        resources: bool,
        /// Write each cubin to DIR/<kernel>-<arch>.cubin (for cuobjdump --dump-sass).
        #[arg(long, value_name = "DIR")]
        out_dir: Option<std::path::PathBuf>,
    },
    /// The README's main job: fine-tune briefly with LoRA and with LoRA-GA on generated
    /// GSM8K-style problems, and compare their loss curves (report.png, report.md).
    Demo(loraga::demo::DemoArgs),
    /// Fine-tune a Llama (full, LoRA, LoRA-GA or PiSSA) with AdamW, a warmup schedule, gradient
    /// clipping, evaluation and checkpoints; --resume continues a stopped run exactly.
    Train(Box<loraga::train::TrainArgs>),
    /// Evaluate a model (and optionally a PEFT adapter): answer loss and perplexity on a JSONL
    /// set, and GSM8K exact match by greedy decoding with --gsm8k.
    Eval(loraga::eval_cmd::EvalArgs),
    /// The kernel summary table on this machine's GPU: the GEMM engine vs cuBLAS, the LoRA layer
    /// fused vs PEFT's cuBLAS composition vs the base GEMM, G += dYᵀX vs cuBLAS, and the
    /// randomized SVD, each timed with CUDA events (median after warm-up). Needs a CUDA GPU.
    Bench {
        /// Fewer shapes and runs (about a minute): 10 timed runs each instead of 50, the GEMM at
        /// two shapes instead of five, the LoRA layer at r = 16 only, the SVD at 4096x4096 only.
        #[arg(long)]
        quick: bool,
        /// Also write the markdown table to this file.
        #[arg(long, value_name = "FILE.md")]
        out: Option<std::path::PathBuf>,
    },
    /// Compare runs: their loss curves in one PNG and a markdown table (final smoothed training
    /// loss, eval losses, steps to reach the reference run's final loss).
    Report {
        /// Run folders, each with metrics.jsonl (and run.json naming the run).
        #[arg(required = true)]
        runs: Vec<std::path::PathBuf>,
        /// The run whose final smoothed training loss the others must reach (e.g. vanilla LoRA).
        #[arg(long)]
        reference: Option<String>,
        /// Weight of the exponential moving average that smooths training losses.
        #[arg(long, default_value_t = 0.9)]
        ema: f64,
        /// Group runs named `<group>-s<seed>` and report each group's mean ± standard deviation
        /// over seeds (curves: the mean over seeds); --reference then names a group.
        #[arg(long)]
        seeds: bool,
        /// The plot's title.
        #[arg(long, default_value = "loss curves")]
        title: String,
        /// Output path without extension: writes OUT.png and OUT.md.
        #[arg(long, default_value = "report")]
        out: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info => {
            print!("{}", loraga::info::report());
            Ok(())
        }
        Command::Kernels { arches, resources, out_dir } => compile_all(&arches, resources, out_dir.as_deref()),
        Command::Eval(args) => loraga::eval_cmd::run(args).map(|text| print!("{text}")),
        Command::Demo(args) => loraga::demo::run(args).map(|table| print!("{table}")),
        Command::Train(args) => loraga::train::run(*args).map(|s| {
            let fmt = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
            println!(
                "{} after {} steps: training loss {}, eval loss {}",
                if s.interrupted { "stopped" } else { "done" },
                s.steps,
                fmt(s.final_loss),
                fmt(s.eval_loss)
            );
        }),
        Command::Bench { quick, out } => bench(quick, out.as_deref()),
        Command::Report { runs, reference, ema, seeds, title, out } => {
            loraga::report::run(&runs, reference.as_deref(), ema, seeds, &title, &out).map(|table| print!("{table}"))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench(quick: bool, out: Option<&std::path::Path>) -> loraga_core::Result<()> {
    let table = loraga::bench::run(quick)?.markdown();
    print!("{table}");
    match out {
        Some(path) => loraga_core::io::atomic::write(path, table.as_bytes()),
        None => Ok(()),
    }
}

fn compile_all(arches: &[String], resources: bool, out_dir: Option<&std::path::Path>) -> loraga_core::Result<()> {
    let arches: Vec<Arch> = arches.iter().map(|a| Arch::parse(a)).collect::<Result<_, _>>()?;
    let (major, minor) = nvrtc::version()?;
    println!("NVRTC {major}.{minor}");
    let mut count = 0;
    for &arch in &arches {
        for src in kernels::SOURCES {
            let t = Instant::now();
            let extra: &[&str] = if resources { &["--ptxas-options=-v"] } else { &[] };
            let (cubin, log) = nvrtc::compile_with_log(src, arch, extra)?;
            println!(
                "compiled kernels/{} for {arch}: {} bytes of cubin in {:.0} ms",
                src.file,
                cubin.len(),
                t.elapsed().as_secs_f64() * 1e3
            );
            if resources {
                println!("{log}");
            }
            if let Some(dir) = out_dir {
                let path = dir.join(format!("{}-{arch}.cubin", src.module));
                loraga_core::io::atomic::write(&path, &cubin)?;
            }
            count += 1;
        }
    }
    println!("{count} kernel compiles succeeded ({} files x {} arches)", kernels::SOURCES.len(), arches.len());
    Ok(())
}
