// Rotary position embeddings of the autograd tape (host side: crates/loraga-core/src/cuda/ops/rope.rs)
// in Hugging Face Llama's half-split layout: dimension i of a head pairs with i + half,
// half = head_dim / 2 (`rotate_half`), and for row r at position p = pos[r]:
//
//   y[i]        = x[i] cos[p, i]               - sign * x[i + half] sin[p, i]
//   y[i + half] = x[i + half] cos[p, i + half] + sign * x[i] sin[p, i + half]
//
// sign = +1 is the forward rotation, -1 the backward (the rotation is orthogonal, so its
// gradient is the rotation by minus the angle). Computed in f32, stored in <t>.
//
// Layouts: x, y [rows, width] row-major with width = heads * head_dim (head h of row r starts at
// r * width + h * head_dim); cos, sin [max_positions, head_dim] f32, the host table uploaded;
// pos [rows] u32, each < max_positions (checked on the host).
//
//   rope_<t>: one thread per (row, head, i < half) pair, grid-stride over rows * width / 2.
//
// Version 1 (the only one). Scalar loads.
#include "common.cuh"

#define THREADS 256

template <typename T>
__device__ void rope(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ cos_t,
                     const float* __restrict__ sin_t, const unsigned int* __restrict__ pos, i64 rows, int width,
                     int head_dim, float sign) {
    const int half = head_dim / 2;
    const int pairs_per_row = width / 2;
    const i64 total = rows * pairs_per_row;
    for (i64 t = (i64)blockIdx.x * THREADS + threadIdx.x; t < total; t += (i64)gridDim.x * THREADS) {
        const i64 r = t / pairs_per_row;
        const int q = (int)(t % pairs_per_row);
        const int h = q / half, i = q % half;
        const i64 base = r * width + (i64)h * head_dim;
        const i64 angle = (i64)pos[r] * head_dim;
        const float x1 = to_f32(x[base + i]), x2 = to_f32(x[base + i + half]);
        y[base + i] = from_f32<T>(x1 * cos_t[angle + i] - sign * x2 * sin_t[angle + i]);
        y[base + i + half] = from_f32<T>(x2 * cos_t[angle + i + half] + sign * x1 * sin_t[angle + i + half]);
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
rope_f32(const float* x, float* y, const float* cos_t, const float* sin_t, const unsigned int* pos, i64 rows,
         int width, int head_dim, float sign) {
    rope(x, y, cos_t, sin_t, pos, rows, width, head_dim, sign);
}
extern "C" __global__ void __launch_bounds__(THREADS)
rope_bf16(const bf16* x, bf16* y, const float* cos_t, const float* sin_t, const unsigned int* pos, i64 rows,
          int width, int head_dim, float sign) {
    rope(x, y, cos_t, sin_t, pos, rows, width, head_dim, sign);
}
