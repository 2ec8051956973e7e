// The element-wise and row-wise steps of grouped-query causal attention; the products
// (S = Q K^T, O = P V and the backward ones) are cuBLAS strided-batched GEMMs, see
// crates/loraga-core/src/cuda/attention.rs for the whole algorithm and the layouts.
//
//   attn_swap_<T>:            dst[a][y][x][e] = src[a][x][y][e]     for src [A, X, Y, D]
//       Moves heads between the token-major layout of the projections, [batch, seq, heads, d]
//       (= [batch*seq, heads*d] row-major), and the head-major layout of the GEMMs,
//       [batch, heads, seq, d]: X = seq, Y = heads one way, X = heads, Y = seq the other.
//   softmax_causal_fwd_<T>:   P[r, j] = exp(S[r, j] - m) / sum_{l visible} exp(S[r, l] - m)
//       for visible j, 0 otherwise, with m the maximum over the visible keys. One block per row
//       r = (b * heads + h) * seq + i of the f32 scores S [batch*heads*seq, seq] (already
//       scaled by 1/sqrt(d)); key j is visible to query i when j <= i and mask[b * seq + j] != 0.
//       A row with no visible key is all zeros. Every element of P is written (the P V GEMM reads
//       whole rows). One online (max, sum) pass over the visible keys, one writing pass.
//   softmax_causal_bwd_<T>:   dS[r, j] = P[r, j] (dP[r, j] - sum_l P[r, l] dP[r, l])
//       In place: dS overwrites P (same type, same index, read and written by one thread after a
//       block barrier). Only j <= i is touched: P is 0 beyond the diagonal, and so is dS. Where
//       P is 0 (masked keys, empty rows) dS is 0 without reading dP.
//
// P and dS have the activations' type T (f32 or bf16: they are GEMM operands beside V, K, Q);
// S and dP are f32. All arithmetic is f32.
//
// Version 1: 256-thread blocks; rows read with stride-256 coalesced loads; no shared staging
// (a row of 1024 f32 is 4 KB and stays in L1/L2 between the two passes).
#include "common.cuh"
#include "softmax.cuh"

#define THREADS 256

template <typename T>
__device__ void attn_swap(const T* __restrict__ src, T* __restrict__ dst, i64 A, i64 X, i64 Y, i64 D) {
    const i64 n = A * X * Y * D;
    const i64 stride = (i64)gridDim.x * THREADS;
    for (i64 o = (i64)blockIdx.x * THREADS + threadIdx.x; o < n; o += stride) {
        // o = ((a * Y + y) * X + x) * D + e
        const i64 e = o % D, r = o / D;
        const i64 x = r % X, r2 = r / X;
        const i64 y = r2 % Y, a = r2 / Y;
        dst[o] = src[((a * X + x) * Y + y) * D + e];
    }
}

template <typename T>
__device__ void softmax_causal_fwd(const float* __restrict__ s, T* __restrict__ p,
                                   const unsigned char* __restrict__ mask, int seq, int heads) {
    const i64 row = blockIdx.x;
    const int i = (int)(row % seq);
    const i64 b = row / ((i64)heads * seq);
    const float* srow = s + row * seq;
    T* prow = p + row * seq;
    const unsigned char* visible = mask + b * seq;

    MaxSum st = maxsum_empty();
    for (int j = threadIdx.x; j <= i; j += THREADS)
        if (visible[j]) maxsum_add(st, srow[j]);
    st = block_maxsum(st);

    const bool any = st.m != neg_inf();
    for (int j = threadIdx.x; j < seq; j += THREADS) {
        float v = 0.0f;
        if (any && j <= i && visible[j]) v = expf(srow[j] - st.m) / st.s;
        prow[j] = from_f32<T>(v);
    }
}

template <typename T>
__device__ void softmax_causal_bwd(T* p_ds, const float* __restrict__ dp, int seq) {
    const i64 row = blockIdx.x;
    const int i = (int)(row % seq);
    T* prow = p_ds + row * seq;
    const float* dprow = dp + row * seq;

    float acc = 0.0f;
    for (int j = threadIdx.x; j <= i; j += THREADS) {
        const float pj = to_f32(prow[j]);
        if (pj != 0.0f) acc += pj * dprow[j];
    }
    const float rowdot = block_sum(acc);  // ends with a barrier: every read of P is done

    for (int j = threadIdx.x; j <= i; j += THREADS) {
        const float pj = to_f32(prow[j]);
        prow[j] = from_f32<T>(pj != 0.0f ? pj * (dprow[j] - rowdot) : 0.0f);
    }
}

// One entry point per storage type T of the activations.
extern "C" __global__ void __launch_bounds__(THREADS)
attn_swap_f32(const float* src, float* dst, i64 A, i64 X, i64 Y, i64 D) {
    attn_swap(src, dst, A, X, Y, D);
}
extern "C" __global__ void __launch_bounds__(THREADS)
attn_swap_bf16(const bf16* src, bf16* dst, i64 A, i64 X, i64 Y, i64 D) {
    attn_swap(src, dst, A, X, Y, D);
}
extern "C" __global__ void __launch_bounds__(THREADS)
softmax_causal_fwd_f32(const float* s, float* p, const unsigned char* mask, int seq, int heads) {
    softmax_causal_fwd(s, p, mask, seq, heads);
}
extern "C" __global__ void __launch_bounds__(THREADS)
softmax_causal_fwd_bf16(const float* s, bf16* p, const unsigned char* mask, int seq, int heads) {
    softmax_causal_fwd(s, p, mask, seq, heads);
}
extern "C" __global__ void __launch_bounds__(THREADS)
softmax_causal_bwd_f32(float* p_ds, const float* dp, int seq) {
    softmax_causal_bwd(p_ds, dp, seq);
}
extern "C" __global__ void __launch_bounds__(THREADS)
softmax_causal_bwd_bf16(bf16* p_ds, const float* dp, int seq) {
    softmax_causal_bwd(p_ds, dp, seq);
}
