// Gradient clipping by global norm (torch.nn.utils.clip_grad_norm_): the per-tensor sums of
// squares that the norm is built from, and the scale that clips. Host side:
// crates/loraga-core/src/optim/cuda.rs; CPU reference: crates/loraga-core/src/optim/clip.rs.
//
//   grad_sumsq_partial:  partial[b] = sum over block b's chunk of (double) g[i]^2
//   grad_sumsq_finish:   sumsq[t]   = sum of partial[b] over tensor t's blocks   (one block per tensor)
//   grad_scale:          g[i]       = round_to_dtype((float) g[i] * coef)
//
// Layout: a multi-tensor table (multi_tensor.cuh) of GradEntry, one per non-empty gradient; each
// gradient is a dense f32 or bf16 buffer of n elements (flag `bf16`). `partial` has one double per
// block of the sum launch, `sumsq` one per table entry.
//
// Every sum is in f64 and in a fixed order (thread-strided, then a fixed tree; no atomics), so the
// result is deterministic. Squares of finite f32 values cannot overflow f64, so a tensor's sum is
// NaN/Inf exactly when it holds a NaN/Inf: the host uses that to name the bad parameter.
//
// Version 1 (the only one): 256-thread blocks, scalar coalesced loads, warp shuffles and one
// shared-memory pass per block.
#include "multi_tensor.cuh"

#define THREADS 256

struct GradEntry {
    void* data;
    i64 n;
    i64 first_block;
    int bf16;
    int pad;
};
static_assert(sizeof(GradEntry) == 32, "GradEntry must match the host's 32-byte table entries");

__device__ __forceinline__ float load_grad(const GradEntry& e, i64 i) {
    return e.bf16 ? to_f32(((const bf16*)e.data)[i]) : ((const float*)e.data)[i];
}

// The block's sum of `x` over its threads, valid in thread 0. Fixed order: warp tree, then warp 0
// adds the warps' sums in a tree.
__device__ double block_sum(double x) {
    __shared__ double warp_sums[THREADS / 32];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = x;
    __syncthreads();
    if (warp == 0) {
        x = lane < THREADS / 32 ? warp_sums[lane] : 0.0;
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
    }
    return x;
}

extern "C" __global__ void __launch_bounds__(THREADS)
grad_sumsq_partial(const GradEntry* __restrict__ table, int num, i64 chunk, double* __restrict__ partial) {
    const BlockChunk<GradEntry> c = block_chunk(table, num, chunk);
    double acc = 0.0;
    for (i64 i = c.start + threadIdx.x; i < c.end; i += THREADS) {
        const double g = (double)load_grad(c.e, i);
        acc += g * g;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// Blocks of tensor t are [first_block[t], first_block[t+1]); the last tensor's end is `blocks`.
extern "C" __global__ void __launch_bounds__(THREADS)
grad_sumsq_finish(const GradEntry* __restrict__ table, int num, i64 blocks, const double* __restrict__ partial,
                  double* __restrict__ sumsq) {
    const int t = blockIdx.x;
    const i64 begin = table[t].first_block;
    const i64 end = t + 1 < num ? table[t + 1].first_block : blocks;
    double acc = 0.0;
    for (i64 b = begin + threadIdx.x; b < end; b += THREADS) acc += partial[b];
    acc = block_sum(acc);
    if (threadIdx.x == 0) sumsq[t] = acc;
}

extern "C" __global__ void __launch_bounds__(THREADS)
grad_scale(const GradEntry* __restrict__ table, int num, i64 chunk, float coef) {
    const BlockChunk<GradEntry> c = block_chunk(table, num, chunk);
    if (c.e.bf16) {
        bf16* g = (bf16*)c.e.data;
        for (i64 i = c.start + threadIdx.x; i < c.end; i += THREADS) g[i] = from_f32<bf16>(__fmul_rn(to_f32(g[i]), coef));
    } else {
        float* g = (float*)c.e.data;
        for (i64 i = c.start + threadIdx.x; i < c.end; i += THREADS) g[i] = __fmul_rn(g[i], coef);
    }
}
