#!/usr/bin/env python3
"""The randomized SVD's products with A, timed alone: kernels/rsvd_skinny.cu (compiled by CuPy's
NVRTC, launched with the grid and splits that crates/loraga-core/src/linalg/rsvd_cuda_skinny.rs
computes) against cuBLAS's fp32 SGEMM for the same product (torch.matmul with TF32 off), both
orientations, at the bench's shapes: A 4096x4096 and 11008x4096 (row-major), q = 8 and 32 (the
kernel's limit; wider products take kernels/rsvd_skinny_wg.cu on Hopper, which CuPy's default
sm_90 build cannot compile: benches/rsvd.rs times both kernels against cuBLAS).
CUDA events around each launch on one stream, median of 50 after 10 warm-ups, the L2 flushed
before each (A itself is larger than L2). Checks each result against an f64 product so a fast
wrong answer shows. Prints a markdown table with the read-A bound (bytes of A / 4 TB/s would be
an ideal; the ratio column is what matters).
Usage (on the GPU machine, in the repository root): python3 scripts/bench/skinny_products.py
"""
import statistics

import cupy as cp
import torch

BM, BK, STAGES = 128, 32, 4
MIN_SPLIT = 4 * BK


def splits(tiles, k, sms):
    want = max(1, min(2 * sms // tiles, -(-k // MIN_SPLIT)))
    kchunk = max(BK, -(-(-(-k // want)) // BK) * BK)
    return kchunk, -(-k // kchunk)


def main():
    torch.backends.cuda.matmul.allow_tf32 = False
    src = open("kernels/rsvd_skinny.cu").read()
    module = cp.RawModule(code=src, options=("-I", "kernels", "--std=c++17"), backend="nvrtc")
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    print("| A (row-major) | product | q | splits | loraga us | cuBLAS us | cuBLAS / loraga | read-A bound us | max rel err (ours, cuBLAS) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for rows, cols in [(4096, 4096), (11008, 4096)]:
        a = torch.randn(rows, cols, device="cuda", dtype=torch.float32)
        a_cp = cp.asarray(a)
        for q in [8, 32]:
            for trans in [False, True]:
                # n: out [rows, q] = A V; t: out [cols, q] = Aᵀ V.
                m, k = (cols, rows) if trans else (rows, cols)
                v = torch.randn(q, k, device="cuda", dtype=torch.float32)  # column-major [k, q]
                bn = 32
                tiles = -(-m // BM)
                kchunk, s = splits(tiles, k, sms)
                f = module.get_function(f"rsvd_skinny_{'t' if trans else 'n'}")
                a_tile = BK * (BM + 8) if trans else BM * (BK + 4)
                smem = STAGES * (a_tile + bn * (BK + 4)) * 4
                f.max_dynamic_shared_size_bytes = smem
                threads = 256
                out = cp.zeros((q, m), dtype=cp.float32)  # column-major [m, q]
                partials = cp.zeros(max(1, s * tiles) * BM * bn, dtype=cp.float32)
                tickets = cp.zeros(tiles, dtype=cp.uint32)
                v_cp = cp.asarray(v)

                def ours():
                    f((tiles, s), (threads,), (a_cp, cp.int32(m), cp.int32(k), v_cp, cp.int32(q), out,
                                               cp.int32(kchunk), partials, tickets), shared_mem=smem)

                def theirs():
                    return (a.t() @ v.t()) if trans else (a @ v.t())

                def time(fn):
                    ts = []
                    for i in range(60):
                        flush.zero_()
                        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        e0.record()
                        fn()
                        e1.record()
                        e1.synchronize()
                        if i >= 10:
                            ts.append(e0.elapsed_time(e1) * 1e3)
                    return statistics.median(ts)

                t_ours, t_blas = time(ours), time(theirs)
                exact = (a.double().t() @ v.double().t()) if trans else (a.double() @ v.double().t())
                scale = ((a.abs().double().t() @ v.abs().double().t()) if trans else (a.abs().double() @ v.abs().double().t()))
                ours()
                got = torch.as_tensor(out, device="cuda").t().double()
                err = ((got - exact).abs() / scale).max().item()
                err_b = ((theirs().double() - exact).abs() / scale).max().item()
                bound = rows * cols * 4 / 4.0e12 * 1e6
                name = "Aᵀ V" if trans else "A V"
                print(f"| {rows}x{cols} | {name} | {q} | {s} | {t_ours:.1f} | {t_blas:.1f} | {t_blas / t_ours:.2f}x | {bound:.1f} | {err:.1e}, {err_b:.1e} |", flush=True)


if __name__ == "__main__":
    main()
