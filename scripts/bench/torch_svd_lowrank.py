#!/usr/bin/env python3
"""torch.svd_lowrank(G, q, niter=4) in fp32 (TF32 off) at the shapes of benches/rsvd.rs, timed with
CUDA events: median of 20 runs after 3 warm-ups, inputs rotating over three Gaussian matrices.
Also the Llama-2-7B batch (224 layers, r = 8 and 32, q = 4r): one timed pass over all layers,
median of 3, as LoRA-GA runs it (one svd_lowrank per layer). Prints a markdown table.
Usage (on the GPU machine): python3 scripts/bench/torch_svd_lowrank.py
"""
import statistics

import torch

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
NITER = 4


def time_ms(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(1)
    rows = []
    for m, n in [(4096, 4096), (11008, 4096)]:
        inputs = [torch.randn(m, n, device=dev, generator=gen) for _ in range(3)]
        for q in [32, 128, 512]:
            turn = [0]

            def run():
                turn[0] = (turn[0] + 1) % 3
                torch.svd_lowrank(inputs[turn[0]], q=q, niter=NITER)

            ms = time_ms(run, 3, 20)
            flops = (2 * NITER + 2) * 2 * m * n * q
            rows.append((f"{m}x{n} q={q}", ms, flops))
        del inputs

    shapes = [(4096, 4096), (11008, 4096), (4096, 11008)]
    pool = [[torch.randn(m, n, device=dev, generator=gen) for _ in range(2)] for m, n in shapes]
    kinds = [0, 0, 0, 0, 1, 1, 2]
    layers = [pool[s][(l + j) % 2] for l in range(32) for j, s in enumerate(kinds)]
    for r in [8, 32]:
        q = 4 * r

        def batch():
            for g in layers:
                torch.svd_lowrank(g, q=min(q, *g.shape), niter=NITER)

        ms = time_ms(batch, 1, 3)
        flops = sum((2 * NITER + 2) * 2 * g.shape[0] * g.shape[1] * q for g in layers)
        rows.append((f"Llama-2-7B 224 layers r={r} q={q}", ms, flops))

    print(f"### torch.svd_lowrank fp32, niter = {NITER} (torch {torch.__version__}, {torch.cuda.get_device_name()})\n")
    print("| problem | implementation | median ms | TFLOP/s |")
    print("|---|---|---:|---:|")
    for problem, ms, flops in rows:
        print(f"| {problem} | torch.svd_lowrank | {ms:.4f} | {flops / (ms * 1e-3) / 1e12:.1f} |")


if __name__ == "__main__":
    main()
