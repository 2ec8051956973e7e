// GEMM engine for Hopper (sm_90a): bf16 operands, or f32 operands on TF32 tensor cores, fp32
// accumulation; the GEMM under every hot loraga kernel.
//
//   C[m, n] = alpha * sum_k opA[m, k] opB[k, n]  +  beta * C[m, n]
//
// with the K loop running over up to two operand pairs one after the other ("split K sources"):
//   C = alpha * ([A1 | A2] [B1 | B2]) + beta * C  =  alpha * (A1 B1 + A2 B2) + beta * C
// so that the LoRA forward X W^T + (s X A^T) B^T is one GEMM over K1 + r, and likewise the
// backward dY W + (s dY B) A.
//
// Layouts (all row-major in memory; the entry name gemm_sm90_<ta><tb>_<in>_<out> says which):
//   nt: A [M, K], B [N, K]   (opB = B^T: x @ W^T)       both operands K-major
//   nn: A [M, K], B [K, N]   (dY @ W)                    B MN-major
//   tn: A [K, M], B [K, N]   (dY^T @ X, weight gradient)  both MN-major
//   tt: A [K, M], B [N, K]                               A MN-major
// bf16 operands come in all four layouts. f32 operands (the SVD path) run m64n256k8 TF32 MMAs,
// which wgmma only reads K-major, so f32 has the nt entry points alone: the host repacks an
// MN-major (or unaligned) f32 operand into a K-major scratch buffer with gemm_pack_k_major_f32
// (one read and one write of the operand) and launches nt. TF32 keeps 10 of f32's 23 mantissa
// bits (the tensor cores truncate the rest); products and sums are fp32.
// Each operand is described by a TMA tensor map built on the host (gemm_sm90.rs) with 128-byte
// swizzle: K-major operands in boxes of 128 bytes of K (64 bf16 or 32 f32) x rows, MN-major ones
// in boxes of 64 MN x 64 K (one 128-byte "stripe" per box, the layout wgmma reads with its
// transpose bit set). The contiguous dimension of every operand must have 16-byte rows (a multiple
// of 8 bf16 or 4 f32 elements). C is row-major
// [M, N] with leading dimension ldc, stored as bf16 or f32 (the kernel name's suffix). Ragged
// M, N, K: TMA zero-fills the parts of a box outside the matrix, and stores are guarded. beta == 0
// never reads C (BLAS semantics); beta == 1 with an f32 C is in-place accumulation.
//
// Structure (version 1):
// - Persistent: one CTA per SM loops over 128 x 256 output tiles in a grouped order (GROUP_M
//   tile-rows at a time) so that concurrently running tiles share A and B panels in L2.
// - Each source's K arrives as a count of 32-byte MMA steps (k16 bf16, k8 tf32), four to a
//   k-tile; a source's last k-tile runs only the steps that hold data, so a LoRA adapter of rank
//   16 adds one wgmma step to the K loop rather than a whole k-tile of mostly zero-filled ones.
// - Split K for skinny f32 products (LoRA's dA, dB): with k_splits > 1 each tile's K loop is cut
//   into slices that run as separate work units and add into C with TMA's in-place add.
// - Warp-specialized: warpgroup 0 is the producer (one thread issues TMA loads into a 3-stage
//   shared-memory ring, each stage guarded by a "full" and an "empty" mbarrier); warpgroups 1 and
//   2 are consumers, each computing 64 x 256 of the tile with wgmma m64n256k16 and keeping one
//   wgmma group in flight while releasing the previous stage.
// - setmaxnreg moves registers from the producer (40) to the consumers (232): a consumer holds
//   128 fp32 accumulators per thread.
// - Epilogue: registers -> swizzled shared memory -> TMA, which overlaps the store with the next
//   tile's MMAs: a store for beta == 0 (bf16 activations, f32 results), TMA's in-place add for an
//   f32 C with beta == 1 (gradient accumulation). Otherwise (other betas, rows not 16-byte
//   aligned) straight from registers to global memory, a pair of columns per store.
#include "common.cuh"
#include "gemm_common.cuh"
// wgmma, setmaxnreg and TMA exist only on sm_90a: this header defines LORAGA_SM90A there. Other
// targets compile the entry points with a trapping body, so every kernel file builds for every
// arch; the host never launches these there (gemm_sm90.rs checks Arch::has_wgmma first).
#include "wgmma_sm90.cuh"

