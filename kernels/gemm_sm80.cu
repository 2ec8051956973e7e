// GEMM engine for GPUs without wgmma (sm_80 and later: Ampere, Ada; Hopper runs it too): warp
// MMAs (mma.sync) fed by cp.async through a multi-stage shared-memory ring, fp32 accumulation.
//
//   C[m, n] = alpha * sum_k opA[m, k] opB[k, n]  +  beta * C[m, n]
//
// with the K loop running over up to two operand pairs one after the other ("split K sources"):
//   C = alpha * ([A1 | A2] [B1 | B2]) + beta * C  =  alpha * (A1 B1 + A2 B2) + beta * C,
// the same problem as the Hopper engine (gemm_sm90.cu), which the host prefers where it runs.
//
// Operands: bf16 (mma m16n8k16, products exact in fp32) or f32 read as TF32 (mma m16n8k8; each
// element rounded to nearest with cvt.rna.tf32.f32, keeping 10 of 23 mantissa bits). Sums fp32.
//
// Layouts (all row-major in memory; the entry name gemm_sm80_<ta><tb>_<in>_<out> says which):
//   nt: A [M, K], B [N, K]   (x @ W^T)             both operands K-major
//   nn: A [M, K], B [K, N]   (dY @ W)              B MN-major
//   tn: A [K, M], B [K, N]   (dY^T @ X)            both MN-major
//   tt: A [K, M], B [N, K]                         A MN-major
// Each operand's tile lands in shared memory in its own memory order (K-major: [rows][BK];
// MN-major: [BK][rows]), rows padded by 16 or 32 bytes so that the fragment reads below hit 32
// different banks. bf16 fragments come through ldmatrix (.trans for an MN-major tile), TF32 ones
// element by element; either way every layout is one code path with a different index function. The contiguous dimension of every operand must be a multiple of
// 16 bytes (8 bf16 or 4 f32): cp.async moves 16-byte chunks, and a chunk is then either wholly
// inside the matrix or wholly outside (zero-filled), which handles ragged M, N and K. C is
// row-major [M, N] (ldc = N), bf16 or f32; stores are guarded; beta == 0 never reads C, and
// beta == 1 with an f32 C is in-place accumulation (C += alpha A B).
//
// Structure: one CTA of 8 warps per 128 x 128 output tile, tiles in the grouped order of
// gemm_common.cuh; warps as 2 x 4, each computing 64 x 32 (4 x 4 MMA tiles, 64 fp32 accumulators
// per thread). A k-tile is 64 bytes of K (32 bf16 or 16 f32, two MMA K steps); STAGES k-tiles are
// in flight: while the warps compute on tile kt, cp.async fills tile kt + STAGES - 1.
#include "common.cuh"
#include "gemm_common.cuh"
#include "mma_sm80.cuh"

#define BM 128
#define BN 128
#define BK_BYTES 64
#define STAGES 4
#define THREADS 256
#define GROUP_M 8

// The shared-memory tile of one operand: ROWS along M (or N), BK along K, stored in the operand's
// memory order. LD is the padded row length in elements.
template <typename T, bool MN, int ROWS>
struct Tile {
    static constexpr int BK = BK_BYTES / sizeof(T);
    // Padding against bank conflicts. K-major rows are 64 bytes + 16 = 20 words: 8 consecutive rows
    // start at banks 20 g mod 32 = 0, 20, 8, 28, 16, 4, 24, 12, so the 4 words each row gives a
    // TF32 fragment read or an ldmatrix phase (16 bytes) cover all 32 banks once. MN-major rows are
    // ROWS + 8 elements: 68 words for bf16 (8 ldmatrix rows start 4 banks apart, 4 words each) and
    // 136 for f32 (the 4 K rows of a TF32 fragment read start 8 banks apart, 8 words each).
    static constexpr int LD = MN ? ROWS + 8 : BK + 16 / sizeof(T);
    static constexpr int ELEMS = MN ? BK * LD : ROWS * LD;
    __device__ static int at(int mn, int k) { return MN ? k * LD + mn : mn * LD + k; }
};

