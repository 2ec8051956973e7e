// The q x q core of the GPU randomized SVD's device path
// (crates/loraga-core/src/linalg/rsvd_cuda_device.rs): the right singular vectors and the
// squared singular values of the upper-triangular f64 R, by one-sided Jacobi (Hestenes) on the
// columns of C = Rᵀ, in one thread block with C in shared memory.
//
//   rsvd_jacobi_core_<rows>(rt, q, evec, w, info), rows = ceil(q / GROUP) rounded up to 2, 4 or 8:
//       in:  rt  column-major f64 q x q, R upper triangular (entries below the diagonal ignored)
//       out: evec column-major f64 q x q: V_R, orthonormal columns, with R = U_R Σ V_Rᵀ
//            w    f64 q: σ², ascending, w[j] belonging to evec's column j
//            info one int: 0, or 1 if the sweeps did not converge (evec and w still written)
//       That is what syevd returns for RᵀR (eigenvalues ascending, eigenvectors in columns), so
//       the core's remaining steps are the same for both: U_R = R V_R Σ⁻¹.
//
// Why Rᵀ: rotating columns p, k of C by J (c, s) makes them orthogonal; after convergence
// C J_1 J_2 ... = W with orthogonal columns, so W = V_R Σ (Rᵀ = V_R Σ U_Rᵀ, U_R = the product of
// the rotations) and V_R, σ come from W's columns and their norms alone: the rotations need not
// be accumulated. One-sided Jacobi is accurate in the sense that counts here: each σ comes with
// a small relative error (Demmel & Veselić 1992), without squaring R's condition number the way
// an eigen-decomposition of RᵀR does.
//
// Rotation for columns a_p, a_k with α = ‖a_p‖², β = ‖a_k‖², γ = a_pᵀ a_k (recomputed each time
// from the columns, not updated): if γ² > TOL²·αβ, ζ = (β − α) / 2γ,
// t = sign(ζ) / (|ζ| + √(1 + ζ²)), c = 1/√(1 + t²), s = c t; a_p ← c a_p − s a_k,
// a_k ← s a_p + c a_k. A sweep visits every pair once in n − 1 rounds of n/2 disjoint pairs
// (round-robin ordering, n = q rounded up to even: an odd q gets a zero column, whose pairs are
// skipped), so the pairs of a round rotate concurrently and one barrier per round suffices. The
// sweeps stop after the first one without a rotation, at most MAX_SWEEPS. TOL = 1e-13 sits above
// the rounding floor of the computed γ (~√q·2⁻⁵² relative), so a sweep without rotations comes,
// and far below what the rest needs: with |γ| ≤ TOL·σ_p σ_k left, U_R = R V_R Σ⁻¹ is orthonormal
// to ~TOL·cond(R) plus R's own rounding (the device path checks it to 1e-7), and the σ² change
// only in the second order.
//
// Why the angle in f32: f64 division and square root are long instruction sequences on the GPU,
// and a round is a chain of them (measured: ~0.9 µs a round at q = 32 with them in f64). Only
// the rotation's orthogonality must be exact, not its angle: t comes from ζ in f32 (ζ's operands
// scaled by a power of two first, so nothing over- or underflows f32), c = 1/√(1 + t²) is
// refined to f64 by Newton steps, s = c t in f64, so c² + s² = 1 to f64 rounding for whatever t
// is. An angle off by ~1e-7 leaves |γ| at ~1e-7 of its value, which the next visit removes:
// convergence stays quadratic down to that level and the final sweeps finish the rest.
//
// Layout and launch: one block of (n/2)·GROUP threads rounded up to whole warps (the extra
// lanes have no pair but join the shuffles and barriers), GROUP lanes per pair (a power of two
// dividing 32, so a group's reductions are shuffles inside one warp), lane l owning rows l,
// l + GROUP, ... of both columns in registers for the round (one shared-memory read and one
// write per element a round); dynamic shared memory n·q doubles (C, column j at j*q), so
// q ≤ MAX_Q = 128 on any device with 132 KiB of opt-in shared memory per block (the host
// checks).
//
// Version 3: f64 columns on CUDA cores, the angle in f32 (version 1 computed it in f64 and ran
// ~0.9 µs a round at q = 32, 2.8 µs at q = 128, slower than syevd), instantiated by the rows a
// lane holds (version 2 ran the widest's 8 predicated rows at every q: 213 µs at q = 32, now
// 169 µs); measured cost: rsvd_cuda_jacobi.rs. Tried and dropped (2026-11-29, sixth session):
// the columns in registers, exchanged by the odd-even ordering (shuffles inside a warp, shared
// memory across warps, one barrier every other round): correct at every q to 128, but 177 µs
// at q = 32 and 3,110 µs at q = 128 (ncu), slower than this one: a round is bound by its chain
// of reductions and the angle, and at q = 128 by the shuffles and f64 FMAs of 1,024 threads on
// one SM, not by shared-memory traffic.
#include "common.cuh"

