// One CholeskyQR pass of the GPU randomized SVD's device path in three kernels of our own
// (crates/loraga-core/src/linalg/rsvd_cuda_orth.rs), for q small enough that a q x q f64 matrix
// fits in one block's shared memory. X is the column-major f32 panel [rows, q] (element (r, j) at
// x[r + j*rows]); every q x q matrix is column-major (element (i, j) at [i + j*q]).
//
//   rsvd_orth_gram(x, rows, q, chunk_rows, chunks, partials, tickets, g):
//       G = XᵀX in f64, g[q*q] full (both triangles). The f32 products are exact in f64 and
//       accumulate in f64 (the same Gram as widening + DGEMM, summed in another order). Grid
//       (pairs, chunks): block (p, c) computes the 32 x 32 tile pair p (tiles ti <= tj of the
//       upper triangle, numbered row by row) over rows [c*chunk_rows, (c+1)*chunk_rows) into
//       partials[(c*pairs + p)*1024 ..] ((i, j) of the tile at i + 32*j), chunks <= MAX_CHUNKS.
//       The chunks form groups of SUM_GROUP: the last block of a group to finish (a ticket
//       counter per (pair, group)) sums the group's partials in chunk order, into the group
//       partial at partials[((MAX_CHUNKS + group)*pairs + p)*1024 ..] when there are several
//       groups; the last of those (a ticket per pair) sums them in group order and writes the
//       tile and its transpose. Tickets: tickets[p*MAX_GROUPS + group], then tickets[pairs*
//       MAX_GROUPS + p], zero between launches (each last block resets its own). G does not
//       depend on which block finished when: reruns are bit-identical.
//   rsvd_orth_chol_inv_<Q>(g, q, r32, rinv, flag, chol_bit, gram_bit, gram_tol), Q = 32, 64, 128:
//       One block, for q <= Q (G padded to Q x Q with I). If gram_bit != 0: flag |= gram_bit
//       unless ||G - I||_F < gram_tol (NaN fails). Then upper Cholesky RᵀR = G in f64 as
//       right-looking elimination that applies the same row operations to I, giving E = L⁻¹
//       for G = L D Lᵀ, so R⁻¹ = Eᵀ D^-½ (one barrier a step, the working matrix in registers).
//       Out: g = R (f64), r32 = R rounded to f32, rinv = R⁻¹ (f64), all with zeros below the
//       diagonal. flag |= chol_bit if a pivot is not > 0 (NaN included) or an entry of R, of R
//       in f32 or of R⁻¹ is not finite, or a diagonal of R rounds to an f32 that is not > 0;
//       then R = R⁻¹ = I are written instead, so the following apply leaves X as it was (a
//       NaN's row aside): finite stays finite, and the flagged layer is redone by the
//       host-assisted fallback anyway.
//   rsvd_orth_apply_<Q>(x, rows, q, rinv), Q = 32, 64, 128, for q <= Q:
//       X ← X R⁻¹ in place, f64 accumulation over the f32 X and f64 R⁻¹, rounded to f32 once.
//       Each block stages R⁻¹ (f64 q x q) in shared memory once, then owns APPLY_ROWS-row chunks
//       (grid-stride): it stages its chunk of X (all q columns) in shared memory before writing
//       any of it.
//
// Launch: gram with GRAM_THREADS threads and no dynamic shared memory; chol_inv_<Q> as one block
// of 32*Q/CHOL_ROWS threads with (Q*(Q + 1) + 3*Q) doubles of dynamic shared memory (the host
// takes the smallest Q >= q and checks that it fits the device); apply with APPLY_THREADS
// threads and q*q doubles then APPLY_ROWS*q floats of dynamic shared memory (48 KiB at q = 64,
// 160 KiB at 128).
//
// Failure is reported, not acted on (as in rsvd_factor.cu): bits ORed into the layer's u32 flag,
// tests written so that NaN raises them.
//
// Version 2: the elimination's working matrix in registers, run by panels of CHOL_ROWS rows
// with a barrier a panel (version 1 kept it in shared memory with a barrier a step, each step a
// chain of shared-memory loads and stores: 19 us at q = 32, 60 at 64 and 242 at 128 on an H200,
// against 11, 23 and 73 now; cuSOLVER's potrf alone takes ~90 at 128); the apply with two rows
// and up to eight columns a thread. Plain f64 FMA on CUDA cores.
#include "common.cuh"

