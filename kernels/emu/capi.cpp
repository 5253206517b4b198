// The crate's kernels (kernels/*.cu, unmodified) behind a C ABI that runs them on the CPU through
// the SIMT emulator (cuda_emu.h), for the Rust feature `kernel-emu` (src/backends/emu/), built by
// build.rs with the `cc` crate.
//
// This file plans nothing: every launch takes its grid, block and dynamic shared memory from the
// caller, which computes them with the same Rust code that launches the kernels on a GPU
// (src/backends/launch/mod.rs). Each entry point `ms_emu_<kernel>_<suffix>` runs one launch
// `ms_<kernel>_<suffix><<<grid, block, shared>>>(args...)` and returns when every block is done;
// an emulator error (a divergent barrier, a deadlock, an invalid launch) prints its report and
// aborts the process, and under ASan / UBSan / TSan any report does too.
#include "cuda_emu.h"
CUDA_EMU_DYNAMIC_SHARED(unsigned char, shared_row)
#include "backward.cu"
#include "forward.cu"
#include "fused.cu"
#include "targets.cu"

// One launch's shape, as src/backends/launch/mod.rs plans it (`Launch`, #[repr(C)] on the Rust side).
struct EmuLaunch {
    unsigned grid[3];
    unsigned block[3];
    unsigned shared_mem_bytes;
};

namespace {
// The emulator's launch configuration of a planned launch. Above 48 KiB of dynamic shared memory
// the CUDA backend opts the kernel into exactly the launch's size (the planner keeps it within
// the device's limit); the emulator still refuses more than an H200 allows.
cuda_emu::LaunchConfig config(const EmuLaunch* l) {
    cuda_emu::LaunchConfig c;
    c.grid = dim3(l->grid[0], l->grid[1], l->grid[2]);
    c.block = dim3(l->block[0], l->block[1], l->block[2]);
    c.dynamic_smem = l->shared_mem_bytes;
    c.max_dynamic_smem = std::max<size_t>(48 * 1024, l->shared_mem_bytes);
    return c;
}

// `cluster`: blocks per thread-block cluster (the kernel's __cluster_dims__ on a GPU).
template <class... P, class... A>
void launch_in_clusters(const EmuLaunch* l, unsigned cluster, void (*kernel)(P...),
                        A&&... args) {
    cuda_emu::LaunchConfig c = config(l);
    c.cluster = dim3(cluster, 1, 1);
    cuda_emu::launch_ex(c, kernel, std::forward<A>(args)...);
}

template <class... P, class... A>
void launch(const EmuLaunch* l, void (*kernel)(P...), A&&... args) {
    launch_in_clusters(l, 1, kernel, std::forward<A>(args)...);
}

// A cooperative launch (cudaLaunchCooperativeKernel: grid.sync() allowed).
template <class... P, class... A>
void launch_cooperative(const EmuLaunch* l, void (*kernel)(P...), A&&... args) {
    cuda_emu::LaunchConfig c = config(l);
    c.cooperative = true;
    cuda_emu::launch_ex(c, kernel, std::forward<A>(args)...);
}

// The entry point of `variant` (src/backends/launch/mod.rs's variant_index: MS_PER_TRANSFORM's order).
template <class K> K pick(int variant, K identity, K cosine, K rbf, K identity_ext, K cosine_ext,
                          K rbf_ext) {
    switch (variant) {
        case 0: return identity;
        case 1: return cosine;
        case 2: return rbf;
        case 3: return identity_ext;
        case 4: return cosine_ext;
        default: return rbf_ext;
    }
}
}  // namespace

// The constants of the kernel ABI as this build sees them, for the Rust side to compare with its
// own: sizeof(MsParams), alignof(MsParams), MS_BLOCK, MS_FINALIZE_BLOCK, MS_STAT_COLUMNS,
// MS_ROWINFO_COLUMNS, MS_PARTIAL_COLUMNS, MS_MAX_SPHERE_M, sizeof(EmuLaunch), MS_TARGETS_BLOCK,
// MS_CLUSTER, and the emulator's largest cooperative grid.
extern "C" void ms_emu_abi(unsigned long long out[12]) {
    const unsigned long long v[12] = {sizeof(MsParams),   alignof(MsParams), MS_BLOCK,
                                      MS_FINALIZE_BLOCK,  MS_STAT_COLUMNS,   MS_ROWINFO_COLUMNS,
                                      MS_PARTIAL_COLUMNS, MS_MAX_SPHERE_M,   sizeof(EmuLaunch),
                                      MS_TARGETS_BLOCK,   MS_CLUSTER,
                                      cuda_emu::max_cooperative_blocks};
    for (int i = 0; i < 12; ++i) out[i] = v[i];
}

