#!/usr/bin/env python3
"""The randomized SVD's q x q core, timed alone: the f64 symmetric eigen-decomposition of RᵀR
(R upper triangular, the last CholeskyQR's factor) by the cuSOLVER routines the device path could
call, and by the host (NumPy's LAPACK, with the copies there and back), at q = 32, 64, 128, 256.
Each routine gets a fresh copy of the same matrix (the copy is outside the timed interval); CUDA
events around the call on one stream, median of 50 after 5 warm-ups (a routine that waits on the
host inside shows that wait in its time). Checks each result's residual (cuSOLVER's eigenvectors
are the columns of its column-major output, so the rows of the torch view) so a fast wrong
answer shows. Prints a markdown table.
Usage (on the GPU machine): python3 scripts/bench/core_eigen.py
"""
import ctypes
import ctypes.util
import glob
import os
import statistics
import time

import numpy as np
import torch

VECTOR, UPPER = 1, 1
RANGE_I = 1002


def load_cusolver():
    names = sorted(glob.glob("/usr/local/cuda*/lib64/libcusolver.so*"))
    names += sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "*", "lib", "libcusolver.so*")))
    names += [ctypes.util.find_library("cusolver") or ""]
    for name in names:
        if name:
            try:
                return ctypes.CDLL(name), name
            except OSError:
                pass
    raise SystemExit("libcusolver not found")


LIB, LIB_NAME = load_cusolver()


def check(status, what):
    if status != 0:
        raise RuntimeError(f"{what} returned {status}")


def ptr(t):
    return ctypes.c_void_p(t.data_ptr())


def core_matrix(q, seed):
    """RᵀR for R the Cholesky factor of a panel with decaying column scales, as the core sees."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * q, q, generator=g, dtype=torch.float64) * torch.logspace(0, -3, q, dtype=torch.float64)
    r = torch.linalg.qr(x).R
    return r.T @ r


def time_call(stream, setup, call, warmup=5, reps=50):
    for _ in range(warmup):
        setup()
        call()
    times = []
    for _ in range(reps):
        setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        call()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def residual(a0, w, v):
    """max |A V - V diag(w)| / |A|, the decomposition's error."""
    return float((a0 @ v - v * w).abs().max() / a0.abs().max())


