// The helpers of the emulated kernels' C ABI (capi.cpp, capi_fused.cpp): a planned launch's shape
// and the launches themselves. Two translation units, so that the build compiles the kernels on
// two cores (the kernels' source is most of the emulated build's time, under ASan + UBSan
// above a minute).
#pragma once
#include "cuda_emu.h"

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


#define MS_EMU_PICK(OP, SUFFIX)                                                                  \
    pick(variant, OP##_identity_##SUFFIX, OP##_cosine_##SUFFIX, OP##_rbf_##SUFFIX,               \
         OP##_identity_ext_##SUFFIX, OP##_cosine_ext_##SUFFIX, OP##_rbf_ext_##SUFFIX)

