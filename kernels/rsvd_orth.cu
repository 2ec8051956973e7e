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
//   rsvd_orth_chol_inv(g, q, r32, rinv, flag, chol_bit, gram_bit, gram_tol):
//       One block, G in shared memory (leading dimension q + 1). If gram_bit != 0: flag |=
//       gram_bit unless ||G - I||_F < gram_tol (NaN fails). Then upper Cholesky RᵀR = G in f64
//       as right-looking elimination (one barrier per step) that applies the same row
//       operations to I, giving E = L⁻¹ for G = L D Lᵀ, so R⁻¹ = Eᵀ D^-½ at no extra barrier.
//       Out: g = R (f64), r32 = R rounded to f32, rinv = R⁻¹ (f64), all with zeros below the
//       diagonal. flag |= chol_bit if a pivot is not > 0 (NaN included) or an entry of R, of R
//       in f32 or of R⁻¹ is not finite, or a diagonal of R rounds to an f32 that is not > 0;
//       then R = R⁻¹ = I are written instead, so the following apply leaves X as it was (a
//       NaN's row aside): finite stays finite, and the flagged layer is redone by the
//       host-assisted fallback anyway.
//   rsvd_orth_apply(x, rows, q, rinv):
//       X ← X R⁻¹ in place, f64 accumulation over the f32 X and f64 R⁻¹, rounded to f32 once.
//       Each block stages R⁻¹ (f64 q x q) in shared memory once, then owns 32-row chunks
//       (grid-stride): it stages its chunk of X (all q columns) in shared memory before writing
//       any of it.
//
// Launch: gram with GRAM_THREADS threads and no dynamic shared memory; chol_inv as one block of
// CHOL_THREADS threads with (q*(q + 1) + 3*q) doubles of dynamic shared memory (the host
// computes the largest q that fits the device); apply with APPLY_THREADS threads and q*q
// doubles then APPLY_ROWS*q floats of dynamic shared memory (40 KiB at q = 64).
//
// Failure is reported, not acted on (as in rsvd_factor.cu): bits ORed into the layer's u32 flag,
// tests written so that NaN raises them.
//
// Version 1: plain f64 FMA on CUDA cores; one thread block for the factorisation (q + 4
// barriers: a few microseconds at q = 32, against ~45 us of library launches for the pass).
#include "common.cuh"

#define GRAM_TILE 32
#define GRAM_ROWS 32
#define GRAM_THREADS 256
// Chunks summed by one block at each of the two levels; MAX_CHUNKS = SUM_GROUP * MAX_GROUPS
// chunks at most (the host sizes partials and tickets for them).
#define SUM_GROUP 8
#define MAX_GROUPS 8
#define MAX_CHUNKS (SUM_GROUP * MAX_GROUPS)
// 16 warps: at q <= 64 a warp updates 2 to 4 columns per elimination step, each a chain of
// dependent shared-memory loads and stores; fewer warps would lengthen every step's slowest
// warp, while a barrier costs about the same for 8 or 16 warps.
#define CHOL_THREADS 512
#define APPLY_ROWS 32
#define APPLY_THREADS 256

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

