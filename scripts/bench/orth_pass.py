#!/usr/bin/env python3
"""One CholeskyQR pass of the randomized SVD's device path, timed kernel by kernel: loraga's
fused pass (kernels/rsvd_orth.cu: the f64 Gram, Cholesky with R⁻¹ in one block, X ← X R⁻¹)
against the library pass the device path runs above the fused limit (X widened to f64, DGEMM
Gram, cuSOLVER's Dpotrf, cuBLAS's STRSM with R in f32), at q = 32, 64, 128 on panels of 4096 and
11008 rows (the bench's two sides). With a second kernel file (`--compare OLD.cu`), its
rsvd_orth_chol_inv and rsvd_orth_apply are timed beside the current ones.
Each step runs REPS times back to back between two CUDA events (inputs restored by a copy that
is timed alone and subtracted), median of 7 such runs: the per-launch time of a queue the host
keeps full. Checks the pass against an f64 reference (R, R R⁻¹, the orthogonality of X R⁻¹) so a
fast wrong answer shows. Prints a markdown table.
Usage (on the GPU machine, in the repository root): python3 scripts/bench/orth_pass.py [--compare OLD.cu]
"""
import ctypes
import os
import statistics
import sys

import cupy as cp
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from core_eigen import LIB, check, ptr  # noqa: E402

UPPER = 1
REPS, RUNS = 20, 7
GRAM_TILE, GRAM_ROWS, MAX_CHUNKS, MAX_GROUPS, GRAM_MIN_ROWS = 32, 32, 64, 8, 64


def module(path):
    return cp.RawModule(code=open(path).read(), options=("-I", "kernels", "--std=c++17"), backend="nvrtc")


def per_launch_us(call, restore=None):
    """Median per-launch microseconds of `call` queued REPS times, less `restore`'s share."""
    def run(f):
        for _ in range(3):
            f()
        times = []
        for _ in range(RUNS):
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            for _ in range(REPS):
                f()
            end.record()
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end) * 1e3 / REPS)
        return statistics.median(times)
    if restore is None:
        return run(call)
    return run(lambda: (restore(), call())) - run(restore)


