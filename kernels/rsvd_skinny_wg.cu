// The fp32 products with A of the GPU randomized SVD for q > 32 on Hopper
// (crates/loraga-core/src/linalg/rsvd_cuda_skinny.rs): out = op(A) V to f32 accuracy, 3xTF32 on
// warpgroup MMAs (wgmma). rsvd_skinny.cu does q <= 32 with mma.sync, on any sm_80 or later.
//
//   rsvd_skinny_wg_split(v, n, vs):  vs[e] = hi(v[e]), vs[n + e] = lo(v[e]) for e < n
//       (split_tf32 in mma_sm80.cuh): V's halves, made once per product (V is k x q, A m x k).
//   rsvd_skinny_wg_<n|t>_<NQ>(ta, tv, m, k, q, out, kchunk, partials, tickets)
//       n: A row-major [m, k] (element (i, l) at a[i*k + l]):  out = A V
//       t: A row-major [k, m] (element (i, l) at a[l*m + i]):  out = Aᵀ V
//       ta: A's tensor map (crates/loraga-core/src/cuda/tma.rs), boxes of 128 bytes x rows with
//       128-byte swizzle: n: [m rows, k] in boxes of BM rows x 32 k; t: [k rows, m] in boxes of
//       32 k rows x 32 m (four make a tile).
//       tv: the tensor map of V's split as row-major [2q rows, k] (row j < q: column j of V's hi
//       part; row q + j: its lo part), boxes of NQ rows x 32 k.
//       out column-major [m, q]. A's rows must be 16-byte aligned (k, or m for t, a multiple of
//       4; TMA's rule), and k a multiple of 4 (V's split); the host takes cuBLAS otherwise.
//
// Grid (row tiles, splits, column tiles): block (b, s, c) computes rows [b*BM, b*BM + BM) and
// columns [c*NQ, c*NQ + NQ) of out over the reduction range [s*kchunk, min(k, (s+1)*kchunk)),
// kchunk a multiple of BK (so only the last split's last step runs past k, where TMA reads
// zeros), NQ = 64 or 128 (the narrowest tile that holds q, or 128 a tile above that). A hi tile
// whose rows run past q reads lo rows there: those columns of the product are garbage and are not
// stored. Splits are summed as in rsvd_skinny.cu: partial tiles, a ticket per output tile, the last
// block to arrive adds them in split order, so reruns and the batch's lanes give the same bits.
//
// 3xTF32 (as rsvd_skinny.cu): a v ≈ a_lo v_hi + a_hi v_lo + a_hi v_hi, three TF32 MMAs into one
// f32 accumulator. Why wgmma: mma.sync's TF32 rate on Hopper leaves three MMAs a product little
// faster than f32 FMAs (rsvd_skinny.cu's header); wgmma runs at the tensor cores' full rate.
// wgmma reads a TF32 operand from shared memory only K-major; V's split rows are (k is their
// contiguous index), A's rows are for n but not for t. So A goes through registers for both: each
// thread loads its fragment from the staged tile, splits it there, and passes hi and lo to wgmma
// as its register operand; V's halves are split beforehand (a pass over k*q elements, against the
// m*k*q of the product) and read by wgmma from shared memory.
//
// Why TMA and a producer warp (version 2): version 1 staged the tiles with cp.async from every
// thread and waited for each stage's MMAs before the next; with two warpgroups an SM, the copies'
// address arithmetic and the fragment loads ran one after another with the MMAs, and the kernel
// spent ~3x the MMAs' time a stage (ncu, 2048 x 4096 by 128: 71 us). Now one producer thread
// issues a stage's copies (three or six TMA boxes) into a STAGES-deep ring guarded by a "full"
// and an "empty" mbarrier a stage, and each consumer warpgroup keeps one stage's MMAs in flight
// while it loads the next stage's fragments, releasing a stage once its MMAs are done: 47 us for
// that product. What bounds it now is mostly traffic, not the MMAs: every 128 rows reload V's two
// tiles, twice A's bytes (PERF.md, eighth session).
//
// A block: two consumer warpgroups, each owning 64 rows of the tile (a warp 16: the m64nNQk8
// fragment, rows g and g + 8 at reduction steps tg and tg + 4, g = lane / 4, tg = lane % 4), and
// the producer warp. A stage holds V's hi and lo tiles (NQ rows of 128 bytes each) and A's tile
// (16 KiB), all 128-byte swizzled as TMA writes them (16-byte chunk c of a 128-byte row r at
// chunk c ^ (r % 8)): the fragment loads hit 32 distinct banks for n and two lanes a bank for t.
#include "common.cuh"
#include "mma_sm80.cuh"
#include "wgmma_sm90.cuh"