extern "C" __global__ void __launch_bounds__(CHOL_THREADS)
rsvd_orth_chol_inv(double* g, int q, float* __restrict__ r32, double* __restrict__ rinv, unsigned int* flag,
                   unsigned int chol_bit, unsigned int gram_bit, double gram_tol) {
    // s holds G's upper triangle, becoming R, and in its strict lower triangle E = L⁻¹ (see
    // below); element (i, j) at s[i + j*ld]: the odd leading dimension puts the strided reads
    // of a row (one element per lane) on distinct banks. Loops over a q x q matrix give each
    // warp a column and its lanes consecutive rows, so no thread divides indices.
    extern __shared__ double sh[];
    const int ld = q + 1;
    double* s = sh;
    double* rdiag = s + q * ld;     // q: R's diagonal
    double* rdiag_inv = rdiag + q;  // q: its reciprocals
    double* pivot_inv = rdiag_inv + q;  // q: 1 / the pivots
    __shared__ double warp_sum[CHOL_THREADS / 32];
    __shared__ int failed;
    const int t = threadIdx.x, lane = t % 32, warp = t / 32;
    const int warps = CHOL_THREADS / 32;
    // Pivot k is final once written (by the load for k = 0, by step k − 1's update otherwise);
    // its writer derives r_k, 1 / r_k and 1 / d_k at once, off the other threads' path but on
    // the step's: so from one reciprocal square root (within 1 ulp in CUDA's double rsqrt; the
    // products add a rounding or two, ~1e-16 relative, far inside what the checks and tests
    // allow) rather than a square root and two divisions. A pivot that is not > 0 marks the
    // failure and continues as d = 1 (the values are replaced by I below).
    auto pivot = [&](int k, double d) {
        const bool ok = d > 0.0;
        const double dk = ok ? d : 1.0;
        const double rsq = rsqrt(dk);
        rdiag[k] = dk * rsq;
        rdiag_inv[k] = rsq;
        pivot_inv[k] = rsq * rsq;
        if (!ok) failed = 1;
    };
    if (t == 0) failed = 0;
    __syncthreads();  // failed is cleared before any pivot can set it

    double sum = 0.0;
    for (int j = warp; j < q; j += warps) {
        for (int i = lane; i < q; i += 32) {
            const double v = g[i + (i64)j * q];
            s[i + j * ld] = i <= j ? v : 0.0;
            if (i == 0 && j == 0) pivot(0, v);
            const double d = v - (i == j ? 1.0 : 0.0);
            sum += d * d;  // NaN and inf stay in the sum
        }
    }
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, o);
    if (lane == 0) warp_sum[warp] = sum;
    __syncthreads();
    if (t == 0 && gram_bit != 0) {
        double total = 0.0;
        for (int w = 0; w < warps; ++w) total += warp_sum[w];
        if (!(sqrt(total) < gram_tol)) atomicOr(flag, gram_bit);
    }

    // Cholesky as elimination: G = L D Lᵀ, R = D^½ Lᵀ, and R⁻¹ = L⁻ᵀ D^-½ with E = L⁻¹ built by
    // the same row operations applied to I. Step k, with d = the pivot and multipliers
    // m_i = s[k][i] / d (i > k, from row k as yet unscaled):
    //   trailing upper triangle, k < i <= j:  s[i][j] −= m_j s[k][i]   (= r_ki r_kj)
    //   E, rows i > k, columns c <= k:        E[i][c] −= m_i E[k][c]   (E[k][k] = 1)
    //   row k − 1, which no one reads any more, scaled to R's row: ÷ r_{k−1}
    // all disjoint, so one barrier per step.
    for (int k = 0; k < q; ++k) {
        const double inv_d = pivot_inv[k];
        for (int col = warp; col < q; col += warps) {
            if (col > k) {
                const double m = s[k + col * ld] * inv_d;
                for (int i = k + 1 + lane; i <= col; i += 32) {
                    const double v = s[i + col * ld] - s[k + i * ld] * m;
                    s[i + col * ld] = v;
                    if (i == k + 1 && col == k + 1) pivot(k + 1, v);
                }
            } else {
                const double e = col == k ? 1.0 : s[k + col * ld];
                for (int i = k + 1 + lane; i < q; i += 32) s[i + col * ld] -= s[k + i * ld] * inv_d * e;
            }
        }
        if (k > 0) {
            const double r_prev = rdiag[k - 1], inv_prev = rdiag_inv[k - 1];
            for (int j = k - 1 + t; j < q; j += CHOL_THREADS) {
                double* e = &s[(k - 1) + j * ld];
                *e = j == k - 1 ? r_prev : *e * inv_prev;
            }
        }
        __syncthreads();
    }
    if (t == 0) s[(q - 1) + (q - 1) * ld] = rdiag[q - 1];  // the last row is its diagonal alone
    __syncthreads();

    // R⁻¹ = Eᵀ D^-½: W[c][i] = E[i][c] / r_i for c < i, W[i][i] = 1 / r_i. Everything written
    // must be usable: finite R (also in f32), finite R⁻¹, and an f32 diagonal > 0 (the core
    // inverts R = R₂ R₁ made of these f32 factors).
    if (!failed) {
        for (int j = warp; j < q; j += warps) {
            for (int i = lane; i <= j; i += 32) {
                const double r = i == j ? rdiag[i] : s[i + j * ld];
                const float r_f = (float)r;
                const double w = i == j ? rdiag_inv[j] : s[j + i * ld] * rdiag_inv[j];
                const bool good = (r - r) == 0.0 && (r_f - r_f) == 0.0f && (w - w) == 0.0 && (i != j || r_f > 0.0f);
                if (!good) failed = 1;  // every writer stores the same value
            }
        }
        __syncthreads();
    }
    if (t == 0 && failed) atomicOr(flag, chol_bit);

    for (int j = warp; j < q; j += warps) {
        for (int i = lane; i < q; i += 32) {
            double r = i == j ? 1.0 : 0.0, w = r;
            if (!failed && i <= j) {
                r = i == j ? rdiag[i] : s[i + j * ld];
                w = i == j ? rdiag_inv[j] : s[j + i * ld] * rdiag_inv[j];
            }
            const i64 idx = i + (i64)j * q;
            g[idx] = r;
            r32[idx] = (float)r;
            rinv[idx] = w;
        }
    }
}