#define MS_EMU_PICK(OP, SUFFIX)                                                                  \
    pick(variant, OP##_identity_##SUFFIX, OP##_cosine_##SUFFIX, OP##_rbf_##SUFFIX,               \
         OP##_identity_ext_##SUFFIX, OP##_cosine_ext_##SUFFIX, OP##_rbf_ext_##SUFFIX)

#define MS_EMU_ENTRIES(T, SUFFIX)                                                                \
    extern "C" void ms_emu_forward_partial_##SUFFIX(                                             \
        const EmuLaunch* l, int variant, const T* x, const int* targets,                         \
        const AccOf<T>::type* scale, const AccOf<T>::type* weights, const MsParams* p,           \
        AccOf<T>::type* partials) {                                                              \
        launch(l, MS_EMU_PICK(ms_forward_partial, SUFFIX), x, targets, scale, weights, *p,       \
               partials);                                                                        \
    }                                                                                            \
    extern "C" void ms_emu_forward_finalize_##SUFFIX(                                            \
        const EmuLaunch* l, const T* x, const int* targets, const AccOf<T>::type* scale,         \
        const AccOf<T>::type* weights, const AccOf<T>::type* poly, const MsParams* p,            \
        const AccOf<T>::type* partials, AccOf<T>::type* stats, AccOf<T>::type* row_info,         \
        AccOf<T>::type* grad_scale, const AccOf<T>::type* upstream) {                            \
        launch(l, ms_forward_finalize_##SUFFIX, x, targets, scale, weights, poly, *p, partials,  \
               stats, row_info, grad_scale, upstream);                                           \
    }                                                                                            \
    extern "C" void ms_emu_backward_##SUFFIX(const EmuLaunch* l, int variant, const T* x,        \
                                             const int* targets, const AccOf<T>::type* row_info, \
                                             const AccOf<T>::type* weights, const MsParams* p,   \
                                             T* grad) {                                          \
        launch(l, MS_EMU_PICK(ms_backward, SUFFIX), x, targets, row_info, weights, *p, grad);    \
    }                                                                                            \
    /* kind: 0 ms_fused, 1 ms_fused_warp, 2 ms_fused_cluster (in clusters of MS_CLUSTER), 3   \
       ms_fused_l2 (cooperative; the only kind that takes partials and group_rows). */          \
    extern "C" void ms_emu_fused_##SUFFIX(                                                       \
        const EmuLaunch* l, int kind, int variant, const T* x, const int* targets,               \
        const AccOf<T>::type* scale, const AccOf<T>::type* weights, const AccOf<T>::type* poly,  \
        const MsParams* p, AccOf<T>::type* stats, T* grad, AccOf<T>::type* grad_scale,           \
        const AccOf<T>::type* upstream, AccOf<T>::type* partials, long long group_rows) {       \
        if (kind == 3) {                                                                         \
            launch_cooperative(l, MS_EMU_PICK(ms_fused_l2, SUFFIX), x, targets, scale, weights,  \
                               poly, *p, stats, grad, grad_scale, upstream, partials,            \
                               group_rows);                                                      \
            return;                                                                              \
        }                                                                                        \
        auto kernel = kind == 0   ? MS_EMU_PICK(ms_fused, SUFFIX)                                \
                      : kind == 1 ? MS_EMU_PICK(ms_fused_warp, SUFFIX)                           \
                                  : MS_EMU_PICK(ms_fused_cluster, SUFFIX);                       \
        launch_in_clusters(l, kind == 2 ? MS_CLUSTER : 1, kernel, x, targets, scale, weights,    \
                           poly, *p, stats, grad, grad_scale, upstream);                         \
    }

MS_EMU_ENTRIES(float, f32)
MS_EMU_ENTRIES(double, f64)
MS_EMU_ENTRIES(__half, f16)
MS_EMU_ENTRIES(__nv_bfloat16, bf16)

// dtype: 0 u8, 1 u32, 2 i64 (the raw targets' type).
#define MS_EMU_TARGETS(A, ASUFFIX)                                                               \
    extern "C" void ms_emu_targets_##ASUFFIX(                                                    \
        const EmuLaunch* l, int dtype, const void* raw, long long rows, long long classes,       \
        long long ignore_index, int has_ignore, const A* weights, int has_weights, int mean,     \
        int* out, long long* first_invalid, A* upstream) {                                       \
        if (dtype == 0) {                                                                        \
            launch(l, ms_targets_u8_##ASUFFIX, static_cast<const unsigned char*>(raw), rows,     \
                   classes, ignore_index, has_ignore, weights, has_weights, mean, out,           \
                   first_invalid, upstream);                                                     \
        } else if (dtype == 1) {                                                                 \
            launch(l, ms_targets_u32_##ASUFFIX, static_cast<const unsigned int*>(raw), rows,     \
                   classes, ignore_index, has_ignore, weights, has_weights, mean, out,           \
                   first_invalid, upstream);                                                     \
        } else {                                                                                 \
            launch(l, ms_targets_i64_##ASUFFIX, static_cast<const long long*>(raw), rows,        \
                   classes, ignore_index, has_ignore, weights, has_weights, mean, out,           \
                   first_invalid, upstream);                                                     \
        }                                                                                        \
    }

MS_EMU_TARGETS(float, f32)
MS_EMU_TARGETS(double, f64)