#define GRAM_TILE 32
#define GRAM_ROWS 32
#define GRAM_THREADS 256
// Chunks summed by one block at each of the two levels; MAX_CHUNKS = SUM_GROUP * MAX_GROUPS
// chunks at most (the host sizes partials and tickets for them).
#define SUM_GROUP 8
#define MAX_GROUPS 8
#define MAX_CHUNKS (SUM_GROUP * MAX_GROUPS)
// Rows of the Cholesky's working matrix a warp owns (its register tile is CHOL_ROWS x Q/32 per
// lane), which is also a panel. Four measured faster than eight at every Q (ncu on an H200:
// 11.3 / 23.5 / 73.2 us against 14.2 / 25.5 / 76.9 at Q = 32 / 64 / 128), and sixteen at 128
// took 140; at 128 the 1024 threads' 64 registers spill a few values (ptxas: 84 bytes).
#define CHOL_ROWS 4
#define APPLY_ROWS 64
#define APPLY_THREADS 512

// Pair p of the upper triangle of an nt x nt tile grid, numbered row by row: (0,0), (0,1), ...
__device__ __forceinline__ void pair_tiles(int p, int nt, int* ti, int* tj) {
    int i = 0;
    while (p >= nt - i) {
        p -= nt - i;
        ++i;
    }
    *ti = i;
    *tj = i + p;
}

extern "C" __global__ void __launch_bounds__(GRAM_THREADS)
rsvd_orth_gram(const float* __restrict__ x, int rows, int q, int chunk_rows, int chunks,
               double* __restrict__ partials, unsigned int* tickets, double* __restrict__ g) {
    // Column c of the tile, row r of the staged rows; the +1 keeps the strided reads of xa
    // (one column per lane) on distinct banks.
    __shared__ double xa[GRAM_TILE][GRAM_ROWS + 1];
    __shared__ double xb[GRAM_TILE][GRAM_ROWS + 1];
    const int nt = ceil_div(q, GRAM_TILE);
    const int pair = blockIdx.x, chunk = blockIdx.y, pairs = gridDim.x;
    int ti, tj;
    pair_tiles(pair, nt, &ti, &tj);
    const int ca = ti * GRAM_TILE, cb = tj * GRAM_TILE;
    // Thread t owns tile entries (i, jg + 8k), k = 0..3: a warp shares jg, so xb is a broadcast.
    const int t = threadIdx.x, i = t % GRAM_TILE, jg = t / GRAM_TILE;
    double acc[4] = {0.0, 0.0, 0.0, 0.0};
    const int r_begin = chunk * chunk_rows;
    const int r_end = min(rows, r_begin + chunk_rows);
    // Thread t stages row r0 + i of columns jg + 8u, u = 0..3, of both tiles (a warp reads 32
    // consecutive rows of one column), loaded one step ahead into registers so that the loads
    // for the next 32 rows wait while this step's products run.
    static_assert(GRAM_ROWS == GRAM_TILE && GRAM_TILE * GRAM_ROWS == 4 * GRAM_THREADS, "staging split");
    float na[4], nb[4];
    auto fetch = [&](int r0) {
        const bool in_rows = r0 + i < r_end;
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int c = jg + 8 * u;
            na[u] = (in_rows && ca + c < q) ? x[(r0 + i) + (i64)(ca + c) * rows] : 0.0f;
            nb[u] = (in_rows && cb + c < q) ? x[(r0 + i) + (i64)(cb + c) * rows] : 0.0f;
        }
    };
    if (r_begin < r_end) fetch(r_begin);
    for (int r0 = r_begin; r0 < r_end; r0 += GRAM_ROWS) {
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            xa[jg + 8 * u][i] = (double)na[u];
            xb[jg + 8 * u][i] = (double)nb[u];
        }
        __syncthreads();
        if (r0 + GRAM_ROWS < r_end) fetch(r0 + GRAM_ROWS);
