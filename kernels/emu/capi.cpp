// The crate's kernels (kernels/*.cu, unmodified) behind a C ABI that runs them on the CPU through
// the SIMT emulator (cuda_emu.h), for the Rust feature `kernel-emu` (src/emu.rs), built by
// build.rs with the `cc` crate.
//
// This file plans nothing: every launch takes its grid, block and dynamic shared memory from the
// caller, which computes them with the same Rust code that launches the kernels on a GPU
// (src/launch.rs). Each entry point `ms_emu_<kernel>_<suffix>` runs one launch
// `ms_<kernel>_<suffix><<<grid, block, shared>>>(args...)` and returns when every block is done;
// an emulator error (a divergent barrier, a deadlock, an invalid launch) prints its report and
// aborts the process, and under ASan / UBSan / TSan any report does too.
#include "cuda_emu.h"
CUDA_EMU_DYNAMIC_SHARED(unsigned char, shared_row)
#include "backward.cu"
#include "forward.cu"
#include "fused.cu"

// One launch's shape, as src/launch.rs plans it (`Launch`, #[repr(C)] on the Rust side).
struct EmuLaunch {
    unsigned grid[3];
    unsigned block[3];
    unsigned shared_mem_bytes;
};

namespace {
template <class... P, class... A>
void launch(const EmuLaunch* l, void (*kernel)(P...), A&&... args) {
    cuda_emu::launch(dim3(l->grid[0], l->grid[1], l->grid[2]),
                     dim3(l->block[0], l->block[1], l->block[2]), l->shared_mem_bytes, kernel,
                     std::forward<A>(args)...);
}
}  // namespace

// The constants of the kernel ABI as this build sees them, for the Rust side to compare with its
// own: sizeof(MsParams), alignof(MsParams), MS_BLOCK, MS_FINALIZE_BLOCK, MS_STAT_COLUMNS,
// MS_ROWINFO_COLUMNS, MS_PARTIAL_COLUMNS, MS_MAX_SPHERE_M, sizeof(EmuLaunch).
extern "C" void ms_emu_abi(unsigned long long out[9]) {
    const unsigned long long v[9] = {sizeof(MsParams),   alignof(MsParams), MS_BLOCK,
                                     MS_FINALIZE_BLOCK,  MS_STAT_COLUMNS,   MS_ROWINFO_COLUMNS,
                                     MS_PARTIAL_COLUMNS, MS_MAX_SPHERE_M,   sizeof(EmuLaunch)};
    for (int i = 0; i < 9; ++i) out[i] = v[i];
}

#define MS_EMU_ENTRIES(T, SUFFIX)                                                                \
    extern "C" void ms_emu_forward_partial_##SUFFIX(const EmuLaunch* l, const T* x,              \
                                                    const int* targets,                          \
                                                    const AccOf<T>::type* scale,                 \
                                                    const AccOf<T>::type* weights,               \
                                                    const MsParams* p,                           \
                                                    AccOf<T>::type* partials) {                  \
        launch(l, ms_forward_partial_##SUFFIX, x, targets, scale, weights, *p, partials);        \
    }                                                                                            \
    extern "C" void ms_emu_forward_finalize_##SUFFIX(                                            \
        const EmuLaunch* l, const T* x, const int* targets, const AccOf<T>::type* scale,         \
        const AccOf<T>::type* weights, const AccOf<T>::type* poly, const MsParams* p,            \
        const AccOf<T>::type* partials, AccOf<T>::type* stats, AccOf<T>::type* row_info,         \
        AccOf<T>::type* grad_scale) {                                                            \
        launch(l, ms_forward_finalize_##SUFFIX, x, targets, scale, weights, poly, *p, partials,  \
               stats, row_info, grad_scale);                                                     \
    }                                                                                            \
    extern "C" void ms_emu_backward_##SUFFIX(const EmuLaunch* l, const T* x, const int* targets, \
                                             const AccOf<T>::type* row_info,                     \
                                             const AccOf<T>::type* weights, const MsParams* p,   \
                                             T* grad) {                                          \
        launch(l, ms_backward_##SUFFIX, x, targets, row_info, weights, *p, grad);                \
    }                                                                                            \
    extern "C" void ms_emu_fused_##SUFFIX(                                                       \
        const EmuLaunch* l, const T* x, const int* targets, const AccOf<T>::type* scale,         \
        const AccOf<T>::type* weights, const AccOf<T>::type* poly, const MsParams* p,            \
        AccOf<T>::type* stats, T* grad, AccOf<T>::type* grad_scale) {                            \
        launch(l, ms_fused_##SUFFIX, x, targets, scale, weights, poly, *p, stats, grad,          \
               grad_scale);                                                                      \
    }

MS_EMU_ENTRIES(float, f32)
MS_EMU_ENTRIES(double, f64)
MS_EMU_ENTRIES(__half, f16)
MS_EMU_ENTRIES(__nv_bfloat16, bf16)
