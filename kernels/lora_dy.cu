// The two products of LoRA's backward that read dY (crates/loraga-core/src/cuda/lora_dy.rs), in
// one pass over it:
//
//   V' = s dY B    [M, r]  bf16 (dY's dtype: the dX GEMM's second K source)
//   dB = dYᵀ U'    [N, r]  f32  (U' = s X Aᵀ, kept by the forward)
//
//   lora_dy_<R>(tdy, tb, tu, m, n, r, a, bc, v_partials, db_partials)   partial sums, then
//   lora_dy_sum(v_partials, C, db_partials, RB, m, n, r, s, v, db)      their sums in order
//       dY [m, n], B [n, r], U' [m, r]: bf16, row-major, as TMA tensor maps (tdy in boxes of
//       TM rows x 64 columns, tb and tu in boxes of TN and TM rows x 64 columns); r <= R (R = 16
//       or 32) and a multiple of 8, n a multiple of 8 (16-byte rows); v [m, r] bf16 and db [n, r]
//       f32 row-major; v_partials [C][m][r] and db_partials [RB][n][r] f32.
//
// Why: dY is the largest operand of a LoRA layer's backward ([tokens, out features]), and as two
// GEMMs (what cuBLAS runs) V' and dB each stream it from memory. Here every tile of dY is read
// from memory once and feeds both products on the tensor cores (mma.sync bf16, fp32
// accumulation). Wider ranks keep the two GEMMs: at R = 64 (tried, not kept) a warp's V'
// accumulators and U' fragments spill at the 168 registers a thread that 9 warps get (registers
// go to warps in fours), the fragment reads from shared memory (~112 KB a 16 KB step) approach
// the memory stream's time, and the partial sums grow with r; at 128 the MMAs alone (4r flops a
// dY element) outrun it on mma.sync. The partial sums settle it for any instruction set: with one
// region per SM, each region of area A leaves about 2 sqrt(A) r partial sums (its rows' V' and its
// columns' dB), written and read back as f32. At 8192 x 4096 on 132 SMs that is ~1 MB per unit
// of r, as much as dY's 67 MB at r = 64 and twice it at 128, where cuBLAS's two GEMMs read dY
// twice and nothing else (PERF.md, tenth session).
//
// Work split. Block (cb, rb) of the grid (C, RB) takes a row tiles (TM rows each) from rb·a and
// the column chunks (TN columns each) cb, cb + C, cb + 2C, ...: interleaved, so that the blocks of
// a row band read neighbouring chunks of the same rows at about the same time (whole DRAM pages,
// not 128 bytes of each). It walks them row tile by row tile, each across its chunks, one step
// (TM x TN of dY) at a time:
// - A producer warp (one thread) fills a STAGES-deep ring with TMA: the dY tile and B's TN rows
//   a stage, and U''s TM rows (two buffers) at a row tile's first step; full and empty mbarriers
//   hand stages to the 8 consumer warps and back.
// - V' of a row tile sums over the block's chunks in registers: a warp owns 16 rows and all R
//   columns (A = dY's rows, B = B's rows). At the row tile's end, the warp stores its partial.
// - dBᵀ = U'ᵀ dY of a chunk sums over the block's rows in shared memory (db_acc [R][RN + 8] f32):
//   a warp owns 8 of the chunk's columns and all R rows, with U''s fragments (A, fixed for a row
//   tile) held in registers and dY's as B, in two accumulators (even and odd K steps: half the
//   dependent MMA chain). At the end, the block stores its partial.
// The sums over the blocks run as a second kernel over every SM, in block order, so the results
// do not depend on which block finished first (reruns are bit-identical).
//
// Measured on the H200 (ncu, 8192 x 11008 dY, r = 16; PERF.md): 52 us at 75% of DRAM bandwidth,
// where cuBLAS's two GEMMs take ~100 us. Earlier versions: every thread copying with cp.async and
// a block barrier a step, 168-181 us (address arithmetic and barriers: 4-6% of the instructions
// were MMAs); TMA with the sums done in this kernel by the last block of a row tile to finish,
// 148 us (that block's warps waited on global memory while the stages stood full).
//
// Shared layouts: every box has 128-byte rows, 128-byte swizzled by TMA (16-byte chunk c of row i
// at c ^ (i % 8)), so that the eight rows an ldmatrix phase reads, plain or transposed, fall in
// distinct banks. B's and U''s boxes are 64 columns wide for their r columns: TMA fills the rest,
// and rows past m or n, with zeros, so ragged edges add nothing.
#include "common.cuh"
// TMA and mbarriers exist on sm_90 and later; other targets compile a trapping body (the host
// checks Arch::has_wgmma first and runs cuBLAS's two GEMMs there).
#include "wgmma_sm90.cuh"

