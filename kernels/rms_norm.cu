// RMSNorm of the autograd tape (host side: crates/loraga-core/src/cuda/ops/rms_norm.rs), as
// Hugging Face Llama computes it, every value in f32 registers:
//
//   forward:  r_i = 1 / sqrt(mean_j x_ij^2 + eps),   y_ij = w_j * x_ij * r_i
//   backward: dx_ij = dy_ij w_j r_i - x_ij r_i^3 (sum_k dy_ik w_k x_ik) / d
//             dw_j  = sum_i dy_ij x_ij r_i
//
// Layouts: x, y, dy, dx [rows, d] row-major; w [d]; r [rows] f32 (written by the forward, read
// by the backward); dw [d] f32 (weight gradients are kept in f32 whatever the activations are).
// <t> is the type of x, w, y, dy and dx (f32 or bf16).
//
//   rms_norm_fwd_<t>:        one warp per row, WARPS rows per block: grid = ceil(rows / WARPS).
//                            Lane l reads columns l, l + 32, ... (coalesced); the sum of squares
//                            is reduced by warp shuffles; a second pass over the row (from L1/L2)
//                            writes y.
//   rms_norm_bwd_dx_<t>:     the same layout for dx: one warp-reduced dot product per row.
//   rms_norm_bwd_dw_part_<t>: dw in two stages, without atomics, so it is deterministic:
//                            stage 1 gives each (chunk of rows_per_chunk rows, column j) one
//                            thread that sums its chunk into part[chunk, j] (f32);
//                            grid = (ceil(d / THREADS), chunks), threads of a warp read
//                            consecutive columns of a row (coalesced).
//   rms_norm_dw_sum:         stage 2, dw_j = sum over chunks of part[chunk, j] in chunk order;
//                            grid = ceil(d / THREADS).
//
// Version 1 (the only one). Scalar loads; rows of any length d >= 1.
#include "common.cuh"

#define THREADS 256
#define WARPS (THREADS / 32)

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

template <typename T>
__device__ void rms_norm_fwd(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                             float* __restrict__ r, i64 rows, int d, float eps) {
    const int lane = threadIdx.x % 32;
    const i64 row = (i64)blockIdx.x * WARPS + threadIdx.x / 32;
    if (row >= rows) return;  // whole warps leave together: no shuffle is left half-empty
    const T* xr = x + row * d;
    float ss = 0.0f;
    for (int j = lane; j < d; j += 32) {
        const float v = to_f32(xr[j]);
        ss += v * v;
    }
    const float inv = 1.0f / sqrtf(warp_sum(ss) / (float)d + eps);
    T* yr = y + row * d;
    for (int j = lane; j < d; j += 32) yr[j] = from_f32<T>(to_f32(w[j]) * (to_f32(xr[j]) * inv));
    if (lane == 0) r[row] = inv;
}

template <typename T>
__device__ void rms_norm_bwd_dx(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                const float* __restrict__ r, T* __restrict__ dx, i64 rows, int d) {
    const int lane = threadIdx.x % 32;
    const i64 row = (i64)blockIdx.x * WARPS + threadIdx.x / 32;
    if (row >= rows) return;
    const T* xr = x + row * d;
    const T* gr = dy + row * d;
    float dot = 0.0f;
    for (int j = lane; j < d; j += 32) dot += to_f32(gr[j]) * to_f32(w[j]) * to_f32(xr[j]);
    const float inv = r[row];
    const float c = inv * inv * inv * warp_sum(dot) / (float)d;
    T* dr = dx + row * d;
    for (int j = lane; j < d; j += 32) dr[j] = from_f32<T>(to_f32(gr[j]) * to_f32(w[j]) * inv - to_f32(xr[j]) * c);
}

template <typename T>
__device__ void rms_norm_bwd_dw_part(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ r,
                                     float* __restrict__ part, i64 rows, int d, int rows_per_chunk) {
    const int j = blockIdx.x * THREADS + threadIdx.x;
    if (j >= d) return;
    const i64 chunk = blockIdx.y;
    const i64 begin = chunk * rows_per_chunk;
    const i64 end = begin + rows_per_chunk < rows ? begin + rows_per_chunk : rows;
    float acc = 0.0f;
    for (i64 i = begin; i < end; ++i) acc += to_f32(dy[i * d + j]) * to_f32(x[i * d + j]) * r[i];
    part[chunk * d + j] = acc;
}

extern "C" __global__ void __launch_bounds__(THREADS)
rms_norm_fwd_f32(const float* x, const float* w, float* y, float* r, i64 rows, int d, float eps) {
    rms_norm_fwd(x, w, y, r, rows, d, eps);
}
extern "C" __global__ void __launch_bounds__(THREADS)
rms_norm_fwd_bf16(const bf16* x, const bf16* w, bf16* y, float* r, i64 rows, int d, float eps) {
    rms_norm_fwd(x, w, y, r, rows, d, eps);
}
extern "C" __global__ void __launch_bounds__(THREADS)
rms_norm_bwd_dx_f32(const float* dy, const float* x, const float* w, const float* r, float* dx, i64 rows, int d) {
    rms_norm_bwd_dx(dy, x, w, r, dx, rows, d);
}
extern "C" __global__ void __launch_bounds__(THREADS)
rms_norm_bwd_dx_bf16(const bf16* dy, const bf16* x, const bf16* w, const float* r, bf16* dx, i64 rows, int d) {
    rms_norm_bwd_dx(dy, x, w, r, dx, rows, d);
}
extern "C" __global__ void __launch_bounds__(THREADS)
rms_norm_bwd_dw_part_f32(const float* dy, const float* x, const float* r, float* part, i64 rows, int d,
                         int rows_per_chunk) {
    rms_norm_bwd_dw_part(dy, x, r, part, rows, d, rows_per_chunk);
}
extern "C" __global__ void __launch_bounds__(THREADS)
rms_norm_bwd_dw_part_bf16(const bf16* dy, const bf16* x, const float* r, float* part, i64 rows, int d,
                          int rows_per_chunk) {
    rms_norm_bwd_dw_part(dy, x, r, part, rows, d, rows_per_chunk);
}

extern "C" __global__ void __launch_bounds__(THREADS)
rms_norm_dw_sum(const float* __restrict__ part, float* __restrict__ dw, int chunks, int d) {
    const int j = blockIdx.x * THREADS + threadIdx.x;
    if (j >= d) return;
    float acc = 0.0f;
    for (int c = 0; c < chunks; ++c) acc += part[(i64)c * d + j];
    dw[j] = acc;
}
