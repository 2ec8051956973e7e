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