// Must match crates/loraga-core/src/cuda/lora_dy.rs.
#define TM 128
#define TN 64
#define STAGES 4
#define CONSUMERS 8                       // warps that multiply; one more warp loads
#define THREADS (32 * (CONSUMERS + 1))

#ifdef LORAGA_SM90A

// Shared layout, from a 1024-byte aligned base: STAGES stages of [dY tile TM x TN | B box TN x 64],
// two U' boxes (TM x 64), then the dBᵀ accumulator [R][RN + 8] f32 and the mbarriers.
#define DY_BYTES (TM * TN * 2)
#define B_BYTES (TN * 64 * 2)
#define STAGE_BYTES (DY_BYTES + B_BYTES)
#define U_BYTES (TM * 64 * 2)

// The element offset of (row, col) in a box of 64-column (128-byte) rows as TMA's 128-byte swizzle
// lays it out.
__device__ __forceinline__ int swz(int row, int col) { return row * 64 + ((((col >> 3) ^ row) & 7) << 3) + (col & 7); }

template <int R> struct Dy {
    static constexpr int VACC = R / 2;  // V' accumulators a thread: R / 8 tiles x 4
    static constexpr int MI = R / 16;   // 16-row MMA tiles of dBᵀ (its R rows)
    static_assert(R == 16 || R == 32, "R is 16 or 32");
};

