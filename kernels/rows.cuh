// The element loops shared by the kernels: walking a slice of a row by 16-byte vectors, and the
// online statistics of one vector with a single max-rescale and no per-element target test.
//
// Per element of the steady-state loops (transform and element type fixed at compile time,
// options uniform over the launch): one conversion, z = r*u, a max, (z - max)*log2(e), 2^t and
// a sum in the forward; z, (z - max - ln_sum)*log2(e), 2^t, one FMA and a conversion in the
// backward. The target is looked for once per vector; a vector holding it, soft-capping and
// non-finite maxima take the scalar online_push path of common.cuh.
#pragma once

#include "heads.cuh"

#ifndef MS_HOST_CHECK

// Calls scalar(j) for the elements of [start, end) of the row at `row` that precede its first
// 16-byte boundary, vector(j0) for each aligned run of V = 16 / sizeof(T) elements, scalar(j)
// for the tail; the elements are spread over `threads` threads starting at `thread`. A row
// whose elements are not naturally aligned (never from candle) goes scalar throughout. Returns
// nothing: the callbacks do the work.
// The number of elements of the n at `from` before its first 16-byte boundary (n when the
// elements are not naturally aligned, or none is on a boundary).
template <typename T> __device__ __forceinline__ long long row_head(const T* from, long long n) {
    const uintptr_t misalign = reinterpret_cast<uintptr_t>(from) & 15;
    long long head = misalign == 0 ? 0 : (long long)((16 - misalign) / sizeof(T));
    if (head > n || !aligned16(from + head)) head = n;
    return head;
}

template <typename T, typename Scalar, typename Vector>
__device__ __forceinline__ void walk_row(const T* row, long long start, long long end,
                                         long long thread, long long threads, Scalar&& scalar,
                                         Vector&& vector) {
    constexpr int V = VecWidth<T>::value;
    const long long body = start + row_head(row + start, end - start);
    const long long vectors = (end - body) / V;
    const long long tail = body + vectors * V;
    for (long long j = start + thread; j < body; j += threads) scalar(j);
    for (long long k = thread; k < vectors; k += threads) vector(body + k * V);
    for (long long j = tail + thread; j < end; j += threads) scalar(j);
}

// walk_row whose vectors go by fast(j0), which returns false, having changed nothing, for a
// vector it cannot take; slow(j0) then takes that one. The steady-state loop is fast's alone:
// slow runs in an enclosing loop, out of the element loop's instruction stream.
template <typename T, typename Scalar, typename Fast, typename Slow>
__device__ __forceinline__ void walk_row(const T* row, long long start, long long end,
                                         long long thread, long long threads, Scalar&& scalar,
                                         Fast&& fast, Slow&& slow) {
    constexpr int V = VecWidth<T>::value;
    const long long body = start + row_head(row + start, end - start);
    const long long vectors = (end - body) / V;
    const long long tail = body + vectors * V;
    for (long long j = start + thread; j < body; j += threads) scalar(j);
    for (long long k = thread; k < vectors;) {
        while (k < vectors && fast(body + k * V)) k += threads;
        if (k < vectors) {
            slow(body + k * V);
            k += threads;
        }
    }
    for (long long j = tail + thread; j < end; j += threads) scalar(j);
}

// Whether [j0, j0 + n) holds class y.
__device__ __forceinline__ bool holds(long long j0, int n, long long y) {
    return (unsigned long long)(y - j0) < (unsigned long long)n;
}

// The V elements of the 16-byte vector at x (aligned), as the accumulation type.
template <typename T>
__device__ __forceinline__ void load_vector(const T* x, typename AccOf<T>::type* out) {
    constexpr int V = VecWidth<T>::value;
    const uint4 raw = *reinterpret_cast<const uint4*>(x);
    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = to_acc(v[i]);
}

