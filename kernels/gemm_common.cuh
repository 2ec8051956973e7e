// Shared by the GEMM engines (gemm_sm90.cu, gemm_sm80.cu): the grouped order of output tiles and
// the register epilogue.
#pragma once
#include "common.cuh"

// Tile t of the grouped order -> (tile row, tile column): group_m tile-rows at a time, walked down
// the columns, so that tiles running at the same time share A and B panels in L2.
__device__ __forceinline__ void tile_coords(int t, int tiles_m, int tiles_n, int group_m, int& tm, int& tn) {
    int per_group = group_m * tiles_n;
    int first_m = (t / per_group) * group_m;
    int rows = min(tiles_m - first_m, group_m);
    int in_group = t % per_group;
    tm = first_m + in_group % rows;
    tn = in_group / rows;
}

// Two adjacent output columns of one row, C[r, c..c+1] = alpha * v + beta * C, guarded against the
// ragged edges of M and N. beta == 0 never reads C (BLAS semantics), so a C full of NaN is
// overwritten.
template <typename Tout>
__device__ __forceinline__ void store_pair(Tout* C, int M, int N, i64 ldc, int r, int c, float v0, float v1, float alpha,
                                           float beta) {
    if (r >= M) return;
    Tout* p = C + r * ldc + c;
    if (c + 1 < N) {
        float o0 = alpha * v0, o1 = alpha * v1;
        if (beta != 0.0f) {
            o0 += beta * to_f32(p[0]);
            o1 += beta * to_f32(p[1]);
        }
        p[0] = from_f32<Tout>(o0);
        p[1] = from_f32<Tout>(o1);
    } else if (c < N) {
        float o0 = alpha * v0;
        if (beta != 0.0f) o0 += beta * to_f32(p[0]);
        p[0] = from_f32<Tout>(o0);
    }
}
