// Elementwise ops of the autograd tape (host side: crates/loraga-core/src/cuda/ops/elementwise.rs).
// Every value is computed in f32 registers and stored once, in the output's type:
//
//   add_<t>:               y = a + b              (add's backward is a copy of dy)
//   mul_<t>:               y = a * b              (also mul's backward: da = dy * b, db = dy * a)
//   scale_<t>:             y = s * x              (also scale's backward: dx = s * dy)
//   silu_fwd_<t>:          y = x * sigmoid(x)
//   silu_bwd_<t>:          dx = dy * silu'(x),    silu'(x) = s (1 + x (1 - s)),  s = sigmoid(x)
//   swiglu_fwd_<t>:        y = silu(g) * u
//   swiglu_bwd_<t>:        dg = dy * u * silu'(g),  du = dy * silu(g)   (both, in one pass)
//   cast_<from>_<to>:      y = x                  (bf16 -> f32 exact; f32 -> bf16 rounds to
//                                                  nearest even, as PyTorch's .to(bfloat16))
//   add_assign_<acc>_<g>:  acc += g               (gradient accumulation, in place; the sum is
//                                                  formed in f32 and stored in acc's type)
//
// <t> is f32 or bf16 and is the type of every operand of that entry point.
// Calling convention of every entry point (one host launcher serves them all):
//   (const In* inputs..., Out* outputs..., i64 n [, float scalar])
// Layout: dense buffers of n elements, any shape flattened; n is 64-bit. add_assign's acc is
// an output that is also read, through one pointer, so no pointer here is __restrict__.
// Vectorisation: each step of a thread moves 16 bytes of the widest operand (4 f32 or 8 bf16
// lanes) when every pointer is aligned to its own pack size; otherwise, and for the last
// n % lanes elements, it moves one element per step. The alignment test reads only kernel
// arguments, so every thread takes the same branch.
// Launch: THREADS-thread blocks, grid-stride loops, any grid of at least one block.
//
// Version 1 (the only one).
#include "common.cuh"

#define THREADS 256

// N values of T moved by one load or store.
template <typename T, int N> struct alignas(sizeof(T) * N) Pack {
    T v[N];
};

// Lanes per step: 16 bytes of the widest of the operand types.
template <typename A, typename B, typename C> __host__ __device__ constexpr int lanes() {
    return 16 / (sizeof(A) > sizeof(B) ? (sizeof(A) > sizeof(C) ? sizeof(A) : sizeof(C))
                                       : (sizeof(B) > sizeof(C) ? sizeof(B) : sizeof(C)));
}

template <int N, typename T> __device__ __forceinline__ bool packable(const T* p) {
    return reinterpret_cast<unsigned long long>(p) % (sizeof(T) * N) == 0;
}

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float silu(float x) { return x * sigmoid(x); }
__device__ __forceinline__ float silu_grad(float x) {
    const float s = sigmoid(x);
    return s * (1.0f + x * (1.0f - s));
}

