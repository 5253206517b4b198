// loss_and_grad for rows that fit in shared memory: one block of MS_BLOCK threads per row reads
// the row once by 16-byte vectors into shared memory while forming its online statistics
// (push_vector in rows.cuh), finishes the row, then writes the gradient from shared memory with
// 16-byte stores: one read and one write per element. The row may use all the dynamic shared
// memory the device allows a block (the host opts in above 48 KiB: src/backends/launch/mod.rs plans it).
// One entry point per variant (ms_fused_{identity|cosine|rbf}[_ext]_T). On sm_90, rows that
// do not fit in one block's shared memory but in MS_CLUSTER blocks' take ms_fused_cluster: a
// thread-block cluster per row, each block holding a slice, the slices' statistics merged
// through distributed shared memory; still one read and one write per element. Wider rows take
// ms_fused_l2 (below: the second read from L2), or forward_partial -> forward_finalize ->
// backward on a GPU without cooperative launch.
//
// Shared memory layout: element j of the row at row_s[pad + j], pad < V chosen so that the
// elements walk_row reads by vectors sit at 16-byte boundaries of shared memory too; the
// dynamic size is round_up((C + V - 1) * sizeof(T), 16).
#include "rows.cuh"
#ifdef __CUDACC__
#include <cooperative_groups.h>
#endif

// Finishes a row that several blocks share (a cluster's, or the L2 kernel's slices), in each of
// them, from the statistics of its non-target entries `others` (the same bits in every block):
// its backward info into `info`; the one block with `owner` also writes its statistics to st and
// d(loss)/d(scale) to *grad_scale. xr is the row (its target's input is read for y >= 0 only).
template <typename T, typename A>
__device__ __forceinline__ void finish_shared_row(const MsParams& p, const A* __restrict__ poly,
                                                  const A* __restrict__ weights, const T* xr,
                                                  long long y, A r, const Online<A>& others,
                                                  A up, bool owner, A* st, A* grad_scale,
                                                  A* info) {
    A row_stats[MS_STAT_COLUMNS];
    if (y < 0) {
        finalize_skipped_row(y, r, row_stats, info);
    } else {
        const A weight = p.has_weights ? weights[y] : A(1);
        finalize_row(p, poly, weight, r, to_acc(xr[y]), others, up, row_stats, info);
    }
    if (owner) {
#pragma unroll
        for (int c = 0; c < MS_STAT_COLUMNS; ++c) st[c] = row_stats[c];
        *grad_scale = row_stats[7] * up;
    }
}

template <typename T, int TR, bool EXT>
__device__ void fused(const T* __restrict__ x, const int* __restrict__ targets,
                      const typename AccOf<T>::type* __restrict__ scale,
                      const typename AccOf<T>::type* __restrict__ weights,
                      const typename AccOf<T>::type* __restrict__ poly, MsParams p,
                      typename AccOf<T>::type* __restrict__ stats, T* __restrict__ grad,
                      typename AccOf<T>::type* __restrict__ grad_scale,
                      const typename AccOf<T>::type* __restrict__ upstream) {
    typedef typename AccOf<T>::type A;
    extern __shared__ __align__(16) unsigned char shared_row[];
    __shared__ A info_s[MS_ROWINFO_COLUMNS];
    require_block<MS_BLOCK>();
    const A up = *upstream;
    for (long long row = blockIdx.x; row < p.rows; row += gridDim.x) {
        const T* xr = x + row * p.row_stride;
        const long long y = targets[row];
        const A r = scale[row];
        T* cache = slice_cache(shared_row, xr, p.classes);
        Online<A> s = online_empty<A>();
        cache_and_push<TR, EXT>(p, weights, xr, 0, p.classes, cache, y, r, threadIdx.x, MS_BLOCK,
                                s);
        s = block_reduce_online<MS_BLOCK>(s);  // synchronizes: the cached row is complete after it
        if (threadIdx.x == 0) {
            A* st = stats + row * MS_STAT_COLUMNS;
            if (y < 0) {
                finalize_skipped_row(y, r, st, info_s);
            } else {
                const A weight = p.has_weights ? weights[y] : A(1);
                finalize_row(p, poly, weight, r, to_acc(cache[y]), s, up, st, info_s);
            }
            grad_scale[row] = st[7] * up;
        }
        __syncthreads();
        A info[MS_ROWINFO_COLUMNS];
#pragma unroll
        for (int c = 0; c < MS_ROWINFO_COLUMNS; ++c) info[c] = info_s[c];
        write_gradient<TR, EXT>(p, weights, info, xr, cache, grad + row * p.classes, 0, p.classes,
                                y, threadIdx.x, MS_BLOCK);
        __syncthreads();  // the cached row and info_s are rewritten by the next row
    }
}

