// The backward pass: one read and one write per element. The probabilities are recomputed from
// the row's saved max and ln sum exp (Apex xentropy's idea); the criterion's per-row constants
// a, k, g_y (upstream gradient folded in) come with them in row_info [B, 6] (GradRow and
// grad_other in heads.cuh):
//   dx_j = (a * r * p_j + k * r * w_j) * c_j * du_j/dx_j (j != y),   dx_y = g_y * r * dz_y/dx_y / r,
//   p_j = exp((z_j - max) - ln_sum) (2^(... * log2 e) in f32: ms_exp_mul),
// with z_j = r * u_j, or cap * tanh(r * u_j / cap) with soft-capping (c_j = sech^2 of the same,
// else 1), and w_j the class weight with weighted smoothing (else 1: only then are the weights
// read). One entry point per transform (ms_backward_{identity|cosine|rbf}_T): no switch per
// element; the target is looked for once per vector (grad_vector in rows.cuh).
// Every row is read by 16-byte vectors whatever its alignment (walk_row: a scalar peel before
// its first 16-byte boundary); the gradient row is written with 16-byte stores where it is
// aligned at the same element (the usual case), with scalar stores otherwise.
// Grid-stride in both dimensions (rows on y, column vectors on x): any grid is correct, and so
// is any block of at most MS_BLOCK threads (strides use blockDim).
#include "rows.cuh"

template <typename T, int TR, bool EXT>
__device__ void backward(const T* __restrict__ x, const int* __restrict__ targets,
                         const typename AccOf<T>::type* __restrict__ row_info,
                         const typename AccOf<T>::type* __restrict__ weights, MsParams p,
                         T* __restrict__ grad) {
    typedef typename AccOf<T>::type A;
    const long long thread = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long threads = (long long)gridDim.x * blockDim.x;
    for (long long row = blockIdx.y; row < p.rows; row += gridDim.y) {
        const T* xr = x + row * p.row_stride;
        const long long y = targets[row];
        A info[MS_ROWINFO_COLUMNS];
#pragma unroll
        for (int c = 0; c < MS_ROWINFO_COLUMNS; ++c) {
            info[c] = row_info[row * MS_ROWINFO_COLUMNS + c];
        }
        write_gradient<TR, EXT>(p, weights, info, xr, xr, grad + row * p.classes, 0, p.classes, y,
                                thread, threads);
    }
}

#define MS_BACKWARD_ENTRY(T, SUFFIX, NAME, TR, EXT, MIN_BLOCKS)                                       \
    extern "C" __global__ void __launch_bounds__(MS_BLOCK, MIN_BLOCKS)                           \
        ms_backward_##NAME##_##SUFFIX(                                                           \
        const T* x, const int* targets, const AccOf<T>::type* row_info,                          \
        const AccOf<T>::type* weights, MsParams p, T* grad) {                                    \
        backward<T, TR, EXT>(x, targets, row_info, weights, p, grad);                                 \
    }

#define MS_BACKWARD_ENTRY_4(T, SUFFIX, NAME, TR, EXT) MS_BACKWARD_ENTRY(T, SUFFIX, NAME, TR, EXT, 4)
#define MS_BACKWARD_ENTRY_2(T, SUFFIX, NAME, TR, EXT) MS_BACKWARD_ENTRY(T, SUFFIX, NAME, TR, EXT, 2)

MS_PER_TRANSFORM(MS_BACKWARD_ENTRY_4, float, f32)
MS_PER_TRANSFORM(MS_BACKWARD_ENTRY_2, double, f64)
MS_PER_TRANSFORM(MS_BACKWARD_ENTRY_4, __half, f16)
#if __CUDA_ARCH__ >= 800
MS_PER_TRANSFORM(MS_BACKWARD_ENTRY_4, __nv_bfloat16, bf16)
#endif
