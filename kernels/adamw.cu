// AdamW, fused: one pass over every trainable parameter in one launch, as torch.optim.AdamW
// (torch's single-tensor path) computes it. Host side: crates/loraga-core/src/optim/cuda.rs;
// CPU reference (the same operations in the same order): crates/loraga-core/src/optim/adamw.rs.
//
// Per element, with per-tensor scalars from the host (t = that parameter's step count, after
// the increment; computed in f64 there and rounded to f32 once, as torch does with Python floats):
//   decay          = 1 - lr * weight_decay            (1 for parameters excluded from decay)
//   neg_step_size  = -lr / (1 - beta1^t)
//   bc2_sqrt       = sqrt(1 - beta2^t)
// and the global w1 = 1 - beta1, beta2, w2 = 1 - beta2, eps:
//   p     = p * decay                                 param.mul_(1 - lr * wd)
//   m     = fma(w1, g - m, m)          if w1 <  0.5   exp_avg.lerp_(grad, 1 - beta1)
//         = fma(w1 - 1, g - m, g)      otherwise      (torch's two-sided lerp, fused as its CPU kernel)
//   v     = v * beta2 + (w2 * g) * g                  exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=w2)
//   denom = sqrt(v) / bc2_sqrt + eps                  (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
//   p     = p + (neg_step_size * m) / denom           param.addcdiv_(exp_avg, denom, value=-step_size)
// Every operation is an explicitly rounded intrinsic (no fma contraction beyond the one written),
// and NVRTC's defaults give IEEE sqrt and division, so the result is bit-identical to the CPU path.
//
// Layout: a multi-tensor table (multi_tensor.cuh) of AdamwEntry, one per parameter that has a
// gradient; param, exp_avg and exp_avg_sq are dense f32 buffers of n elements, grad is f32 or bf16
// (flag grad_bf16) and only read. The host checks every gradient for NaN/Inf before launching, so
// a bad gradient leaves every parameter and every state untouched.
//
// Version 1 (the only one): 256-thread blocks, one chunk per block, scalar coalesced loads (7 f32
// accesses per element with f32 gradients: memory bound).
#include "multi_tensor.cuh"

#define THREADS 256

struct AdamwEntry {
    float* param;
    const void* grad;
    float* exp_avg;
    float* exp_avg_sq;
    i64 n;
    i64 first_block;
    float decay;
    float neg_step_size;
    float bc2_sqrt;
    int grad_bf16;
};
static_assert(sizeof(AdamwEntry) == 64, "AdamwEntry must match the host's 64-byte table entries");

extern "C" __global__ void __launch_bounds__(THREADS)
adamw_step(const AdamwEntry* __restrict__ table, int num, i64 chunk, float w1, float beta2, float w2, float eps) {
    const BlockChunk<AdamwEntry> c = block_chunk(table, num, chunk);
    const AdamwEntry& e = c.e;
    const bool small_weight = fabsf(w1) < 0.5f;
    const float coeff = small_weight ? w1 : __fsub_rn(w1, 1.0f);
    for (i64 i = c.start + threadIdx.x; i < c.end; i += THREADS) {
        const float g = e.grad_bf16 ? to_f32(((const bf16*)e.grad)[i]) : ((const float*)e.grad)[i];
        const float p = __fmul_rn(e.param[i], e.decay);
        float m = e.exp_avg[i];
        m = __fmaf_rn(coeff, __fsub_rn(g, m), small_weight ? m : g);
        const float v = __fadd_rn(__fmul_rn(e.exp_avg_sq[i], beta2), __fmul_rn(__fmul_rn(w2, g), g));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), e.bc2_sqrt), eps);
        e.exp_avg[i] = m;
        e.exp_avg_sq[i] = v;
        e.param[i] = __fadd_rn(p, __fdiv_rn(__fmul_rn(e.neg_step_size, m), denom));
    }
}
