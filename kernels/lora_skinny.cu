// LoRA's skinny "down" products on tensor cores: the rank-r projection of a tall activation,
// reading the activation once.
//
//   P[m, j] = s * sum_c Z[m, c] * S(c, j)        m < M, j < r, c < C
//
// Z [M, C] is row-major bf16: X (C = K) or dY (C = N). The small operand S [C, r] is stored as
//   lora_down_t: S(c, j) = A[j * C + c]     LoRA's A [r, K]:  U' = s X Aᵀ
//   lora_down_n: S(c, j) = B[c * r + j]     LoRA's B [N, r]:  V' = s dY B
// P [M, r] is row-major bf16, any r >= 1. fp32 accumulation (mma.sync m16n8k16 bf16), one
// rounding at the store.
//
// Why not the GEMM engine: its 128 x 256 tile leaves N = r <= 64 mostly empty and gives M / 128
// CTAs, each running the full K loop at the cost of a whole base-GEMM tile (about 50 µs at
// K = 4096, whatever r is). The product is memory-bound (2 r FLOPs per byte of Z), so this kernel
// is built to stream Z: a CTA owns 64 rows of Z and 64 columns of P (grid ceil(r / 64) x
// ceil(M / 64), the column blocks of one row block adjacent so that they share Z in L2), and
// runs a 4-stage ring of 64 x 64 tiles so that three of Z's tiles (24 KB) are in flight per CTA.
// Z's tiles arrive by 16-byte cp.async when its rows are 16-byte aligned (C % 8 == 0; `vec`);
// S's tiles (small, L2-resident) and unaligned Z tiles are gathered through registers one tile
// ahead, S's transposed into the [j][c] layout the MMA's B fragment wants.
//
// Ragged shapes: rows of Z past M and columns of S past r only feed outputs that are never
// stored; columns past C load as zeros in both operands (they feed every output). Stores are
// guarded element by element.
//
// Version 1 (the only one). 8 warps: warp w computes rows 16 (w % 4) .. +16 and columns
// 32 (w / 4) .. +32 of the CTA's 64 x 64 block, as four m16n8 tiles; tiles wholly past r skip
// their MMAs (warp-uniform).
#include "common.cuh"

#define BM 64
#define RN 64
#define BK 64
#define STAGES 4
#define THREADS 256
#define LDS (BK + 8)                    // smem row stride (elements): conflict-free fragment loads
#define TILE (BM * LDS)                 // one stage of one operand, elements (BM == RN)
#define PER_THREAD (BM * BK / THREADS)  // elements each thread gathers per tile

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

// 16 bytes global -> shared; `bytes` < 16 zero-fills the rest (0 reads nothing).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::);
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void mma_bf16(float* c, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ unsigned lds32(const bf16* p) {
    return *reinterpret_cast<const unsigned*>(p);
}

// Z's tile of columns [c0, c0 + BK) into zs ([BM][LDS]) by cp.async; needs C % 8 == 0.
__device__ __forceinline__ void z_async(bf16* zs, const bf16* Z, int M, int C, int m0, int c0) {
    for (int q = threadIdx.x; q < BM * BK / 8; q += THREADS) {
        const int row = q / (BK / 8), col = (q % (BK / 8)) * 8;
        const int m = m0 + row, c = c0 + col;
        const bool in = m < M && c < C;
        cp_async16(zs + row * LDS + col, in ? Z + (i64)m * C + c : Z, in ? 16 : 0);
    }
}

// Element e of this thread's share of a tile: row e / BK, column e % BK (consecutive threads
// take consecutive columns, so the gathers along a contiguous dimension coalesce).
__device__ __forceinline__ void z_gather(bf16* v, const bf16* Z, int M, int C, int m0, int c0) {
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) {
        const int e = threadIdx.x + i * THREADS, m = m0 + e / BK, c = c0 + e % BK;
        v[i] = (m < M && c < C) ? Z[(i64)m * C + c] : __float2bfloat16(0.0f);
    }
}
__device__ __forceinline__ void z_scatter(bf16* zs, const bf16* v) {
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) {
        const int e = threadIdx.x + i * THREADS;
        zs[(e / BK) * LDS + e % BK] = v[i];
    }
}