// loss_and_grad for narrow rows: one warp per row, MS_BLOCK / 32 rows per block at a time, each
// warp caching its row in its own slot of dynamic shared memory (fused_shared_bytes(C) bytes,
// the layout of ms_fused), reducing it with shuffles and lane 0 finishing it; no block barrier.
// For rows whose slots fit in a few KiB, where a block per row would leave most of its threads
// without an element and wait on thread 0.
template <typename T, int TR, bool EXT>
__device__ void fused_warp(const T* __restrict__ x, const int* __restrict__ targets,
                           const typename AccOf<T>::type* __restrict__ scale,
                           const typename AccOf<T>::type* __restrict__ weights,
                           const typename AccOf<T>::type* __restrict__ poly, MsParams p,
                           typename AccOf<T>::type* __restrict__ stats, T* __restrict__ grad,
                           typename AccOf<T>::type* __restrict__ grad_scale,
                           const typename AccOf<T>::type* __restrict__ upstream) {
    typedef typename AccOf<T>::type A;
    constexpr int V = VecWidth<T>::value;
    constexpr int WARPS = MS_BLOCK / 32;
    extern __shared__ __align__(16) unsigned char shared_row[];
    __shared__ A info_w[WARPS][MS_ROWINFO_COLUMNS];
    require_block<MS_BLOCK>();
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const long long slot = ((p.classes + V - 1) * (long long)sizeof(T) + 15) / 16 * 16;
    const A up = *upstream;
    for (long long row = (long long)blockIdx.x * WARPS + warp; row < p.rows;
         row += (long long)gridDim.x * WARPS) {
        const T* xr = x + row * p.row_stride;
        const long long y = targets[row];
        const A r = scale[row];
        T* cache = slice_cache(shared_row + warp * slot, xr, p.classes);
        Online<A> s = online_empty<A>();
        cache_and_push<TR, EXT>(p, weights, xr, 0, p.classes, cache, y, r, lane, 32, s);
        s = warp_reduce_online(s);  // lane 0's result is the one used
        A* info_s = info_w[warp];
        if (lane == 0) {
            A* st = stats + row * MS_STAT_COLUMNS;
            if (y < 0) {
                finalize_skipped_row(y, r, st, info_s);
            } else {
                const A weight = p.has_weights ? weights[y] : A(1);
                finalize_row(p, poly, weight, r, to_acc(xr[y]), s, up, st, info_s);
            }
            grad_scale[row] = st[7] * up;
        }
        __syncwarp();  // the cached row and the row info are complete
        A info[MS_ROWINFO_COLUMNS];
#pragma unroll
        for (int c = 0; c < MS_ROWINFO_COLUMNS; ++c) info[c] = info_s[c];
        write_gradient<TR, EXT>(p, weights, info, xr, cache, grad + row * p.classes, 0, p.classes,
                                y, lane, 32);
        __syncwarp();  // the slot and the row info are rewritten by the warp's next row
    }
}