def gram_chunks(rows, q, sms, tile):
    """rsvd_cuda_orth.rs's split of the Gram for a kernel with `tile`-wide tiles: (pairs, chunk_rows, chunks)."""
    nt = -(-q // tile)
    pairs = nt * (nt + 1) // 2
    want = min(-(-(2 * sms) // pairs), -(-rows // GRAM_MIN_ROWS))
    chunk_rows = -(-rows // max(1, min(want, MAX_CHUNKS)))
    chunk_rows = -(-chunk_rows // GRAM_ROWS) * GRAM_ROWS
    return pairs, chunk_rows, -(-rows // chunk_rows)


def panel(rows, q, cond, seed):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((rows, q)))
    v, _ = np.linalg.qr(rng.standard_normal((q, q)))
    x = (u * np.logspace(0, -np.log10(cond), q)) @ v.T
    return np.asfortranarray(x.astype(np.float32))


def main():
    compare = sys.argv[sys.argv.index("--compare") + 1] if "--compare" in sys.argv else None
    torch.backends.cuda.matmul.allow_tf32 = False
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    mods = [("loraga", module("kernels/rsvd_orth.cu"))]
    if compare:
        mods.append(("old", module(compare)))
    handle = ctypes.c_void_p()
    check(LIB.cusolverDnCreate(ctypes.byref(handle)), "cusolverDnCreate")
    check(LIB.cusolverDnSetStream(handle, ctypes.c_void_p(cp.cuda.get_current_stream().ptr)), "setStream")
    torch_stream = torch.cuda.ExternalStream(cp.cuda.get_current_stream().ptr)
    rows_out = []
    for q in [32, 64, 128]:
        for rows in [4096, 11008]:
            x_host = panel(rows, q, 1e4, q + rows)
            x0 = cp.asarray(x_host.ravel(order="F"))
            x = x0.copy()
            g = cp.zeros(q * q, dtype=cp.float64)
            r32 = cp.zeros(q * q, dtype=cp.float32)
            rinv = cp.zeros(q * q, dtype=cp.float64)
            flag = cp.zeros(1, dtype=cp.uint32)
            shape = f"{rows}x{q}"
            for name, mod in mods:
                pairs, chunk_rows, chunks = gram_chunks(rows, q, sms, GRAM_TILE)
                partials = cp.zeros((MAX_CHUNKS + MAX_GROUPS) * pairs * GRAM_TILE * GRAM_TILE, dtype=cp.float64)
                tickets = cp.zeros(pairs * (MAX_GROUPS + 1), dtype=cp.uint32)
                gram_k = mod.get_function("rsvd_orth_gram")
                if name == "loraga":
                    big_q = next(b for b in (32, 64, 128) if q <= b)
                    chol_k = mod.get_function(f"rsvd_orth_chol_inv_{big_q}")
                    chol_rows = 4  # the kernel's CHOL_ROWS(Q)
                    chol_threads, chol_smem = 32 * big_q // chol_rows, (big_q * (big_q + 1) + 3 * big_q) * 8
                else:
                    chol_k = mod.get_function("rsvd_orth_chol_inv")
                    chol_threads, chol_smem = 512, (q * (q + 1) + 3 * q) * 8
                if name == "loraga":
                    apply_k = mod.get_function(f"rsvd_orth_apply_{big_q}")
                    apply_rows, apply_threads = 64, 512
                else:
                    apply_k = mod.get_function("rsvd_orth_apply")
                    apply_rows, apply_threads = 32, 256
                apply_smem = q * q * 8 + apply_rows * q * 4
                per_sm = max(1, min(4, (227 << 10) // apply_smem))
                chol_k.max_dynamic_shared_size_bytes = chol_smem
                apply_k.max_dynamic_shared_size_bytes = apply_smem
                gram = lambda: gram_k((pairs, chunks), (256,), (x, cp.int32(rows), cp.int32(q), cp.int32(chunk_rows),
                                                               cp.int32(chunks), partials, tickets, g))
                chol = lambda: chol_k((1,), (chol_threads,), (g, cp.int32(q), r32, rinv, flag, cp.uint32(2), cp.uint32(0),
                                                              cp.float64(0.5)), shared_mem=chol_smem)
                apply = lambda: apply_k((min(-(-rows // apply_rows), per_sm * sms),), (apply_threads,),
                                        (x, cp.int32(rows), cp.int32(q), rinv), shared_mem=apply_smem)
                # Correctness of one pass from x0.
                x[:] = x0
                flag[:] = 0
                gram(); g_copy = g.copy(); chol(); apply()
                cp.cuda.Device().synchronize()
                gm = cp.asnumpy(g_copy).reshape(q, q, order="F")
                r_ref = np.linalg.cholesky(gm).T
                r = cp.asnumpy(g).reshape(q, q, order="F")
                w = cp.asnumpy(rinv).reshape(q, q, order="F")
                r_err = np.linalg.norm(r - r_ref) / np.linalg.norm(r_ref)
                inv_err = np.abs(r @ w - np.eye(q)).max()
                xq = cp.asnumpy(x).reshape(rows, q, order="F").astype(np.float64)
                ortho = np.abs(xq.T @ xq - np.eye(q)).max()
                ok = int(flag[0]) == 0 and r_err < 1e-10 and inv_err < 1e-10 and ortho < 1e-5
                g_saved = g_copy
                t_gram = per_launch_us(gram)
                t_chol = per_launch_us(chol, lambda: g.__setitem__(slice(None), g_saved))
                t_apply = per_launch_us(apply)
                rows_out.append((shape, f"{name} gram / chol_inv / apply", t_gram, t_chol, t_apply,
                                 f"R {r_err:.1e}, RR⁻¹ {inv_err:.1e}, QᵀQ {ortho:.1e}, flag {int(flag[0])}{'' if ok else ' FAIL'}"))
            # The library pass.
            xt = torch.as_tensor(x0, device="cuda").view(q, rows).T  # column-major [rows, q]
            wide = torch.empty(rows, q, dtype=torch.float64, device="cuda")
            gt = torch.empty(q, q, dtype=torch.float64, device="cuda")
            with torch.cuda.stream(torch_stream):
                gram_lib = lambda: (wide.copy_(xt), torch.mm(wide.T, wide, out=gt))
                gram_lib()
                g_keep = gt.clone()
                lwork = ctypes.c_int()
                check(LIB.cusolverDnDpotrf_bufferSize(handle, UPPER, q, ptr(gt), q, ctypes.byref(lwork)), "potrf_bs")
                work = torch.empty(max(lwork.value, 1), dtype=torch.float64, device="cuda")
                info = torch.zeros(1, dtype=torch.int32, device="cuda")
                potrf = lambda: check(LIB.cusolverDnDpotrf(handle, UPPER, q, ptr(gt), q, ptr(work), lwork, ptr(info)), "potrf")
                r_f32 = torch.linalg.cholesky(g_keep, upper=True).float()
                y = torch.empty_like(xt)
                strsm = lambda: torch.linalg.solve_triangular(r_f32, xt, upper=True, left=False, out=y)
                t_gram = per_launch_us(gram_lib)
                t_chol = per_launch_us(potrf, lambda: gt.copy_(g_keep))
                t_apply = per_launch_us(strsm)
            rows_out.append((shape, "library widen+DGEMM / Dpotrf / STRSM", t_gram, t_chol, t_apply, ""))
    print(f"{REPS} launches back to back, median of {RUNS}; us per launch")
    print("| panel | pass | gram | Cholesky (+ R⁻¹) | X R⁻¹ | sum | check |")
    print("|---|---|---:|---:|---:|---:|---|")
    for shape, name, a, b, c, note in rows_out:
        print(f"| {shape} | {name} | {a:.1f} | {b:.1f} | {c:.1f} | {a + b + c:.1f} | {note} |")


if __name__ == "__main__":
    main()
