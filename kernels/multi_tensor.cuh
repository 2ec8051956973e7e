// Multi-tensor launches: one grid covers a list of tensors (every trainable parameter of a
// model), so a step costs one launch instead of one per tensor.
//
// Each tensor is cut into chunks of `chunk` elements and each chunk is one block. The host
// writes one table entry per non-empty tensor, in order, with `first_block`: the index of the
// first block working on it (0 for the first tensor, increasing). Tensor t owns blocks
// [first_block[t], first_block[t + 1]) and block b works on elements
// [(b - first_block) * chunk, min(that + chunk, n)) of its tensor. A block finds its tensor by a
// binary search over the table (log2 of the tensor count, from L1/L2: negligible next to a chunk).
// block_chunk gives a block its entry and element range.
#pragma once
#include "common.cuh"

// The last t with table[t].first_block <= block; `Entry` is any struct with an i64 first_block.
template <typename Entry>
__device__ __forceinline__ int tensor_of_block(const Entry* __restrict__ table, int num, i64 block) {
    int lo = 0, hi = num - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (table[mid].first_block <= block) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

// This block's table entry and element range [start, end) within that entry's tensor.
template <typename Entry>
struct BlockChunk {
    Entry e;
    i64 start, end;
};

template <typename Entry>
__device__ __forceinline__ BlockChunk<Entry> block_chunk(const Entry* __restrict__ table, int num, i64 chunk) {
    const i64 block = blockIdx.x;
    const Entry e = table[tensor_of_block(table, num, block)];
    const i64 start = (block - e.first_block) * chunk;
    return {e, start, min(start + chunk, e.n)};
}