// Loads the [ROWS x BK] tile of an operand at (mn0, k0) into shared memory. The operand is
// row-major with rows along K (MN-major: [K, MN]) or along MN (K-major: [MN, K]), leading
// dimension ld; `mn_size` and `k_size` bound it.
template <typename T, bool MN, int ROWS>
__device__ __forceinline__ void load_tile(T* dst, const T* src, i64 ld, int mn0, int k0, int mn_size, int k_size) {
    using Tl = Tile<T, MN, ROWS>;
    constexpr int E = 16 / sizeof(T);  // elements per 16-byte chunk
    constexpr int ROW_ELEMS = MN ? ROWS : Tl::BK;
    constexpr int CHUNKS = (MN ? Tl::BK : ROWS) * ROW_ELEMS / E;
    static_assert(CHUNKS % THREADS == 0, "every thread moves the same number of chunks");
#pragma unroll
    for (int i = 0; i < CHUNKS / THREADS; ++i) {
        int chunk = threadIdx.x + i * THREADS;
        int row = chunk / (ROW_ELEMS / E), col = (chunk % (ROW_ELEMS / E)) * E;
        int mn = MN ? mn0 + col : mn0 + row;
        int k = MN ? k0 + row : k0 + col;
        bool inside = mn < mn_size && k < k_size;
        const T* g = inside ? src + (MN ? (i64)k * ld + mn : (i64)mn * ld + k) : src;
        cp_async16(dst + row * Tl::LD + col, g, inside ? 16 : 0);
    }
}

// One TF32 MMA operand register: the f32 element at (mn, k) of a tile, rounded to nearest TF32.
// (ldmatrix moves 16-bit elements, so f32 fragments are read one element at a time.)
template <bool MN, int ROWS>
__device__ __forceinline__ unsigned frag_tf32(const float* t, int mn, int k) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(t[Tile<float, MN, ROWS>::at(mn, k)]));
    return r;
}

// The bf16 fragments of one K step (kk) through ldmatrix: A for the 16 rows from m (registers as
// in `mma`), and B for the 16 columns from n (r[0..1] = the first 8 columns' b, r[2..3] the
// next 8's). Which row of which 8 x 8 matrix lane l addresses follows from the fragment layout:
// A's matrices are (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15);
// B's are (cols 0-7, k 0-7), (cols 0-7, k 8-15), (cols 8-15, k 0-7), (cols 8-15, k 8-15). An
// MN-major tile stores each matrix transposed (rows along K), hence TRANS.
template <bool MN, int ROWS>
__device__ __forceinline__ void ldsm_a(unsigned* r, const bf16* tile, int m, int kk, int lane) {
    using Tl = Tile<bf16, MN, ROWS>;
    const int i = lane % 8, hi_mn = 8 * ((lane / 8) % 2), hi_k = 8 * (lane / 16);
    ldmatrix_x4<MN>(r, tile + (MN ? Tl::at(m + hi_mn, kk + hi_k + i) : Tl::at(m + hi_mn + i, kk + hi_k)));
}
template <bool MN, int ROWS>
__device__ __forceinline__ void ldsm_b(unsigned* r, const bf16* tile, int n, int kk, int lane) {
    using Tl = Tile<bf16, MN, ROWS>;
    const int i = lane % 8, hi_k = 8 * ((lane / 8) % 2), hi_n = 8 * (lane / 16);
    ldmatrix_x4<MN>(r, tile + (MN ? Tl::at(n + hi_n, kk + hi_k + i) : Tl::at(n + hi_n + i, kk + hi_k)));
}

// One K source: A and B with their leading dimensions, and its length along K.
struct Source {
    const void* a;
    const void* b;
    i64 lda, ldb;
    int k;
};