// loss_and_grad for rows wider than one pass allows (kernels/README.md: which rows on which
// GPU), one read from memory and a second from L2: a cooperative grid of co-resident blocks
// takes the rows in groups of `group_rows` (planned so that two groups fit in L2 with room to
// spare) and each row in p.splits slices (split_range). Phase g, for g = 0..groups:
//   - the slices of group g - 1 (read in phase g - 1, still in L2): every block merges its row's
//     p.splits partial states in the same fixed order (merge_partials: the same bits in every
//     block), finishes the row (the slice-0 block writes its statistics and d(loss)/d(scale))
//     and writes its slice's gradient;
//   - the slices of group g (from memory): their online states into `partials` (push_split);
// then a grid barrier (none after the last phase). The backward of a group thus overlaps the
// forward of the next: one barrier per group. partials: rows * p.splits * MS_PARTIAL_COLUMNS.
template <typename T, int TR, bool EXT>
__device__ void fused_l2(const T* __restrict__ x, const int* __restrict__ targets,
                         const typename AccOf<T>::type* __restrict__ scale,
                         const typename AccOf<T>::type* __restrict__ weights,
                         const typename AccOf<T>::type* __restrict__ poly, MsParams p,
                         typename AccOf<T>::type* __restrict__ stats, T* __restrict__ grad,
                         typename AccOf<T>::type* __restrict__ grad_scale,
                         const typename AccOf<T>::type* __restrict__ upstream,
                         typename AccOf<T>::type* __restrict__ partials, long long group_rows) {
    typedef typename AccOf<T>::type A;
    __shared__ A info_s[MS_ROWINFO_COLUMNS];
    require_block<MS_BLOCK>();
    cooperative_groups::grid_group grid = cooperative_groups::this_grid();
    const A up = *upstream;
    // The host checks that rows * splits fits in an int (src/backends/launch/mod.rs: params): the phase
    // bookkeeping lives in 32-bit registers, the element loops' state in the rest.
    const int rows = (int)p.rows;
    const int splits = p.splits;
    const int group = (int)group_rows;
    const int groups = (rows + group - 1) / group;
    for (int g = 0; g <= groups; ++g) {
        // Rows [back, back + back_rows) take their gradient, [ahead, ahead + ahead_rows) their
        // partial states.
        const int back = (g - 1) * group;
        const int back_rows = g == 0 ? 0 : (int)min_ll(group, rows - back);
        const int ahead = g * group;
        const int ahead_rows = g == groups ? 0 : (int)min_ll(group, rows - ahead);
        const int back_items = back_rows * splits;
        const int items = back_items + ahead_rows * splits;
        for (int item = blockIdx.x; item < items; item += gridDim.x) {
            if (item >= back_items) {
                const int k = item - back_items;
                push_split<T, TR, EXT>(x, targets, scale, weights, p, ahead + k / splits,
                                       k % splits, partials);
                continue;
            }
            const long long row = back + item / splits;
            const int split = item % splits;
            const T* xr = x + row * p.row_stride;
            const long long y = targets[row];
            const A r = scale[row];
            if (threadIdx.x < 32) {
                const Online<A> others =
                    merge_partials(partials + row * splits * MS_PARTIAL_COLUMNS, splits);
                if (threadIdx.x == 0) {
                    finish_shared_row(p, poly, weights, xr, y, r, others, up, split == 0,
                                      stats + row * MS_STAT_COLUMNS, grad_scale + row, info_s);
                }
            }
            __syncthreads();
            A info[MS_ROWINFO_COLUMNS];
#pragma unroll
            for (int c = 0; c < MS_ROWINFO_COLUMNS; ++c) info[c] = info_s[c];
            long long start, end;
            split_range<T>(p, split, start, end);
            write_gradient<TR, EXT>(p, weights, info, xr, xr + start, grad + row * p.classes,
                                    start, end, y, threadIdx.x, MS_BLOCK);
            __syncthreads();  // info_s is rewritten by the block's next item
        }
        if (g < groups) grid.sync();  // group g's partial states are complete
    }
}

// MIN_BLOCKS, the blocks per SM the entry is compiled for, bounds its registers by
// 65536 / (MS_BLOCK * MIN_BLOCKS): 4 (64 registers) for the f32-accumulating entries, 2 (128) for
// f64, whose pow is a real call: at the 64-register target ptxas picks for 256-thread blocks
// without a hint, the values live across that call spill.
#define MS_FUSED_ENTRY(T, SUFFIX, NAME, TR, EXT, MIN_BLOCKS)                                          \
    extern "C" __global__ void __launch_bounds__(MS_BLOCK, MIN_BLOCKS)                           \
        ms_fused_##NAME##_##SUFFIX(const T* x, const int* targets, const AccOf<T>::type* scale,  \
                                   const AccOf<T>::type* weights, const AccOf<T>::type* poly,    \
                                   MsParams p, AccOf<T>::type* stats, T* grad,                   \
                                   AccOf<T>::type* grad_scale, const AccOf<T>::type* upstream) { \
        fused<T, TR, EXT>(x, targets, scale, weights, poly, p, stats, grad, grad_scale, upstream);    \
    }