// Must match crates/loraga-core/src/linalg/rsvd_cuda_skinny.rs.
#define WG_BM 128
#define WG_BK 32
#define WG_STAGES 4
#define WG_CONSUMERS 2
#define WG_THREADS (128 * WG_CONSUMERS + 32)

extern "C" __global__ void rsvd_skinny_wg_split(const float* __restrict__ v, i64 n, float* __restrict__ vs) {
    for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < n; e += (i64)gridDim.x * blockDim.x) {
        unsigned hi, lo;
        split_tf32(v[e], hi, lo);
        vs[e] = __uint_as_float(hi);
        vs[n + e] = __uint_as_float(lo);
    }
}

#ifdef LORAGA_SM90A

// d[64 x NQ] += a[64 x 8] b[8 x NQ] on TF32: a this thread's four fragment registers, b from
// shared memory (K-major, 128-byte swizzled); d this thread's NQ / 2 accumulators, element i at
// row g + 8 * ((i / 2) % 2) of its warp's 16 and column 8 * (i / 4) + 2 * tg + i % 2.
template <int NQ>
__device__ __forceinline__ void wgmma_tf32(float* d, const unsigned* a, unsigned long long desc_b);
template <>
__device__ __forceinline__ void wgmma_tf32<64>(float* d, const unsigned* a, unsigned long long desc_b) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.eq.u32 p, 1, 1;\n"
        "wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "{%32, %33, %34, %35}, %36, p, 1, 1;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]),
          "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),
          "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));
}
template <>
__device__ __forceinline__ void wgmma_tf32<128>(float* d, const unsigned* a, unsigned long long desc_b) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.eq.u32 p, 1, 1;\n"
        "wgmma.mma_async.sync.aligned.m64n128k8.f32.tf32.tf32 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %68, p, 1, 1;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]),
          "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),
          "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]),
          "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),
          "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]),
          "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]),
          "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));
}

