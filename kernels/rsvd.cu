// Helpers of the GPU randomized SVD (crates/loraga-core/src/linalg/rsvd_cuda.rs). The heavy
// work (products with A, Gram matrices, triangular solves) goes through cuBLAS; these kernels do
// the element-wise and reduction steps around it.
//
//   rsvd_first_nonfinite_f32:  first[0] = min { i : a[i] is NaN or +-Inf }   (unchanged if none)
//       a is any dense f32 buffer of n elements (a row-major gradient [m, n] read as flat);
//       first[0] must hold 0xffff...ff before the launch. Grid-stride loop, per-thread minimum,
//       warp-shuffle minimum, one 64-bit atomicMin per warp. Non-finite is tested on the bits
//       (exponent all ones), so no math header and no fast-math surprise.
//   rsvd_f32_to_f64:           y[i] = (double) x[i]   (exact widening)
//       Feeds cuBLAS DGEMM for the Gram matrices XᵀX of CholeskyQR: the products of f32 values
//       are exact in f64 and accumulate in f64, so the Gram carries f64 accuracy and Cholesky
//       works up to cond(X) ~ 1e7 instead of ~3e3 with an f32 Gram.
//   rsvd_bf16_to_f32:          y[i] = (float) x[i]    (exact widening, LoRA-GA's grad.float())
//
// Version 1 (the only one): 256-thread blocks, grid-stride loops.
#include "common.cuh"

#define THREADS 256

extern "C" __global__ void __launch_bounds__(THREADS)
rsvd_first_nonfinite_f32(const float* __restrict__ a, i64 n, unsigned long long* first) {
    unsigned long long best = ~0ull;
    const i64 stride = (i64)gridDim.x * THREADS;
    for (i64 i = (i64)blockIdx.x * THREADS + threadIdx.x; i < n; i += stride) {
        unsigned int bits = __float_as_uint(a[i]);
        if ((bits & 0x7f800000u) == 0x7f800000u) {
            best = (unsigned long long)i;
            break;  // later indices of this thread are larger
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        unsigned long long other = __shfl_down_sync(0xffffffffu, best, off);
        best = other < best ? other : best;
    }
    if ((threadIdx.x & 31) == 0 && best != ~0ull) atomicMin(first, best);
}

extern "C" __global__ void __launch_bounds__(THREADS)
rsvd_f32_to_f64(const float* __restrict__ x, double* __restrict__ y, i64 n) {
    const i64 stride = (i64)gridDim.x * THREADS;
    for (i64 i = (i64)blockIdx.x * THREADS + threadIdx.x; i < n; i += stride) y[i] = (double)x[i];
}

extern "C" __global__ void __launch_bounds__(THREADS)
rsvd_bf16_to_f32(const bf16* __restrict__ x, float* __restrict__ y, i64 n) {
    const i64 stride = (i64)gridDim.x * THREADS;
    for (i64 i = (i64)blockIdx.x * THREADS + threadIdx.x; i < n; i += stride) y[i] = to_f32(x[i]);
}