// The warp kernel's `_ext` entries keep more per-row state live across their element loops:
// at 64 registers they spill, so they are compiled for 2 blocks per SM (128 registers).
#define MS_FUSED_WARP_ENTRY(T, SUFFIX, NAME, TR, EXT, MIN_BLOCKS)                                \
    extern "C" __global__ void __launch_bounds__(MS_BLOCK, (EXT) ? 2 : (MIN_BLOCKS))             \
        ms_fused_warp_##NAME##_##SUFFIX(const T* x, const int* targets,                          \
                                        const AccOf<T>::type* scale,                             \
                                        const AccOf<T>::type* weights,                           \
                                        const AccOf<T>::type* poly, MsParams p,                  \
                                        AccOf<T>::type* stats, T* grad,                          \
                                        AccOf<T>::type* grad_scale,                              \
                                        const AccOf<T>::type* upstream) {                        \
        fused_warp<T, TR, EXT>(x, targets, scale, weights, poly, p, stats, grad, grad_scale,     \
                               upstream);                                                        \
    }
// The L2 kernel holds both halves of a row's work in one loop: at 64 registers it spills, so
// it is compiled for 3 blocks per SM (80 registers), its `_ext` entries and f64 for 2 (128),
// and runs as a cooperative grid of exactly that many blocks per SM, the residency the register
// bound guarantees (src/backends/launch/mod.rs: l2_blocks_per_sm).
#define MS_FUSED_L2_ENTRY(T, SUFFIX, NAME, TR, EXT, MIN_BLOCKS)                                  \
    extern "C" __global__ void __launch_bounds__(MS_BLOCK, (EXT) ? 2 : (MIN_BLOCKS))             \
        ms_fused_l2_##NAME##_##SUFFIX(const T* x, const int* targets,                            \
                                      const AccOf<T>::type* scale,                               \
                                      const AccOf<T>::type* weights,                             \
                                      const AccOf<T>::type* poly, MsParams p,                    \
                                      AccOf<T>::type* stats, T* grad, AccOf<T>::type* grad_scale, \
                                      const AccOf<T>::type* upstream,                            \
                                      AccOf<T>::type* partials, long long group_rows) {          \
        fused_l2<T, TR, EXT>(x, targets, scale, weights, poly, p, stats, grad, grad_scale,       \
                             upstream, partials, group_rows);                                    \
    }
#define MS_FUSED_ENTRY_4(T, SUFFIX, NAME, TR, EXT) \
    MS_FUSED_ENTRY(T, SUFFIX, NAME, TR, EXT, 4)    \
    MS_FUSED_WARP_ENTRY(T, SUFFIX, NAME, TR, EXT, 4) \
    MS_FUSED_L2_ENTRY(T, SUFFIX, NAME, TR, EXT, 3)
#define MS_FUSED_ENTRY_2(T, SUFFIX, NAME, TR, EXT) \
    MS_FUSED_ENTRY(T, SUFFIX, NAME, TR, EXT, 2)    \
    MS_FUSED_WARP_ENTRY(T, SUFFIX, NAME, TR, EXT, 2) \
    MS_FUSED_L2_ENTRY(T, SUFFIX, NAME, TR, EXT, 2)

MS_PER_TRANSFORM(MS_FUSED_ENTRY_4, float, f32)
MS_PER_TRANSFORM(MS_FUSED_ENTRY_2, double, f64)
MS_PER_TRANSFORM(MS_FUSED_ENTRY_4, __half, f16)
#if __CUDA_ARCH__ >= 800
MS_PER_TRANSFORM(MS_FUSED_ENTRY_4, __nv_bfloat16, bf16)
#endif

#if __CUDA_ARCH__ >= 900