template <bool TRANS, int NQ> struct SkinnyWg {
    static constexpr int BM = WG_BM, BK = WG_BK, STAGES = WG_STAGES;
    static constexpr int ACC = NQ / 2;          // accumulators a thread
    static constexpr int V_TILE = NQ * BK * 4;  // bytes of one half's tile: NQ rows of 128 bytes
    static constexpr int A_TILE = BM * BK * 4;
    static constexpr int STAGE = 2 * V_TILE + A_TILE;  // a multiple of 1024, as the swizzle needs
    static constexpr int STEPS = BK / 8;               // MMA K steps a stage
    static_assert(STAGE % 1024 == 0, "stages 1024-byte aligned");

    // Element (r, l) (row r of the tile, reduction step l of the stage) of the stage's A tile.
    __device__ static float a_elem(const unsigned char* at, int r, int l) {
        if (TRANS) {  // four boxes of [32 l][32 r]
            const int i = r % 32;
            return *reinterpret_cast<const float*>(at + (r / 32) * (32 * 128) + l * 128 + (((i / 4) ^ (l % 8)) * 16) +
                                                   (i % 4) * 4);
        }
        return *reinterpret_cast<const float*>(at + r * 128 + (((l / 4) ^ (r % 8)) * 16) + (l % 4) * 4);
    }

    // This warp's A fragments of the stage, split: K step s at hi[s], lo[s].
    __device__ static void load_fragments(const unsigned char* st, int r, unsigned (&hi)[STEPS][4],
                                          unsigned (&lo)[STEPS][4]) {
        const unsigned char* at = st + 2 * V_TILE;
        const int tg = threadIdx.x % 4;
#pragma unroll
        for (int s = 0; s < STEPS; ++s) {
            split_tf32(a_elem(at, r, 8 * s + tg), hi[s][0], lo[s][0]);
            split_tf32(a_elem(at, r + 8, 8 * s + tg), hi[s][1], lo[s][1]);
            split_tf32(a_elem(at, r, 8 * s + tg + 4), hi[s][2], lo[s][2]);
            split_tf32(a_elem(at, r + 8, 8 * s + tg + 4), hi[s][3], lo[s][3]);
        }
    }

    // Queues the stage's MMAs: acc += A V over its BK steps, 3xTF32.
    __device__ static void multiply(const unsigned char* st, float* acc, unsigned (&hi)[STEPS][4],
                                    unsigned (&lo)[STEPS][4]) {
        wgmma_fence();  // the fragments written above are ready for the MMAs
#pragma unroll
        for (int s = 0; s < STEPS; ++s) {
            // K step s is 8 f32 = 32 bytes into each 128-byte row.
            const unsigned long long vhi = desc_k_major(st + 32 * s), vlo = desc_k_major(st + V_TILE + 32 * s);
            wgmma_tf32<NQ>(acc, lo[s], vhi);
            wgmma_tf32<NQ>(acc, hi[s], vlo);
            wgmma_tf32<NQ>(acc, hi[s], vhi);
        }
        wgmma_commit();
    }

    // Writes accumulator e of consumer thread pt (warpgroup pt / 128) to out.
    __device__ static void store(float* out, int m, int q, int m0, int j0, int pt, int e, float value) {
        const int lane = pt % 32, g = lane / 4, tg = lane % 4;
        const int i = m0 + (pt / 128) * 64 + (pt / 32 % 4) * 16 + g + 8 * ((e / 2) % 2);
        const int j = j0 + 8 * (e / 4) + 2 * tg + e % 2;
        if (i < m && j < q) out[i + (i64)j * m] = value;
    }

    __device__ static void run(const TmaDesc* ta, const TmaDesc* tv, int m, int k, int q, float* __restrict__ out,
                               int kchunk, float* __restrict__ partials, unsigned* __restrict__ tickets) {
        extern __shared__ unsigned char smem_raw[];
        unsigned char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
        unsigned long long* full = reinterpret_cast<unsigned long long*>(smem + STAGES * STAGE);
        unsigned long long* empty = full + STAGES;
        const int t = threadIdx.x, wg = t / 128;
        const int tile = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
        const int ctile = blockIdx.z, ctiles = gridDim.z;
        const int m0 = tile * BM, j0 = ctile * NQ;
        const int lbeg = split * kchunk, lend = min(k, lbeg + kchunk);
        const int steps = max(0, (lend - lbeg + BK - 1) / BK);

        if (t == 0) {
            for (int i = 0; i < STAGES; ++i) {
                mbar_init(&full[i], 1);
                mbar_init(&empty[i], WG_CONSUMERS);
            }
            asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
            fence_proxy_async_shared();
        }
        __syncthreads();

        float acc[ACC];
#pragma unroll
        for (int e = 0; e < ACC; ++e) acc[e] = 0.0f;

        if (wg == WG_CONSUMERS) {
            // The producer: one thread fills the ring.
            if (t == WG_CONSUMERS * 128) {
                for (int step = 0; step < steps; ++step) {
                    const int st = step % STAGES, l0 = lbeg + step * BK;
                    if (step >= STAGES) mbar_wait(&empty[st], (step / STAGES - 1) & 1);
                    unsigned char* s = smem + st * STAGE;
                    mbar_expect_tx(&full[st], STAGE);
                    tma_load(s, tv, &full[st], l0, j0);
                    tma_load(s + V_TILE, tv, &full[st], l0, q + j0);
                    if (TRANS) {
#pragma unroll
                        for (int b = 0; b < BM / 32; ++b) tma_load(s + 2 * V_TILE + b * 32 * 128, ta, &full[st], m0 + 32 * b, l0);
                    } else {
                        tma_load(s + 2 * V_TILE, ta, &full[st], l0, m0);
                    }
                }
            }
        } else {
            // A consumer: the stages two at a time, alternating fragment buffers, so the MMAs of
            // one stage run while the next stage's fragments load.
            const int r = wg * 64 + (t / 32 % 4) * 16 + (t % 32) / 4;
            unsigned hi[2][STEPS][4], lo[2][STEPS][4];
            auto stage = [&](int step, unsigned (&h)[STEPS][4], unsigned (&l)[STEPS][4], unsigned (&ph)[STEPS][4],
                             unsigned (&pl)[STEPS][4]) {
                const int st = step % STAGES;
                mbar_wait(&full[st], (step / STAGES) & 1);
                const unsigned char* s = smem + st * STAGE;
                load_fragments(s, r, h, l);
                multiply(s, acc, h, l);
                wgmma_wait<1>();  // the previous stage's MMAs are done: release its stage and fragments
                fence_registers<ACC>(acc);
                fence_registers<4 * STEPS>(&ph[0][0]);
                fence_registers<4 * STEPS>(&pl[0][0]);
                if (step > 0 && t % 128 == 0) mbar_arrive(&empty[(step - 1) % STAGES]);
            };
            for (int step = 0; step < steps; step += 2) {
                stage(step, hi[0], lo[0], hi[1], lo[1]);
                if (step + 1 < steps) stage(step + 1, hi[1], lo[1], hi[0], lo[0]);
            }
            wgmma_wait<0>();
            fence_registers<ACC>(acc);
            fence_registers<8 * STEPS>(&hi[0][0][0]);
            fence_registers<8 * STEPS>(&lo[0][0][0]);
        }

        const bool consumer = wg < WG_CONSUMERS;
        if (splits == 1) {
            if (consumer) {
#pragma unroll
                for (int e = 0; e < ACC; ++e) store(out, m, q, m0, j0, t, e, acc[e]);
            }
            return;
        }
        // This thread's run of the tile's partials for this split, then the ticket (every thread
        // of the block takes part: it holds barriers).
        const int unit = tile * ctiles + ctile;
        auto run_of = [&](int s) {
            return reinterpret_cast<float4*>(partials + ((i64)(unit * splits + s) * (WG_CONSUMERS * 128) + t) * ACC);
        };
        if (consumer) store_run<ACC>(run_of(split), acc);
        if (!last_to_arrive(tickets + unit, splits) || !consumer) return;
        // The last block sums the splits in order, every consumer thread its own run.
        sum_runs(acc, splits, run_of);
#pragma unroll
        for (int e = 0; e < ACC; ++e) store(out, m, q, m0, j0, t, e, acc[e]);
    }
};

#endif  // LORAGA_SM90A

#ifdef LORAGA_SM90A
#define SKINNY_WG_BODY(TRANS, NQ) SkinnyWg<TRANS, NQ>::run(&ta, &tv, m, k, q, out, kchunk, partials, tickets);
#else
#define SKINNY_WG_BODY(TRANS, NQ) __trap();
#endif

#define SKINNY_WG(NAME, TRANS, NQ)                                                                               \
    extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)                                                    \
        NAME(const __grid_constant__ TmaDesc ta, const __grid_constant__ TmaDesc tv, int m, int k, int q,         \
             float* __restrict__ out, int kchunk, float* __restrict__ partials, unsigned* __restrict__ tickets) {    \
        SKINNY_WG_BODY(TRANS, NQ)                                                                                  \
    }

SKINNY_WG(rsvd_skinny_wg_n_64, false, 64)
SKINNY_WG(rsvd_skinny_wg_t_64, true, 64)
SKINNY_WG(rsvd_skinny_wg_n_128, false, 128)
SKINNY_WG(rsvd_skinny_wg_t_128, true, 128)
