// The small steps between the cuBLAS/cuSOLVER calls of the GPU randomized SVD's device path
// (crates/loraga-core/src/linalg/rsvd_cuda_device.rs), so that no q x q factor has to visit the
// host. All matrices are column-major q x q (element (i, j) at [i + j*q]) unless said otherwise;
// q <= 512 in practice, never more than min(m, n) of the layer.
//
// Failure is reported, not acted on: each kernel ORs a bit into `flag` (one u32 per layer) when
// its input says the fast path cannot be trusted, and the host reads the flags once per batch
// and redoes those layers with the host-assisted fallback. NaN must always raise a flag, so every
// test is written as !(x < tol) rather than x >= tol.
//
//   rsvd_gram_check(g, q, fro_tol, max_tol, flag, bit):
//       d = g - I;  flag |= bit  unless  ||d||_F < fro_tol  and  max|d_ij| <= max_tol
//       (+inf for a tolerance leaves only its finiteness test). One block; f64 reductions.
//       Used on CholeskyQR's Gram XᵀX (second pass: must be within 1/2 of I, so that the pass
//       leaves X orthonormal to f32 rounding) and on U_RᵀU_R of the core (orthogonality).
//   rsvd_chol_to_f32(r, q, info, out, flag, bit):
//       out = triu(r) rounded to f32, zeros below the diagonal (cuSOLVER potrf leaves the Gram's
//       lower triangle there); flag |= bit if potrf's *info != 0 or a rounded diagonal entry is
//       not > 0 (the STRSM that follows would divide by it).
//   rsvd_tri_product(a, b, q, c):
//       c = a b in f64 for upper-triangular f32 a, b: c_ij = sum_{l=i..j} a_il b_lj (i <= j), 0
//       below. The R of a two-pass CholeskyQR, X = Q (R2 R1), from the two f32 factors the solves
//       actually used.
//   rsvd_core_order(evec, w, rv, q, k, info, u64, u32, v32, s, flag, bit):
//       From the eigen-decomposition RᵀR = V diag(w) Vᵀ (w ascending, as syevd returns it) and
//       rv = R V: for output column j < k take source column c = q-1-j (descending order),
//       sigma_j = sqrt(max(w_c, 0)), V_R[:, j] = evec[:, c], U_R[:, j] = rv[:, c] / sigma_j,
//       S[j] = sigma_j. U_R is written in f64 (u64, for its orthogonality check) and f32 (u32),
//       V_R in f32 (v32); all [q, k] column-major. flag |= bit if syevd's *info != 0 or a
//       sigma_j is not a finite f32.
//
// Version 1 (the only one): grid-stride loops of 256 threads; one 256-thread block for the
// reductions (q*q <= 262144 elements: a few microseconds).
#include "common.cuh"

#define THREADS 256

extern "C" __global__ void __launch_bounds__(THREADS)
rsvd_gram_check(const double* __restrict__ g, int q, double fro_tol, double max_tol, unsigned int* flag,
                unsigned int bit) {
    __shared__ double sum_sh[THREADS];
    __shared__ double max_sh[THREADS];
    double sum = 0.0, mx = 0.0;
    // A warp per column, its lanes on consecutive rows: no index division (a 64-bit one per
    // element made this 33 µs at q = 128 on an H200), and a column's loads are independent, so
    // several are in flight.
    const int lane = threadIdx.x % 32;
    for (int j = threadIdx.x / 32; j < q; j += THREADS / 32) {
        const double* col = g + (i64)j * q;
#pragma unroll 4
        for (int i = lane; i < q; i += 32) {
            const double d = col[i] - (i == j ? 1.0 : 0.0);
            sum += d * d;  // NaN and inf stay in the sum
            const double a = fabs(d);
            mx = (a > mx || a != a) ? a : mx;
        }
    }
    sum_sh[threadIdx.x] = sum;
    max_sh[threadIdx.x] = mx;
    __syncthreads();
    for (int half = THREADS / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) {
            sum_sh[threadIdx.x] += sum_sh[threadIdx.x + half];
            const double o = max_sh[threadIdx.x + half];
            if (o > max_sh[threadIdx.x] || o != o) max_sh[threadIdx.x] = o;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        const bool ok = sqrt(sum_sh[0]) < fro_tol && max_sh[0] <= max_tol && sum_sh[0] == sum_sh[0];
        if (!ok) atomicOr(flag, bit);
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
rsvd_chol_to_f32(const double* __restrict__ r, int q, const int* __restrict__ info, float* __restrict__ out,
                 unsigned int* flag, unsigned int bit) {
    const i64 n = (i64)q * q;
    const i64 stride = (i64)gridDim.x * THREADS;
    for (i64 idx = (i64)blockIdx.x * THREADS + threadIdx.x; idx < n; idx += stride) {
        const int i = (int)(idx % q), j = (int)(idx / q);
        const float v = i <= j ? (float)r[idx] : 0.0f;
        out[idx] = v;
        if (i == j && !(v > 0.0f)) atomicOr(flag, bit);
    }
    if (blockIdx.x == 0 && threadIdx.x == 0 && *info != 0) atomicOr(flag, bit);
}

extern "C" __global__ void __launch_bounds__(THREADS)
rsvd_tri_product(const float* __restrict__ a, const float* __restrict__ b, int q, double* __restrict__ c) {
    const i64 n = (i64)q * q;
    const i64 stride = (i64)gridDim.x * THREADS;
    for (i64 idx = (i64)blockIdx.x * THREADS + threadIdx.x; idx < n; idx += stride) {
        const int i = (int)(idx % q), j = (int)(idx / q);
        double acc = 0.0;
        for (int l = i; l <= j; ++l) acc += (double)a[i + (i64)l * q] * (double)b[l + (i64)j * q];
        c[idx] = acc;  // 0 below the diagonal: the loop is empty there
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
rsvd_core_order(const double* __restrict__ evec, const double* __restrict__ w, const double* __restrict__ rv, int q,
                int k, const int* __restrict__ info, double* __restrict__ u64, float* __restrict__ u32,
                float* __restrict__ v32, float* __restrict__ s, unsigned int* flag, unsigned int bit) {
    const i64 n = (i64)q * k;
    const i64 stride = (i64)gridDim.x * THREADS;
    for (i64 idx = (i64)blockIdx.x * THREADS + threadIdx.x; idx < n; idx += stride) {
        const int i = (int)(idx % q), j = (int)(idx / q);
        const int src = q - 1 - j;
        const double sigma = sqrt(fmax(w[src], 0.0));
        const i64 from = i + (i64)src * q;
        v32[idx] = (float)evec[from];
        const double u = rv[from] / sigma;  // sigma = 0 gives inf/NaN: the orthogonality check flags it
        u64[idx] = u;
        u32[idx] = (float)u;
        if (i == 0) {
            const float sf = (float)sigma;
            s[j] = sf;
            if (!(sf - sf == 0.0f)) atomicOr(flag, bit);  // inf or NaN
        }
    }
    if (blockIdx.x == 0 && threadIdx.x == 0 && *info != 0) atomicOr(flag, bit);
}