#define BM 128
#define BN 256
#define BK 64
#define STAGES 3
#define CONSUMERS 2
#define THREADS (128 * (CONSUMERS + 1))
#define GROUP_M 16

#ifdef LORAGA_SM90A

// Shared memory layout; the base is aligned to 1024 bytes by hand (128-byte swizzle needs it).
struct Smem {
    bf16 a[STAGES][BM * BK];
    bf16 b[STAGES][BN * BK];
    // The bf16 output tile on its way out through TMA: BN / 64 column slabs of [BM][64], each
    // 128-byte swizzled like the operands so that the fragment writes are free of bank conflicts.
    bf16 c[BN / 64][BM * 64];
    unsigned long long full[STAGES];
    unsigned long long empty[STAGES];
};
#define STAGE_BYTES ((BM + BN) * BK * 2)

// How the epilogue writes C (chosen by the host, gemm_sm90.rs):
#define EPI_DIRECT 0     // from registers, any beta, any N
#define EPI_TMA_STORE 1  // through shared memory and TMA; beta == 0; 16-byte rows
#define EPI_TMA_ADD 2    // f32 only: TMA's in-place add, C += alpha * A B; beta == 1

// TMA store of a shared-memory box to (c0 = column, c1 = row) of the tensor map; rows and
// columns outside the matrix are not written. Completion is tracked per thread in bulk groups.
__device__ __forceinline__ void tma_store(const TmaDesc* map, const void* src, int c0, int c1) {
    asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];"
                 ::"l"(map), "r"(smem_addr(src)), "r"(c0), "r"(c1)
                 : "memory");
}
// TMA in-place add of an f32 shared-memory box into (c0, c1) of the tensor map.
__device__ __forceinline__ void tma_reduce_add(const TmaDesc* map, const void* src, int c0, int c1) {
    asm volatile("cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3}], [%1];"
                 ::"l"(map), "r"(smem_addr(src)), "r"(c0), "r"(c1)
                 : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
// Waits until this thread's earlier TMA stores have read their shared memory (it may be reused).
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }
// Waits until this thread's earlier TMA stores are complete in global memory.
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }
// Barrier over one consumer warpgroup (ids 1.. ; 0 is __syncthreads).
__device__ __forceinline__ void warpgroup_sync(int id) { asm volatile("bar.sync %0, 128;" ::"r"(id) : "memory"); }

// MN-major tile stored as 128-byte stripes of 64 MN elements x BK rows of K: the next stripe
// along MN is BK * 128 bytes on (leading offset), the next 8 K rows 1024 bytes (stride offset).
__device__ __forceinline__ unsigned long long desc_mn_major(const bf16* p) { return smem_desc(p, BK * 128, 1024); }


// The 128 accumulator registers of an m64n256 warpgroup MMA, as asm operands %0..%127.
#define WGMMA_D_REGS                                                                                               \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, "  \
    "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "   \
    "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, "   \
    "%65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, "   \
    "%86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, " \
    "%106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, "     \
    "%123, %124, %125, %126, %127}"
#define WGMMA_D_OPERANDS                                                                                           \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),     \
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),      \
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),     \
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),     \
        "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),     \
        "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),     \
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),     \
        "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]),     \
        "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]),     \
        "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]),     \
        "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]),     \
        "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]),     \
        "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),              \
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]),           \
        "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]),           \
        "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]),           \
        "+f"(d[125]), "+f"(d[126]), "+f"(d[127])

