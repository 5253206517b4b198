// The one-pass kernels (kernels/fused.cu, unmodified) behind the C ABI of capi.cpp (which
// describes it), in a translation unit of their own.
#include "capi.h"
CUDA_EMU_DYNAMIC_SHARED(unsigned char, shared_row)
#include "fused.cu"

#define MS_EMU_FUSED_ENTRIES(T, SUFFIX)                                                          \
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

MS_EMU_FUSED_ENTRIES(float, f32)
MS_EMU_FUSED_ENTRIES(double, f64)
MS_EMU_FUSED_ENTRIES(__half, f16)
MS_EMU_FUSED_ENTRIES(__nv_bfloat16, bf16)
