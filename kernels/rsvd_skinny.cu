// The ten products with A of the GPU randomized SVD (crates/loraga-core/src/linalg/rsvd_cuda_skinny.rs):
// out = op(A) V for a large f32 A and a skinny f32 V of q <= 32 columns, to f32 accuracy on the
// tensor cores (3xTF32, below).
//
//   rsvd_skinny_<n|t>[_s](a, m, k, v, q, out, kchunk, partials, tickets)
//       n: A row-major [m, k] (element (i, l) at a[i*k + l]):      out = A V
//       t: A row-major [k, m] (element (i, l) at a[l*m + i]):      out = Aᵀ V
//       V column-major [k, q] (element (l, j) at v[l + j*k]), out column-major [m, q], q <= 32
//       (columns past q are zero in the tile).
//       _s: the 4-byte-copy variant, for an A or V whose rows or columns are not 16-byte
//       aligned (k, or m for t, not a multiple of 4); the fast one copies in 16-byte chunks.
//
// Grid (tiles, splits): block (b, s) computes rows [b*BM, b*BM + BM) of out over the reduction
// range [s*kchunk, min(k, (s+1)*kchunk)) (kchunk a multiple of BK). With one split it writes out;
// with more, it writes its partial tile to partials (tile-major, a thread-private run of its
// accumulators), and the last block of the tile to finish (a ticket counter per tile, zero between
// launches: that block resets it) sums the splits in order s = 0, 1, ... and writes out, so out
// does not depend on which block finished when: reruns and the batch's lanes are bit-identical to
// a single layer.
//
// 3xTF32: every f32 operand x is split as x = hi + lo, hi = x with its low 13 bits cleared (TF32)
// and lo = x − hi (exact), and a b ≈ a_hi b_hi + a_hi b_lo + a_lo b_hi: three m16n8k8 TF32 MMAs
// with f32 accumulation. What is dropped (a_lo b_lo, and lo's own low bits, which the MMA
// ignores) is < 2⁻¹⁹ of |a b|. Measured against f64 on the H200: within 2.3-6.5e-7 of Σ|a||v|,
// where cuBLAS's SGEMM is within 0.5-1.2e-7 (scripts/bench/skinny_products.py, PERF.md): f32
// accuracy in every sense the randomized SVD needs (tests/rsvd_cuda.rs bounds the products and
// the whole SVD), a few times SGEMM's rounding.
//
// Why our own kernel, and why only q <= 32 (wider products take rsvd_skinny_wg.cu on Hopper,
// cuBLAS elsewhere): cuBLAS's SGEMM takes 45-50 us for these products at
// 4096 x 4096 by 32 and 94-102 us at 11008 x 4096 on the H200 (reading A: 17 and 45 us); this
// kernel 42-43 and 78-80 us. At 64 and 128 columns it measured 0.83-0.96x of cuBLAS at 4096 x
// 4096 (1.0-1.16x at 11008): there the three MMAs and the splits bind, so wider products stay
// off this design. A 128-column tile (16 MMA tiles a warp, one block an SM, 255 registers) measured
// 90-94 us against cuBLAS's 96-106 at 4096 x 4096 by 128 and 206 against 238-246 at 11008 x
// 4096 (2026-11-29, sixth session), 1.02-1.20x for 4-6x the rounding error: mma.sync's TF32 rate
// on Hopper leaves three MMAs a product little over f32 FMAs, so it was not kept. Earlier
// versions: f32 FMAs on the CUDA cores, 77-81 us at 4096 x 4096 (issue-bound
// at 8-12 warps an SM); 3xTF32 with rounding conversions, checked copies and 4 warps a block,
// 55-69 us.
//
// Each block streams a BM x BK tile of A and a BK x 32 tile of V through a STAGES-deep cp.async
// ring. Its 8 warps form KG = 2 groups of 4 that take alternate halves of each stage's BK steps
// (more warps to hide the MMAs' latency, the same shared memory); a warp owns 32 rows (two
// 16-row fragments) and the 32 columns, and group 1 hands its sums to group 0 through shared
// memory at the end. Shared layouts, chosen so that the fragment loads (lane = 4g + tg reads row
// g, step tg) hit 32 distinct banks:
//   t: As[l][i], row stride BM + 8;  n: As[i][l], row stride BK + 4;  Vs[j][l], row stride BK + 4
//   (V's columns are contiguous, so V is copied in 16-byte chunks too).
// Whole tiles (all but a row tile at the end of A and the last step of a split) copy without
// checks from offsets that depend on the thread alone. Out-of-range rows, reduction steps and
// columns are zero-filled by the copies (src-size 0), so nothing outside A or V is read and no
// NaN from outside the range enters a sum.
#include "common.cuh"
#include "mma_sm80.cuh"