// S's tile for columns [j0, j0 + RN) and contraction indices [c0, c0 + BK), stored as ss[j][c].
// Layout t (A [r, C]) gathers along c; layout n (B [C, r]) gathers along j and transposes.
template <bool T> __device__ __forceinline__ void s_gather(bf16* v, const bf16* S, int C, int r, int j0, int c0) {
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) {
        const int e = threadIdx.x + i * THREADS;
        const int j = j0 + (T ? e / BK : e % RN), c = c0 + (T ? e % BK : e / RN);
        const bool in = j < r && c < C;
        v[i] = in ? S[T ? (i64)j * C + c : (i64)c * r + j] : __float2bfloat16(0.0f);
    }
}
template <bool T> __device__ __forceinline__ void s_scatter(bf16* ss, const bf16* v) {
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) {
        const int e = threadIdx.x + i * THREADS;
        const int j = T ? e / BK : e % RN, c = T ? e % BK : e / RN;
        ss[j * LDS + c] = v[i];
    }
}

template <bool T>
__device__ void lora_down(const bf16* __restrict__ Z, const bf16* __restrict__ S, bf16* __restrict__ P, int M, int C,
                          int r, float s, int vec) {
    extern __shared__ __align__(128) unsigned char smem[];
    bf16* zs = reinterpret_cast<bf16*>(smem);  // [STAGES][BM][LDS]
    bf16* ss = zs + STAGES * TILE;             // [STAGES][RN][LDS]

    const int m0 = blockIdx.y * BM, j0 = blockIdx.x * RN;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;         // mma fragment coordinates
    const int wr = 16 * (warp % 4), wc = 32 * (warp / 4);
    const int ktiles = ceil_div(C, BK);

    bf16 zv[PER_THREAD], sv[PER_THREAD];
    for (int st = 0; st < STAGES - 1; ++st) {
        if (st < ktiles) {
            if (vec) {
                z_async(zs + st * TILE, Z, M, C, m0, st * BK);
            } else {
                z_gather(zv, Z, M, C, m0, st * BK);
                z_scatter(zs + st * TILE, zv);
            }
            s_gather<T>(sv, S, C, r, j0, st * BK);
            s_scatter<T>(ss + st * TILE, sv);
        }
        cp_async_commit();  // one group per stage, empty or not, so wait_group counts stages
    }

    float acc[4][4] = {};
    for (int kt = 0; kt < ktiles; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // stage kt is in; every warp is done with stage kt - 1, refilled below
        const int next = kt + STAGES - 1, ns = next % STAGES;
        const bool more = next < ktiles;
        if (more) {
            if (vec) {
                z_async(zs + ns * TILE, Z, M, C, m0, next * BK);
            } else {
                z_gather(zv, Z, M, C, m0, next * BK);
            }
            s_gather<T>(sv, S, C, r, j0, next * BK);
        }
        cp_async_commit();

        const bf16* za = zs + (kt % STAGES) * TILE;
        const bf16* sb = ss + (kt % STAGES) * TILE;
#pragma unroll
        for (int k = 0; k < BK; k += 16) {
            unsigned a[4];
            a[0] = lds32(za + (wr + g) * LDS + k + 2 * t);
            a[1] = lds32(za + (wr + g + 8) * LDS + k + 2 * t);
            a[2] = lds32(za + (wr + g) * LDS + k + 2 * t + 8);
            a[3] = lds32(za + (wr + g + 8) * LDS + k + 2 * t + 8);
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                const int col = wc + 8 * nt;
                if (j0 + col >= r) break;  // warp-uniform: this and later tiles are past r
                unsigned b[2];
                b[0] = lds32(sb + (col + g) * LDS + k + 2 * t);
                b[1] = lds32(sb + (col + g) * LDS + k + 2 * t + 8);
                mma_bf16(acc[nt], a, b);
            }
        }

        if (more) {  // stage ns was last read in iteration kt - 1, before this iteration's barrier
            if (!vec) z_scatter(zs + ns * TILE, zv);
            s_scatter<T>(ss + ns * TILE, sv);
        }
    }
    cp_async_wait<0>();

#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
        for (int h = 0; h < 4; ++h) {  // c0, c1: row g; c2, c3: row g + 8; columns 2t, 2t + 1
            const int m = m0 + wr + g + (h / 2) * 8, j = j0 + wc + 8 * nt + 2 * t + h % 2;
            if (m < M && j < r) P[(i64)m * r + j] = from_f32<bf16>(s * acc[nt][h]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
    lora_down_t_bf16(const bf16* Z, const bf16* A, bf16* P, int M, int C, int r, float s, int vec) {
    lora_down<true>(Z, A, P, M, C, r, s, vec);
}
extern "C" __global__ void __launch_bounds__(THREADS)
    lora_down_n_bf16(const bf16* Z, const bf16* B, bf16* P, int M, int C, int r, float s, int vec) {
    lora_down<false>(Z, B, P, M, C, r, s, vec);
}
