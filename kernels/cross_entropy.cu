// Mean cross-entropy over the vocabulary with an ignore index, as PyTorch's
// F.cross_entropy(logits, targets, ignore_index=-100, reduction="mean"), and its gradient.
//
//   Layouts: logits x [n, vocab] row-major (T = f32 or bf16), targets t [n] i64 (a class in
//   [0, vocab) or -100, checked on the host), count = #{r : t[r] != -100} >= 1 (host).
//
//   cross_entropy_fwd_<T>:   one block per row r, one online (max, sum) pass over the row:
//       m[r] = max_j x[r, j],  s[r] = sum_j exp(x[r, j] - m[r])
//       loss[r] = m[r] + log s[r] - x[r, t[r]]     (0 where t[r] = -100)
//   cross_entropy_mean_f32:  one block: out[0] = (sum_r loss[r]) / count, summed in f64 in a
//       fixed order (deterministic).
//   cross_entropy_bwd_<T>:   one block per row, with g = upstream gradient of the mean (g[0]):
//       dx[r, j] = (exp(x[r, j] - m[r]) / s[r] - [j == t[r]]) * g / count,  0 for ignored rows
//       Every element of dx is written.
//
// All arithmetic is f32 (the row sums too: each thread adds vocab/256 terms <= 1 and the block
// merges 256 partial states, so s is accurate to ~1e-6 relative even at vocab 150k). m and s are
// kept between the passes ([n] f32 each) so the backward needs no reduction.
//
// Version 1: 256-thread blocks, scalar coalesced loads (rows of odd vocab sizes are not aligned
// for vector loads).
#include "common.cuh"
#include "softmax.cuh"

#define THREADS 256
#define IGNORE_INDEX (-100)

template <typename T>
__device__ void cross_entropy_fwd(const T* __restrict__ x, const i64* __restrict__ targets,
                                  float* __restrict__ row_max, float* __restrict__ row_sum,
                                  float* __restrict__ row_loss, int vocab) {
    const i64 row = blockIdx.x;
    const T* xr = x + row * vocab;
    MaxSum st = maxsum_empty();
    for (int j = threadIdx.x; j < vocab; j += THREADS) maxsum_add(st, to_f32(xr[j]));
    st = block_maxsum(st);
    if (threadIdx.x == 0) {
        const i64 t = targets[row];
        row_max[row] = st.m;
        row_sum[row] = st.s;
        row_loss[row] = t == IGNORE_INDEX ? 0.0f : (st.m + logf(st.s)) - to_f32(xr[t]);
    }
}

template <typename T>
__device__ void cross_entropy_bwd(const T* __restrict__ x, const i64* __restrict__ targets,
                                  const float* __restrict__ row_max, const float* __restrict__ row_sum,
                                  const float* __restrict__ g, int count, T* __restrict__ dx, int vocab) {
    const i64 row = blockIdx.x;
    const i64 t = targets[row];
    const T* xr = x + row * vocab;
    T* dr = dx + row * vocab;
    if (t == IGNORE_INDEX) {
        for (int j = threadIdx.x; j < vocab; j += THREADS) dr[j] = from_f32<T>(0.0f);
        return;
    }
    const float m = row_max[row], s = row_sum[row], scale = g[0] / (float)count;
    for (int j = threadIdx.x; j < vocab; j += THREADS) {
        const float p = expf(to_f32(xr[j]) - m) / s;
        dr[j] = from_f32<T>((j == t ? p - 1.0f : p) * scale);
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
cross_entropy_mean_f32(const float* __restrict__ row_loss, int n, int count, float* __restrict__ out) {
    double acc = 0.0;
    for (int r = threadIdx.x; r < n; r += THREADS) acc += (double)row_loss[r];
    acc = block_sum(acc);
    if (threadIdx.x == 0) out[0] = (float)(acc / (double)count);
}

// One entry point per logits type.
extern "C" __global__ void __launch_bounds__(THREADS)
cross_entropy_fwd_f32(const float* x, const i64* targets, float* row_max, float* row_sum, float* row_loss,
                      int vocab) {
    cross_entropy_fwd(x, targets, row_max, row_sum, row_loss, vocab);
}
extern "C" __global__ void __launch_bounds__(THREADS)
cross_entropy_fwd_bf16(const bf16* x, const i64* targets, float* row_max, float* row_sum, float* row_loss,
                       int vocab) {
    cross_entropy_fwd(x, targets, row_max, row_sum, row_loss, vocab);
}
extern "C" __global__ void __launch_bounds__(THREADS)
cross_entropy_bwd_f32(const float* x, const i64* targets, const float* row_max, const float* row_sum,
                      const float* g, int count, float* dx, int vocab) {
    cross_entropy_bwd(x, targets, row_max, row_sum, g, count, dx, vocab);
}
extern "C" __global__ void __launch_bounds__(THREADS)
cross_entropy_bwd_bf16(const bf16* x, const i64* targets, const float* row_max, const float* row_sum,
                       const float* g, int count, bf16* dx, int vocab) {
    cross_entropy_bwd(x, targets, row_max, row_sum, g, count, dx, vocab);
}