// loss_and_grad for rows that fit in the shared memory of MS_CLUSTER blocks (sm_90): the blocks
// of a cluster take consecutive slices of a row (of round_up(ceil(C / MS_CLUSTER), V) classes,
// the last one shorter), cache them in shared memory while forming their online statistics,
// publish them in shared memory, and after a cluster barrier every block's thread 0 merges the
// MS_CLUSTER states in rank order through distributed shared memory (the same merge, hence the
// same bits, in every block) and finishes the row; each block then writes its slice's gradient.
// A second cluster barrier ends the row: no block rewrites its published state, or exits,
// while another may still read it. Grid: MS_CLUSTER blocks per cluster, grid-stride over rows
// by clusters. Shared memory layout of a slice: as ms_fused's, relative to the slice's start.
template <typename T, int TR, bool EXT>
__device__ void fused_cluster(const T* __restrict__ x, const int* __restrict__ targets,
                              const typename AccOf<T>::type* __restrict__ scale,
                              const typename AccOf<T>::type* __restrict__ weights,
                              const typename AccOf<T>::type* __restrict__ poly, MsParams p,
                              typename AccOf<T>::type* __restrict__ stats, T* __restrict__ grad,
                              typename AccOf<T>::type* __restrict__ grad_scale,
                              const typename AccOf<T>::type* __restrict__ upstream) {
    typedef typename AccOf<T>::type A;
    constexpr int V = VecWidth<T>::value;
    extern __shared__ __align__(16) unsigned char shared_row[];
    __shared__ A info_s[MS_ROWINFO_COLUMNS];
    __shared__ Online<A> slice_state;
    require_block<MS_BLOCK>();
    cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
    const unsigned rank = cluster.block_rank();
    const A up = *upstream;
    long long per = (p.classes + MS_CLUSTER - 1) / MS_CLUSTER;
    per = (per + V - 1) / V * V;
    const long long start = rank * per < p.classes ? rank * per : p.classes;
    const long long end = start + per < p.classes ? start + per : p.classes;
    for (long long row = blockIdx.x / MS_CLUSTER; row < p.rows; row += gridDim.x / MS_CLUSTER) {
        const T* xr = x + row * p.row_stride;
        const long long y = targets[row];
        const A r = scale[row];
        T* cache = slice_cache(shared_row, xr + start, end - start);
        Online<A> s = online_empty<A>();
        cache_and_push<TR, EXT>(p, weights, xr, start, end, cache, y, r, threadIdx.x, MS_BLOCK, s);
        s = block_reduce_online<MS_BLOCK>(s);
        if (threadIdx.x == 0) slice_state = s;
        cluster.sync();  // every slice's state is published
        if (threadIdx.x == 0) {
            Online<A> others = online_empty<A>();
            for (unsigned k = 0; k < MS_CLUSTER; ++k) {
                others = online_merge(others, *cluster.map_shared_rank(&slice_state, k));
            }
            finish_shared_row(p, poly, weights, xr, y, r, others, up, rank == 0,
                              stats + row * MS_STAT_COLUMNS, grad_scale + row, info_s);
        }
        __syncthreads();
        A info[MS_ROWINFO_COLUMNS];
#pragma unroll
        for (int c = 0; c < MS_ROWINFO_COLUMNS; ++c) info[c] = info_s[c];
        write_gradient<TR, EXT>(p, weights, info, xr, cache, grad + row * p.classes, start, end, y,
                                threadIdx.x, MS_BLOCK);
        cluster.sync();  // the published states are read; the cache and info_s are free
    }
}

#define MS_FUSED_CLUSTER_ENTRY(T, SUFFIX, NAME, TR, EXT, MIN_BLOCKS)                             \
    extern "C" __global__ void __cluster_dims__(MS_CLUSTER, 1, 1)                                \
        __launch_bounds__(MS_BLOCK, MIN_BLOCKS) ms_fused_cluster_##NAME##_##SUFFIX(               \
            const T* x, const int* targets, const AccOf<T>::type* scale,                         \
            const AccOf<T>::type* weights, const AccOf<T>::type* poly, MsParams p,               \
            AccOf<T>::type* stats, T* grad, AccOf<T>::type* grad_scale,                          \
            const AccOf<T>::type* upstream) {                                                    \
        fused_cluster<T, TR, EXT>(x, targets, scale, weights, poly, p, stats, grad, grad_scale,  \
                                  upstream);                                                     \
    }
#define MS_FUSED_CLUSTER_ENTRY_4(T, SUFFIX, NAME, TR, EXT) \
    MS_FUSED_CLUSTER_ENTRY(T, SUFFIX, NAME, TR, EXT, 4)
#define MS_FUSED_CLUSTER_ENTRY_2(T, SUFFIX, NAME, TR, EXT) \
    MS_FUSED_CLUSTER_ENTRY(T, SUFFIX, NAME, TR, EXT, 2)

MS_PER_TRANSFORM(MS_FUSED_CLUSTER_ENTRY_4, float, f32)
MS_PER_TRANSFORM(MS_FUSED_CLUSTER_ENTRY_2, double, f64)
MS_PER_TRANSFORM(MS_FUSED_CLUSTER_ENTRY_4, __half, f16)
MS_PER_TRANSFORM(MS_FUSED_CLUSTER_ENTRY_4, __nv_bfloat16, bf16)
#endif  // __CUDA_ARCH__ >= 900
