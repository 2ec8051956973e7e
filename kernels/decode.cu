// The kernels of incremental decoding on the device (host side:
// crates/loraga-core/src/cuda/decode.rs; the CPU reference is crates/loraga-core/src/model/kv_cache.rs):
//
//   kv_store_<T>:         Kc[rows[t], :] = k[t, :],  Vc[rows[t], :] = v[t, :]      for t < tokens
//       The keys (after RoPE) and values of the new tokens go to their cache rows.
//   decode_attention_<T>: o[t, h, :] = sum_{j <= pos} softmax_j(q[t, h, :] . Kc[first + j, g, :] * scale)
//                                      Vc[first + j, g, :]
//       with pos = rows[t] % capacity (the token's position in its slot), first = rows[t] - pos
//       (the slot's position 0) and g = h / (heads / kv_heads), the key/value head of query head h.
//   argmax_rows_<T>:      out[r] = the first j with x[r, j] = max_j x[r, j], or 0xffffffff when
//       the row holds a NaN or an infinity (the host reports that as an error).
//
// Layouts, row-major, T = f32 or bf16: q and o [tokens, heads * d]; k, v [tokens, kv_heads * d];
// the cache Kc, Vc [slots * capacity, kv_heads * d] (row slot * capacity + position, one such
// buffer per layer); rows [tokens] u32 = slot * capacity + position, each < slots * capacity and
// distinct (checked on the host), which also says which earlier rows a token sees. x [rows, vocab].
//
// decode_attention: one block per (token, query head), THREADS threads. The keys are taken in
// chunks of CHUNK: each warp scores one key at a time with its lanes across d (coalesced reads of
// a key row), the scores wait in shared memory, and an online softmax (running max m and
// normaliser l, as softmax.cuh) rescales the output accumulated so far; thread e < d accumulates
// output element e over the chunk's values (coalesced across threads). So any number of cached
// positions fits in fixed shared memory. All arithmetic is f32; the output is rounded to T once.
// The new tokens' keys must be stored (kv_store) before this runs: a token of a prompt sees the
// tokens before it in the same call.
//
// Version 1: scalar loads; d <= MAX_D (checked on the host).
#include "common.cuh"
#include "softmax.cuh"

#define THREADS 256
#define CHUNK 256
#define MAX_D 256

template <typename T>
__device__ void kv_store(const T* __restrict__ k, const T* __restrict__ v, T* kc, T* vc,
                         const unsigned int* __restrict__ rows, i64 tokens, int width) {
    const i64 n = tokens * width;
    for (i64 i = (i64)blockIdx.x * THREADS + threadIdx.x; i < n; i += (i64)gridDim.x * THREADS) {
        const i64 t = i / width, e = i % width;
        const i64 dst = (i64)rows[t] * width + e;
        kc[dst] = k[i];
        vc[dst] = v[i];
    }
}

template <typename T>
__device__ void decode_attention(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
                                 T* __restrict__ o, const unsigned int* __restrict__ rows, int heads,
                                 int kv_heads, int d, int capacity, float scale) {
    __shared__ float qs[MAX_D];
    __shared__ float p[CHUNK];
    const i64 t = blockIdx.x / heads;
    const int h = blockIdx.x % heads;
    const unsigned int row = rows[t];
    const int pos = (int)(row % (unsigned int)capacity);
    const i64 first = (i64)row - pos;
    const i64 kvw = (i64)kv_heads * d;
    const i64 col = (i64)(h / (heads / kv_heads)) * d;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

    for (int e = threadIdx.x; e < d; e += THREADS) qs[e] = to_f32(q[(t * heads + h) * d + e]);
    __syncthreads();

    float m = neg_inf(), l = 0.0f, acc = 0.0f;
    for (int c0 = 0; c0 <= pos; c0 += CHUNK) {
        const int n = min(CHUNK, pos + 1 - c0);
        for (int j = warp; j < n; j += THREADS / 32) {
            const T* key = kc + (first + c0 + j) * kvw + col;
            float s = 0.0f;
            for (int e = lane; e < d; e += 32) s += qs[e] * to_f32(key[e]);
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(FULL_MASK, s, off);
            if (lane == 0) p[j] = s * scale;
        }
        __syncthreads();
        MaxSum st = maxsum_empty();
        for (int j = threadIdx.x; j < n; j += THREADS) maxsum_add(st, p[j]);
        st = block_maxsum(st);  // ends with a barrier: every score has been read
        const float m_new = fmaxf(m, st.m);
        // exp(-inf) = 0 on the first chunk, when nothing has been accumulated yet.
        const float old = m == neg_inf() ? 0.0f : expf(m - m_new);
        l = l * old + st.s * expf(st.m - m_new);
        for (int j = threadIdx.x; j < n; j += THREADS) p[j] = expf(p[j] - m_new);
        __syncthreads();
        if (threadIdx.x < d) {
            const T* val = vc + (first + c0) * kvw + col + threadIdx.x;
            float a = 0.0f;
            for (int j = 0; j < n; ++j) a += p[j] * to_f32(val[j * kvw]);
            acc = acc * old + a;
        }
        m = m_new;
        __syncthreads();  // the next chunk overwrites p
    }
    if (threadIdx.x < d) o[(t * heads + h) * d + threadIdx.x] = from_f32<T>(acc / l);
}