// Adds the V entries in[0..V) (inputs of classes j0..j0+V) of a row with scale r and target y to
// the online state s when it can: rescaling once per vector, the exponentials as ms_exp_mul
// (2^((z - max) * log2 e) in f32). Returns false, s unchanged, for a vector that holds the
// target, has a non-finite max or is soft-capped: push_slow takes it. EXT: the launch may use
// label smoothing, the row scale's gradient or soft-capping (the host picks the entry point:
// without EXT none of them).
template <int TR, int V, bool EXT, typename A>
__device__ __forceinline__ bool push_vector(const MsParams& p, const A* __restrict__ weights,
                                            Online<A>& s, A r, const A* in, long long j0,
                                            long long y) {
    A u[V], z[V];
    A m = s.max;
#pragma unroll
    for (int i = 0; i < V; ++i) {
        u[i] = head_u<TR>(p, in[i]);
        z[i] = r * u[i];
        m = z[i] > m ? z[i] : m;  // NaN never wins: it reaches the sums through 2^NaN
    }
    if (MS_UNLIKELY(holds(j0, V, y) || (EXT && p.softcapped) ||
                    !(m > neg_infinity<A>() && m < -neg_infinity<A>()))) {
        return false;
    }
    if (MS_UNLIKELY(m > s.max)) {
        const A rescale = ms_exp(s.max - m);
        s.sum_exp *= rescale;
        s.sum_exp_v *= rescale;
        s.max = m;
    }
    A sum = A(0), sum_v = A(0);
#pragma unroll
    for (int i = 0; i < V; ++i) {
        const A e = ms_exp_mul(z[i] - m, 1.0);
        sum += e;
        if (EXT && p.scale_grad) sum_v += times_nonzero(e, u[i]);
    }
    s.sum_exp += sum;
    if constexpr (EXT) {
        s.sum_exp_v += sum_v;
        // The smoothing term's sum w*v (sum w*z is only read with soft-capping, not here).
        if (p.smoothing > 0.0) {
#pragma unroll
            for (int i = 0; i < V; ++i) {
                s.sum_wv += times_nonzero(smoothing_weight(p, weights, j0 + i), u[i]);
            }
        }
    }
    return true;
}

// The vectors push_vector declines, entry by entry (online_push), the target skipped; class j
// at src[j - offset].
template <int TR, typename T, typename A>
__device__ void push_slow(const MsParams& p, const A* __restrict__ weights, Online<A>& s, A r,
                          const T* src, long long offset, long long j0, long long y) {
    constexpr int V = VecWidth<T>::value;
    for (int i = 0; i < V; ++i) {
        if (j0 + i != y) push_other<TR>(p, weights, s, r, to_acc(src[j0 - offset + i]), j0 + i);
    }
}

// The gradient of the V elements of classes j0.. (at src + (j0 - offset), 16-byte aligned) into
// out, all as non-target elements: the caller overwrites the target's afterwards (grad_target
// at one call site per kernel: its margin math is large). Returns false, having written
// nothing, under soft-capping: grad_slow takes those vectors.
template <int TR, int V, bool EXT, typename T, typename A>
__device__ __forceinline__ bool grad_vector(const MsParams& p, const GradRow<A>& g,
                                            const A* __restrict__ weights, const T* src,
                                            long long offset, long long j0, A* out) {
    if (MS_UNLIKELY(EXT && p.softcapped)) return false;
    A in[V];
    load_vector(src + (j0 - offset), in);
#pragma unroll
    for (int i = 0; i < V; ++i) {
        out[i] = grad_other<TR, EXT, false>(p, g, in[i], smoothing_weight(p, weights, j0 + i));
    }
    return true;
}

// The vectors grad_vector declines, element by element.
template <int TR, int V, typename T, typename A>
__device__ void grad_slow(const MsParams& p, const GradRow<A>& g, const A* __restrict__ weights,
                          const T* src, long long offset, long long j0, A* out) {
    for (int i = 0; i < V; ++i) {
        out[i] = grad_other_any<TR>(p, g, to_acc(src[j0 - offset + i]),
                                    smoothing_weight(p, weights, j0 + i));
    }
}

// Stores V gradient values at out (16-byte aligned when `vector_store`).
template <typename T>
__device__ __forceinline__ void store_vector(T* out, const typename AccOf<T>::type* g,
                                             bool vector_store) {
    constexpr int V = VecWidth<T>::value;
    if (vector_store) {
        uint4 raw;
        T* v = reinterpret_cast<T*>(&raw);
#pragma unroll
        for (int i = 0; i < V; ++i) v[i] = from_acc<T>(g[i]);
        *reinterpret_cast<uint4*>(out) = raw;
    } else {
#pragma unroll
        for (int i = 0; i < V; ++i) out[i] = from_acc<T>(g[i]);
    }
}

// A non-target element's gradient (class j, input x).
template <int TR, typename A>
__device__ __forceinline__ A grad_other_at(const MsParams& p, const GradRow<A>& g,
                                           const A* __restrict__ weights, A x, long long j) {
    return grad_other_any<TR>(p, g, x, smoothing_weight(p, weights, j));
}

