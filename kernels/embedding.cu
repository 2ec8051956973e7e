// Embedding lookup of the autograd tape (host side: crates/loraga-core/src/cuda/ops/embedding.rs):
//
//   forward:  out[r, j] = table[ids[r], j]
//   backward: dtable[v, j] = sum over rows r with ids[r] == v of dy[r, j]   (a scatter-add)
//
// Layouts: table [vocab, dim] and out, dy [rows, dim] row-major in <t> (f32 or bf16); ids [rows]
// u32, each < vocab (checked on the host before the upload); dtable [vocab, dim] f32, zeroed by
// the host before the backward (the gradient of a table is kept in f32 whatever its type).
//
//   embedding_fwd_<t>: block b copies rows b, b + gridDim.x, ...; its threads stride the columns
//                      (coalesced reads and writes of whole rows).
//   embedding_bwd_<t>: the same walk over dy, each element added into dtable with an f32
//                      atomicAdd. A token that appears several times gets its rows summed in
//                      whatever order the atomics land, so the result can differ from run to run
//                      in the last bits (f32 addition is not associative); rows of distinct
//                      tokens never collide.
//
// Version 1 (the only one). Scalar loads.
#include "common.cuh"

#define THREADS 256

template <typename T>
__device__ void embedding_fwd(const T* __restrict__ table, const unsigned int* __restrict__ ids, T* __restrict__ out,
                              i64 rows, int dim) {
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* src = table + (i64)ids[r] * dim;
        T* dst = out + r * dim;
        for (int j = threadIdx.x; j < dim; j += THREADS) dst[j] = src[j];
    }
}

template <typename T>
__device__ void embedding_bwd(const T* __restrict__ dy, const unsigned int* __restrict__ ids, float* dtable, i64 rows,
                              int dim) {
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* src = dy + r * dim;
        float* dst = dtable + (i64)ids[r] * dim;
        for (int j = threadIdx.x; j < dim; j += THREADS) atomicAdd(dst + j, to_f32(src[j]));
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
embedding_fwd_f32(const float* table, const unsigned int* ids, float* out, i64 rows, int dim) {
    embedding_fwd(table, ids, out, rows, dim);
}
extern "C" __global__ void __launch_bounds__(THREADS)
embedding_fwd_bf16(const bf16* table, const unsigned int* ids, bf16* out, i64 rows, int dim) {
    embedding_fwd(table, ids, out, rows, dim);
}
extern "C" __global__ void __launch_bounds__(THREADS)
embedding_bwd_f32(const float* dy, const unsigned int* ids, float* dtable, i64 rows, int dim) {
    embedding_bwd(dy, ids, dtable, rows, dim);
}
extern "C" __global__ void __launch_bounds__(THREADS)
embedding_bwd_bf16(const bf16* dy, const unsigned int* ids, float* dtable, i64 rows, int dim) {
    embedding_bwd(dy, ids, dtable, rows, dim);
}