template <typename T, bool A_MN, bool B_MN, typename Tout>
__device__ void gemm_sm80(Source s1, Source s2, Tout* C, int M, int N, float alpha, float beta) {
    using TA = Tile<T, A_MN, BM>;
    using TB = Tile<T, B_MN, BN>;
    constexpr int BK = TA::BK;
    constexpr int KSTEP = sizeof(T) == 2 ? 16 : 8;  // K of one MMA
    extern __shared__ __align__(16) unsigned char smem[];
    T* sa = reinterpret_cast<T*>(smem);
    T* sb = sa + STAGES * TA::ELEMS;

    int tm, tn;
    tile_coords(blockIdx.x, ceil_div(M, BM), ceil_div(N, BN), GROUP_M, tm, tn);
    const int m0 = tm * BM, n0 = tn * BN;
    const int k1_tiles = ceil_div(s1.k, BK), k_tiles = k1_tiles + ceil_div(s2.k, BK);

    auto load = [&](int kt) {
        if (kt < k_tiles) {
            int st = kt % STAGES;
            // Field by field: choosing a whole Source by a run-time index would put both on the stack.
            const bool first = kt < k1_tiles;
            const T* ga = static_cast<const T*>(first ? s1.a : s2.a);
            const T* gb = static_cast<const T*>(first ? s1.b : s2.b);
            const int k = first ? s1.k : s2.k, k0 = (first ? kt : kt - k1_tiles) * BK;
            load_tile<T, A_MN, BM>(sa + st * TA::ELEMS, ga, first ? s1.lda : s2.lda, m0, k0, M, k);
            load_tile<T, B_MN, BN>(sb + st * TB::ELEMS, gb, first ? s1.ldb : s2.ldb, n0, k0, N, k);
        }
        cp_async_commit();  // an empty group past the end keeps the wait count uniform
    };

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int wm = (warp / 4) * 64, wn = (warp % 4) * 32;  // this warp's 64 x 32 within the tile
    const int g = lane / 4, t = lane % 4;
    const int k_lo = sizeof(T) == 2 ? 2 * t : t;
    float d[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) d[i][j][r] = 0.0f;

#pragma unroll
    for (int kt = 0; kt < STAGES - 1; ++kt) load(kt);
    for (int kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait<STAGES - 2>();  // tile kt has landed (for this thread's chunks)...
        __syncthreads();              // ...and for everyone's; stage (kt - 1) % STAGES is free again
        load(kt + STAGES - 1);
        const T* a = sa + (kt % STAGES) * TA::ELEMS;
        const T* b = sb + (kt % STAGES) * TB::ELEMS;
        // Two MMA K steps per k-tile, kept rolled: unrolled, the second step's fragment loads are
        // hoisted over the first's MMAs and the layouts with an MN-major bf16 B spill registers.
#pragma unroll 1
        for (int kk = 0; kk < BK; kk += KSTEP) {
            unsigned fa[4][4], fb[4][2];
            if constexpr (sizeof(T) == 2) {
#pragma unroll
                for (int i = 0; i < 4; ++i) ldsm_a<A_MN, BM>(fa[i], a, wm + 16 * i, kk, lane);
#pragma unroll
                for (int j = 0; j < 4; j += 2) ldsm_b<B_MN, BN>(&fb[j][0], b, wn + 8 * j, kk, lane);
            } else {
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    int row = wm + 16 * i + g;
                    fa[i][0] = frag_tf32<A_MN, BM>(a, row, kk + k_lo);
                    fa[i][1] = frag_tf32<A_MN, BM>(a, row + 8, kk + k_lo);
                    fa[i][2] = frag_tf32<A_MN, BM>(a, row, kk + k_lo + KSTEP / 2);
                    fa[i][3] = frag_tf32<A_MN, BM>(a, row + 8, kk + k_lo + KSTEP / 2);
                }
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    int col = wn + 8 * j + g;
                    fb[j][0] = frag_tf32<B_MN, BN>(b, col, kk + k_lo);
                    fb[j][1] = frag_tf32<B_MN, BN>(b, col, kk + k_lo + KSTEP / 2);
                }
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) mma<T>(d[i][j], fa[i], fb[j]);
        }
    }
    cp_async_wait<0>();

#pragma unroll
    for (int i = 0; i < 4; ++i) {
        int row = m0 + wm + 16 * i + g;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            int col = n0 + wn + 8 * j + 2 * t;
            store_pair(C, M, N, (i64)N, row, col, d[i][j][0], d[i][j][1], alpha, beta);
            store_pair(C, M, N, (i64)N, row + 8, col, d[i][j][2], d[i][j][3], alpha, beta);
        }
    }
}

// One entry point per layout (see the top), operand type and output type. Arguments: per K
// source A, B, their leading dimensions and K; then C, M, N, alpha, beta.
#define GEMM_SM80_ARGS                                                                                           \
    const void *a1, const void *b1, i64 lda1, i64 ldb1, int k1, const void *a2, const void *b2, i64 lda2, i64 ldb2, \
        int k2
#define GEMM_SM80_SOURCES Source{a1, b1, lda1, ldb1, k1}, Source{a2, b2, lda2, ldb2, k2}