#pragma unroll 8
        for (int r = 0; r < GRAM_ROWS; ++r) {
            const double a = xa[i][r];
#pragma unroll
            for (int k = 0; k < 4; ++k) acc[k] = fma(a, xb[jg + 8 * k][r], acc[k]);
        }
        __syncthreads();
    }
    const i64 tile = GRAM_TILE * GRAM_TILE;
    double* mine = partials + ((i64)chunk * pairs + pair) * tile;
#pragma unroll
    for (int k = 0; k < 4; ++k) mine[i + GRAM_TILE * (jg + 8 * k)] = acc[k];

    // Publish the partial, then take the group's ticket: the block that draws the group's last
    // one sums the group's partials in chunk order into a group partial, and the last of those
    // (a second ticket per pair) sums the group partials in group order into G. Two levels of at
    // most SUM_GROUP loads an entry, all in flight at once: a single level over all chunks waited
    // on L2 latency once per SUM_GROUP chunks.
    const int groups = ceil_div(chunks, SUM_GROUP), group = chunk / SUM_GROUP;
    const int first = group * SUM_GROUP, count = min(SUM_GROUP, chunks - first);
    if (!last_to_arrive(tickets + pair * MAX_GROUPS + group, count)) return;
    // Sum of `n` (≤ SUM_GROUP) runs of this thread's four entries, `stride` doubles apart, in order.
    auto sum_runs = [&](const double* base, int n, i64 stride, double (&out)[4]) {
        double v[SUM_GROUP][4];
#pragma unroll
        for (int u = 0; u < SUM_GROUP; ++u)
#pragma unroll
            for (int k = 0; k < 4; ++k) v[u][k] = __ldcg(base + (i64)min(u, n - 1) * stride + GRAM_TILE * 8 * k);
#pragma unroll
        for (int k = 0; k < 4; ++k) out[k] = 0.0;
#pragma unroll
        for (int u = 0; u < SUM_GROUP; ++u)
#pragma unroll
            for (int k = 0; k < 4; ++k)
                if (u < n) out[k] += v[u][k];
    };
    const i64 entry = i + GRAM_TILE * jg;
    double s[4];
    sum_runs(partials + ((i64)first * pairs + pair) * tile + entry, count, (i64)pairs * tile, s);
    if (groups > 1) {
        double* group_partials = partials + (i64)MAX_CHUNKS * pairs * tile;
#pragma unroll
        for (int k = 0; k < 4; ++k) group_partials[((i64)group * pairs + pair) * tile + entry + GRAM_TILE * 8 * k] = s[k];
        if (!last_to_arrive(tickets + pairs * MAX_GROUPS + pair, groups)) return;
        sum_runs(group_partials + (i64)pair * tile + entry, groups, (i64)pairs * tile, s);
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const int j = jg + 8 * k;
        const int gi = ca + i, gj = cb + j;
        if (gi < q && gj < q) {
            g[gi + (i64)gj * q] = s[k];
            g[gj + (i64)gi * q] = s[k];
        }
    }
}

// The pivots' record in shared memory: R's diagonal, its reciprocals, the pivots' reciprocals,
// and whether a pivot was not > 0.
struct Pivots {
    double* rdiag;
    double* rdiag_inv;
    double* pivot_inv;
    int* failed;
    // Pivot k's owner derives r_k, 1 / r_k and 1 / d_k from one reciprocal square root (within
    // 1 ulp in CUDA's double rsqrt; the products add a rounding or two, ~1e-16 relative, far
    // inside what the checks and tests allow) rather than a square root and two divisions. A
    // pivot that is not > 0 marks the failure and continues as d = 1 (the values are replaced
    // by I at the end).
    __device__ __forceinline__ void set(int k, double d) const {
        const bool ok = d > 0.0;
        const double dk = ok ? d : 1.0;
        const double rsq = rsqrt(dk);
        rdiag[k] = dk * rsq;
        rdiag_inv[k] = rsq;
        pivot_inv[k] = rsq * rsq;
        if (!ok) *failed = 1;
    }
};

