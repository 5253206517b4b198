// Shared machinery of the kernels: dtype loads and stores, the accumulation type, the online
// softmax state with its merge, and deterministic warp / block reductions of it.
//
// With MS_HOST_CHECK defined, the per-row math (this file less the reductions, and heads.cuh)
// compiles as plain host C++ for kernels/host_check/, which replays the kernels' algorithm on the
// CPU so that the CUDA math is tested against the Rust CPU path on machines without a GPU.
#pragma once

#include <stdint.h>

#ifdef MS_HOST_CHECK
#include <cmath>
#include <limits>
#define __device__
#define __forceinline__ inline
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "params.cuh"

// The accumulation type: f32 for f32 / f16 / bf16 input, f64 for f64 input.
template <typename T> struct AccOf { typedef float type; };
template <> struct AccOf<double> { typedef double type; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
template <typename T> __device__ __forceinline__ T from_acc(typename AccOf<T>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }

#ifndef MS_HOST_CHECK
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
#endif

// Accurate math in the accumulation type (no fast-math intrinsics: the results must agree with
// the CPU path to ~1e-6 relative).
#ifdef MS_HOST_CHECK
template <typename A> inline A ms_exp(A x) { return std::exp(x); }
inline float ms_exp2_ftz(float x) {
    const float r = std::exp2(x);
    return r < 1.17549435e-38f ? 0.0f : r;
}
inline float ms_exp_mul(float x, double c) { return ms_exp2_ftz(x * float(c * 1.44269504088896340736)); }
inline double ms_exp_mul(double x, double c) { return std::exp(x * c); }
template <typename A> inline A ms_expm1(A x) { return std::expm1(x); }
template <typename A> inline A ms_abs(A x) { return std::fabs(x); }
template <typename A> inline A ms_log(A x) { return std::log(x); }
template <typename A> inline A ms_pow(A x, A y) { return std::pow(x, y); }
template <typename A> inline A ms_acos(A x) { return std::acos(x); }
template <typename A> inline A ms_sqrt(A x) { return std::sqrt(x); }
template <typename A> inline A ms_cospi(A t) { return std::cos(A(3.14159265358979323846) * t); }
template <typename A> inline A ms_sinpi(A t) { return std::sin(A(3.14159265358979323846) * t); }
template <typename A> inline A neg_infinity() { return -std::numeric_limits<A>::infinity(); }
#else
__device__ __forceinline__ float ms_exp(float x) { return expf(x); }
__device__ __forceinline__ double ms_exp(double x) { return exp(x); }
// 2^x with results below 2^-126 flushed to 0 (MUFU.EX2, 2 ulp, one instruction: exp2f adds the
// scaling for subnormal results, expf ~8 instructions). The CPU path flushes subnormal
// probabilities too. Compiled as C++ (the emulator), exp2f then the flush.
__device__ __forceinline__ float ms_exp2_ftz(float x) {
#ifdef __CUDACC__
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
#else
    const float r = exp2f(x);
    return r < 1.17549435e-38f ? 0.0f : r;
#endif
}
// e^(x * c) for a constant c, the element loops' exponential: in f32 2^(x * (c * log2 e)), the
// constant folded; in f64 exp (its exp2 is a real call, around which the kernels would spill).
__device__ __forceinline__ float ms_exp_mul(float x, double c) {
    return ms_exp2_ftz(x * float(c * 1.44269504088896340736));
}
__device__ __forceinline__ double ms_exp_mul(double x, double c) { return exp(x * c); }
__device__ __forceinline__ float ms_expm1(float x) { return expm1f(x); }
__device__ __forceinline__ double ms_expm1(double x) { return expm1(x); }
__device__ __forceinline__ float ms_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double ms_abs(double x) { return fabs(x); }
__device__ __forceinline__ float ms_log(float x) { return logf(x); }
__device__ __forceinline__ double ms_log(double x) { return log(x); }
__device__ __forceinline__ float ms_pow(float x, float y) { return powf(x, y); }
__device__ __forceinline__ double ms_pow(double x, double y) { return pow(x, y); }
__device__ __forceinline__ float ms_acos(float x) { return acosf(x); }
__device__ __forceinline__ double ms_acos(double x) { return acos(x); }
// sin(pi*t) and cos(pi*t): the reduction of t by integers is exact, so unlike sinf/cosf these
// have no Payne-Hanek slow path and its local-memory array (a stack frame in every kernel).
__device__ __forceinline__ float ms_cospi(float t) { return cospif(t); }
__device__ __forceinline__ double ms_cospi(double t) { return cospi(t); }
__device__ __forceinline__ float ms_sinpi(float t) { return sinpif(t); }
__device__ __forceinline__ double ms_sinpi(double t) { return sinpi(t); }
__device__ __forceinline__ float ms_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double ms_sqrt(double x) { return sqrt(x); }

template <typename A> __device__ __forceinline__ A neg_infinity();
template <> __device__ __forceinline__ float neg_infinity<float>() { return -__int_as_float(0x7f800000); }
template <> __device__ __forceinline__ double neg_infinity<double>() {
    return -__longlong_as_double(0x7ff0000000000000LL);
}
#endif  // MS_HOST_CHECK

// A branch the steady state does not take (rare rows, vectors and launches): the compiler lays
// its code out of the loop.
#define MS_UNLIKELY(c) __builtin_expect(!!(c), 0)

// The elements one 16-byte vector load brings.
template <typename T> struct VecWidth { static constexpr int value = 16 / sizeof(T); };

__device__ __forceinline__ bool aligned16(const void* ptr) {
    return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0;
}

// The running softmax statistics of a set of entries (src/backends/cpu/'s `Online`): max logit,
// sum exp(z - max), sum exp(z - max) * v, sum w * v and sum w * z, where v = dz/dr is the
// entry's derivative with respect to the row scale (the unscaled logit u, times sech^2 with
// soft-capping) and w its weight in the smoothing term (1 unless weighted smoothing).
template <typename A> struct Online {
    A max;
    A sum_exp;
    A sum_exp_v;
    A sum_wv;
    A sum_wz;
};

template <typename A> __device__ __forceinline__ Online<A> online_empty() {
    Online<A> s;
    s.max = neg_infinity<A>();
    s.sum_exp = A(0);
    s.sum_exp_v = A(0);
    s.sum_wv = A(0);
    s.sum_wz = A(0);
    return s;
}

// c * v, except that an exactly zero coefficient (or probability weight) contributes 0 even when
// v is infinite: a masked logit (u = -inf) has p = 0, and 0 * (-inf) = NaN is not its share.
// A NaN coefficient still gives NaN.
template <typename A> __device__ __forceinline__ A times_nonzero(A c, A v) {
    return c == A(0) ? A(0) : c * v;
}

// Adds one entry with logit z, dz/dr = v and smoothing weight w (rescaling the sums when the max
// grows). z = -inf (a masked logit) has exp(z - max) = 0 and leaves max, sum exp and sum exp*v
// as they are; it is skipped there because with an empty state (max = -inf) exp(z - max) would
// be exp(-inf + inf) = NaN. NaN z still makes the sums NaN (z > max is false, z != -inf is
// true). A zero weight adds 0 to sum w*v and sum w*z, also for a masked logit.
template <typename A> __device__ __forceinline__ void online_push(Online<A>& s, A z, A v, A w) {
    if (z > s.max) {
        const A rescale = ms_exp(s.max - z);
        s.sum_exp = s.sum_exp * rescale + A(1);
        s.sum_exp_v = s.sum_exp_v * rescale + v;
        s.max = z;
    } else if (z != neg_infinity<A>()) {
        const A e = ms_exp(z - s.max);
        s.sum_exp += e;
        s.sum_exp_v += times_nonzero(e, v);
    }
    s.sum_wv += times_nonzero(w, v);
    s.sum_wz += times_nonzero(w, z);
}

// The statistics of the union of two disjoint sets. Not associative in floating point, so every
// reduction below merges in a fixed order: results are bitwise reproducible for a fixed launch.
template <typename A> __device__ __forceinline__ Online<A> online_merge(Online<A> a, Online<A> b) {
    Online<A> r;
    r.max = a.max > b.max ? a.max : b.max;
    r.sum_wv = a.sum_wv + b.sum_wv;
    r.sum_wz = a.sum_wz + b.sum_wz;
    if (r.max == neg_infinity<A>()) {  // both empty
        r.sum_exp = A(0);
        r.sum_exp_v = A(0);
        return r;
    }
    const A fa = ms_exp(a.max - r.max);
    const A fb = ms_exp(b.max - r.max);
    r.sum_exp = a.sum_exp * fa + b.sum_exp * fb;
    r.sum_exp_v = a.sum_exp_v * fa + b.sum_exp_v * fb;
    return r;
}

#ifndef MS_HOST_CHECK
template <typename A> __device__ __forceinline__ Online<A> warp_reduce_online(Online<A> s) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        Online<A> other;
        other.max = __shfl_xor_sync(0xffffffffu, s.max, offset);
        other.sum_exp = __shfl_xor_sync(0xffffffffu, s.sum_exp, offset);
        other.sum_exp_v = __shfl_xor_sync(0xffffffffu, s.sum_exp_v, offset);
        other.sum_wv = __shfl_xor_sync(0xffffffffu, s.sum_wv, offset);
        other.sum_wz = __shfl_xor_sync(0xffffffffu, s.sum_wz, offset);
        s = online_merge(s, other);
    }
    return s;
}