__device__ __forceinline__ i64 first_index() { return (i64)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ i64 grid_stride() { return (i64)gridDim.x * blockDim.x; }

// y[i] = op(a[i]) for i < n.
template <typename Ta, typename Ty, typename Op> __device__ void map1(const Ta* a, Ty* y, i64 n, Op op) {
    constexpr int N = lanes<Ta, Ty, Ty>();
    i64 done = 0;
    if (packable<N>(a) && packable<N>(y)) {
        const i64 packs = n / N;
        for (i64 p = first_index(); p < packs; p += grid_stride()) {
            const Pack<Ta, N> va = reinterpret_cast<const Pack<Ta, N>*>(a)[p];
            Pack<Ty, N> vy;
#pragma unroll
            for (int k = 0; k < N; ++k) vy.v[k] = from_f32<Ty>(op(to_f32(va.v[k])));
            reinterpret_cast<Pack<Ty, N>*>(y)[p] = vy;
        }
        done = packs * N;
    }
    for (i64 i = done + first_index(); i < n; i += grid_stride()) y[i] = from_f32<Ty>(op(to_f32(a[i])));
}

// y[i] = op(a[i], b[i]) for i < n; y may be a (in place).
template <typename Ta, typename Tb, typename Ty, typename Op>
__device__ void map2(const Ta* a, const Tb* b, Ty* y, i64 n, Op op) {
    constexpr int N = lanes<Ta, Tb, Ty>();
    i64 done = 0;
    if (packable<N>(a) && packable<N>(b) && packable<N>(y)) {
        const i64 packs = n / N;
        for (i64 p = first_index(); p < packs; p += grid_stride()) {
            const Pack<Ta, N> va = reinterpret_cast<const Pack<Ta, N>*>(a)[p];
            const Pack<Tb, N> vb = reinterpret_cast<const Pack<Tb, N>*>(b)[p];
            Pack<Ty, N> vy;
#pragma unroll
            for (int k = 0; k < N; ++k) vy.v[k] = from_f32<Ty>(op(to_f32(va.v[k]), to_f32(vb.v[k])));
            reinterpret_cast<Pack<Ty, N>*>(y)[p] = vy;
        }
        done = packs * N;
    }
    for (i64 i = done + first_index(); i < n; i += grid_stride()) {
        y[i] = from_f32<Ty>(op(to_f32(a[i]), to_f32(b[i])));
    }
}

// SwiGLU's backward: two outputs from three inputs, so it has its own loop.
template <typename T> __device__ void swiglu_bwd(const T* dy, const T* g, const T* u, T* dg, T* du, i64 n) {
    constexpr int N = lanes<T, T, T>();
    auto one = [](float d, float gv, float uv, T* dg_out, T* du_out) {
        *dg_out = from_f32<T>(d * uv * silu_grad(gv));
        *du_out = from_f32<T>(d * silu(gv));
    };
    i64 done = 0;
    if (packable<N>(dy) && packable<N>(g) && packable<N>(u) && packable<N>(dg) && packable<N>(du)) {
        const i64 packs = n / N;
        for (i64 p = first_index(); p < packs; p += grid_stride()) {
            const Pack<T, N> vd = reinterpret_cast<const Pack<T, N>*>(dy)[p];
            const Pack<T, N> vg = reinterpret_cast<const Pack<T, N>*>(g)[p];
            const Pack<T, N> vu = reinterpret_cast<const Pack<T, N>*>(u)[p];
            Pack<T, N> og, ou;
#pragma unroll
            for (int k = 0; k < N; ++k) one(to_f32(vd.v[k]), to_f32(vg.v[k]), to_f32(vu.v[k]), &og.v[k], &ou.v[k]);
            reinterpret_cast<Pack<T, N>*>(dg)[p] = og;
            reinterpret_cast<Pack<T, N>*>(du)[p] = ou;
        }
        done = packs * N;
    }
    for (i64 i = done + first_index(); i < n; i += grid_stride()) {
        one(to_f32(dy[i]), to_f32(g[i]), to_f32(u[i]), &dg[i], &du[i]);
    }
}

struct Add {
    __device__ float operator()(float a, float b) const { return a + b; }
};
struct Mul {
    __device__ float operator()(float a, float b) const { return a * b; }
};
struct Scale {
    float s;
    __device__ float operator()(float x) const { return s * x; }
};
struct Silu {
    __device__ float operator()(float x) const { return silu(x); }
};
struct SiluBwd {
    __device__ float operator()(float dy, float x) const { return dy * silu_grad(x); }
};
struct SwigluFwd {
    __device__ float operator()(float g, float u) const { return silu(g) * u; }
};
struct Identity {
    __device__ float operator()(float x) const { return x; }
};

// Entry points: one per op and operand type.
extern "C" __global__ void __launch_bounds__(THREADS) add_f32(const float* a, const float* b, float* y, i64 n) {
    map2(a, b, y, n, Add());
}
extern "C" __global__ void __launch_bounds__(THREADS) add_bf16(const bf16* a, const bf16* b, bf16* y, i64 n) {
    map2(a, b, y, n, Add());
}
extern "C" __global__ void __launch_bounds__(THREADS) mul_f32(const float* a, const float* b, float* y, i64 n) {
    map2(a, b, y, n, Mul());
}
extern "C" __global__ void __launch_bounds__(THREADS) mul_bf16(const bf16* a, const bf16* b, bf16* y, i64 n) {
    map2(a, b, y, n, Mul());
}
extern "C" __global__ void __launch_bounds__(THREADS) scale_f32(const float* x, float* y, i64 n, float s) {
    map1(x, y, n, Scale{s});
}
extern "C" __global__ void __launch_bounds__(THREADS) scale_bf16(const bf16* x, bf16* y, i64 n, float s) {
    map1(x, y, n, Scale{s});
}
extern "C" __global__ void __launch_bounds__(THREADS) silu_fwd_f32(const float* x, float* y, i64 n) {
    map1(x, y, n, Silu());
}
extern "C" __global__ void __launch_bounds__(THREADS) silu_fwd_bf16(const bf16* x, bf16* y, i64 n) {
    map1(x, y, n, Silu());
}
extern "C" __global__ void __launch_bounds__(THREADS)
silu_bwd_f32(const float* dy, const float* x, float* dx, i64 n) {
    map2(dy, x, dx, n, SiluBwd());
}
extern "C" __global__ void __launch_bounds__(THREADS) silu_bwd_bf16(const bf16* dy, const bf16* x, bf16* dx, i64 n) {
    map2(dy, x, dx, n, SiluBwd());
}
extern "C" __global__ void __launch_bounds__(THREADS)
swiglu_fwd_f32(const float* g, const float* u, float* y, i64 n) {
    map2(g, u, y, n, SwigluFwd());
}
extern "C" __global__ void __launch_bounds__(THREADS) swiglu_fwd_bf16(const bf16* g, const bf16* u, bf16* y, i64 n) {
    map2(g, u, y, n, SwigluFwd());
}
extern "C" __global__ void __launch_bounds__(THREADS)
swiglu_bwd_f32(const float* dy, const float* g, const float* u, float* dg, float* du, i64 n) {
    swiglu_bwd(dy, g, u, dg, du, n);
}
extern "C" __global__ void __launch_bounds__(THREADS)
swiglu_bwd_bf16(const bf16* dy, const bf16* g, const bf16* u, bf16* dg, bf16* du, i64 n) {
    swiglu_bwd(dy, g, u, dg, du, n);
}
extern "C" __global__ void __launch_bounds__(THREADS) cast_f32_bf16(const float* x, bf16* y, i64 n) {
    map1(x, y, n, Identity());
}
extern "C" __global__ void __launch_bounds__(THREADS) cast_bf16_f32(const bf16* x, float* y, i64 n) {
    map1(x, y, n, Identity());
}
extern "C" __global__ void __launch_bounds__(THREADS) add_assign_f32_f32(const float* g, float* acc, i64 n) {
    map2(acc, g, acc, n, Add());
}
extern "C" __global__ void __launch_bounds__(THREADS) add_assign_f32_bf16(const bf16* g, float* acc, i64 n) {
    map2(acc, g, acc, n, Add());
}
extern "C" __global__ void __launch_bounds__(THREADS) add_assign_bf16_bf16(const bf16* g, bf16* acc, i64 n) {
    map2(acc, g, acc, n, Add());
}
extern "C" __global__ void __launch_bounds__(THREADS) add_assign_bf16_f32(const float* g, bf16* acc, i64 n) {
    map2(acc, g, acc, n, Add());
}
