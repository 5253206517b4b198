// The launch parameters shared by every kernel of the crate, passed by value.
// Mirrored field for field by `MsParams` in src/backends/launch/params.rs (#[repr(C)]): change both together.
#pragma once

#define MS_MAX_SPHERE_M 16

// Threads per block, fixed at compile time (the block reductions are sized by them, and each
// entry point carries __launch_bounds__ of its size). The host launches with exactly these:
// ms_forward_partial, ms_backward and ms_fused with MS_BLOCK, ms_forward_finalize with
// MS_FINALIZE_BLOCK. ms_forward_partial and ms_fused trap on any other block shape;
// ms_backward and ms_forward_finalize stride by blockDim and are correct with fewer threads.
#define MS_BLOCK 256
#define MS_FINALIZE_BLOCK 128
// Blocks per row of ms_fused_cluster (sm_90: a thread-block cluster, the portable maximum).
#define MS_CLUSTER 8
// ms_targets (one block: it also sums the class weights for the mean, in a fixed order).
#define MS_TARGETS_BLOCK 1024

// A target as the loss kernels take it (int32): a class in [0, C), MS_TARGET_IGNORED for a row
// whose target is ignore_index, MS_TARGET_INVALID for any other value (only reachable with the
// target check turned off: the row's loss and gradient are NaN).
#define MS_TARGET_IGNORED (-1)
#define MS_TARGET_INVALID (-2)

// Which per-element transform x -> u the head applies to the non-target entries.
#define MS_TRANSFORM_IDENTITY 0  // Softmax: u = x
#define MS_TRANSFORM_COSINE 1    // cosine heads: u = clamp(x, -1, 1)
#define MS_TRANSFORM_RBF 2       // RBF: u = exp(-max(x, 0) / gamma)

// Which margin the target entry gets.
#define MS_MARGIN_NONE 0              // Softmax, RBF: the target uses the plain transform
#define MS_MARGIN_COSFACE 1           // CosFace: c - m
#define MS_MARGIN_ARCFACE_COMBINED 2  // ArcFace, Combined: cos(m1*theta + m2) - m3 (+ fallback, easy)
#define MS_MARGIN_SPHEREFACE 3        // SphereFace: (lambda*c + psi) / (1 + lambda)

struct MsParams {
    long long rows;        // B
    long long classes;     // C
    long long row_stride;  // elements between the starts of two input rows
    int transform;         // MS_TRANSFORM_*
    int margin;            // MS_MARGIN_*
    int exact;             // 1: MarginGrad::Exact, 0: Detached
    int easy;              // ArcFace easy margin
    int sphere_m;          // SphereFace integer margin, 1..MS_MAX_SPHERE_M
    int n_poly;            // number of PolyLoss coefficients (device array `poly`)
    int has_weights;       // 1: class weights in the device array `weights`
    int splits;            // blocks per row in the split forward (ms_forward_partial)
    int weighted_smoothing;  // 1: class weights and label smoothing, the smoothing term reads
                             // weights[j] for every class j (else every w_j = 1 there)
    int softcapped;        // 1: logit soft-capping z = softcap*tanh(z/softcap)
    int scale_grad;        // 1: d loss / d row scale is wanted (else the kernels write 0 for it
                           // and skip sum exp*v)
    int reserved;          // 0 (keeps the doubles 8-byte aligned)
    double neg_inv_gamma;  // RBF: -1/gamma
    double additive_m;     // CosFace m
    double m1, m2, m3;     // angular margins (ArcFace: 1, m, 0)
    double fallback_shift; // m3 + m2*sin(m2)
    double sin_floor;      // exact mode: floor of the derivative's sin(theta), sin(acos(1 - 1e-5))
    double lambda;         // SphereFace lambda
    double thresholds[MS_MAX_SPHERE_M];  // cos(j*pi/m), j = 1..m-1 at [1..m-1]
    double smoothing;      // label smoothing epsilon
    double total_weight;   // W = sum_j w_j with weighted_smoothing, else C
    double focal_gamma;
    double z_loss;
    double softcap;        // the cap (0 unless softcapped)
    double inv_softcap;    // 1/cap in f64 (0 unless softcapped)
};

// Column layout of the per-row statistics [B, MS_STAT_COLUMNS] (accumulation type), as in
// src/layout.rs: loss, max logit, ln sum exp(z - max), w_y, a, k, g_y, dloss/dscale.
#define MS_STAT_COLUMNS 8
// Per-row input of the backward kernel [B, MS_ROWINFO_COLUMNS]:
// max, ln sum, a, k, g_y (upstream folded in), scale.
#define MS_ROWINFO_COLUMNS 6
// Online state of one partial row (ms_forward_partial), over the non-target entries: max,
// sum exp(z - max), sum exp(z - max)*v, sum w*v, sum w*z (v = dz/dr; w the smoothing weight).
#define MS_PARTIAL_COLUMNS 5