#define GROUP 16
#define MAX_SWEEPS 40
#define MAX_Q 128
#define TOL 1e-13

// Position j of round `round` in the round-robin ordering of n players: 0 stays, 1..n−1 rotate.
__device__ __forceinline__ int player(int j, int round, int n) {
    return j == 0 ? 0 : 1 + (j - 1 + round) % (n - 1);
}

// Sum over the GROUP lanes of a group (xor butterfly: every lane ends with the sum).
__device__ __forceinline__ double group_sum(double v) {
#pragma unroll
    for (int o = GROUP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o, GROUP);
    return v;
}

// c = 1/√u to f64 accuracy for u in [1, 2]: the f32 estimate (~1e-7 relative), then two Newton
// steps (each squares the relative error).
__device__ __forceinline__ double rsqrt_refined(double u) {
    double c = (double)rsqrtf((float)u);
    c = c * fma(-0.5 * u, c * c, 1.5);
    c = c * fma(-0.5 * u, c * c, 1.5);
    return c;
}

// The rotation's t for ζ = d / 2γ (γ ≠ 0), in f32: d and γ scaled by 2^-e, e = γ's exponent, so
// γ's scaled magnitude is in [1, 2) and only an enormous |d / γ| (> 1e38: cond(R) beyond 1e25,
// which the Cholesky passes never hand over) could overflow, giving t = 0.
__device__ __forceinline__ double rotation_t(double d, double gamma) {
    const int e = ((__double2hiint(gamma) >> 20) & 0x7ff) - 1023;
    const double scale = __hiloint2double((1023 - e) << 20, 0);
    const float zeta = (float)(d * scale) / (2.0f * (float)(gamma * scale));
    const float az = fabsf(zeta);
    // For |ζ| > 1e18, ζ² would overflow; there t = 1/2ζ to f32 precision.
    const float t = az > 1e18f ? 0.5f / zeta : copysignf(1.0f, zeta) / (az + sqrtf(fmaf(zeta, zeta, 1.0f)));
    return (double)t;
}