// Writes `value` to the n elements at out (a gradient row of an ignored or invalid row).
template <typename T, typename A>
__device__ __forceinline__ void fill_row(T* out, long long n, A value, long long thread,
                                         long long threads) {
    constexpr int V = VecWidth<T>::value;
    A values[V];
#pragma unroll
    for (int i = 0; i < V; ++i) values[i] = value;
    walk_row(
        out, 0, n, thread, threads, [&](long long j) { out[j] = from_acc<T>(value); },
        [&](long long j0) { store_vector(out + j0, values, true); });
}

// Where the shared-memory copy of the n classes at `from` starts in `base`: offset by less than
// one vector, so that the elements walk_row reads by vectors sit at 16-byte boundaries of
// shared memory too (fused_shared_bytes(n) bytes from base hold it: src/backends/launch/mod.rs).
template <typename T>
__device__ __forceinline__ T* slice_cache(unsigned char* base, const T* from, long long n) {
    constexpr int V = VecWidth<T>::value;
    return reinterpret_cast<T*>(base) + (V - row_head(from, n) % V) % V;
}

// The forward half of the one-pass kernels: copies classes [start, end) of the row xr to
// cache (class j at cache[j - start], laid out by slice_cache) while adding its non-target
// entries, for target y and row scale r, to s; the slice spread over `threads` threads.
template <int TR, bool EXT, typename T, typename A>
__device__ __forceinline__ void cache_and_push(const MsParams& p, const A* __restrict__ weights,
                                               const T* xr, long long start, long long end,
                                               T* cache, long long y, A r, long long thread,
                                               long long threads, Online<A>& s) {
    constexpr int V = VecWidth<T>::value;
    walk_row(
        xr, start, end, thread, threads,
        [&](long long j) {
            const T v = xr[j];
            cache[j - start] = v;
            if (y >= 0 && j != y) push_other<TR>(p, weights, s, r, to_acc(v), j);
        },
        [&](long long j0) {
            const uint4 raw = *reinterpret_cast<const uint4*>(xr + j0);
            *reinterpret_cast<uint4*>(cache + (j0 - start)) = raw;
            if (y < 0) return true;
            A in[V];
            load_vector(cache + (j0 - start), in);
            return push_vector<TR, V, EXT>(p, weights, s, r, in, j0, y);
        },
        // This thread cached the vector: push_slow reads it back.
        [&](long long j0) { push_slow<TR>(p, weights, s, r, cache, start, j0, y); });
}

// The gradient of classes [start, end) of the row xr into its gradient row gr, from the row's
// backward info and the inputs at src (class j at src[j - start]: the row itself, or its
// shared-memory copy); an ignored row gets zeros, an invalid one NaN. The slice spread over
// `threads` threads; the thread whose part holds the target writes its gradient last.
template <int TR, bool EXT, typename T, typename A>
__device__ __forceinline__ void write_gradient(const MsParams& p, const A* __restrict__ weights,
                                               const A* info, const T* xr, const T* src,
                                               T* gr, long long start, long long end,
                                               long long y, long long thread,
                                               long long threads) {
    constexpr int V = VecWidth<T>::value;
    if (y < 0) {
        fill_row(gr + start, end - start, y == MS_TARGET_INVALID ? A(NAN) : A(0), thread,
                 threads);
        return;
    }
    const GradRow<A> g = grad_row(info);
    // Where walk_row's vectors start in xr, gr is 16-byte aligned too iff the rows are in the
    // same phase (the usual case).
    const bool vector_store =
        ((reinterpret_cast<uintptr_t>(xr) ^ reinterpret_cast<uintptr_t>(gr)) & 15) == 0;
    bool has_target = false;  // this thread wrote element y (as a non-target)
    walk_row(
        xr, start, end, thread, threads,
        [&](long long j) {
            gr[j] = from_acc<T>(grad_other_at<TR>(p, g, weights, to_acc(src[j - start]), j));
            has_target |= j == y;
        },
        [&](long long j0) {
            A out[V];
            if (!grad_vector<TR, V, EXT>(p, g, weights, src, start, j0, out)) return false;
            store_vector(gr + j0, out, vector_store);
            has_target |= holds(j0, V, y);
            return true;
        },
        [&](long long j0) {
            A out[V];
            grad_slow<TR, V>(p, g, weights, src, start, j0, out);
            store_vector(gr + j0, out, vector_store);
            has_target |= holds(j0, V, y);
        });
    if (has_target) gr[y] = from_acc<T>(grad_target(p, info, to_acc(src[y - start])));
}