extern "C" __global__ void __launch_bounds__(THREADS, 2)
gemm_sm80_nt_bf16_bf16(GEMM_SM80_ARGS, bf16* C, int M, int N, float alpha, float beta) {
    gemm_sm80<bf16, false, false>(GEMM_SM80_SOURCES, C, M, N, alpha, beta);
}
extern "C" __global__ void __launch_bounds__(THREADS, 2)
gemm_sm80_nt_bf16_f32(GEMM_SM80_ARGS, float* C, int M, int N, float alpha, float beta) {
    gemm_sm80<bf16, false, false>(GEMM_SM80_SOURCES, C, M, N, alpha, beta);
}
extern "C" __global__ void __launch_bounds__(THREADS, 2)
gemm_sm80_nn_bf16_bf16(GEMM_SM80_ARGS, bf16* C, int M, int N, float alpha, float beta) {
    gemm_sm80<bf16, false, true>(GEMM_SM80_SOURCES, C, M, N, alpha, beta);
}
extern "C" __global__ void __launch_bounds__(THREADS, 2)
gemm_sm80_nn_bf16_f32(GEMM_SM80_ARGS, float* C, int M, int N, float alpha, float beta) {
    gemm_sm80<bf16, false, true>(GEMM_SM80_SOURCES, C, M, N, alpha, beta);
}
extern "C" __global__ void __launch_bounds__(THREADS, 2)
gemm_sm80_tn_bf16_bf16(GEMM_SM80_ARGS, bf16* C, int M, int N, float alpha, float beta) {
    gemm_sm80<bf16, true, true>(GEMM_SM80_SOURCES, C, M, N, alpha, beta);
}
extern "C" __global__ void __launch_bounds__(THREADS, 2)
gemm_sm80_tn_bf16_f32(GEMM_SM80_ARGS, float* C, int M, int N, float alpha, float beta) {
    gemm_sm80<bf16, true, true>(GEMM_SM80_SOURCES, C, M, N, alpha, beta);
}
extern "C" __global__ void __launch_bounds__(THREADS, 2)
gemm_sm80_tt_bf16_bf16(GEMM_SM80_ARGS, bf16* C, int M, int N, float alpha, float beta) {
    gemm_sm80<bf16, true, false>(GEMM_SM80_SOURCES, C, M, N, alpha, beta);
}
extern "C" __global__ void __launch_bounds__(THREADS, 2)
gemm_sm80_tt_bf16_f32(GEMM_SM80_ARGS, float* C, int M, int N, float alpha, float beta) {
    gemm_sm80<bf16, true, false>(GEMM_SM80_SOURCES, C, M, N, alpha, beta);
}
extern "C" __global__ void __launch_bounds__(THREADS, 2)
gemm_sm80_nt_f32_bf16(GEMM_SM80_ARGS, bf16* C, int M, int N, float alpha, float beta) {
    gemm_sm80<float, false, false>(GEMM_SM80_SOURCES, C, M, N, alpha, beta);
}
extern "C" __global__ void __launch_bounds__(THREADS, 2)
gemm_sm80_nt_f32_f32(GEMM_SM80_ARGS, float* C, int M, int N, float alpha, float beta) {
    gemm_sm80<float, false, false>(GEMM_SM80_SOURCES, C, M, N, alpha, beta);
}
extern "C" __global__ void __launch_bounds__(THREADS, 2)
gemm_sm80_nn_f32_bf16(GEMM_SM80_ARGS, bf16* C, int M, int N, float alpha, float beta) {
    gemm_sm80<float, false, true>(GEMM_SM80_SOURCES, C, M, N, alpha, beta);
}
extern "C" __global__ void __launch_bounds__(THREADS, 2)
gemm_sm80_nn_f32_f32(GEMM_SM80_ARGS, float* C, int M, int N, float alpha, float beta) {
    gemm_sm80<float, false, true>(GEMM_SM80_SOURCES, C, M, N, alpha, beta);
}
extern "C" __global__ void __launch_bounds__(THREADS, 2)
gemm_sm80_tn_f32_bf16(GEMM_SM80_ARGS, bf16* C, int M, int N, float alpha, float beta) {
    gemm_sm80<float, true, true>(GEMM_SM80_SOURCES, C, M, N, alpha, beta);
}
extern "C" __global__ void __launch_bounds__(THREADS, 2)
gemm_sm80_tn_f32_f32(GEMM_SM80_ARGS, float* C, int M, int N, float alpha, float beta) {
    gemm_sm80<float, true, true>(GEMM_SM80_SOURCES, C, M, N, alpha, beta);
}
extern "C" __global__ void __launch_bounds__(THREADS, 2)
gemm_sm80_tt_f32_bf16(GEMM_SM80_ARGS, bf16* C, int M, int N, float alpha, float beta) {
    gemm_sm80<float, true, false>(GEMM_SM80_SOURCES, C, M, N, alpha, beta);
}
extern "C" __global__ void __launch_bounds__(THREADS, 2)
gemm_sm80_tt_f32_f32(GEMM_SM80_ARGS, float* C, int M, int N, float alpha, float beta) {
    gemm_sm80<float, true, false>(GEMM_SM80_SOURCES, C, M, N, alpha, beta);
}