extern "C" __global__ void __launch_bounds__(APPLY_THREADS)
rsvd_orth_apply(float* x, int rows, int q, const double* __restrict__ rinv) {
    // R⁻¹ staged once per block ((l, j) at l + j*q, as in global memory): the FMA loop reads it
    // at shared-memory latency instead of waiting on L1/L2 for every l. Then the chunk of X:
    // (r, l) at r + l*APPLY_ROWS.
    extern __shared__ double ws[];
    float* xs = (float*)(ws + q * q);
    // Thread t owns row r of the chunk and columns jb + g + 8k, k = 0..3, of each 32-column
    // block: a warp shares g, so its R⁻¹ reads are one broadcast.
    const int t = threadIdx.x, r = t % APPLY_ROWS, g = t / APPLY_ROWS;
    for (int e = t; e < q * q; e += APPLY_THREADS) ws[e] = rinv[e];  // read after the loop's barriers
    for (int r0 = blockIdx.x * APPLY_ROWS; r0 < rows; r0 += gridDim.x * APPLY_ROWS) {
        const int nr = min(APPLY_ROWS, rows - r0);
        __syncthreads();  // the previous chunk's reads of xs are done
        for (int e = t; e < APPLY_ROWS * q; e += APPLY_THREADS) {
            const int rr = e % APPLY_ROWS, l = e / APPLY_ROWS;
            xs[e] = rr < nr ? x[r0 + rr + (i64)l * rows] : 0.0f;
        }
        __syncthreads();
        for (int jb = 0; jb < q; jb += 32) {
            int col[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) col[k] = min(jb + g + 8 * k, q - 1);  // clamped reads, skipped writes
            double acc[4] = {0.0, 0.0, 0.0, 0.0};
            const int l_end = min(q, jb + 32);  // R⁻¹ is upper: rows l > j contribute zero
            for (int l = 0; l < l_end; ++l) {
                const double xv = (double)xs[r + l * APPLY_ROWS];
                const double* wl = ws + l;
#pragma unroll
                for (int k = 0; k < 4; ++k) acc[k] = fma(xv, wl[col[k] * q], acc[k]);
            }
            if (r < nr) {
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    const int j = jb + g + 8 * k;
                    if (j < q) x[r0 + r + (i64)j * rows] = (float)acc[k];
                }
            }
        }
    }
}