// One 32-byte K step of a warpgroup MMA: d[64 x 256] += A[64 x k] B[k x 256], both from shared
// memory, 128-byte swizzled; d is this thread's 128-register slice of the accumulator. For bf16
// that is m64n256k16; TRANS_A / TRANS_B = 1 read that operand MN-major.
template <typename T, int TRANS_A, int TRANS_B>
__device__ __forceinline__ void wgmma_k32b(float* d, unsigned long long desc_a, unsigned long long desc_b) {
    asm volatile(
        "{\n"
        ".reg .pred accumulate;\n"
        "setp.eq.u32 accumulate, 1, 1;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 " WGMMA_D_REGS
        ", %128, %129, accumulate, 1, 1, %130, %131;\n"
        "}\n"
        : WGMMA_D_OPERANDS
        : "l"(desc_a), "l"(desc_b), "n"(TRANS_A), "n"(TRANS_B));
}
// For f32 operands, m64n256k8 on TF32 (the tensor cores read the top 19 bits of each f32: sign,
// 8 exponent bits and 10 mantissa bits, i.e. they truncate). wgmma has no transpose bits for tf32:
// both operands must be K-major, so the host repacks MN-major f32 operands first.
template <>
__device__ __forceinline__ void wgmma_k32b<float, 0, 0>(float* d, unsigned long long desc_a, unsigned long long desc_b) {
    asm volatile(
        "{\n"
        ".reg .pred accumulate;\n"
        "setp.eq.u32 accumulate, 1, 1;\n"
        "wgmma.mma_async.sync.aligned.m64n256k8.f32.tf32.tf32 " WGMMA_D_REGS ", %128, %129, accumulate, 1, 1;\n"
        "}\n"
        : WGMMA_D_OPERANDS
        : "l"(desc_a), "l"(desc_b));
}

// The K loop over two sources whose K is given in 32-byte MMA steps (four to a k-tile): the
// whole k-tiles of source 1, then of source 2, then each source's partial last tile (if any),
// so that the loop over whole tiles is the same code as without partial ones.
struct KLoop {
    int full1, full, tail1, tail2, tiles;
    __device__ KLoop(int k1_steps, int k2_steps)
        : full1(k1_steps / 4), full(k1_steps / 4 + k2_steps / 4), tail1(k1_steps % 4), tail2(k2_steps % 4),
          tiles(full + (tail1 > 0) + (tail2 > 0)) {}
    // Loop position kt: from source 1 or 2, which k-tile of it, and how many steps hold data.
    __device__ bool first(int kt) const { return kt < full1 || (kt == full && tail1 > 0); }
    __device__ int tile(int kt) const { return kt < full1 ? kt : kt < full ? kt - full1 : first(kt) ? full1 : full - full1; }
    __device__ int steps(int kt) const { return kt < full ? 4 : first(kt) ? tail1 : tail2; }
};

