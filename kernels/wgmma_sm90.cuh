// Hopper (sm_90a) building blocks shared by the kernels that multiply with warpgroup MMAs
// (gemm_sm90.cu, rsvd_skinny_wg.cu): shared-memory descriptors, the wgmma fences, the proxy
// fence that orders ordinary shared-memory writes before wgmma's (or TMA's) reads of them, and
// TMA loads with the mbarriers that count their bytes.
// wgmma exists only on sm_90a: other targets see LORAGA_SM90A undefined and none of this, and
// those kernels compile a trapping body instead (the host checks Arch::has_wgmma first).
#pragma once
#include "mma_sm80.cuh"

// A CUtensorMap as the driver encodes it (crates/loraga-core/src/cuda/tma.rs): 128 opaque bytes,
// passed by value (__grid_constant__). Declared for every arch: the entry points take it.
struct __align__(64) TmaDesc {
    unsigned long long opaque[16];
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LORAGA_SM90A 1

__device__ __forceinline__ unsigned smem_addr(const void* p) { return smem_u32(p); }

// wgmma shared-memory descriptors, 128-byte swizzle. Bits: start address >> 4, leading byte
// offset >> 4 at 16, stride byte offset >> 4 at 32, swizzle mode at 62.
__device__ __forceinline__ unsigned long long smem_desc(const void* p, unsigned lbo, unsigned sbo) {
    unsigned long long addr = smem_addr(p);
    return ((addr & 0x3FFFF) >> 4) | ((unsigned long long)(lbo >> 4) << 16) | ((unsigned long long)(sbo >> 4) << 32) |
           (1ull << 62);
}
// K-major tile, rows of 128 bytes of K (64 bf16 or 32 f32), 128-byte swizzled (16-byte chunk c of
// row r stored at chunk c ^ (r % 8); the tile 1024-byte aligned): 8-row groups are 1024 bytes
// apart; the leading offset is unused (1 unit). A K step of 32 bytes advances the start address
// by 32 bytes; the hardware applies the swizzle to the address it forms.
__device__ __forceinline__ unsigned long long desc_k_major(const void* p) { return smem_desc(p, 16, 1024); }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }

// Keeps the compiler from moving accumulator reads or writes across the asynchronous MMAs.
template <int N>
__device__ __forceinline__ void fence_registers(float* d) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// And keeps fragment registers an MMA in flight reads from being reused before it is done.
template <int N>
__device__ __forceinline__ void fence_registers(unsigned* r) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// Shared-memory writes by ordinary stores or cp.async become visible to the async proxy (wgmma's
// operand reads, TMA stores) only after this fence.
__device__ __forceinline__ void fence_proxy_async_shared() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count));
}

__device__ __forceinline__ void mbar_expect_tx(unsigned long long* bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_arrive(unsigned long long* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

// Waits until the barrier's phase with this parity has completed.
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned parity) {
    unsigned done = 0;
    while (!done) {
        asm volatile(
            "{\n"
            ".reg .pred p;\n"
            "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            "selp.u32 %0, 1, 0, p;\n"
            "}\n"
            : "=r"(done)
            : "r"(smem_addr(bar)), "r"(parity)
            : "memory");
    }
}

// TMA: copies the box at (c0 = column, c1 = row) of the tensor map into shared memory and
// signals `bar` with the number of bytes when done.
__device__ __forceinline__ void tma_load(void* dst, const TmaDesc* map, unsigned long long* bar, int c0, int c1) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];"
        ::"r"(smem_addr(dst)), "l"(map), "r"(smem_addr(bar)), "r"(c0), "r"(c1)
        : "memory");
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL
