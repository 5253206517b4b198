// The forward pass, split so that few rows with very many classes still fill the GPU:
//   ms_forward_partial_{identity|cosine|rbf}: block (row, split) of MS_BLOCK threads reduces the
//     non-target entries of one slice of a row to its online statistics (max, sum exp,
//     sum exp*v, sum w*v, sum w*z: see Online in common.cuh), reading the slice once by 16-byte
//     vectors (a scalar peel before the row's first 16-byte boundary; push_vector in rows.cuh);
//   ms_forward_finalize: one thread per row (MS_FINALIZE_BLOCK rows per block) merges the
//     target's logit and the row's partials in a fixed order (no floating-point atomics:
//     bitwise reproducible) and applies the criterion.
#include "rows.cuh"

template <typename T, int TR, bool EXT>
__device__ void forward_partial(const T* __restrict__ x, const int* __restrict__ targets,
                                const typename AccOf<T>::type* __restrict__ scale,
                                const typename AccOf<T>::type* __restrict__ weights, MsParams p,
                                typename AccOf<T>::type* __restrict__ partials) {
    require_block<MS_BLOCK>();
    const long long blocks = p.rows * p.splits;
    for (long long block = blockIdx.x; block < blocks; block += gridDim.x) {
        push_split<T, TR, EXT>(x, targets, scale, weights, p, block / p.splits,
                               (int)(block % p.splits), partials);
    }
}

template <typename T>
__device__ void forward_finalize(const T* __restrict__ x, const int* __restrict__ targets,
                                 const typename AccOf<T>::type* __restrict__ scale,
                                 const typename AccOf<T>::type* __restrict__ weights,
                                 const typename AccOf<T>::type* __restrict__ poly, MsParams p,
                                 const typename AccOf<T>::type* __restrict__ partials,
                                 typename AccOf<T>::type* __restrict__ stats,
                                 typename AccOf<T>::type* __restrict__ row_info,
                                 typename AccOf<T>::type* __restrict__ grad_scale,
                                 const typename AccOf<T>::type* __restrict__ upstream) {
    typedef typename AccOf<T>::type A;
    for (long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x; row < p.rows;
         row += (long long)gridDim.x * blockDim.x) {
        A* st = stats + row * MS_STAT_COLUMNS;
        A info[MS_ROWINFO_COLUMNS];
        const int y = targets[row];
        const A up = row_info != nullptr ? *upstream : A(1);
        if (y < 0) {
            finalize_skipped_row(y, scale[row], st, info);
        } else {
            Online<A> others = online_empty<A>();
            const A* q = partials + row * p.splits * MS_PARTIAL_COLUMNS;
            for (int k = 0; k < p.splits; ++k, q += MS_PARTIAL_COLUMNS) {
                others = online_merge(others, load_partial(q));
            }
            const A weight = p.has_weights ? weights[y] : A(1);
            finalize_row(p, poly, weight, scale[row], to_acc(x[row * p.row_stride + y]), others, up,
                         st, info);
        }
        if (row_info != nullptr) {
#pragma unroll
            for (int c = 0; c < MS_ROWINFO_COLUMNS; ++c) row_info[row * MS_ROWINFO_COLUMNS + c] = info[c];
        }
        if (grad_scale != nullptr) grad_scale[row] = st[7] * up;
    }
}

// MIN_BLOCKS bounds the registers as in fused.cu: 4 (64) for the f32-accumulating entries, 2
// (128) for f64.
#define MS_PARTIAL_ENTRY(T, SUFFIX, NAME, TR, EXT, MIN_BLOCKS)                                        \
    extern "C" __global__ void __launch_bounds__(MS_BLOCK, MIN_BLOCKS)                           \
        ms_forward_partial_##NAME##_##SUFFIX(                                                    \
        const T* x, const int* targets, const AccOf<T>::type* scale,                             \
        const AccOf<T>::type* weights, MsParams p, AccOf<T>::type* partials) {                   \
        forward_partial<T, TR, EXT>(x, targets, scale, weights, p, partials);                         \
    }

// upstream: the gradient factor (1, or 1/sum w for the mean; one element, ms_targets writes
// it), read only when row_info is written.
#define MS_PARTIAL_ENTRY_4(T, SUFFIX, NAME, TR, EXT) MS_PARTIAL_ENTRY(T, SUFFIX, NAME, TR, EXT, 4)
#define MS_PARTIAL_ENTRY_2(T, SUFFIX, NAME, TR, EXT) MS_PARTIAL_ENTRY(T, SUFFIX, NAME, TR, EXT, 2)

#define MS_FORWARD_ENTRIES(T, SUFFIX, PARTIAL)                                                   \
    MS_PER_TRANSFORM(PARTIAL, T, SUFFIX)                                                         \
    extern "C" __global__ void __launch_bounds__(MS_FINALIZE_BLOCK) ms_forward_finalize_##SUFFIX( \
        const T* x, const int* targets, const AccOf<T>::type* scale,                             \
        const AccOf<T>::type* weights, const AccOf<T>::type* poly, MsParams p,                   \
        const AccOf<T>::type* partials, AccOf<T>::type* stats, AccOf<T>::type* row_info,         \
        AccOf<T>::type* grad_scale, const AccOf<T>::type* upstream) {                            \
        forward_finalize<T>(x, targets, scale, weights, poly, p, partials, stats, row_info,      \
                            grad_scale, upstream);                                               \
    }

MS_FORWARD_ENTRIES(float, f32, MS_PARTIAL_ENTRY_4)
MS_FORWARD_ENTRIES(double, f64, MS_PARTIAL_ENTRY_2)
MS_FORWARD_ENTRIES(__half, f16, MS_PARTIAL_ENTRY_4)
#if __CUDA_ARCH__ >= 800
MS_FORWARD_ENTRIES(__nv_bfloat16, bf16, MS_PARTIAL_ENTRY_4)
#endif