// T is the operand type (bf16, or float read as TF32). A k-tile is 128 bytes of K either way (64 bf16
// or 32 f32), so the ring, the swizzle and the descriptors are the same bytes for both.
template <typename T, bool A_MN, bool B_MN, typename Tout>
__device__ void gemm_sm90(const TmaDesc* ta1, const TmaDesc* tb1, int k1_steps, const TmaDesc* ta2,
                          const TmaDesc* tb2, int k2_steps, int k_splits, const TmaDesc* tc, int epilogue, Tout* C, int M,
                          int N, i64 ldc, float alpha, float beta) {
    static_assert(sizeof(T) == 2 || (!A_MN && !B_MN), "wgmma reads tf32 operands K-major only");
    constexpr int BK_ELEMS = 128 / sizeof(T);
    extern __shared__ unsigned char smem_raw[];
    Smem& s = *reinterpret_cast<Smem*>(smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023));

    const int wg = threadIdx.x / 128;
    const int tiles_m = ceil_div(M, BM), tiles_n = ceil_div(N, BN);
    const int tiles = tiles_m * tiles_n;
    const KLoop kl(k1_steps, k2_steps);
    const int k_tiles = kl.tiles;
    // Split K: work unit u is K slice u % k_splits of tile u / k_splits; slices add into C.
    const int units = tiles * k_splits;
    const int k_per_split = ceil_div(k_tiles, k_splits);

    if (threadIdx.x == 0) {
        for (int i = 0; i < STAGES; ++i) {
            mbar_init(&s.full[i], 1);
            mbar_init(&s.empty[i], CONSUMERS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        fence_proxy_async_shared();
    }
    __syncthreads();

    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
        if (threadIdx.x != 0) return;
        int it = 0;
        for (int u = blockIdx.x; u < units; u += gridDim.x) {
            int tm, tn;
            tile_coords(u / k_splits, tiles_m, tiles_n, GROUP_M, tm, tn);
            const int kt_end = min(k_tiles, (u % k_splits + 1) * k_per_split);
            for (int kt = (u % k_splits) * k_per_split; kt < kt_end; ++kt, ++it) {
                int st = it % STAGES;
                if (it >= STAGES) mbar_wait(&s.empty[st], ((it / STAGES) - 1) & 1);
                mbar_expect_tx(&s.full[st], STAGE_BYTES);
                const bool first = kl.first(kt);
                const int k = kl.tile(kt) * BK_ELEMS;
                const TmaDesc* ta = first ? ta1 : ta2;
                const TmaDesc* tb = first ? tb1 : tb2;
                if (A_MN) {
#pragma unroll
                    for (int j = 0; j < BM / 64; ++j) tma_load(s.a[st] + j * 64 * BK, ta, &s.full[st], tm * BM + 64 * j, k);
                } else {
                    tma_load(s.a[st], ta, &s.full[st], k, tm * BM);
                }
                if (B_MN) {
#pragma unroll
                    for (int j = 0; j < BN / 64; ++j) tma_load(s.b[st] + j * 64 * BK, tb, &s.full[st], tn * BN + 64 * j, k);
                } else {
                    tma_load(s.b[st], tb, &s.full[st], k, tn * BN);
                }
            }
        }
        return;
    }

    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
    const int c = wg - 1;  // this consumer's 64-row half of the tile
    const int lane = threadIdx.x % 32, warp = (threadIdx.x % 128) / 32;
    float d[128];
    int it = 0;
    for (int u = blockIdx.x; u < units; u += gridDim.x) {
        int tm, tn;
        tile_coords(u / k_splits, tiles_m, tiles_n, GROUP_M, tm, tn);
        const int kt_begin = (u % k_splits) * k_per_split, kt_end = min(k_tiles, kt_begin + k_per_split);
        if (kt_begin >= kt_end && k_splits > 1) continue;  // an empty slice adds nothing
#pragma unroll
        for (int i = 0; i < 128; ++i) d[i] = 0.0f;
        int prev = -1;
        // This consumer's 64 rows of A are rows c*64.. of a K-major tile, or stripe c of an
        // MN-major one; each step moves 32 bytes along K (16 bf16, or 8 tf32).
        auto mma_step = [&](int st, int kk) {
            unsigned long long da = A_MN ? desc_mn_major(s.a[st] + c * 64 * BK + kk * 16 * 64)
                                         : desc_k_major(s.a[st] + c * 64 * BK + kk * 16);
            unsigned long long db = B_MN ? desc_mn_major(s.b[st] + kk * 16 * 64) : desc_k_major(s.b[st] + kk * 16);
            wgmma_k32b<T, A_MN, B_MN>(d, da, db);
        };
        // Keep a k-tile's MMAs in flight; the previous ones are done, so release their stage.
        auto release_previous = [&](int st) {
            wgmma_wait<1>();
            fence_registers<128>(d);
            if (prev >= 0 && threadIdx.x % 128 == 0) mbar_arrive(&s.empty[prev]);
            prev = st;
        };
        int kt = kt_begin;
        for (; kt < min(kt_end, kl.full); ++kt, ++it) {
            const int st = it % STAGES;
            mbar_wait(&s.full[st], (it / STAGES) & 1);
            fence_registers<128>(d);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk) mma_step(st, kk);
            wgmma_commit();
            release_previous(st);
        }
        for (; kt < kt_end; ++kt, ++it) {
            const int st = it % STAGES, steps = kl.steps(kt);  // a partial k-tile: 1 to 3 steps
            mbar_wait(&s.full[st], (it / STAGES) & 1);
            fence_registers<128>(d);
            // Each branch a whole fence-MMAs-commit sequence in straight-line code: MMAs of one
            // sequence in different blocks make ptxas fence every one of them.
            if (steps == 3) {
                wgmma_fence(), mma_step(st, 0), mma_step(st, 1), mma_step(st, 2), wgmma_commit();
            } else if (steps == 2) {
                wgmma_fence(), mma_step(st, 0), mma_step(st, 1), wgmma_commit();
            } else {
                wgmma_fence(), mma_step(st, 0), wgmma_commit();
            }
            release_previous(st);
        }
        wgmma_wait<0>();
        fence_registers<128>(d);
        if (prev >= 0 && threadIdx.x % 128 == 0) mbar_arrive(&s.empty[prev]);

        // Accumulator fragment of m64nNk16: register 4g + j holds row (16 warp + lane/4 + 8 (j/2)),
        // column (8 g + 2 (lane % 4) + j % 2).
        if (epilogue == EPI_DIRECT) {
            const int r0 = tm * BM + c * 64 + warp * 16 + lane / 4;
#pragma unroll
            for (int g = 0; g < BN / 8; ++g) {
                int col = tn * BN + g * 8 + 2 * (lane % 4);
                store_pair(C, M, N, ldc, r0, col, d[4 * g + 0], d[4 * g + 1], alpha, beta);
                store_pair(C, M, N, ldc, r0 + 8, col, d[4 * g + 2], d[4 * g + 3], alpha, beta);
            }
        } else if constexpr (sizeof(Tout) == 2) {
            // bf16 output, beta == 0: stage the tile in shared memory and let TMA write it, so the
            // warpgroup goes on to the next tile's MMAs while the copy engine stores this one.
            if (threadIdx.x % 128 == 0) bulk_wait_read();  // the previous tile's store is out of smem
            warpgroup_sync(1 + c);
            const int lr = c * 64 + warp * 16 + lane / 4;  // row within the tile
#pragma unroll
            for (int g = 0; g < BN / 8; ++g) {
                // Column 8g + 2 (lane % 4) lives in slab g / 8, 16-byte chunk g % 8, swizzled by row.
                bf16* slab = s.c[g / 8];
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    int row = lr + 8 * h;
                    int chunk = (g % 8) ^ (row % 8);
                    __nv_bfloat162 v = __floats2bfloat162_rn(alpha * d[4 * g + 2 * h], alpha * d[4 * g + 2 * h + 1]);
                    *reinterpret_cast<__nv_bfloat162*>(slab + row * 64 + chunk * 8 + 2 * (lane % 4)) = v;
                }
            }
            fence_proxy_async_shared();  // make the writes visible to TMA
            warpgroup_sync(1 + c);
            if (threadIdx.x % 128 == 0) {
#pragma unroll
                for (int j = 0; j < BN / 64; ++j) tma_store(tc, s.c[j] + c * 64 * 64, tn * BN + 64 * j, tm * BM + c * 64);
                bulk_commit();
            }
        } else {
            // f32 output (a store when beta == 0, TMA's in-place add when beta == 1: gradient
            // accumulation). Each consumer's 64 x 256 half goes out in two 64 x 128 rounds through
            // its 32 KB share of the staging area, as four [64][32] slabs with 128-byte swizzle.
            float* stage = reinterpret_cast<float*>(&s.c[0][0]) + c * 64 * 128;
            const int lr = warp * 16 + lane / 4;  // row within this consumer's half
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                if (threadIdx.x % 128 == 0) bulk_wait_read();  // the previous round is out of smem
                warpgroup_sync(1 + c);
#pragma unroll
                for (int gg = 0; gg < 16; ++gg) {
                    const int g = 16 * h + gg;
                    int col = 8 * gg + 2 * (lane % 4);  // 0..127 within the round
                    float* slab = stage + (col / 32) * 64 * 32;
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh) {
                        int row = lr + 8 * hh;
                        int chunk = ((col % 32) / 4) ^ (row % 8);
                        *reinterpret_cast<float2*>(slab + row * 32 + chunk * 4 + col % 4) =
                            make_float2(alpha * d[4 * g + 2 * hh], alpha * d[4 * g + 2 * hh + 1]);
                    }
                }
                fence_proxy_async_shared();
                warpgroup_sync(1 + c);
                if (threadIdx.x % 128 == 0) {
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const float* src = stage + j * 64 * 32;
                        int c0 = tn * BN + 128 * h + 32 * j, c1 = tm * BM + 64 * c;
                        if (epilogue == EPI_TMA_ADD) tma_reduce_add(tc, src, c0, c1);
                        else tma_store(tc, src, c0, c1);
                    }
                    bulk_commit();
                }
            }
        }
    }
    // Shared memory must outlive the last TMA store that reads it.
    if (threadIdx.x % 128 == 0) bulk_wait_all();
}

