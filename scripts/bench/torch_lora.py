#!/usr/bin/env python3
"""PyTorch baselines for benches/lora_linear.rs, on the same GPU and shapes.

A PEFT-style LoRA linear layer (nn.Linear base, lora_A, lora_B, result + lora_B(lora_A(x)) * s,
dropout 0, eager mode, no CUDA graphs) at M = 8192 tokens, K = N = 4096, bf16, r in {16, 64};
the base layer alone; and LoRA-GA's reference accumulation G.add_((dY.T @ X).float()).
Times are medians of CUDA-event timings of single runs after warm-up, over three rotating input
sets (each larger than L2); TF32 is off. Prints a markdown table.

    python3 scripts/bench/torch_lora.py
"""
import statistics

import torch
import torch.nn.functional as F

torch.backends.cuda.matmul.allow_tf32 = False
DEV, DT = "cuda", torch.bfloat16
M, K, N = 8192, 4096, 4096


def median_ms(fn, warmup=5, reps=30):
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
    xs = [torch.randn(M, K, device=DEV, dtype=DT) for _ in range(3)]
    dys = [torch.randn(M, N, device=DEV, dtype=DT) for _ in range(3)]
    w = torch.randn(N, K, device=DEV, dtype=DT) * 0.02
    rows = []

    def base_fwd(i):
        F.linear(xs[i], w)

    def base_fwd_bwd(i):
        x = xs[i].requires_grad_(True)
        F.linear(x, w).backward(dys[i])
        x.grad = None

    for r in (16, 64):
        lora_a = (torch.randn(r, K, device=DEV, dtype=DT) * 0.02).requires_grad_(True)
        lora_b = (torch.randn(N, r, device=DEV, dtype=DT) * 0.02).requires_grad_(True)
        s = 2.0

        def peft_fwd(i):
            with torch.no_grad():
                F.linear(xs[i], w) + F.linear(F.linear(xs[i], lora_a), lora_b) * s

        def peft_fwd_bwd(i):
            x = xs[i].requires_grad_(True)
            y = F.linear(x, w) + F.linear(F.linear(x, lora_a), lora_b) * s
            y.backward(dys[i])
            x.grad = lora_a.grad = lora_b.grad = None

        fwd, fwd_bwd = median_ms(base_fwd), median_ms(base_fwd_bwd)
        rows.append((f"forward r={r}", "torch base F.linear", fwd, fwd))
        rows.append((f"forward r={r}", "torch PEFT-style LoRA", median_ms(peft_fwd), fwd))
        rows.append((f"forward+backward r={r}", "torch base", fwd_bwd, fwd_bwd))
        rows.append((f"forward+backward r={r}", "torch PEFT-style LoRA", median_ms(peft_fwd_bwd), fwd_bwd))

    g = torch.zeros(N, K, device=DEV, dtype=torch.float32)

    def accumulate(i):
        g.add_((dys[i].T @ xs[i]).float())

    acc = median_ms(accumulate)
    rows.append(("G += dY^T X (f32 G)", "torch G.add_((dY.T @ X).float())", acc, acc))

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, M={M} K={K} N={N}, bf16, eager")
    print("| problem | implementation | median ms | / torch base |")
    print("|---|---|---:|---:|")
    for problem, name, ms, base in rows:
        print(f"| {problem} | {name} | {ms:.4f} | {ms / base:.3f} |")


if __name__ == "__main__":
    main()
