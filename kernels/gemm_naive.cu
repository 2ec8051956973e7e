// Naive GEMM: the baseline every faster loraga kernel is measured against.
//
//   C[m, n] = alpha * sum_k opA[m, k] * opB[k, n]  +  beta * C[m, n]
//
// Layouts: all matrices are dense and row-major in memory; transposes are expressed by strides,
// so one kernel serves every layout the LoRA math needs:
//   opA[m, k] = A[m * a_rs + k * a_cs]     (A stored [M, K]: a_rs = K, a_cs = 1;
//                                           A stored [K, M] and transposed: a_rs = 1, a_cs = M)
//   opB[k, n] = B[k * b_rs + n * b_cs]     (B stored [K, N]: b_rs = N, b_cs = 1;
//                                           PyTorch weight [N, K] transposed: b_rs = 1, b_cs = K)
//   C[m, n]   = C[m * ldc + n]
// Accumulation is fp32 whatever the storage type. beta == 0 never reads C (BLAS semantics), so
// C may hold garbage or NaN before the call.
//
// Version 1 (the only one): 64x64 output tile per 256-thread block, K in slabs of 16 staged in
// shared memory, a 4x4 register micro-tile per thread. Ragged M, N, K are handled by zero-filled
// loads and guarded stores. No tensor cores, no vector loads, no pipelining: simple on purpose.
#include "common.cuh"

#define TILE_M 64
#define TILE_N 64
#define TILE_K 16
#define THREADS 256

template <typename Tin, typename Tout>
__device__ void gemm_naive(const Tin* __restrict__ A, const Tin* __restrict__ B, Tout* __restrict__ C,
                           int M, int N, int K, i64 a_rs, i64 a_cs, i64 b_rs, i64 b_cs, i64 ldc,
                           float alpha, float beta) {
    // Padded by one column so that the column-wise reads of the A slab hit different banks.
    __shared__ float As[TILE_K][TILE_M + 1];
    __shared__ float Bs[TILE_K][TILE_N + 1];

    const int tid = threadIdx.x;
    const int row0 = blockIdx.y * TILE_M;
    const int col0 = blockIdx.x * TILE_N;
    const int ty = tid / 16, tx = tid % 16;  // this thread owns rows ty + 16 i, cols tx + 16 j

    float acc[4][4] = {};
    for (int k0 = 0; k0 < K; k0 += TILE_K) {
        // Each thread stages 4 elements of each slab (64 x 16 = 1024 = 4 x 256).
        for (int e = tid; e < TILE_M * TILE_K; e += THREADS) {
            int r = e / TILE_K, kk = e % TILE_K;
            int gm = row0 + r, gk = k0 + kk;
            As[kk][r] = (gm < M && gk < K) ? to_f32(A[gm * a_rs + gk * a_cs]) : 0.0f;
        }
        for (int e = tid; e < TILE_K * TILE_N; e += THREADS) {
            int kk = e / TILE_N, c = e % TILE_N;
            int gk = k0 + kk, gn = col0 + c;
            Bs[kk][c] = (gk < K && gn < N) ? to_f32(B[gk * b_rs + gn * b_cs]) : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TILE_K; ++kk) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
        int gm = row0 + ty + 16 * i;
        if (gm >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            int gn = col0 + tx + 16 * j;
            if (gn >= N) continue;
            i64 idx = gm * ldc + gn;
            float v = alpha * acc[i][j];
            if (beta != 0.0f) v += beta * to_f32(C[idx]);
            C[idx] = from_f32<Tout>(v);
        }
    }
}

// One entry point per (input, output) storage type; the name is gemm_naive_<in>_<out>.
extern "C" __global__ void __launch_bounds__(THREADS)
gemm_naive_f32_f32(const float* A, const float* B, float* C, int M, int N, int K, i64 a_rs,
                   i64 a_cs, i64 b_rs, i64 b_cs, i64 ldc, float alpha, float beta) {
    gemm_naive(A, B, C, M, N, K, a_rs, a_cs, b_rs, b_cs, ldc, alpha, beta);
}
extern "C" __global__ void __launch_bounds__(THREADS)
gemm_naive_bf16_bf16(const bf16* A, const bf16* B, bf16* C, int M, int N, int K, i64 a_rs,
                     i64 a_cs, i64 b_rs, i64 b_cs, i64 ldc, float alpha, float beta) {
    gemm_naive(A, B, C, M, N, K, a_rs, a_cs, b_rs, b_cs, ldc, alpha, beta);
}
extern "C" __global__ void __launch_bounds__(THREADS)
gemm_naive_bf16_f32(const bf16* A, const bf16* B, float* C, int M, int N, int K, i64 a_rs,
                    i64 a_cs, i64 b_rs, i64 b_cs, i64 ldc, float alpha, float beta) {
    gemm_naive(A, B, C, M, N, K, a_rs, a_cs, b_rs, b_cs, ldc, alpha, beta);
}
