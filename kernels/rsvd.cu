// Helpers of the GPU randomized SVD (crates/loraga-core/src/linalg/rsvd_cuda.rs). The heavy
// work (products with A, Gram matrices, triangular solves) goes through cuBLAS; these kernels do
// the element-wise and reduction steps around it.
//
//   rsvd_first_nonfinite_f32:  first[0] = min { i : a[i] is NaN or +-Inf }   (unchanged if none)
//       a is any dense f32 buffer of n elements (a row-major gradient [m, n] read as flat);
//       first[0] must hold 0xffff...ff before the launch. Grid-stride loop over float4s (any
//       alignment of a: a scalar head and tail), per-thread minimum, warp-shuffle minimum, one
//       64-bit atomicMin per warp. Non-finite is tested on the bits
//       (exponent all ones), so no math header and no fast-math surprise.
//   rsvd_f32_to_f64:           y[i] = (double) x[i]   (exact widening)
//       Feeds cuBLAS DGEMM for the Gram matrices XᵀX of CholeskyQR: the products of f32 values
//       are exact in f64 and accumulate in f64, so the Gram carries f64 accuracy and Cholesky
//       works up to cond(X) ~ 1e7 instead of ~3e3 with an f32 Gram.
//   rsvd_bf16_to_f32:          y[i] = (float) x[i]    (exact widening, LoRA-GA's grad.float())
//
// 256-thread blocks, grid-stride loops. Version 2 of the non-finite check reads float4s, several
// in flight (version 1, scalar loads one at a time, took 77 us for 11008 x 4096 on the H200).
#include "common.cuh"

#define THREADS 256
#define NONFINITE_UNROLL 4

__device__ __forceinline__ bool nonfinite(float x) {
    return (__float_as_uint(x) & 0x7f800000u) == 0x7f800000u;
}

extern "C" __global__ void __launch_bounds__(THREADS)
rsvd_first_nonfinite_f32(const float* __restrict__ a, i64 n, unsigned long long* first) {
    // The 16-byte-aligned body is read as float4, NONFINITE_UNROLL loads in flight a thread (the
    // check is a bandwidth pass over the whole gradient; one scalar load at a time left it at about
    // half of the memory's rate); the unaligned head and the tail (< 4 elements each) by scalar loads.
    unsigned long long best = ~0ull;
    const i64 head = min(n, (i64)(((16 - (reinterpret_cast<unsigned long long>(a) & 15)) & 15) / 4));
    const i64 n4 = (n - head) / 4;
    const i64 tail = head + 4 * n4;
    const int gt = blockIdx.x * THREADS + threadIdx.x;
    if (gt < head && nonfinite(a[gt])) best = gt;
    if (gt < n - tail && nonfinite(a[tail + gt]) && best == ~0ull) best = tail + gt;
    const float4* body = reinterpret_cast<const float4*>(a + head);
    const i64 stride = (i64)gridDim.x * THREADS;
    unsigned long long found = ~0ull;
    for (i64 base = gt; base < n4 && found == ~0ull; base += NONFINITE_UNROLL * stride) {
        float4 x[NONFINITE_UNROLL];
#pragma unroll
        for (int u = 0; u < NONFINITE_UNROLL; ++u) {
            const i64 j = base + u * stride;
            x[u] = j < n4 ? __ldg(body + j) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
#pragma unroll
        for (int u = 0; u < NONFINITE_UNROLL; ++u) {  // in increasing index order: the first is the least
            const unsigned long long i = head + 4 * (base + u * stride);
            if (found == ~0ull) {
                if (nonfinite(x[u].x)) found = i;
                else if (nonfinite(x[u].y)) found = i + 1;
                else if (nonfinite(x[u].z)) found = i + 2;
                else if (nonfinite(x[u].w)) found = i + 3;
            }
        }
    }
    best = found < best ? found : best;
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