// One block per row: each thread keeps the first index of its largest value, then the block
// merges (larger value wins, the smaller index on ties).
template <typename T>
__device__ void argmax_rows(const T* __restrict__ x, unsigned int* __restrict__ out, int vocab) {
    __shared__ float best_v[THREADS];
    __shared__ int best_j[THREADS];
    __shared__ int bad;
    if (threadIdx.x == 0) bad = 0;
    __syncthreads();
    const T* row = x + (i64)blockIdx.x * vocab;
    float bv = neg_inf();
    int bj = -1;
    for (int j = threadIdx.x; j < vocab; j += THREADS) {
        const float v = to_f32(row[j]);
        if (!isfinite(v)) bad = 1;
        else if (bj < 0 || v > bv) {
            bv = v;
            bj = j;
        }
    }
    best_v[threadIdx.x] = bv;
    best_j[threadIdx.x] = bj;
    __syncthreads();
    for (int half = THREADS / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) {
            const float ov = best_v[threadIdx.x + half];
            const int oj = best_j[threadIdx.x + half];
            const int mj = best_j[threadIdx.x];
            if (oj >= 0 && (mj < 0 || ov > best_v[threadIdx.x] || (ov == best_v[threadIdx.x] && oj < mj))) {
                best_v[threadIdx.x] = ov;
                best_j[threadIdx.x] = oj;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = bad ? 0xffffffffu : (unsigned int)best_j[0];
}

// One entry point per storage type T.
extern "C" __global__ void __launch_bounds__(THREADS)
kv_store_f32(const float* k, const float* v, float* kc, float* vc, const unsigned int* rows, i64 tokens, int width) {
    kv_store(k, v, kc, vc, rows, tokens, width);
}
extern "C" __global__ void __launch_bounds__(THREADS)
kv_store_bf16(const bf16* k, const bf16* v, bf16* kc, bf16* vc, const unsigned int* rows, i64 tokens, int width) {
    kv_store(k, v, kc, vc, rows, tokens, width);
}
extern "C" __global__ void __launch_bounds__(THREADS)
decode_attention_f32(const float* q, const float* kc, const float* vc, float* o, const unsigned int* rows,
                     int heads, int kv_heads, int d, int capacity, float scale) {
    decode_attention(q, kc, vc, o, rows, heads, kv_heads, d, capacity, scale);
}
extern "C" __global__ void __launch_bounds__(THREADS)
decode_attention_bf16(const bf16* q, const bf16* kc, const bf16* vc, bf16* o, const unsigned int* rows,
                      int heads, int kv_heads, int d, int capacity, float scale) {
    decode_attention(q, kc, vc, o, rows, heads, kv_heads, d, capacity, scale);
}
extern "C" __global__ void __launch_bounds__(THREADS)
argmax_rows_f32(const float* x, unsigned int* out, int vocab) {
    argmax_rows(x, out, vocab);
}
extern "C" __global__ void __launch_bounds__(THREADS)
argmax_rows_bf16(const bf16* x, unsigned int* out, int vocab) {
    argmax_rows(x, out, vocab);
}