template <int R>
__device__ void lora_dy(const TmaDesc* tdy, const TmaDesc* tb, const TmaDesc* tu, int m, int n, int r, int a, int bc,
                        float* __restrict__ v_partials, float* __restrict__ db_partials) {
    using D = Dy<R>;
    extern __shared__ unsigned char smem_raw[];
    unsigned char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
    const bf16* ubuf = reinterpret_cast<const bf16*>(smem + STAGES * STAGE_BYTES);
    // db_acc's rows are RN + 8 floats: the float2 read-modify-write of a warp (rows g, 8 columns)
    // then falls in distinct banks.
    const int RN = bc * TN, DB_LD = RN + 8;
    float* db_acc = reinterpret_cast<float*>(smem + STAGES * STAGE_BYTES + 2 * U_BYTES);
    unsigned long long* full = reinterpret_cast<unsigned long long*>(db_acc + R * DB_LD);
    unsigned long long* empty = full + STAGES;
    unsigned long long* ufull = empty + STAGES;
    unsigned long long* uempty = ufull + 2;

    const int t = threadIdx.x, lane = t % 32, w = t / 32, g = lane / 4, tg = lane % 4;
    const int cb = blockIdx.x, rb = blockIdx.y, C = gridDim.x, RB = gridDim.y;
    const int row_tiles = ceil_div(m, TM), chunks = ceil_div(n, TN);
    // The block's row tiles are rb·a, rb·a + 1, ...; its column chunks cb, cb + C, cb + 2C, ...
    // (interleaved, so that the blocks of a row band read each row's neighbouring chunks at about
    // the same time: whole DRAM pages rather than 128 bytes of each).
    const int a_here = min(a, row_tiles - rb * a), b_here = (chunks - cb + C - 1) / C;
    const int steps = a_here * b_here;

    if (t == 0) {
        for (int i = 0; i < STAGES; ++i) {
            mbar_init(&full[i], 1);
            mbar_init(&empty[i], CONSUMERS);
        }
        for (int i = 0; i < 2; ++i) {
            mbar_init(&ufull[i], 1);
            mbar_init(&uempty[i], CONSUMERS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        fence_proxy_async_shared();
    }
    for (int e = t; e < R * DB_LD; e += THREADS) db_acc[e] = 0.0f;
    __syncthreads();

    if (w == CONSUMERS) {
        // The producer: one thread walks the steps, filling the ring and the U' buffers.
        if (lane == 0) {
            int mt = 0, nt = 0;
            for (int p = 0; p < steps; ++p) {
                const int st = p % STAGES, m0 = (rb * a + mt) * TM, n0 = (cb + nt * C) * TN;
                if (p >= STAGES) mbar_wait(&empty[st], (p / STAGES - 1) & 1);
                unsigned char* dst = smem + st * STAGE_BYTES;
                mbar_expect_tx(&full[st], STAGE_BYTES);
                tma_load(dst, tdy, &full[st], n0, m0);
                tma_load(dst + DY_BYTES, tb, &full[st], 0, n0);
                if (nt == 0) {
                    const int ub = mt % 2;
                    if (mt >= 2) mbar_wait(&uempty[ub], (mt / 2 - 1) & 1);
                    mbar_expect_tx(&ufull[ub], U_BYTES);
                    tma_load(smem + STAGES * STAGE_BYTES + ub * U_BYTES, tu, &ufull[ub], 0, m0);
                }
                if (++nt == b_here) nt = 0, ++mt;
            }
        }
    } else {
        float vacc[D::VACC];
        unsigned ua[8][D::MI][4];  // U''s fragments (A of dBᵀ) for the row tile's 8 K steps
#pragma unroll
        for (int e = 0; e < D::VACC; ++e) vacc[e] = 0.0f;

        int mt = 0, nt = 0;
        for (int step = 0; step < steps; ++step) {
            const int st = step % STAGES;
            if (nt == 0) {
                const int ub = mt % 2;
                mbar_wait(&ufull[ub], (mt / 2) & 1);
                const bf16* us = ubuf + ub * (U_BYTES / 2);
                const int i = lane % 8, hi_mn = 8 * ((lane / 8) % 2), hi_k = 8 * (lane / 16);
#pragma unroll
                for (int ks = 0; ks < 8; ++ks)
#pragma unroll
                    for (int mi = 0; mi < D::MI; ++mi)
                        ldmatrix_x4<true>(ua[ks][mi], us + swz(16 * ks + hi_k + i, 16 * mi + hi_mn));
                __syncwarp();
                if (lane == 0) mbar_arrive(&uempty[ub]);
            }
            mbar_wait(&full[st], (step / STAGES) & 1);
            const bf16* ds = reinterpret_cast<const bf16*>(smem + st * STAGE_BYTES);
            const bf16* bs = ds + TM * TN;

            // V'[16w.., 0..R) += dY[16w.., chunk] B[chunk, 0..R)
#pragma unroll
            for (int ks = 0; ks < TN / 16; ++ks) {
                unsigned af[4];
                {
                    const int i = lane % 8, hi_mn = 8 * ((lane / 8) % 2), hi_k = 8 * (lane / 16);
                    ldmatrix_x4<false>(af, ds + swz(16 * w + hi_mn + i, 16 * ks + hi_k));
                }
#pragma unroll
                for (int jp = 0; jp < R / 16; ++jp) {
                    unsigned bf[4];
                    const int i = lane % 8, hi_k = 8 * ((lane / 8) % 2), hi_n = 8 * (lane / 16);
                    ldmatrix_x4<true>(bf, bs + swz(16 * ks + hi_k + i, 16 * jp + hi_n));
                    mma<bf16>(vacc + 8 * jp, af, bf);
                    mma<bf16>(vacc + 8 * jp + 4, af, bf + 2);
                }
            }

            // dBᵀ[0..R, chunk cols 8w..8w+8) += U'ᵀ[0..R, tile rows] dY[tile rows, 8w..8w+8), in
            // two accumulators (even and odd K steps: half the dependent MMA chain) added at the end.
            {
                float acc[2][D::MI][4];
                float* dst = db_acc + nt * TN + 8 * w + 2 * tg;
#pragma unroll
                for (int mi = 0; mi < D::MI; ++mi) {
                    const float2 lo = *reinterpret_cast<const float2*>(dst + (16 * mi + g) * DB_LD);
                    const float2 hi = *reinterpret_cast<const float2*>(dst + (16 * mi + g + 8) * DB_LD);
                    acc[0][mi][0] = lo.x, acc[0][mi][1] = lo.y, acc[0][mi][2] = hi.x, acc[0][mi][3] = hi.y;
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[1][mi][e] = 0.0f;
                }
#pragma unroll
                for (int ks = 0; ks < 8; ks += 2) {
                    // Four 8 x 8 matrices down the tile's rows 16ks.. (two K steps) at columns
                    // 8w..: lane l addresses row 16ks + l.
                    unsigned bf[4];
                    ldmatrix_x4<true>(bf, ds + swz(16 * ks + lane, 8 * w));
#pragma unroll
                    for (int mi = 0; mi < D::MI; ++mi) {
                        mma<bf16>(acc[0][mi], ua[ks][mi], bf);
                        mma<bf16>(acc[1][mi], ua[ks + 1][mi], bf + 2);
                    }
                }
#pragma unroll
                for (int mi = 0; mi < D::MI; ++mi) {
                    *reinterpret_cast<float2*>(dst + (16 * mi + g) * DB_LD) =
                        make_float2(acc[0][mi][0] + acc[1][mi][0], acc[0][mi][1] + acc[1][mi][1]);
                    *reinterpret_cast<float2*>(dst + (16 * mi + g + 8) * DB_LD) =
                        make_float2(acc[0][mi][2] + acc[1][mi][2], acc[0][mi][3] + acc[1][mi][3]);
                }
            }
            __syncwarp();
            if (lane == 0) mbar_arrive(&empty[st]);  // this warp is done with the stage

            if (nt == b_here - 1) {
                // The warp's 16 rows of the row tile's V' over this block's chunks: partial cb.
                float* part = v_partials + (i64)cb * m * r;
#pragma unroll
                for (int j = 0; j < R / 8; ++j) {
                    const int col = 8 * j + 2 * tg;
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int row = (rb * a + mt) * TM + 16 * w + g + 8 * h;
                        if (row < m && col < r)
                            __stcg(reinterpret_cast<float2*>(part + (i64)row * r + col),
                                   make_float2(vacc[4 * j + 2 * h], vacc[4 * j + 2 * h + 1]));
                    }
                }
#pragma unroll
                for (int e = 0; e < D::VACC; ++e) vacc[e] = 0.0f;
            }
            if (++nt == b_here) nt = 0, ++mt;
        }
    }

    // dBᵀ of the block's chunks over its rows, as partial rb of dB [n, r] (local column nt·TN + x
    // is column (cb + nt·C)·TN + x): four of a column's r values a thread.
    __syncthreads();
    float* part = db_partials + (i64)rb * n * r;
    for (int e = t; e < b_here * TN * (r / 4); e += THREADS) {
        const int local = e / (r / 4), j = 4 * (e % (r / 4));
        const int col = (cb + local / TN * C) * TN + local % TN;
        if (col < n) {
            const float* src = db_acc + j * DB_LD + local;
            __stcg(reinterpret_cast<float4*>(part + (i64)col * r + j),
                   make_float4(src[0], src[DB_LD], src[2 * DB_LD], src[3 * DB_LD]));
        }
    }
}

#define LORA_DY_BODY(R) lora_dy<R>(&tdy, &tb, &tu, m, n, r, a, bc, v_partials, db_partials);
#else
#define LORA_DY_BODY(R) __trap();
#endif  // LORAGA_SM90A

#define LORA_DY(R)                                                                                                   \
    extern "C" __global__ void __launch_bounds__(THREADS, 1)                                                         \
        lora_dy_##R(const __grid_constant__ TmaDesc tdy, const __grid_constant__ TmaDesc tb,                          \
                    const __grid_constant__ TmaDesc tu, int m, int n, int r, int a, int bc, float* v_partials,       \
                    float* db_partials) {                                                                            \
        LORA_DY_BODY(R)                                                                                              \
    }