// Reduces the block's states; the result is valid in thread 0. Every thread of the block must
// call it (it synchronizes). The block size is a compile-time constant (MS_BLOCK in params.cuh,
// checked at the kernel's entry by require_block): the warp count is fixed, not read from
// blockDim, and a block size the reduction cannot handle does not compile.
template <int BLOCK, typename A> __device__ Online<A> block_reduce_online(Online<A> s) {
    static_assert(BLOCK % 32 == 0, "block_reduce_online: block size must be a multiple of 32");
    static_assert(BLOCK > 0 && BLOCK <= 1024, "block_reduce_online: at most 1024 threads a block");
    constexpr int WARPS = BLOCK / 32;
    __shared__ Online<A> warp_states[WARPS];
    __syncthreads();  // the previous call's readers are done with warp_states
    s = warp_reduce_online(s);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    if (lane == 0) warp_states[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = lane < WARPS ? warp_states[lane] : online_empty<A>();
        s = warp_reduce_online(s);
    }
    return s;
}

// Kernels whose block reductions are sized at compile time start with this: a launch with any
// other block shape fails with an error (a trap) instead of giving a silently wrong result.
#ifdef __CUDACC__
#define MS_TRAP() __trap()
#else  // the kernels compiled as C++ by the CPU emulator (kernels/emu/)
#include <stdlib.h>
#define MS_TRAP() abort()
#endif
template <int BLOCK> __device__ __forceinline__ void require_block() {
    if (blockDim.x != BLOCK || blockDim.y != 1 || blockDim.z != 1) MS_TRAP();
}
#endif  // MS_HOST_CHECK