// The slice of a row that split `split` of p.splits covers: its start a multiple of the vector
// width (the last slice shorter, or empty when the rounding leaves it nothing).
template <typename T>
__device__ __forceinline__ void split_range(const MsParams& p, long long split, long long& start,
                                            long long& end) {
    constexpr int V = VecWidth<T>::value;
    long long per = (p.classes + p.splits - 1) / p.splits;
    per = (per + V - 1) / V * V;
    start = split * per < p.classes ? split * per : p.classes;
    end = start + per < p.classes ? start + per : p.classes;
}

// One block's part of a split row: the online state of the non-target entries of slice `split`
// of row `row` (empty for an ignored or invalid row), reduced over the block and written by
// thread 0 to partials[(row * p.splits + split) * MS_PARTIAL_COLUMNS ..]. Every thread of the
// block calls it (it synchronizes).
template <typename T, int TR, bool EXT>
__device__ __forceinline__ void push_split(const T* __restrict__ x, const int* __restrict__ targets,
                                           const typename AccOf<T>::type* __restrict__ scale,
                                           const typename AccOf<T>::type* __restrict__ weights,
                                           const MsParams& p, long long row, long long split,
                                           typename AccOf<T>::type* __restrict__ partials) {
    typedef typename AccOf<T>::type A;
    constexpr int V = VecWidth<T>::value;
    const long long y = targets[row];
    Online<A> s = online_empty<A>();
    if (y >= 0) {
        long long start, end;
        split_range<T>(p, split, start, end);
        const T* xr = x + row * p.row_stride;
        const A r = scale[row];
        walk_row(
            xr, start, end, threadIdx.x, MS_BLOCK,
            [&](long long j) {
                if (j != y) push_other<TR>(p, weights, s, r, to_acc(xr[j]), j);
            },
            [&](long long j0) {
                A in[V];
                load_vector(xr + j0, in);
                return push_vector<TR, V, EXT>(p, weights, s, r, in, j0, y);
            },
            [&](long long j0) { push_slow<TR>(p, weights, s, r, xr, 0, j0, y); });
    }
    s = block_reduce_online<MS_BLOCK>(s);
    if (threadIdx.x == 0) {
        A* out = partials + (row * p.splits + split) * MS_PARTIAL_COLUMNS;
        out[0] = s.max;
        out[1] = s.sum_exp;
        out[2] = s.sum_exp_v;
        out[3] = s.sum_wv;
        out[4] = s.sum_wz;
    }
}

// The online state of one (row, split) as push_split wrote it.
template <typename A> __device__ __forceinline__ Online<A> load_partial(const A* q) {
    Online<A> s;
    s.max = q[0];
    s.sum_exp = q[1];
    s.sum_exp_v = q[2];
    s.sum_wv = q[3];
    s.sum_wz = q[4];
    return s;
}

__device__ __forceinline__ long long min_ll(long long a, long long b) { return a < b ? a : b; }

// The merge of the n partial states at q (push_split's layout) by one warp, in an order fixed
// by n alone: lane l merges its run of consecutive states in order, then the warp's butterfly
// (warp_reduce_online). Every lane of the warp calls it; lane 0's result is the one to use, the
// same bits wherever it is computed.
template <typename A> __device__ Online<A> merge_partials(const A* q, long long n) {
    const long long lane = threadIdx.x & 31;
    const long long run = (n + 31) / 32;
    const long long from = min_ll(lane * run, n);
    const long long to = min_ll(from + run, n);
    Online<A> s = online_empty<A>();
    for (long long k = from; k < to; ++k) s = online_merge(s, load_partial(q + k * MS_PARTIAL_COLUMNS));
    return warp_reduce_online(s);
}

// Stamps the entry points {op}_{identity|cosine|rbf}[_ext]_{SUFFIX} of one body: the element
// loops are compiled once per transform, and once more with the options that add work per
// element (label smoothing, the row scale's gradient, soft-capping: `_ext`), so that the loop
// of a launch without them holds nothing for them.
#define MS_PER_TRANSFORM(MACRO, T, SUFFIX)                         \
    MACRO(T, SUFFIX, identity, MS_TRANSFORM_IDENTITY, false)       \
    MACRO(T, SUFFIX, cosine, MS_TRANSFORM_COSINE, false)           \
    MACRO(T, SUFFIX, rbf, MS_TRANSFORM_RBF, false)                 \
    MACRO(T, SUFFIX, identity_ext, MS_TRANSFORM_IDENTITY, true)    \
    MACRO(T, SUFFIX, cosine_ext, MS_TRANSFORM_COSINE, true)        \
    MACRO(T, SUFFIX, rbf_ext, MS_TRANSFORM_RBF, true)

#endif  // MS_HOST_CHECK
