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