// ROWS = rows of a column each lane holds, ceil(q / GROUP): one instantiation a width class, so a
// small q does not run (predicated) the loads and FMAs of the widest.
template <int ROWS>
__device__ __forceinline__ void jacobi_core(const double* __restrict__ rt, int q, double* __restrict__ evec,
                                            double* __restrict__ w, int* __restrict__ info) {
    extern __shared__ double c[];  // n columns of q rows: C = Rᵀ, then the padding column
    __shared__ double norm2[MAX_Q];
    __shared__ int failed;
    const int n = q + (q & 1), pairs = n / 2;
    const int t = threadIdx.x, pair = t / GROUP, lane = t % GROUP;
    const int groups = blockDim.x / GROUP;
    const bool active = pair < pairs;

    // C(i, j) = R(j, i) for j ≤ i (R upper), zero above the diagonal and in the padding column.
    for (int e = t; e < n * q; e += blockDim.x) {
        const int i = e % q, j = e / q;
        c[e] = (j < q && j <= i) ? rt[j + (i64)i * q] : 0.0;
    }
    if (t == 0) failed = 0;
    __syncthreads();
    int sweep = 0;
    bool rotated = true;
    for (; sweep < MAX_SWEEPS && rotated; ++sweep) {
        int mine = 0;
        for (int round = 0; round < n - 1; ++round) {
            const int p = active ? player(pair, round, n) : 0;
            const int k = active ? player(n - 1 - pair, round, n) : 0;
            double* ap = c + (i64)p * q;
            double* ak = c + (i64)k * q;
            double x[ROWS], y[ROWS];
            double alpha = 0.0, beta = 0.0, gamma = 0.0;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                const int i = lane + r * GROUP;
                const bool in = active && i < q;
                x[r] = in ? ap[i] : 0.0;
                y[r] = in ? ak[i] : 0.0;
                alpha = fma(x[r], x[r], alpha);
                beta = fma(y[r], y[r], beta);
                gamma = fma(x[r], y[r], gamma);
            }
            alpha = group_sum(alpha);
            beta = group_sum(beta);
            gamma = group_sum(gamma);
            // False for idle lanes (0 > 0) and for NaN, which the check of the norms reports.
            if (gamma * gamma > (TOL * TOL) * alpha * beta) {
                const double tn = rotation_t(beta - alpha, gamma);
                const double cs = rsqrt_refined(fma(tn, tn, 1.0)), sn = cs * tn;
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    const int i = lane + r * GROUP;
                    if (i < q) {
                        ap[i] = cs * x[r] - sn * y[r];
                        ak[i] = sn * x[r] + cs * y[r];
                    }
                }
                mine = 1;
            }
            // The last round's barrier also tells every thread whether the sweep rotated.
            if (round < n - 2) __syncthreads();
            else rotated = __syncthreads_or(mine);
        }
    }

    // σ_j² = ‖c_j‖², then rank j by ascending σ² (ties by index) and write column j there. The
    // loop with the shuffles runs the same trips on every thread (a whole warp must shuffle).
    for (int j0 = 0; j0 < q; j0 += groups) {
        const int j = j0 + pair;
        double s = 0.0;
        if (j < q) {
            for (int i = lane; i < q; i += GROUP) s = fma(c[i + (i64)j * q], c[i + (i64)j * q], s);
        }
        s = group_sum(s);
        if (j < q && lane == 0) norm2[j] = s;
    }
    __syncthreads();
    for (int j = pair; j < q; j += groups) {
        const double s = norm2[j];
        int rank = 0;
        for (int i = 0; i < q; ++i) rank += (norm2[i] < s) || (norm2[i] == s && i < j);
        const double inv = s > 0.0 ? rsqrt(s) : 0.0;
        for (int i = lane; i < q; i += GROUP) evec[i + (i64)rank * q] = c[i + (i64)j * q] * inv;
        if (lane == 0) w[rank] = s;
        if (!(s - s == 0.0)) failed = 1;  // NaN or inf; every writer stores the same value
    }
    __syncthreads();
    if (t == 0) *info = (failed || rotated) ? 1 : 0;  // rotated: MAX_SWEEPS ran out
}

#define JACOBI(ROWS)                                                                                     \
    extern "C" __global__ void __launch_bounds__(1024) rsvd_jacobi_core_##ROWS(                         \
        const double* __restrict__ rt, int q, double* __restrict__ evec, double* __restrict__ w,        \
        int* __restrict__ info) {                                                                        \
        jacobi_core<ROWS>(rt, q, evec, w, info);                                                         \
    }

JACOBI(2)   // q <= 32
JACOBI(4)   // q <= 64
JACOBI(8)   // q <= MAX_Q
