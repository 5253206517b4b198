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
//
// This file: the split forward (forward.cu), the backward (backward.cu), the target check
// (targets.cu) and the ABI constants; capi_fused.cpp: the one-pass kernels (fused.cu).
#include "capi.h"
#include "backward.cu"
#include "forward.cu"
#include "targets.cu"

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

#define MS_EMU_SPLIT_ENTRIES(T, SUFFIX)                                                          \
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
    }

MS_EMU_SPLIT_ENTRIES(float, f32)
MS_EMU_SPLIT_ENTRIES(double, f64)
MS_EMU_SPLIT_ENTRIES(__half, f16)
MS_EMU_SPLIT_ENTRIES(__nv_bfloat16, bf16)

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
