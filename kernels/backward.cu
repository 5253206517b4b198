// The backward pass: one read and one write per element. The probabilities are recomputed from
// the row's saved max and ln sum exp (Apex xentropy's idea); the criterion's per-row constants
// a, k, g_y (upstream gradient folded in) come with them in row_info [B, 6] (grad_element in
// heads.cuh):
//   dx_j = (a * p_j + k * w_j) * c_j * r * du_j/dx_j (j != y),   dx_y = g_y * r * dz_y/dx_y / r,
//   p_j = exp((z_j - max) - ln_sum),
// with z_j = r * u_j, or cap * tanh(r * u_j / cap) with soft-capping (c_j = sech^2 of the same,
// else 1), and w_j the class weight with weighted smoothing (else 1: only then are the weights
// read).
// Memory-bound, so every row is read with 16-byte vector loads whatever its alignment: the head
// of the row before its first 16-byte-aligned element (fewer than 16 / sizeof(T) elements) is
// peeled off and done scalar, the rest goes by vectors. Rows whose start is not 16-byte aligned
// are common (bf16 with C % 8 != 0: 7 rows of 8). The gradient row is written with 16-byte
// stores where it is aligned at the same element (the usual case: x and grad rows in the same
// phase), with scalar stores otherwise.
// Grid-stride in both dimensions (rows on y, column vectors on x): any grid is correct, and so
// is any block of at most MS_BLOCK threads (strides use blockDim).
#include "common.cuh"
#include "heads.cuh"

// The gradient of element j of a row, 0 for an ignored row (target < 0).
template <typename T>
__device__ __forceinline__ T grad_of(const MsParams& p, const typename AccOf<T>::type* info,
                                     const typename AccOf<T>::type* __restrict__ weights, int y,
                                     T x, long long j) {
    typedef typename AccOf<T>::type A;
    return y < 0 ? from_acc<T>(A(0))
                 : from_acc<T>(grad_element(p, info, to_acc(x), j == y,
                                            smoothing_weight(p, weights, j)));
}

template <typename T>
__device__ void backward(const T* __restrict__ x, const int* __restrict__ targets,
                         const typename AccOf<T>::type* __restrict__ row_info,
                         const typename AccOf<T>::type* __restrict__ weights, MsParams p,
                         T* __restrict__ grad) {
    typedef typename AccOf<T>::type A;
    constexpr int V = VecWidth<T>::value;
    const long long thread = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long threads = (long long)gridDim.x * blockDim.x;
    for (long long row = blockIdx.y; row < p.rows; row += gridDim.y) {
        const T* xr = x + row * p.row_stride;
        T* gr = grad + row * p.classes;
        const int y = targets[row];
        A info[MS_ROWINFO_COLUMNS];
#pragma unroll
        for (int c = 0; c < MS_ROWINFO_COLUMNS; ++c) {
            info[c] = row_info[row * MS_ROWINFO_COLUMNS + c];
        }
        // Elements before xr's first 16-byte boundary; a row whose elements are not even
        // naturally aligned (never from candle) is done scalar throughout.
        const unsigned misalign = (unsigned)(reinterpret_cast<uintptr_t>(xr) & 15);
        long long head = misalign == 0 ? 0 : (long long)((16 - misalign) / sizeof(T));
        if (head > p.classes) {
            head = p.classes;
        } else if (!aligned16(xr + head)) {
            head = p.classes;
        }
        const bool vector_store = aligned16(gr + head);
        for (long long j = thread; j < head; j += threads) gr[j] = grad_of<T>(p, info, weights, y, xr[j], j);
        for (long long j0 = head + thread * V; j0 < p.classes; j0 += threads * V) {
            if (j0 + V <= p.classes) {
                const uint4 raw = *reinterpret_cast<const uint4*>(xr + j0);
                const T* v = reinterpret_cast<const T*>(&raw);
                if (vector_store) {
                    uint4 out_raw;
                    T* out = reinterpret_cast<T*>(&out_raw);
#pragma unroll
                    for (int i = 0; i < V; ++i) out[i] = grad_of<T>(p, info, weights, y, v[i], j0 + i);
                    *reinterpret_cast<uint4*>(gr + j0) = out_raw;
                } else {
#pragma unroll
                    for (int i = 0; i < V; ++i) gr[j0 + i] = grad_of<T>(p, info, weights, y, v[i], j0 + i);
                }
            } else {
                for (long long j = j0; j < p.classes; ++j) gr[j] = grad_of<T>(p, info, weights, y, xr[j], j);
            }
        }
    }
}

#define MS_BACKWARD_ENTRY(T, SUFFIX)                                                             \
    extern "C" __global__ void __launch_bounds__(MS_BLOCK)                                       \
        ms_backward_##SUFFIX(const T* x, const int* targets, const AccOf<T>::type* row_info,     \
                             const AccOf<T>::type* weights, MsParams p, T* grad) {               \
        backward<T>(x, targets, row_info, weights, p, grad);                                     \
    }

MS_BACKWARD_ENTRY(float, f32)
MS_BACKWARD_ENTRY(double, f64)
MS_BACKWARD_ENTRY(__half, f16)
#if __CUDA_ARCH__ >= 800
MS_BACKWARD_ENTRY(__nv_bfloat16, bf16)
#endif