#else
template <typename T, bool A_MN, bool B_MN, typename Tout>
__device__ void gemm_sm90(const TmaDesc*, const TmaDesc*, int, const TmaDesc*, const TmaDesc*, int, int, const TmaDesc*,
                          int, Tout*, int, int, i64, float, float) {
    __trap();
}
#endif  // LORAGA_SM90A

// One entry point per layout (see the top) and operand / output type: gemm_sm90_<name>.
#define GEMM_SM90(name, T, A_MN, B_MN, Tout)                                                                         \
    extern "C" __global__ void __launch_bounds__(THREADS, 1)                                                          \
        gemm_sm90_##name(const __grid_constant__ TmaDesc ta1, const __grid_constant__ TmaDesc tb1, int k1_steps,       \
                         const __grid_constant__ TmaDesc ta2, const __grid_constant__ TmaDesc tb2, int k2_steps,       \
                         int k_splits, const __grid_constant__ TmaDesc tc, int epilogue, Tout* C, int M, int N,        \
                         i64 ldc, float alpha, float beta) {                                                           \
        gemm_sm90<T, A_MN, B_MN>(&ta1, &tb1, k1_steps, &ta2, &tb2, k2_steps, k_splits, &tc, epilogue, C, M, N, ldc,   \
                                 alpha, beta);                                                                         \
    }