// Panel steps k = row0 .. row0 + CHOL_ROWS − 1 on the warp's own rows (the panel), then the rows
// published into `panel`. V is the tile column holding the panel's columns, a template
// parameter so that the tile is indexed by constants only (an index known at run time moves the
// whole tile to local memory) and only the diagonal's column is touched, not selected over.
template <int Q, int V>
__device__ __forceinline__ void own_panel(double (&a)[CHOL_ROWS][Q / 32], double* panel, int row0, int lane,
                                          const Pivots& pv) {
    constexpr int COLS = Q / 32;
#pragma unroll
    for (int kl = 0; kl < CHOL_ROWS; ++kl) {
        const int k = row0 + kl;
        const double x = a[kl][V];  // this lane's entry of row k among the panel's columns
        const double d = __shfl_sync(0xffffffffu, x, k % 32);
        if (lane == 0) pv.set(k, d);
        const double rsq = rsqrt(d > 0.0 ? d : 1.0), inv_d = rsq * rsq;  // = pivot_inv[k]
        // Column k (lane k % 32, tile column V) is E's column k below the pivot: −m_i replaces
        // the update there (the pivot row's entry at column k counts as 0).
        const bool diagonal = lane == k % 32;
#pragma unroll
        for (int u = kl + 1; u < CHOL_ROWS; ++u) {
            const double m = __shfl_sync(0xffffffffu, x, (row0 + u) % 32) * inv_d;
#pragma unroll
            for (int v = 0; v < COLS; ++v)
                a[u][v] = v == V && diagonal ? -m : fma(-m, a[kl][v], a[u][v]);
        }
    }
#pragma unroll
    for (int kl = 0; kl < CHOL_ROWS; ++kl)
#pragma unroll
        for (int v = 0; v < COLS; ++v)
            panel[kl * Q + lane + 32 * v] = v == V && lane == (row0 + kl) % 32 ? 0.0 : a[kl][v];
}

// Panel p's steps (published in `panel`) on a later warp's rows; V as above.
template <int Q, int V>
__device__ __forceinline__ void apply_panel(double (&a)[CHOL_ROWS][Q / 32], const double* panel, int p, int row0,
                                            int lane, const double* pivot_inv) {
    constexpr int COLS = Q / 32;
#pragma unroll 1  // unrolled, the loads for later steps would compete for the tile's registers
    for (int kl = 0; kl < CHOL_ROWS; ++kl) {
        const int k = CHOL_ROWS * p + kl;
        const double* c = panel + kl * Q;
        const double inv_d = pivot_inv[k];
        double m[CHOL_ROWS], cj[COLS];
#pragma unroll
        for (int u = 0; u < CHOL_ROWS; ++u) m[u] = c[row0 + u] * inv_d;
#pragma unroll
        for (int v = 0; v < COLS; ++v) cj[v] = c[lane + 32 * v];
#pragma unroll
        for (int u = 0; u < CHOL_ROWS; ++u)
#pragma unroll
            for (int v = 0; v < COLS; ++v) a[u][v] = fma(-m[u], cj[v], a[u][v]);
        if (lane == k % 32)
#pragma unroll
            for (int u = 0; u < CHOL_ROWS; ++u) a[u][V] = -m[u];
    }
}

// Dispatch on the run-time tile column v (< Q/32) to the instance for it.
template <int Q, int V = 0>
__device__ __forceinline__ void own_panel_at(int v, double (&a)[CHOL_ROWS][Q / 32], double* panel, int row0, int lane,
                                             const Pivots& pv) {
    if constexpr (V < Q / 32) {
        if (v == V) own_panel<Q, V>(a, panel, row0, lane, pv);
        else own_panel_at<Q, V + 1>(v, a, panel, row0, lane, pv);
    }
}
template <int Q, int V = 0>
__device__ __forceinline__ void apply_panel_at(int v, double (&a)[CHOL_ROWS][Q / 32], const double* panel, int p,
                                               int row0, int lane, const double* pivot_inv) {
    if constexpr (V < Q / 32) {
        if (v == V) apply_panel<Q, V>(a, panel, p, row0, lane, pivot_inv);
        else apply_panel_at<Q, V + 1>(v, a, panel, p, row0, lane, pivot_inv);
    }
}

