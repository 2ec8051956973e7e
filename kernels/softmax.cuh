// Softmax building blocks shared by the attention and cross-entropy kernels: the online softmax
// state and block-wide reductions.
//
//   MaxSum {m, s} of a set X:  m = max X,  s = sum_{x in X} exp(x - m);   the empty set is {-inf, 0}
//   adding x:      x > m:  {x, s exp(m - x) + 1}        otherwise:  {m, s + exp(x - m)}
//   merging A, B:  m = max(A.m, B.m),  s = A.s exp(A.m - m) + B.s exp(B.m - m)
// (Milakov & Gimelshein 2018), so one pass over a row gives both the maximum and the
// normaliser, and per-thread states merge in any order. -inf elements are skipped (exp(-inf) = 0)
// so that -inf - -inf never makes a NaN; a NaN element makes s NaN, as it should.
//
// The block reductions use warp shuffles and 32 slots of shared memory; every thread gets the
// result. They require blockDim.x to be a multiple of 32 (at most 1024) and must be reached by
// every thread of the block. They end with a barrier, so a kernel may call them more than once.
#pragma once
#include "common.cuh"

#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

struct MaxSum {
    float m;
    float s;
};

__device__ __forceinline__ MaxSum maxsum_empty() { return MaxSum{neg_inf(), 0.0f}; }

__device__ __forceinline__ void maxsum_add(MaxSum& a, float x) {
    if (x > a.m) {
        a.s = a.s * expf(a.m - x) + 1.0f;
        a.m = x;
    } else if (x != neg_inf()) {
        a.s += expf(x - a.m);
    }
}

__device__ __forceinline__ MaxSum maxsum_merge(MaxSum a, MaxSum b) {
    const float m = fmaxf(a.m, b.m);
    if (m == neg_inf()) return a;  // both empty
    return MaxSum{m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

__device__ __forceinline__ MaxSum warp_maxsum(MaxSum v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        MaxSum o{__shfl_xor_sync(FULL_MASK, v.m, off), __shfl_xor_sync(FULL_MASK, v.s, off)};
        v = maxsum_merge(v, o);
    }
    return v;
}

__device__ MaxSum block_maxsum(MaxSum v) {
    __shared__ float ms[32], ss[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_maxsum(v);
    if (lane == 0) {
        ms[warp] = v.m;
        ss[warp] = v.s;
    }
    __syncthreads();
    v = lane < warps ? MaxSum{ms[lane], ss[lane]} : maxsum_empty();
    v = warp_maxsum(v);
    __syncthreads();  // the slots may be reused by a later call
    return v;
}

template <typename A> __device__ A block_sum(A v) {
    __shared__ A slots[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(FULL_MASK, v, off);
    if (lane == 0) slots[warp] = v;
    __syncthreads();
    v = lane < warps ? slots[lane] : A(0);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(FULL_MASK, v, off);
    __syncthreads();
    return v;
}