LORA_DY(16)
LORA_DY(32)

// The sums of the partials, in split order: v = s Σ_c v_partials[c] (bf16) and db = Σ_b
// db_partials[b] (f32), four elements a thread (r is a multiple of 8).
extern "C" __global__ void lora_dy_sum(const float* __restrict__ v_partials, int C, const float* __restrict__ db_partials,
                                       int RB, int m, int n, int r, float s, bf16* __restrict__ v,
                                       float* __restrict__ db) {
    const i64 v4 = (i64)m * r / 4, db4 = (i64)n * r / 4;
    for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < v4 + db4; e += (i64)gridDim.x * blockDim.x) {
        const bool is_v = e < v4;
        const float4* p = reinterpret_cast<const float4*>(is_v ? v_partials : db_partials) + (is_v ? e : e - v4);
        const int splits = is_v ? C : RB;
        const i64 stride = is_v ? v4 : db4;
        float4 sum = __ldcs(p);
#pragma unroll 4
        for (int k = 1; k < splits; ++k) {
            const float4 q = __ldcs(p + k * stride);
            sum.x += q.x, sum.y += q.y, sum.z += q.z, sum.w += q.w;
        }
        if (is_v) {
            __nv_bfloat162* out = reinterpret_cast<__nv_bfloat162*>(v) + 2 * e;
            out[0] = __floats2bfloat162_rn(s * sum.x, s * sum.y);
            out[1] = __floats2bfloat162_rn(s * sum.z, s * sum.w);
        } else {
            reinterpret_cast<float4*>(db)[e - v4] = sum;
        }
    }
}
