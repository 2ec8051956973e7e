#!/usr/bin/env python3
"""PyTorch baselines for benches/lora_linear.rs, on the same GPU and the same grid.

A PEFT-style LoRA linear layer (nn.Linear base, lora_A, lora_B, result + lora_B(lora_A(x)) * s,
dropout 0, eager mode, no CUDA graphs), the base layer alone, and LoRA-GA's reference
accumulation G.add_((dY.T @ X).float()), over issue 4's grid: M in {4096, 8192, 16384};
(K, N) in {(4096, 4096), (4096, 11008), (11008, 4096)}; r in {8, 16, 64, 128}; bf16, s = 2.
Times are medians of CUDA-event timings of single runs after warm-up, over three rotating input
sets (each larger than L2); TF32 is off. LORA_FILTER keeps the shapes whose label
("M=8192 K=4096 N=11008 r=16") contains every comma-separated term, as in the Rust bench;
LORA_REPS sets the timed runs per median (default 10). Prints markdown tables.

    LORA_FILTER=M=8192 python3 scripts/bench/torch_lora.py
"""
import os
import statistics

import torch
import torch.nn.functional as F

torch.backends.cuda.matmul.allow_tf32 = False
DEV, DT = "cuda", torch.bfloat16
S = 2.0
REPS = int(os.environ.get("LORA_REPS", "10"))
TERMS = [t for t in os.environ.get("LORA_FILTER", "").split(",") if t]


def median_ms(fn, warmup=3, reps=REPS):
    for i in range(warmup):
        fn(i % 3)
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i % 3)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, bf16, eager, s = {S}")
    rows = ["| M | K | N | r | base fwd | PEFT fwd | PEFT / base fwd | base f+b | PEFT f+b | PEFT / base f+b |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    g_rows = ["| M | K | N | G.add_((dY.T @ X).float()) ms |", "|---:|---:|---:|---:|"]
    for m in (4096, 8192, 16384):
        for k, n in ((4096, 4096), (4096, 11008), (11008, 4096)):
            ranks = [r for r in (8, 16, 64, 128) if all(t in f"M={m} K={k} N={n} r={r}" for t in TERMS)]
            if not ranks:
                continue
            xs = [torch.randn(m, k, device=DEV, dtype=DT) for _ in range(3)]
            dys = [torch.randn(m, n, device=DEV, dtype=DT) for _ in range(3)]
            w = torch.randn(n, k, device=DEV, dtype=DT) * 0.02
            g = torch.zeros(n, k, device=DEV, dtype=torch.float32)

            def accumulate(i):
                g.add_((dys[i].T @ xs[i]).float())

            g_rows.append(f"| {m} | {k} | {n} | {median_ms(accumulate):.4f} |")

            def base_fwd(i):
                F.linear(xs[i], w)

            def base_fwd_bwd(i):
                x = xs[i].requires_grad_(True)
                F.linear(x, w).backward(dys[i])
                x.grad = None

            for r in ranks:
                lora_a = (torch.randn(r, k, device=DEV, dtype=DT) * 0.02).requires_grad_(True)
                lora_b = (torch.randn(n, r, device=DEV, dtype=DT) * 0.02).requires_grad_(True)

                def peft_fwd(i):
                    with torch.no_grad():
                        F.linear(xs[i], w) + F.linear(F.linear(xs[i], lora_a), lora_b) * S

                def peft_fwd_bwd(i):
                    x = xs[i].requires_grad_(True)
                    y = F.linear(x, w) + F.linear(F.linear(x, lora_a), lora_b) * S
                    y.backward(dys[i])
                    x.grad = lora_a.grad = lora_b.grad = None

                fwd, fwd_bwd = median_ms(base_fwd), median_ms(base_fwd_bwd)
                pf, pfb = median_ms(peft_fwd), median_ms(peft_fwd_bwd)
                rows.append(f"| {m} | {k} | {n} | {r} | {fwd:.4f} | {pf:.4f} | {pf / fwd:.3f} "
                            f"| {fwd_bwd:.4f} | {pfb:.4f} | {pfb / fwd_bwd:.3f} |")
            del xs, dys, w, g
            torch.cuda.empty_cache()
    print("\n".join(rows))
    print()
    print("\n".join(g_rows))


if __name__ == "__main__":
    main()
