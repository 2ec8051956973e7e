// Ampere-style building blocks shared by the kernels that stage tiles with cp.async and multiply
// them with mma.sync (gemm_sm80.cu, rsvd_skinny.cu, lora_dy.cu): sm_80 and later.
#pragma once

__device__ __forceinline__ unsigned smem_u32(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

// Copies the first `bytes` (0 to 16) of src into the 16 bytes at dst and zero-fills the rest
// (with 0, src is not read). Both 16-byte aligned.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_u32(dst)), "l"(src), "r"(bytes)
                 : "memory");
}

// The same for one 4-byte element: copied when `inside`, else zero.
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool inside) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(smem_u32(dst)), "l"(src), "r"(inside ? 4 : 0)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// Four 8 x 8 bf16 matrices from shared memory in one instruction: lanes 8i..8i+7 give the
// addresses of matrix i's 8 rows (16 bytes each); lane l receives, in register i, matrix i's
// elements (row l / 4, columns 2 (l % 4) and + 1), or with TRANS (rows 2 (l % 4) and + 1, column
// l / 4). TRANS turns an MN-major tile into the K-pairs an MMA fragment holds.
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(unsigned* r, const bf16* row) {
    if constexpr (TRANS) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(smem_u32(row)));
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(smem_u32(row)));
    }
}

// d[16 x 8] += a[16 x K] b[K x 8]: K = 16 for bf16, 8 for TF32. Fragment registers (g = lane / 4,
// t = lane % 4): a = (row g, k lo), (g + 8, k lo), (g, k hi), (g + 8, k hi); b = (k lo, col g),
// (k hi, col g), with k lo = 2t (bf16 pair) or t (tf32) and k hi = k lo + K / 2; d = (g, 2t),
// (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1).
template <typename T>
__device__ __forceinline__ void mma(float* d, const unsigned* a, const unsigned* b) {
    if constexpr (sizeof(T) == 2) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
}

// The 3xTF32 split (rsvd_skinny.cu, rsvd_skinny_wg.cu): x = hi + lo with hi = x truncated to TF32
// (its low 13 bits cleared: one logic op, where a rounding conversion runs at a quarter of the FMA
// rate) and lo = x − hi, exact in f32 with |lo| < 2⁻¹⁰|x|, which the MMA reads as TF32 by dropping
// its low 13 bits (a loss < 2⁻²⁰|x|).
__device__ __forceinline__ void split_tf32(float x, unsigned& hi, unsigned& lo) {
    hi = __float_as_uint(x) & 0xffffe000u;
    lo = __float_as_uint(x - __uint_as_float(hi));
}