// The elimination of rsvd_orth_chol_inv_<Q> on a register tile: warp w owns rows
// [CHOL_ROWS*w, CHOL_ROWS*(w + 1)) of the Q x Q working matrix and lane l its columns l + 32v
// (v < Q/32), so a step costs each thread CHOL_ROWS * Q/32 FMAs on registers and a few
// broadcast reads of a published pivot row.
template <int Q>
__device__ __forceinline__ void chol_inv(double* g, int q, float* __restrict__ r32, double* __restrict__ rinv,
                                         unsigned int* flag, unsigned int chol_bit, unsigned int gram_bit,
                                         double gram_tol) {
    constexpr int COLS = Q / 32, WARPS = Q / CHOL_ROWS, LD = Q + 1;
    static_assert(Q % 32 == 0 && Q % CHOL_ROWS == 0 && 32 % CHOL_ROWS == 0, "tile");
    // s stages G in and R / E out ((i, j) at s[i + j*LD]: the odd leading dimension keeps a
    // row's strided reads, one element per lane, off each other's banks).
    extern __shared__ double sh[];
    double* s = sh;
    double* rdiag = s + Q * LD;          // Q: R's diagonal
    double* rdiag_inv = rdiag + Q;       // Q: its reciprocals
    double* pivot_inv = rdiag_inv + Q;   // Q: 1 / the pivots
    double* published = s;               // 2 x CHOL_ROWS x Q: a panel's rows, by panel parity, while s is free
    __shared__ double warp_sum[WARPS];
    __shared__ int failed;
    const int t = threadIdx.x, lane = t % 32, warp = t / 32, row0 = CHOL_ROWS * warp;
    if (t == 0) failed = 0;

    // G padded to Q x Q with I: a padded pivot is 1 and its row and column are zero, so the
    // steps before q leave the padding alone and R, R⁻¹ are G's padded with I.
    double sum = 0.0;
#pragma unroll
    for (int n = 0; n < Q / WARPS; ++n) {
        const int j = warp + n * WARPS;
#pragma unroll
        for (int i0 = 0; i0 < Q; i0 += 32) {
            const int i = i0 + lane;
            const double id = i == j ? 1.0 : 0.0;
            const double v = i < q && j < q ? g[i + (i64)j * q] : id;
            s[i + j * LD] = v;
            sum += (v - id) * (v - id);  // NaN and inf stay in the sum
        }
    }
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, o);
    if (lane == 0) warp_sum[warp] = sum;
    __syncthreads();  // also: failed is cleared before any pivot can set it
    if (t == 0 && gram_bit != 0) {
        double total = 0.0;
        for (int w = 0; w < WARPS; ++w) total += warp_sum[w];
        if (!(sqrt(total) < gram_tol)) atomicOr(flag, gram_bit);
    }

    // Cholesky as elimination: G = L D Lᵀ, R = D^½ Lᵀ, and R⁻¹ = L⁻ᵀ D^-½ with E = L⁻¹ built
    // by the same row operations applied to I. The tile holds U = D Lᵀ in its upper triangle
    // (diagonal: the pivots) and E in its strict lower one. Step k's pivot row is
    //   c_j = E_kj (j < k),  0 (j = k),  U_kj (j > k),
    // and with the multipliers m_i = U_ki / d_k every row i > k takes a −= m_i c_j:
    //   upper, k < i <= j:   U_ij −= m_i U_kj        (the trailing Schur complement)
    //   lower, j < k < i:    E_ij −= m_i E_kj        (row i of E minus m_i times row k)
    //   lower, j = k < i:    E_ik = −m_i             (set after the update: E's column k starts here)
    //   lower, k < j < i:    no meaning yet; column j's step sets it before anything reads it
    // so no entry needs a test of which triangle it is in.
    // The steps go by panels of CHOL_ROWS rows, warp p's: warp p runs the panel's steps on its
    // own rows by itself (the pivot row and multipliers come by shuffles, no barrier; its rows
    // have taken every earlier panel by then) and publishes the rows; after the barrier every
    // warp below applies the panel's steps to its rows from the published ones. Each entry sees
    // the same operations in the same order as step by step, with one barrier a panel instead
    // of one a step (a step's barrier and pivot chain cost ~900 cycles on an H200, against ~100
    // of FMAs).
    double a[CHOL_ROWS][COLS];