GEMM_SM90(nt_bf16_bf16, bf16, false, false, bf16)
GEMM_SM90(nt_bf16_f32, bf16, false, false, float)
GEMM_SM90(nn_bf16_bf16, bf16, false, true, bf16)
GEMM_SM90(nn_bf16_f32, bf16, false, true, float)
GEMM_SM90(tn_bf16_bf16, bf16, true, true, bf16)
GEMM_SM90(tn_bf16_f32, bf16, true, true, float)
GEMM_SM90(tt_bf16_bf16, bf16, true, false, bf16)
GEMM_SM90(tt_bf16_f32, bf16, true, false, float)
// f32 operands (TF32 MMAs): the nt layout only; the host repacks other layouts into it.
GEMM_SM90(nt_f32_bf16, float, false, false, bf16)
GEMM_SM90(nt_f32_f32, float, false, false, float)

// Repacks op(X) [rows, k] of an f32 operand (element (r, j) at src[r * rs + j * cs]) into the
// K-major [rows, ld] buffer the TF32 path reads (dst[r * ld + j], ld >= k a multiple of 4 for
// TMA's 16-byte rows; columns k..ld are zeroed). 32 x 32 tiles through shared memory so that both
// the transposed read and the write are coalesced. Plain CUDA: runs on every arch.
extern "C" __global__ void gemm_pack_k_major_f32(const float* __restrict__ src, i64 rs, i64 cs, int rows, int k,
                                                 float* __restrict__ dst, int ld) {
    __shared__ float tile[32][33];
    const int r0 = blockIdx.x * 32, j0 = blockIdx.y * 32;  // rows on x: up to 2^31 blocks
    const int tx = threadIdx.x, ty = threadIdx.y;  // 32 x 8 threads
    // Read with the thread index along whichever source dimension is contiguous.
    const bool along_j = cs == 1;
    for (int i = ty; i < 32; i += 8) {
        int r = along_j ? r0 + i : r0 + tx, j = along_j ? j0 + tx : j0 + i;
        float v = (r < rows && j < k) ? src[r * rs + j * cs] : 0.0f;
        if (along_j) tile[i][tx] = v;
        else tile[tx][i] = v;
    }
    __syncthreads();
    for (int i = ty; i < 32; i += 8) {
        int r = r0 + i, j = j0 + tx;
        if (r < rows && j < ld) dst[(i64)r * ld + j] = tile[i][tx];
    }
}
