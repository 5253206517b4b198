// loss_and_grad for rows that fit in shared memory: one block of MS_BLOCK threads per row reads
// the row once into shared memory (16-byte vector loads where aligned) while forming its online
// statistics, finishes the row, then writes the gradient from shared memory: one read and one
// write per element. Rows that do not fit take forward_partial -> forward_finalize -> backward.
#include "common.cuh"
#include "heads.cuh"

template <typename T>
__device__ void fused(const T* __restrict__ x, const int* __restrict__ targets,
                      const typename AccOf<T>::type* __restrict__ scale,
                      const typename AccOf<T>::type* __restrict__ weights,
                      const typename AccOf<T>::type* __restrict__ poly, MsParams p,
                      typename AccOf<T>::type* __restrict__ stats, T* __restrict__ grad,
                      typename AccOf<T>::type* __restrict__ grad_scale) {
    typedef typename AccOf<T>::type A;
    constexpr int V = VecWidth<T>::value;
    extern __shared__ __align__(16) unsigned char shared_row[];
    T* row_s = reinterpret_cast<T*>(shared_row);
    __shared__ A info[MS_ROWINFO_COLUMNS];
    require_block<MS_BLOCK>();
    for (long long row = blockIdx.x; row < p.rows; row += gridDim.x) {
        const T* xr = x + row * p.row_stride;
        const int y = targets[row];
        const A r = scale[row];
        Online<A> s = online_empty<A>();
        if (aligned16(xr)) {
            for (long long j0 = (long long)threadIdx.x * V; j0 < p.classes;
                 j0 += (long long)MS_BLOCK * V) {
                if (j0 + V <= p.classes) {
                    const uint4 raw = *reinterpret_cast<const uint4*>(xr + j0);
                    *reinterpret_cast<uint4*>(row_s + j0) = raw;
                    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
                    for (int i = 0; i < V; ++i) {
                        if (y < 0 || j0 + i == y) continue;
                        push_entry(p, weights, s, r, to_acc(v[i]), j0 + i);
                    }
                } else {
                    for (long long j = j0; j < p.classes; ++j) {
                        row_s[j] = xr[j];
                        if (y < 0 || j == y) continue;
                        push_entry(p, weights, s, r, to_acc(xr[j]), j);
                    }
                }
            }
        } else {
            for (long long j = threadIdx.x; j < p.classes; j += MS_BLOCK) {
                const T v = xr[j];
                row_s[j] = v;
                if (y < 0 || j == y) continue;
                push_entry(p, weights, s, r, to_acc(v), j);
            }
        }
        s = block_reduce_online<MS_BLOCK>(s);  // synchronizes: row_s is complete after it
        if (threadIdx.x == 0) {
            A* st = stats + row * MS_STAT_COLUMNS;
            if (y < 0) {
#pragma unroll
                for (int c = 0; c < MS_STAT_COLUMNS; ++c) st[c] = A(0);
#pragma unroll
                for (int c = 0; c < MS_ROWINFO_COLUMNS; ++c) info[c] = A(0);
                info[5] = r;
            } else {
                const A weight = p.has_weights ? weights[y] : A(1);
                finalize_row(p, poly, weight, r, to_acc(row_s[y]), s, st, info);
            }
            grad_scale[row] = st[7] * A(p.upstream);
        }
        __syncthreads();
        A row_info[MS_ROWINFO_COLUMNS];
#pragma unroll
        for (int c = 0; c < MS_ROWINFO_COLUMNS; ++c) row_info[c] = info[c];
        T* gr = grad + row * p.classes;
        for (long long j = threadIdx.x; j < p.classes; j += MS_BLOCK) {
            gr[j] = y < 0 ? from_acc<T>(A(0))
                          : from_acc<T>(grad_element(p, row_info, to_acc(row_s[j]), j == y,
                                                     smoothing_weight(p, weights, j)));
        }
        __syncthreads();  // row_s and info are rewritten by the next row
    }
}

// MIN_BLOCKS, the blocks per SM the entry is compiled for, bounds its registers by
// 65536 / (MS_BLOCK * MIN_BLOCKS): 4 (64 registers) for the f32-accumulating entries, 2 (128) for
// f64, whose pow is a real call: at the 64-register target ptxas picks for 256-thread blocks
// without a hint, the values live across that call spill. The row in shared memory (up to
// 47 KiB) already holds a large-C block to a few per SM.
#define MS_FUSED_ENTRY(T, SUFFIX, MIN_BLOCKS)                                                    \
    extern "C" __global__ void __launch_bounds__(MS_BLOCK, MIN_BLOCKS) ms_fused_##SUFFIX(        \
        const T* x, const int* targets, const AccOf<T>::type* scale,                             \
        const AccOf<T>::type* weights, const AccOf<T>::type* poly, MsParams p,                   \
        AccOf<T>::type* stats, T* grad, AccOf<T>::type* grad_scale) {                            \
        fused<T>(x, targets, scale, weights, poly, p, stats, grad, grad_scale);                  \
    }

MS_FUSED_ENTRY(float, f32, 4)
MS_FUSED_ENTRY(double, f64, 2)
MS_FUSED_ENTRY(__half, f16, 4)
#if __CUDA_ARCH__ >= 800
MS_FUSED_ENTRY(__nv_bfloat16, bf16, 4)
#endif