#pragma unroll
    for (int u = 0; u < CHOL_ROWS; ++u)
#pragma unroll
        for (int v = 0; v < COLS; ++v) {
            const int i = row0 + u, j = lane + 32 * v;
            a[u][v] = i <= j ? s[i + j * LD] : 0.0;
        }
    __syncthreads();  // s is read: the panels may take it
    // A panel's CHOL_ROWS columns lie in one tile column, CHOL_ROWS*p / 32.
    const Pivots pv{rdiag, rdiag_inv, pivot_inv, &failed};
    for (int p = 0; p < ceil_div(q, CHOL_ROWS); ++p) {
        double* panel = published + (p & 1) * CHOL_ROWS * Q;  // row kl at panel[kl*Q ..]
        if (warp == p) own_panel_at<Q>(row0 / 32, a, panel, row0, lane, pv);
        __syncthreads();
        if (warp > p) apply_panel_at<Q>(CHOL_ROWS * p / 32, a, panel, p, row0, lane, pivot_inv);
    }

    // R's rows are U's scaled by 1 / r_i; E stays. Into s (once the last panel is read) for the
    // checks and the coalesced writes below.
    __syncthreads();
#pragma unroll
    for (int u = 0; u < CHOL_ROWS; ++u)
#pragma unroll
        for (int v = 0; v < COLS; ++v) {
            const int i = row0 + u, j = lane + 32 * v;
            if (i < q && j < q) s[i + j * LD] = i < j ? a[u][v] * rdiag_inv[i] : i == j ? rdiag[i] : a[u][v];
        }
    __syncthreads();

    // R⁻¹ = Eᵀ D^-½: W[c][i] = E[i][c] / r_i for c < i, W[i][i] = 1 / r_i. Everything written
    // must be usable: finite R (also in f32), finite R⁻¹, and an f32 diagonal > 0 (the core
    // inverts R = R₂ R₁ made of these f32 factors).
    if (!failed) {
        for (int j = warp; j < q; j += WARPS) {
            for (int i = lane; i <= j; i += 32) {
                const double r = s[i + j * LD];
                const float r_f = (float)r;
                const double w = i == j ? rdiag_inv[j] : s[j + i * LD] * rdiag_inv[j];
                const bool good = (r - r) == 0.0 && (r_f - r_f) == 0.0f && (w - w) == 0.0 && (i != j || r_f > 0.0f);
                if (!good) failed = 1;  // every writer stores the same value
            }
        }
        __syncthreads();
    }
    if (t == 0 && failed) atomicOr(flag, chol_bit);

    for (int j = warp; j < q; j += WARPS) {
        for (int i = lane; i < q; i += 32) {
            double r = i == j ? 1.0 : 0.0, w = r;
            if (!failed && i <= j) {
                r = s[i + j * LD];
                w = i == j ? rdiag_inv[j] : s[j + i * LD] * rdiag_inv[j];
            }
            const i64 idx = i + (i64)j * q;
            g[idx] = r;
            r32[idx] = (float)r;
            rinv[idx] = w;
        }
    }
}

#define CHOL_INV(Q)                                                                                           \
    extern "C" __global__ void __launch_bounds__(32 * (Q) / CHOL_ROWS)                                     \
    rsvd_orth_chol_inv_##Q(double* g, int q, float* __restrict__ r32, double* __restrict__ rinv,               \
                           unsigned int* flag, unsigned int chol_bit, unsigned int gram_bit, double gram_tol) { \
        chol_inv<Q>(g, q, r32, rinv, flag, chol_bit, gram_bit, gram_tol);                       \
    }
CHOL_INV(32)
CHOL_INV(64)
CHOL_INV(128)

