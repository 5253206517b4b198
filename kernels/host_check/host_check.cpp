// The kernels' per-row algorithm replayed on the CPU with the kernels' own math (heads.cuh and
// common.cuh compiled as host C++): per split, the online statistics of the non-target entries
// of the split's slice; the splits merged in order into the target-seeded state; finalize_row;
// then grad_element for every entry. Linked into the crate's unit tests under the
// `kernel-host-check` feature (see build.rs and src/backends/kernel_check.rs); not part of the library.
#define MS_HOST_CHECK
#include "../heads.cuh"

template <typename A>
static void replay_row(const MsParams* p, const A* poly, const A* weights, const A* x, int target,
                       A scale, A* stats, A* info, A* grad) {
    const long long classes = p->classes;
    if (target < 0) {
        for (int c = 0; c < MS_STAT_COLUMNS; ++c) stats[c] = A(0);
        for (int c = 0; c < MS_ROWINFO_COLUMNS; ++c) info[c] = A(0);
        for (long long j = 0; j < classes; ++j) grad[j] = A(0);
        return;
    }
    // The slices of forward_partial (split_range in forward.cu, vector width of T = A).
    const long long width = 16 / sizeof(A);
    long long per = (classes + p->splits - 1) / p->splits;
    per = (per + width - 1) / width * width;
    Online<A> others = online_empty<A>();
    for (int split = 0; split < p->splits; ++split) {
        const long long start = split * per;
        const long long end = start + per < classes ? start + per : classes;
        Online<A> part = online_empty<A>();
        for (long long j = start; j < end; ++j) {
            if (j == target) continue;
            push_entry(*p, weights, part, scale, x[j], j);
        }
        others = online_merge(others, part);
    }
    const A weight = p->has_weights ? weights[target] : A(1);
    finalize_row(*p, poly, weight, scale, x[target], others, A(1), stats, info);
    for (long long j = 0; j < classes; ++j) {
        grad[j] = grad_element(*p, info, x[j], j == target, smoothing_weight(*p, weights, j));
    }
}

extern "C" void ms_host_replay_row_f32(const MsParams* p, const float* poly, const float* weights,
                                       const float* x, int target, float scale, float* stats,
                                       float* info, float* grad) {
    replay_row<float>(p, poly, weights, x, target, scale, stats, info, grad);
}

extern "C" void ms_host_replay_row_f64(const MsParams* p, const double* poly,
                                       const double* weights, const double* x, int target,
                                       double scale, double* stats, double* info, double* grad) {
    replay_row<double>(p, poly, weights, x, target, scale, stats, info, grad);
}
