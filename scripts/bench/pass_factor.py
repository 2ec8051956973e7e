#!/usr/bin/env python3
"""The q x q step of one CholeskyQR pass at q = 32, 64, 128, timed alone (CUDA events, median of
50 after 5 warm-ups, a fresh copy of the Gram each run outside the timing): cuSOLVER's Dpotrf,
DpotrfBatched (a batch of one) and Xpotrf (64-bit API), and loraga's one-block
rsvd_orth_chol_inv_<q> (kernels/rsvd_orth.cu: Cholesky and R⁻¹ in f64); then X R⁻¹ for X f32
[rows, q] by cuBLAS STRSM (what the pass runs above q = 64) against an SGEMM with R⁻¹ rounded to
f32. Event times of calls this small include the launch and Python's overhead (~25 us: the
SGEMM rows are mostly that); ncu gives the kernels' own times. Prints a markdown table.
Usage (on the GPU machine): python3 scripts/bench/pass_factor.py
"""
import ctypes
import os
import sys

import cupy as cp
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from core_eigen import LIB, check, core_matrix, ptr, time_call  # noqa: E402

UPPER = 1


def main():
    torch.cuda.init()
    handle = ctypes.c_void_p()
    check(LIB.cusolverDnCreate(ctypes.byref(handle)), "create")
    stream = torch.cuda.current_stream()
    check(LIB.cusolverDnSetStream(handle, ctypes.c_void_p(stream.cuda_stream)), "setStream")
    kernels = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "kernels")
    src = open(os.path.join(kernels, "rsvd_orth.cu")).read()
    mod = cp.RawModule(code=src, options=("-I", kernels, "--std=c++17"))
    rows = []
    for q in [32, 64, 128]:
        g0 = core_matrix(q, q).cuda()  # RᵀR: the Gram a pass factors, as the core's R gives it
        a = g0.clone()
        info = torch.zeros(1, dtype=torch.int32, device="cuda")
        lwork = ctypes.c_int()
        check(LIB.cusolverDnDpotrf_bufferSize(handle, UPPER, q, ptr(a), q, ctypes.byref(lwork)), "potrf_bs")
        work = torch.empty(max(lwork.value, 1), dtype=torch.float64, device="cuda")
        setup = lambda: a.copy_(g0)
        rows.append((q, "cusolverDnDpotrf", time_call(stream, setup, lambda: check(
            LIB.cusolverDnDpotrf(handle, UPPER, q, ptr(a), q, ptr(work), lwork, ptr(info)), "potrf"))))
        aptr = torch.tensor([a.data_ptr()], dtype=torch.int64, device="cuda")
        infos = torch.zeros(1, dtype=torch.int32, device="cuda")
        rows.append((q, "cusolverDnDpotrfBatched (1)", time_call(stream, setup, lambda: check(
            LIB.cusolverDnDpotrfBatched(handle, UPPER, q, ptr(aptr), q, ptr(infos), 1), "potrfBatched"))))
        params = ctypes.c_void_p()
        check(LIB.cusolverDnCreateParams(ctypes.byref(params)), "params")
        dbytes, hbytes = ctypes.c_size_t(), ctypes.c_size_t()
        R64F = 1
        check(LIB.cusolverDnXpotrf_bufferSize(handle, params, UPPER, ctypes.c_int64(q), R64F, ptr(a), ctypes.c_int64(q), R64F,
                                              ctypes.byref(dbytes), ctypes.byref(hbytes)), "xpotrf_bs")
        dwork = torch.empty(max(dbytes.value, 8), dtype=torch.uint8, device="cuda")
        hwork = ctypes.create_string_buffer(max(hbytes.value, 8))
        rows.append((q, "cusolverDnXpotrf", time_call(stream, setup, lambda: check(
            LIB.cusolverDnXpotrf(handle, params, UPPER, ctypes.c_int64(q), R64F, ptr(a), ctypes.c_int64(q), R64F,
                                 ptr(dwork), ctypes.c_size_t(dbytes.value), hwork, ctypes.c_size_t(hbytes.value), ptr(info)), "xpotrf"))))
        # rsvd_cuda_orth.rs's launch: the instance for q's width, 32*w/4 threads (CHOL_ROWS = 4).
        chol = mod.get_function(f"rsvd_orth_chol_inv_{q}")
        smem, threads = (q * (q + 1) + 3 * q) * 8, 32 * q // 4
        chol.max_dynamic_shared_size_bytes = smem
        ga = cp.asarray(g0)
        gw = ga.copy()
        r32 = cp.zeros(q * q, dtype=cp.float32)
        rinv = cp.zeros(q * q, dtype=cp.float64)
        flag = cp.zeros(1, dtype=cp.uint32)
        args = (gw, cp.int32(q), r32, rinv, flag, cp.uint32(2), cp.uint32(0), cp.float64(0.5))
        rows.append((q, f"loraga rsvd_orth_chol_inv_{q} (R and R⁻¹)", time_call(stream,
            lambda: gw.__setitem__(slice(None), ga), lambda: chol((1,), (threads,), args, shared_mem=smem))))
        for m in [4096, 11008]:
            x0 = torch.randn(m, q, device="cuda").T.contiguous().T  # column-major [m, q]
            r = torch.linalg.cholesky(g0, upper=True).float()
            y = torch.empty_like(x0)
            rows.append((q, f"X R⁻¹, X [{m}, {q}]: torch.linalg.solve_triangular (STRSM)", time_call(stream,
                lambda: None, lambda: torch.linalg.solve_triangular(r, x0, upper=True, left=False, out=y))))
            w = torch.linalg.inv(r.double()).float()
            rows.append((q, f"X R⁻¹, X [{m}, {q}]: SGEMM with R⁻¹", time_call(stream, lambda: None, lambda: torch.mm(x0, w, out=y))))
    print("| q | step | median us |\n|---:|---|---:|")
    for q, name, us in rows:
        print(f"| {q} | {name} | {us:.1f} |")


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = False
    main()