// X ← X R⁻¹ for q <= 16*NC: a block of APPLY_THREADS owns APPLY_ROWS rows and every column, so
// it reads its rows of X before it writes any (in place). Thread (warp w, lane l) computes rows
// l and l + 32 of the chunk in columns w + 16c, c < NC: each R⁻¹ read from shared memory is a
// broadcast that feeds 64 FMAs and each X read NC (a thread a row and four columns, as version 1
// did, left the loop bound by shared-memory reads: 17 us at 4096 x 128, 44 us at 11008 x 128).
template <int NC>
__device__ __forceinline__ void apply(float* x, int rows, int q, const double* __restrict__ rinv) {
    constexpr int WARPS = APPLY_THREADS / 32;
    static_assert(APPLY_ROWS == 64, "two rows a lane");
    // R⁻¹ as in global memory ((l, j) at l + j*q), then the chunk of X ((r, l) at r + l*APPLY_ROWS).
    extern __shared__ double ws[];
    float* xs = (float*)(ws + q * q);
    const int t = threadIdx.x, lane = t % 32, w = t / 32;
    // Loads go out in batches of STAGE before any is stored: a plain loop waits on L2 once per
    // element.
    constexpr int STAGE = 8;
    const int n = q * q;
    for (int e0 = t; e0 < n; e0 += STAGE * APPLY_THREADS) {  // read after the loop's barriers
        double v[STAGE];
#pragma unroll
        for (int u = 0; u < STAGE; ++u) {
            const int e = e0 + u * APPLY_THREADS;
            v[u] = e < n ? rinv[e] : 0.0;
        }
#pragma unroll
        for (int u = 0; u < STAGE; ++u)
            if (e0 + u * APPLY_THREADS < n) ws[e0 + u * APPLY_THREADS] = v[u];
    }
    int col[NC];  // this thread's columns, clamped for reads (writes skip the clamped ones)
#pragma unroll
    for (int c = 0; c < NC; ++c) col[c] = min(w + WARPS * c, q - 1);
    for (int r0 = blockIdx.x * APPLY_ROWS; r0 < rows; r0 += gridDim.x * APPLY_ROWS) {
        const int nr = min(APPLY_ROWS, rows - r0);
        __syncthreads();  // the previous chunk's reads of xs are done
        // Warp w stages columns w + WARPS*u, its lanes rows lane and lane + 32 (coalesced).
        for (int l0 = w; l0 < q; l0 += (STAGE / 2) * WARPS) {
            float v[STAGE];
#pragma unroll
            for (int u = 0; u < STAGE; ++u) {
                const int l = l0 + (u / 2) * WARPS, r = lane + 32 * (u % 2);
                v[u] = l < q && r < nr ? x[r0 + r + (i64)l * rows] : 0.0f;
            }
#pragma unroll
            for (int u = 0; u < STAGE; ++u) {
                const int l = l0 + (u / 2) * WARPS, r = lane + 32 * (u % 2);
                if (l < q) xs[r + l * APPLY_ROWS] = v[u];
            }
        }
        __syncthreads();
        // R⁻¹ is upper: column j takes rows l <= j only. The thread's columns grow with c, so
        // l runs in segments, segment c ending at column c, after which c drops out.
        double acc[2][NC];
#pragma unroll
        for (int c = 0; c < NC; ++c) acc[0][c] = acc[1][c] = 0.0;
        int l = 0;
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            const int end = min(q, w + WARPS * c + 1);
#pragma unroll 2
            for (; l < end; ++l) {
                const double x0 = xs[lane + l * APPLY_ROWS], x1 = xs[lane + 32 + l * APPLY_ROWS];
#pragma unroll
                for (int cc = c; cc < NC; ++cc) {
                    const double wv = ws[l + col[cc] * q];
                    acc[0][cc] = fma(x0, wv, acc[0][cc]);
                    acc[1][cc] = fma(x1, wv, acc[1][cc]);
                }
            }
        }
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            const int j = w + WARPS * c;
#pragma unroll
            for (int h = 0; h < 2; ++h)
                if (j < q && lane + 32 * h < nr) x[r0 + lane + 32 * h + (i64)j * rows] = (float)acc[h][c];
        }
    }
}

#define APPLY(Q)                                                                                   \
    extern "C" __global__ void __launch_bounds__(APPLY_THREADS)                                    \
    rsvd_orth_apply_##Q(float* x, int rows, int q, const double* __restrict__ rinv) {              \
        apply<(Q) / (APPLY_THREADS / 32)>(x, rows, q, rinv);                                       \
    }
APPLY(32)
APPLY(64)
APPLY(128)