// Must match crates/loraga-core/src/linalg/rsvd_cuda_skinny.rs (and scripts/bench/skinny_products.py).
#define BM 128
#define BK 32
#define STAGES 4
#define KG 2

template <bool TRANS, bool VEC> struct Skinny {
    static constexpr int NT = 4;             // 8-column MMA tiles a warp
    static constexpr int BN = 8 * NT;        // q <= BN
    static constexpr int TT = 128;           // the threads that hold one copy of the block's tile
    static constexpr int THREADS = KG * TT;  // KG groups of them split each stage's BK steps
    static constexpr int MF = 2;             // 16-row fragments a warp: a warp owns 32 rows
    static constexpr int AS_LD = TRANS ? BM + 8 : BK + 4;
    static constexpr int AS_SIZE = TRANS ? BK * AS_LD : BM * AS_LD;
    static constexpr int VS_LD = BK + 4;
    static constexpr int VS_SIZE = BN * VS_LD;
    static constexpr int STAGE = AS_SIZE + VS_SIZE;
    static constexpr int ACC = MF * NT * 4;

    // 16-byte chunks a thread copies a stage (VEC): chunk c = t + u*THREADS is row r and
    // column col of the tile as stored in A, at offset `off` from the step's corner of A.
    static constexpr int A_CHUNKS = BM * BK / 4 / THREADS;
    static constexpr int V_CHUNKS = BN * BK / 4 / THREADS;
    static_assert(A_CHUNKS * THREADS * 4 == BM * BK && V_CHUNKS * THREADS * 4 == BN * BK, "whole chunks a thread");

    // The tile of A for reduction steps [l0, l0 + BK) (those at or past lend are zeros). A
    // block's tiles are all whole but the last row tile and the last step of a split; those take
    // the checked path.
    __device__ static void load_a(float* as, const float* a, int m, int k, int m0, int l0, int lend) {
        const int t = threadIdx.x;
        if (VEC) {
            const float* corner = TRANS ? a + (i64)l0 * m + m0 : a + (i64)m0 * k + l0;
            const bool whole = m0 + BM <= m && l0 + BK <= lend;
#pragma unroll
            for (int u = 0; u < A_CHUNKS; ++u) {
                const int c = t + u * THREADS;
                // t: row l of the tile is BM contiguous floats; n: row i is BK contiguous floats.
                const int r = TRANS ? c / (BM / 4) : c / (BK / 4);
                const int col = TRANS ? 4 * (c % (BM / 4)) : 4 * (c % (BK / 4));
                const i64 off = TRANS ? (i64)r * m + col : (i64)r * k + col;  // m, k up to 2^30
                float* dst = as + r * AS_LD + col;
                if (whole) {
                    cp_async16(dst, corner + off, 16);
                } else {
                    const int valid = TRANS ? (l0 + r < lend ? min(max(m - (m0 + col), 0), 4) : 0)
                                            : (m0 + r < m ? min(max(lend - (l0 + col), 0), 4) : 0);
                    cp_async16(dst, valid > 0 ? corner + off : a, 4 * valid);
                }
            }
        } else {
#pragma unroll 4
            for (int e = t; e < BM * BK; e += THREADS) {
                const int i = TRANS ? e % BM : e / BK, l = TRANS ? e / BM : e % BK;
                const bool inside = m0 + i < m && l0 + l < lend;
                const float* src = inside ? (TRANS ? a + (i64)(l0 + l) * m + m0 + i : a + (i64)(m0 + i) * k + l0 + l) : a;
                cp_async4(as + (TRANS ? l * AS_LD + i : i * AS_LD + l), src, inside);
            }
        }
    }

    // The tile of V for reduction steps [l0, l0 + BK) as Vs[j][l] (V's columns are contiguous in
    // l): 16-byte chunks when VEC (k a multiple of 4), else 4-byte copies.
    __device__ static void load_v(float* vs, const float* v, int k, int q, int l0, int lend) {
        const int t = threadIdx.x;
        if (VEC) {
            const bool whole = l0 + BK <= lend;
#pragma unroll
            for (int u = 0; u < V_CHUNKS; ++u) {
                const int c = t + u * THREADS;
                const int j = c / (BK / 4), l = 4 * (c % (BK / 4));
                const int valid = j < q ? (whole ? 4 : min(max(lend - (l0 + l), 0), 4)) : 0;
                cp_async16(vs + j * VS_LD + l, valid > 0 ? v + (i64)j * k + l0 + l : v, 4 * valid);
            }
        } else {
#pragma unroll 4
            for (int e = t; e < BK * BN; e += THREADS) {
                const int j = e / BK, l = e % BK;
                const bool inside = j < q && l0 + l < lend;
                cp_async4(vs + j * VS_LD + l, inside ? v + l0 + l + (i64)j * k : v, inside);
            }
        }
    }

    // acc += the stage's A tile times its V tile for this warp's 32 rows and 8*NT columns over
    // group kg's half of the steps, as 3xTF32: a b ≈ a_hi b_hi + a_hi b_lo + a_lo b_hi.
    __device__ static void multiply(const float* as, const float* vs, float (&acc)[MF][NT][4], int wrow, int wcol,
                                    int kg) {
        const int lane = threadIdx.x % 32, g = lane / 4, tg = lane % 4;
        auto elem = [&](int r, int l) { return TRANS ? as[l * AS_LD + r] : as[r * AS_LD + l]; };
#pragma unroll
        for (int kk = kg * (BK / KG); kk < (kg + 1) * (BK / KG); kk += 8) {
            unsigned ahi[MF][4], alo[MF][4];
#pragma unroll
            for (int f = 0; f < MF; ++f) {
                const int r = wrow + 16 * f + g;
                split_tf32(elem(r, kk + tg), ahi[f][0], alo[f][0]);
                split_tf32(elem(r + 8, kk + tg), ahi[f][1], alo[f][1]);
                split_tf32(elem(r, kk + tg + 4), ahi[f][2], alo[f][2]);
                split_tf32(elem(r + 8, kk + tg + 4), ahi[f][3], alo[f][3]);
            }
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                const int col = wcol + 8 * n + g;
                unsigned bhi[2], blo[2];
                split_tf32(vs[col * VS_LD + kk + tg], bhi[0], blo[0]);
                split_tf32(vs[col * VS_LD + kk + tg + 4], bhi[1], blo[1]);
#pragma unroll
                for (int f = 0; f < MF; ++f) {
                    mma<float>(acc[f][n], alo[f], bhi);
                    mma<float>(acc[f][n], ahi[f], blo);
                    mma<float>(acc[f][n], ahi[f], bhi);
                }
            }
        }
    }

    // Writes value e of tile thread pt's accumulators (fragment (f, n): c0, c1 at row g, columns
    // 2tg, 2tg + 1; c2, c3 at row g + 8) to out.
    __device__ static void store(float* out, int m, int q, int m0, int pt, int e, float value) {
        const int lane = pt % 32, w = pt / 32, g = lane / 4, tg = lane % 4;
        const int f = e / (NT * 4), n = (e / 4) % NT, c = e % 4;
        const int i = m0 + (w % 4) * 32 + 16 * f + g + 8 * (c / 2);
        const int j = (w / 4) * 8 * NT + 8 * n + 2 * tg + c % 2;
        if (i < m && j < q) out[i + (i64)j * m] = value;
    }

    __device__ static void run(const float* __restrict__ a, int m, int k, const float* __restrict__ v, int q,
                               float* __restrict__ out, int kchunk, float* __restrict__ partials,
                               unsigned* __restrict__ tickets) {
        extern __shared__ float4 smem4[];
        float* smem = reinterpret_cast<float*>(smem4);
        const int t = threadIdx.x, warp = t / 32;
        const int kg = t / TT, tw = warp % (TT / 32);
        const int wrow = (tw % 4) * 32, wcol = (tw / 4) * 8 * NT;
        const int tile = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
        const int m0 = tile * BM;
        const int lbeg = split * kchunk, lend = min(k, lbeg + kchunk);
        const int steps = max(0, (lend - lbeg + BK - 1) / BK);

        float acc[MF][NT][4];
#pragma unroll
        for (int f = 0; f < MF; ++f)
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[f][n][e] = 0.0f;

#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) {
            if (s < steps) {
                float* st = smem + s * STAGE;
                load_a(st, a, m, k, m0, lbeg + s * BK, lend);
                load_v(st + AS_SIZE, v, k, q, lbeg + s * BK, lend);
            }
            cp_async_commit();  // an empty group past the end keeps the wait count uniform
        }
        for (int step = 0; step < steps; ++step) {
            cp_async_wait<STAGES - 2>();  // this thread's copies of tile `step` have landed...
            __syncthreads();            // ...everyone's, and everyone is done with step - 1's stage
            const int next = step + STAGES - 1;
            if (next < steps) {
                float* st = smem + (next % STAGES) * STAGE;
                load_a(st, a, m, k, m0, lbeg + next * BK, lend);
                load_v(st + AS_SIZE, v, k, q, lbeg + next * BK, lend);
            }
            cp_async_commit();
            const float* st = smem + (step % STAGES) * STAGE;
            multiply(st, st + AS_SIZE, acc, wrow, wcol, kg);
        }
        cp_async_wait<0>();
        __syncthreads();  // every warp is done with the stages: they take the groups' sum
        float* flat = &acc[0][0][0];
        // Group 1's accumulators through shared memory into group 0's ([e][thread]: no conflicts).
        if (kg == 1) {
#pragma unroll
            for (int e = 0; e < ACC; ++e) smem[e * TT + (t - TT)] = flat[e];
        }
        __syncthreads();
        if (kg == 0) {
#pragma unroll
            for (int e = 0; e < ACC; ++e) flat[e] += smem[e * TT + t];
        }
        if (splits == 1) {
            if (kg == 0) {
#pragma unroll
                for (int e = 0; e < ACC; ++e) store(out, m, q, m0, t, e, flat[e]);
            }
            return;
        }
        // This tile thread's run of the tile's partials for this split, then the ticket.
        if (kg == 0) store_run<ACC>(reinterpret_cast<float4*>(partials + ((i64)(tile * splits + split) * TT + t) * ACC), flat);
        if (!last_to_arrive(tickets + tile, splits)) return;
        // The last block sums the splits in order, every thread a half of one tile thread's run.
        constexpr int HALF = ACC / KG;
        const int pt = t % TT, h = t / TT;
        float sum[HALF];
        sum_runs(sum, splits, [&](int s) {
            return reinterpret_cast<const float4*>(partials + ((i64)(tile * splits + s) * TT + pt) * ACC + h * HALF);
        });
#pragma unroll
        for (int e = 0; e < HALF; ++e) store(out, m, q, m0, pt, h * HALF + e, sum[e]);
    }
};

#define SKINNY(NAME, TRANS, VEC)                                                                            \
    extern "C" __global__ void __launch_bounds__(KG * 128, 2)                                               \
        NAME(const float* __restrict__ a, int m, int k, const float* __restrict__ v, int q,                 \
             float* __restrict__ out, int kchunk, float* __restrict__ partials, unsigned* __restrict__ tickets) { \
        Skinny<TRANS, VEC>::run(a, m, k, v, q, out, kchunk, partials, tickets);                             \
    }

SKINNY(rsvd_skinny_n, false, true)
SKINNY(rsvd_skinny_t, true, true)
SKINNY(rsvd_skinny_n_s, false, false)
SKINNY(rsvd_skinny_t_s, true, false)
