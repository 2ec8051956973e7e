// Shared device helpers for every loraga kernel.
//
// NVRTC compiles these files, so only CUDA's own headers may be included (no <stdint.h> or
// other host headers). Element conversions go through float: every kernel accumulates in fp32
// whatever its storage type, and converts once on load and once on store.
#pragma once
#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;
typedef long long i64;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
// Round to nearest even, as PyTorch's .to(bfloat16) does.
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }

__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Split reductions with a fixed summation order: each of `count` blocks publishes its partial
// result, then calls this with every thread; it returns true in the last block to arrive at
// `ticket`, which then sees every other block's writes and can sum them in a fixed order (so the
// result does not depend on which block finished when). That block resets the ticket to zero for
// the next launch on the same buffer. A __syncthreads at entry and exit, like any barrier.
__device__ __forceinline__ bool last_to_arrive(unsigned int* ticket, unsigned int count) {
    __shared__ bool last;
    __threadfence();  // this block's partial is visible before its ticket
    __syncthreads();
    if (threadIdx.x + threadIdx.y + threadIdx.z == 0) {
        last = atomicAdd(ticket, 1u) == count - 1;
        if (last) *ticket = 0;
    }
    __syncthreads();
    if (last) __threadfence();  // and the others' partials before this block reads them
    return last;
}

// The split reductions' partial runs (rsvd_skinny.cu, rsvd_skinny_wg.cu): a thread's N partial
// sums as a run of float4s (16-byte aligned), written through L2 for the block that adds them.
template <int N>
__device__ __forceinline__ void store_run(float4* run, const float* v) {
    static_assert(N % 4 == 0, "whole float4s");
#pragma unroll
    for (int e = 0; e < N; e += 4) __stcg(run + e / 4, make_float4(v[e], v[e + 1], v[e + 2], v[e + 3]));
}

// sum = the runs of splits 0, 1, ..., splits - 1 (run(s) points at split s's run of N floats)
// added in that order, whichever block wrote which when: the fixed order last_to_arrive's caller
// needs. Two splits' loads are in flight at a time.
template <int N, typename Run>
__device__ __forceinline__ void sum_runs(float (&sum)[N], int splits, Run run) {
    static_assert(N % 4 == 0, "whole float4s");
#pragma unroll
    for (int e = 0; e < N; ++e) sum[e] = 0.0f;
    int s = 0;
    for (; s + 1 < splits; s += 2) {
        float4 p0[N / 4], p1[N / 4];
#pragma unroll
        for (int e = 0; e < N / 4; ++e) {
            p0[e] = __ldcg(run(s) + e);
            p1[e] = __ldcg(run(s + 1) + e);
        }
#pragma unroll
        for (int e = 0; e < N / 4; ++e) {
            sum[4 * e] = (sum[4 * e] + p0[e].x) + p1[e].x;
            sum[4 * e + 1] = (sum[4 * e + 1] + p0[e].y) + p1[e].y;
            sum[4 * e + 2] = (sum[4 * e + 2] + p0[e].z) + p1[e].z;
            sum[4 * e + 3] = (sum[4 * e + 3] + p0[e].w) + p1[e].w;
        }
    }
    if (s < splits) {
#pragma unroll
        for (int e = 0; e < N / 4; ++e) {
            const float4 p = __ldcg(run(s) + e);
            sum[4 * e] += p.x;
            sum[4 * e + 1] += p.y;
            sum[4 * e + 2] += p.z;
            sum[4 * e + 3] += p.w;
        }
    }
}