def main():
    torch.cuda.init()
    dev = torch.device("cuda")
    stream = torch.cuda.current_stream()
    handle = ctypes.c_void_p()
    check(LIB.cusolverDnCreate(ctypes.byref(handle)), "cusolverDnCreate")
    check(LIB.cusolverDnSetStream(handle, ctypes.c_void_p(stream.cuda_stream)), "cusolverDnSetStream")
    info = torch.zeros(1, dtype=torch.int32, device=dev)
    print(f"cuSOLVER: {LIB_NAME}; torch {torch.__version__}; GPU {torch.cuda.get_device_name()}")
    rows = []
    for q in [32, 64, 128, 256]:
        a_host = core_matrix(q, q)
        a0 = a_host.to(dev)
        a = torch.empty_like(a0)
        w = torch.empty(q, dtype=torch.float64, device=dev)
        lwork = ctypes.c_int()
        n = ctypes.c_int(q)

        def setup():
            a.copy_(a0)

        out = {}

        # syevd: the device path's current core.
        check(LIB.cusolverDnDsyevd_bufferSize(handle, VECTOR, UPPER, n, ptr(a), n, ptr(w), ctypes.byref(lwork)), "syevd_bufferSize")
        work = torch.empty(max(lwork.value, 1), dtype=torch.float64, device=dev)

        def syevd():
            check(LIB.cusolverDnDsyevd(handle, VECTOR, UPPER, n, ptr(a), n, ptr(w), ptr(work), lwork, ptr(info)), "syevd")

        out["syevd"] = (time_call(stream, setup, syevd), residual(a0, w, a.T))

        # syevdx: only the top half of the eigenpairs (LoRA-GA keeps k = 2r = q/2).
        meig = ctypes.c_int()
        il, iu = ctypes.c_int(q // 2 + 1), ctypes.c_int(q)
        zero = ctypes.c_double(0.0)
        check(LIB.cusolverDnDsyevdx_bufferSize(handle, VECTOR, RANGE_I, UPPER, n, ptr(a), n, zero, zero, il, iu,
                                               ctypes.byref(meig), ptr(w), ctypes.byref(lwork)), "syevdx_bufferSize")
        workx = torch.empty(max(lwork.value, 1), dtype=torch.float64, device=dev)

        def syevdx():
            check(LIB.cusolverDnDsyevdx(handle, VECTOR, RANGE_I, UPPER, n, ptr(a), n, zero, zero, il, iu,
                                        ctypes.byref(meig), ptr(w), ptr(workx), lwork, ptr(info)), "syevdx")

        t = time_call(stream, setup, syevdx)
        out["syevdx (top q/2)"] = (t, residual(a0, w[: q // 2], a.T[:, : q // 2]))

        # syevj and syevjBatched (batch of one; cuSOLVER takes n <= 32 there).
        params = ctypes.c_void_p()
        check(LIB.cusolverDnCreateSyevjInfo(ctypes.byref(params)), "CreateSyevjInfo")
        check(LIB.cusolverDnDsyevj_bufferSize(handle, VECTOR, UPPER, n, ptr(a), n, ptr(w), ctypes.byref(lwork), params), "syevj_bufferSize")
        workj = torch.empty(max(lwork.value, 1), dtype=torch.float64, device=dev)

        def syevj():
            check(LIB.cusolverDnDsyevj(handle, VECTOR, UPPER, n, ptr(a), n, ptr(w), ptr(workj), lwork, ptr(info), params), "syevj")

        out["syevj"] = (time_call(stream, setup, syevj), residual(a0, w, a.T))
        if q <= 32:
            one = ctypes.c_int(1)
            check(LIB.cusolverDnDsyevjBatched_bufferSize(handle, VECTOR, UPPER, n, ptr(a), n, ptr(w), ctypes.byref(lwork), params, one), "syevjBatched_bufferSize")
            workb = torch.empty(max(lwork.value, 1), dtype=torch.float64, device=dev)

            def syevj_batched():
                check(LIB.cusolverDnDsyevjBatched(handle, VECTOR, UPPER, n, ptr(a), n, ptr(w), ptr(workb), lwork, ptr(info), params, one), "syevjBatched")

            out["syevjBatched"] = (time_call(stream, setup, syevj_batched), residual(a0, w, a.T))

        # syevBatched (64-bit API, cuSOLVER 11.7+), a batch of one.
        if hasattr(LIB, "cusolverDnXsyevBatched"):
            xparams = ctypes.c_void_p()
            check(LIB.cusolverDnCreateParams(ctypes.byref(xparams)), "CreateParams")
            dev_bytes, host_bytes = ctypes.c_size_t(), ctypes.c_size_t()
            R64F, one64, n64 = 1, ctypes.c_int64(1), ctypes.c_int64(q)
            check(LIB.cusolverDnXsyevBatched_bufferSize(handle, xparams, VECTOR, UPPER, n64, R64F, ptr(a), n64, R64F, ptr(w), R64F,
                                                        ctypes.byref(dev_bytes), ctypes.byref(host_bytes), one64), "XsyevBatched_bufferSize")
            dwork = torch.empty(max(dev_bytes.value, 8), dtype=torch.uint8, device=dev)
            hwork = ctypes.create_string_buffer(max(host_bytes.value, 8))

            def xsyev_batched():
                check(LIB.cusolverDnXsyevBatched(handle, xparams, VECTOR, UPPER, n64, R64F, ptr(a), n64, R64F, ptr(w), R64F,
                                                 ptr(dwork), ctypes.c_size_t(dev_bytes.value), hwork, ctypes.c_size_t(host_bytes.value),
                                                 ptr(info), one64), "XsyevBatched")

            t = time_call(stream, setup, xsyev_batched)
            out["XsyevBatched"] = (t, residual(a0, w, a.T))

        # torch's own choice, and the host: copy down, LAPACK, copy up (wall clock, synchronous).
        def torch_eigh():
            wt, vt = torch.linalg.eigh(a)
            out["_torch"] = (wt, vt)

        t = time_call(stream, setup, torch_eigh)
        out["torch.linalg.eigh"] = (t, residual(a0, *out.pop("_torch")))

        host_times = []
        for rep in range(55):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            h = a0.cpu().numpy()
            wh, vh = np.linalg.eigh(h)
            vd = torch.from_numpy(vh).to(dev)
            torch.cuda.synchronize()
            if rep >= 5:
                host_times.append((time.perf_counter() - t0) * 1e6)
        out["host numpy eigh + copies"] = (statistics.median(host_times),
                                           residual(a0, torch.from_numpy(wh).to(dev), vd))
        for name, (us, res) in out.items():
            rows.append((q, name, us, res))
    print("| q | routine | median us | max residual / max|A| |")
    print("|---:|---|---:|---:|")
    for q, name, us, res in rows:
        print(f"| {q} | {name} | {us:.1f} | {res:.1e} |")


if __name__ == "__main__":
    main()
