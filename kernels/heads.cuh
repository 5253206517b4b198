// The one CUDA definition of each head's math and of the criterion; it mirrors src/math.rs and
// the row functions of src/backends/cpu/ (the one Rust definition) line for line, so the two paths
// agree to rounding.
//
// A row's logits are z_j = r * u_j (u the head's unscaled logit, r the row's scale), or with
// soft-capping z_j = cap * tanh(r * u_j / cap). The criterion's gradient with respect to the
// logits is
//   g_j = A * p_j + K * w_j (j != y),   g_y = G,
// with three per-row constants (see criterion_row) and w_j the class weight where the smoothing
// term reads it (weighted smoothing), else 1, so the backward pass needs only those and the
// row's max and ln sum exp(z - max): p_j = exp((z_j - max) - ln_sum).
#pragma once

#include "common.cuh"

#define MS_PI 3.14159265358979323846

// PyTorch's clamp: NaN passes through, and so does the gradient on the closed interval.
template <typename A> __device__ __forceinline__ A clamp_torch(A x, A lo, A hi) {
    return x < lo ? lo : (x > hi ? hi : x);
}

template <typename A> __device__ __forceinline__ A inside(A x, A lo, A hi) {
    return (x >= lo && x <= hi) ? A(1) : A(0);
}

// u = h(x) of a non-target entry, for a transform known at compile time (the element loops are
// instantiated per transform: no switch per element): Softmax x; cosine heads clamp(c, -1, 1);
// RBF exp(-max(d2, 0) / gamma).
template <int TR, typename A> __device__ __forceinline__ A head_u(const MsParams& p, A x) {
    if constexpr (TR == MS_TRANSFORM_IDENTITY) {
        return x;
    } else if constexpr (TR == MS_TRANSFORM_COSINE) {
        return clamp_torch(x, A(-1), A(1));
    } else {
        const A d2 = x < A(0) ? A(0) : x;
        return ms_exp_mul(d2, p.neg_inv_gamma);
    }
}

// du/dx given x and u = head_u(x).
template <int TR, typename A> __device__ __forceinline__ A head_du(const MsParams& p, A x, A u) {
    if constexpr (TR == MS_TRANSFORM_IDENTITY) {
        return A(1);
    } else if constexpr (TR == MS_TRANSFORM_COSINE) {
        return inside(x, A(-1), A(1));
    } else {
        return x >= A(0) ? u * A(p.neg_inv_gamma) : A(0);
    }
}

// head_u / head_du for p.transform read at run time (per row: the target, the host replay).
template <typename A> __device__ __forceinline__ A head_u(const MsParams& p, A x) {
    if (p.transform == MS_TRANSFORM_IDENTITY) return head_u<MS_TRANSFORM_IDENTITY>(p, x);
    if (p.transform == MS_TRANSFORM_COSINE) return head_u<MS_TRANSFORM_COSINE>(p, x);
    return head_u<MS_TRANSFORM_RBF>(p, x);
}

template <typename A> __device__ __forceinline__ A head_du(const MsParams& p, A x, A u) {
    if (p.transform == MS_TRANSFORM_IDENTITY) return head_du<MS_TRANSFORM_IDENTITY>(p, x, u);
    if (p.transform == MS_TRANSFORM_COSINE) return head_du<MS_TRANSFORM_COSINE>(p, x, u);
    return head_du<MS_TRANSFORM_RBF>(p, x, u);
}

template <typename A> struct TargetTerm {
    A u;   // u_y = phi(c)
    A du;  // du_y / dx
};

// cos(m*theta) = T_m(c) and U_{m-1}(c) (dT_m/dc = m * U_{m-1}), without acos, finite at c = +-1.
template <typename A> __device__ __forceinline__ void chebyshev(int m, A c, A& t, A& u) {
    const A two_c = c + c;
    A t_prev = A(1), u_prev = A(0);
    t = c;
    u = A(1);
    for (int i = 1; i < m; ++i) {
        const A t_next = two_c * t - t_prev;
        const A u_next = two_c * u - u_prev;
        t_prev = t;
        t = t_next;
        u_prev = u;
        u = u_next;
    }
}

// The target entry's (u_y, du_y/dx) for the target's input x.
template <typename A> __device__ TargetTerm<A> target_term(const MsParams& p, A x) {
    TargetTerm<A> r;
    const A one = A(1);
    if (p.margin == MS_MARGIN_NONE) {
        r.u = head_u(p, x);
        r.du = head_du(p, x, r.u);
        return r;
    }
    if (p.margin == MS_MARGIN_COSFACE) {
        r.u = clamp_torch(x, -one, one) - A(p.additive_m);
        r.du = inside(x, -one, one);
        return r;
    }
    if (p.margin == MS_MARGIN_ARCFACE_COMBINED) {
        // The same value in both gradient modes (a mode never changes the loss).
        const A c = clamp_torch(x, -one, one);
        const A pass = inside(x, -one, one);
        r.du = pass;
        if (p.easy && c <= A(0)) {
            r.u = c;
            return r;
        }
        const A theta = ms_acos(c);
        const A angle = A(p.m1) * theta + A(p.m2);
        // InsightFace applies no fallback with the easy margin.
        if (!p.easy && angle > A(MS_PI)) {
            r.u = c - A(p.fallback_shift);
            return r;
        }
        const A half_turns = angle * A(1.0 / MS_PI);
        r.u = ms_cospi(half_turns) - A(p.m3);
        if (p.exact) {
            // d cos(m1*theta + m2)/dc = m1*sin(m1*theta + m2)/sin(theta), the denominator
            // bounded below by sin(theta_eps) (only the derivative: the value is unclamped).
            const A sin_theta = ms_sqrt((one - c) * (one + c));
            const A floor = A(p.sin_floor);
            const A denominator = sin_theta > floor ? sin_theta : floor;
            r.du = pass * A(p.m1) * ms_sinpi(half_turns) / denominator;
        }
        return r;
    }
    // MS_MARGIN_SPHEREFACE
    const A c = clamp_torch(x, -one, one);
    const A pass = inside(x, -one, one);
    int k = 0;
#pragma unroll
    for (int j = 1; j < MS_MAX_SPHERE_M; ++j) {  // constant indices: params stay in param space
        if (j < p.sphere_m && c <= A(p.thresholds[j])) ++k;
    }
    A t_m, u_m1;
    chebyshev(p.sphere_m, c, t_m, u_m1);
    const A sign = (k & 1) ? -one : one;
    const A psi = sign * t_m - A(2 * k);
    const A lambda = A(p.lambda);
    r.u = (lambda * c + psi) / (one + lambda);
    r.du = p.exact ? pass * (lambda + sign * A(p.sphere_m) * u_m1) / (one + lambda) : pass;
    return r;
}

// Logit soft-capping z = cap * tanh(z_raw / cap) and its derivative sech^2(z_raw / cap), both
// from one expm1 (SoftCap::apply in src/math.rs): with a = z_raw / cap and
// e = expm1(-2|a|) in [-1, 0], tanh|a| = -e / (2 + e) and sech^2 a = 4 * (1 + e) / (2 + e)^2.
// Accurate near a = 0 and finite for every a: a = +-inf gives (+-cap, 0).
template <typename A> __device__ __forceinline__ void softcap(const MsParams& p, A z_raw, A& z,
                                                              A& dz) {
    const A one = A(1);
    const A a = z_raw * A(p.inv_softcap);
    const A two = one + one;
    const A e = ms_expm1(-(ms_abs(a) * two));
    const A two_plus_e = two + e;
    A t = -e / two_plus_e;
    if (a < A(0)) t = -t;
    dz = (two + two) * (one + e) / (two_plus_e * two_plus_e);
    z = A(p.softcap) * t;
}

// A non-target entry's logit z and v = dz/dr from its unscaled logit u (the loop body of
// Online::absorb in src/backends/cpu/): z = r * u and v = u, soft-capped when p.softcapped.
template <typename A> __device__ __forceinline__ void entry_logit(const MsParams& p, A r, A u, A& z,
                                                                  A& v) {
    z = r * u;
    v = u;
    if (p.softcapped) {
        A dz;
        softcap(p, z, z, dz);
        // A masked logit (u = -inf) has sech^2 = 0: its dz/dr is 0, not NaN.
        v = times_nonzero(dz, u);
    }
}

// The weight w_j of class j in the smoothing term: the class weight with weighted smoothing, else
// 1 (`weights` is then not read: it may be a dummy).
template <typename A>
__device__ __forceinline__ A smoothing_weight(const MsParams& p, const A* __restrict__ weights,
                                              long long j) {
    return p.weighted_smoothing ? weights[j] : A(1);
}

// Adds the non-target entry j with input x to the online state s of a row with scale r, for the
// transform TR.
template <int TR, typename A>
__device__ __forceinline__ void push_other(const MsParams& p, const A* __restrict__ weights,
                                           Online<A>& s, A r, A x, long long j) {
    A z, v;
    entry_logit(p, r, head_u<TR>(p, x), z, v);
    online_push(s, z, v, smoothing_weight(p, weights, j));
}

// push_other for the transform in p (the host replay).
template <typename A>
__device__ __forceinline__ void push_entry(const MsParams& p, const A* __restrict__ weights,
                                           Online<A>& s, A r, A x, long long j) {
    A z, v;
    entry_logit(p, r, head_u(p, x), z, v);
    online_push(s, z, v, smoothing_weight(p, weights, j));
}

// The target entry's logit z_y, dz_y/dr and dz_y/dx * (1/r) (the margin's derivative times the
// soft-capping's), for the target's input x (target_logit in src/backends/cpu/).
template <typename A> struct TargetLogit {
    A z;
    A v;
    A dz;
};

template <typename A> __device__ TargetLogit<A> target_logit(const MsParams& p, A x, A scale) {
    const TargetTerm<A> t = target_term(p, x);
    TargetLogit<A> r;
    r.z = scale * t.u;
    if (p.softcapped) {
        A dz;
        softcap(p, r.z, r.z, dz);
        r.v = times_nonzero(dz, t.u);
        r.dz = dz * t.du;
    } else {
        r.v = t.u;
        r.dz = t.du;
    }
    return r;
}

template <typename A> struct RowLoss {
    A loss;      // l, class weights included
    A a;         // g_j = a * p_j + k * w_j for j != y (w_j = 1 unless weighted smoothing;
    A k;         // k = 0 without smoothing)
    A g_target;  // g_y, formed from 1 - p_y so that it does not cancel as p_y -> 1
};

// The row's loss and gradient constants from its logits' max and ln sum exp(z - max), the target
// logit z_y, S = sum_j w_j * z_j (every class, the target included; w_j = 1 unless weighted
// smoothing, and only read with smoothing) and the class weight w = w_y. The derivation is
// written out above Criterion::row in src/math.rs; with W = p.total_weight (sum_j w_j, or C):
//   l_CE = (1 - eps)*w*(-log p_y) + (eps/C)*(W*lse - S),  p_t = (1 - eps)*p_y + eps/C,
//   F = (1 - p_t)^gamma,  l = F*l_CE + w*[sum_k eps_k*(1 - p_t)^(k + gamma) + lambda_z*lse^2],
//   D = dl/dp_t = -gamma*(1 - p_t)^(gamma - 1)*l_CE - w*sum_k eps_k*(k + gamma)*(1 - p_t)^(k + gamma - 1),
//   A = F*((1 - eps)*w + eps*W/C) - D*(1 - eps)*p_y + 2*w*lambda_z*lse,  K = -F*eps/C,
//   G = F*[(eps/C)*((W - w)*p_y - w*(1 - p_y)) - (1 - eps)*w*(1 - p_y)]
//       + D*(1 - eps)*p_y*(1 - p_y) + 2*w*lambda_z*lse*p_y.
template <typename A>
__device__ RowLoss<A> criterion_row(const MsParams& p, const A* __restrict__ poly, A max, A log_sum,
                                    A z_target, A sum_wz, A weight) {
    const A one = A(1), zero = A(0);
    const A eps = A(p.smoothing);
    const A classes = A(p.classes);
    const A total = A(p.total_weight);
    const A lse = max + log_sum;
    A log_py = (z_target - max) - log_sum;
    if (log_py > zero) log_py = zero;  // rounding; NaN passes through
    const A p_y = ms_exp(log_py);
    const A one_minus_py = -ms_expm1(log_py);
    const A keep = one - eps;
    A ce, one_minus_pt;
    if (eps > zero) {
        // sum_j w_j*(lse - z_j) = (W*M - S) + W*ln sum.
        const A smooth = (total * max - sum_wz) + total * log_sum;
        ce = keep * weight * -log_py + eps / classes * smooth;
        const A spread = eps * (classes - one) / classes;
        one_minus_pt = keep * one_minus_py + spread;
    } else {
        ce = weight * -log_py;
        one_minus_pt = one_minus_py;
    }
    const A gamma = A(p.focal_gamma);
    const A focal = gamma > zero ? ms_pow(one_minus_pt, gamma) : one;
    // l_CE/(1 - p_t) -> w as p_t -> 1 without smoothing; with smoothing 1 - p_t >= eps(C-1)/C,
    // and 1 - p_t = 0 only for C = 1, where l_CE = 0.
    const A ce_ratio = one_minus_pt > zero ? ce / one_minus_pt : weight;
    A loss = focal * ce;
    // Without focusing (gamma = 0) this term is 0, also where l_CE = +inf (smoothing with a
    // masked logit): 0 * inf would make every gradient NaN.
    A d_pt = gamma > zero ? -gamma * focal * ce_ratio : zero;
    A poly_sum = zero;
    for (int i = 0; i < p.n_poly; ++i) {
        const A coef = poly[i];
        const A power = A(i + 1) + gamma;
        poly_sum += coef * ms_pow(one_minus_pt, power);
        d_pt -= weight * coef * power * ms_pow(one_minus_pt, power - one);
    }
    const A z_loss = A(p.z_loss);
    loss += weight * (poly_sum + z_loss * lse * lse);
    const A z_term = (z_loss + z_loss) * weight * lse;
    // D*(1 - eps)*p_y, 0 where p_y = 0 whatever D is.
    const A d_py = times_nonzero(p_y, d_pt * keep);
    const A smooth_target =
        eps > zero ? eps / classes * ((total - weight) * p_y - weight * one_minus_py) : zero;
    RowLoss<A> r;
    r.loss = loss;
    r.a = focal * (keep * weight + eps * total / classes) - d_py + z_term;
    r.k = -focal * eps / classes;
    r.g_target = focal * (smooth_target - keep * weight * one_minus_py) + d_py * one_minus_py +
                 z_term * p_y;
    return r;
}

// Finishes one (non-ignored) row from the online statistics of its non-target entries
// (forward_row in src/backends/cpu/): writes the row's MS_STAT_COLUMNS statistics and returns its
// backward info [max, ln_sum, a, k, g_y, scale] with the gradient factor `up` (1, or 1/sum w for
// the fused paths' mean) folded into a, k, g_y. `weight` is the target's class weight w_y (1
// without class weights). d loss / d scale (stats[7]) is 0 unless p.scale_grad.
template <typename A>
__device__ void finalize_row(const MsParams& p, const A* __restrict__ poly, A weight, A scale,
                             A x_target, Online<A> others, A up, A* __restrict__ stats, A* info) {
    const TargetLogit<A> t = target_logit(p, x_target, scale);
    Online<A> s;
    s.max = t.z;
    s.sum_exp = A(1);
    s.sum_exp_v = A(0);
    s.sum_wv = A(0);
    s.sum_wz = A(0);
    s = online_merge(s, others);
    const A log_sum = ms_log(s.sum_exp);
    // sum_j w_j * z_j, the target included (w_j = 1 unless weighted smoothing). Without
    // soft-capping the CPU forms the others' share as r * sum w*v (= sum w*z up to rounding).
    const A w_target = p.weighted_smoothing ? weight : A(1);
    const A sum_wz_others = p.softcapped ? s.sum_wz : scale * s.sum_wv;
    const A sum_wz = sum_wz_others + times_nonzero(w_target, t.z);
    // sum_{j != y} p_j * v_j. It and the columns that need nothing from the criterion are
    // formed and written before it: fewer values live across its pow calls (a real call in
    // f64, around which the f64 kernels would otherwise spill).
    const A p_others = s.sum_exp_v / s.sum_exp;
    stats[1] = s.max;
    stats[2] = log_sum;
    stats[3] = weight;
    info[0] = s.max;
    info[1] = log_sum;
    info[5] = scale;
    const RowLoss<A> r = criterion_row(p, poly, s.max, log_sum, t.z, sum_wz, weight);
    // dl/dr = sum_j g_j * v_j. A term with an exactly zero coefficient adds 0: k = 0 without
    // smoothing, while sum_wv = -inf with a masked logit.
    const A d_scale = p.scale_grad ? times_nonzero(r.a, p_others) + times_nonzero(r.k, s.sum_wv) +
                                         times_nonzero(r.g_target, t.v)
                                   : A(0);
    stats[0] = r.loss;
    stats[4] = r.a;
    stats[5] = r.k;
    stats[6] = r.g_target;
    stats[7] = d_scale;
    info[2] = r.a * up;
    info[3] = r.k * up;
    info[4] = r.g_target * up;
}

// The statistics and backward info of a row the kernels do not reduce: an ignored row (zeros,
// the scale kept) or, with the target check off, a row whose target is invalid (NaN).
template <typename A>
__device__ __forceinline__ void finalize_skipped_row(int target, A scale, A* __restrict__ stats,
                                                     A* info) {
    const A fill = target == MS_TARGET_INVALID ? A(NAN) : A(0);
#pragma unroll
    for (int c = 0; c < MS_STAT_COLUMNS; ++c) stats[c] = fill;
#pragma unroll
    for (int c = 0; c < MS_ROWINFO_COLUMNS; ++c) info[c] = fill;
    info[5] = scale;
}

// The gradient of the target element, x its input: g_y * r * dz_y/dx_y * (1/r) (the margin's
// derivative times the soft-capping's).
template <typename A> __device__ A grad_target(const MsParams& p, const A* info, A x) {
    const A scale = info[5];
    return info[4] * scale * target_logit(p, x, scale).dz;
}

// A row's gradient constants for the non-target elements, formed once per row from its backward
// info (see finalize_row).
template <typename A> struct GradRow {
    A scale;
    A max;
    A log_sum;     // f64: ln sum; f32: ln sum * log2 e (p_j = 2^((z_j - max) * log2 e - this))
    A ar;  // a * r
    A kr;  // k * r
};

template <typename A> __device__ __forceinline__ GradRow<A> grad_row(const A* info) {
    GradRow<A> g;
    g.max = info[0];
    g.log_sum = sizeof(A) == 4 ? info[1] * A(1.44269504088896340736) : info[1];
    g.scale = info[5];
    g.ar = info[2] * g.scale;
    g.kr = info[3] * g.scale;
    return g;
}

// d loss / d x_j of a non-target element with input x and smoothing weight w (backward_row in
// src/backends/cpu/), for the transform TR:
//   dx_j = (a * r * p_j + k * r * w_j) * dz_j/dz_raw * du_j/dx_j,
//   p_j = exp((z_j - max) - ln_sum), in f32 2^((z_j - max) * log2 e - ln_sum * log2 e),
// z_j = r * u_j, or cap * tanh(r * u_j / cap) with soft-capping (then dz_j/dz_raw = sech^2).
// EXT: label smoothing may be on (else k = 0: the host guarantees); CAP: soft-capping is on.
template <int TR, bool EXT, bool CAP, typename A>
__device__ __forceinline__ A grad_other(const MsParams& p, const GradRow<A>& g, A x, A w) {
    const A u = head_u<TR>(p, x);
    A z = g.scale * u;
    A dz = A(1);
    if constexpr (CAP) softcap(p, z, z, dz);
    A prob;
    if constexpr (sizeof(A) == 4) {
        prob = ms_exp2_ftz((z - g.max) * A(1.44269504088896340736) - g.log_sum);
    } else {
        prob = ms_exp((z - g.max) - g.log_sum);
    }
    A out = EXT ? g.ar * prob + g.kr * w : g.ar * prob;
    if constexpr (CAP) out *= dz;
    if constexpr (TR != MS_TRANSFORM_IDENTITY) out *= head_du<TR>(p, x, u);
    return out;
}

// grad_other with soft-capping read from p (the vectors and elements the fast loops decline).
template <int TR, typename A>
__device__ A grad_other_any(const MsParams& p, const GradRow<A>& g, A x, A w) {
    return p.softcapped ? grad_other<TR, true, true>(p, g, x, w)
                        : grad_other<TR, true, false>(p, g, x, w);
}

// One element's gradient for the transform in p (the host replay; the kernels' loops call
// grad_other / grad_target directly).
template <typename A>
__device__ __forceinline__ A grad_element(const MsParams& p, const A* info, A x, bool is_target,
                                          A w) {
    if (is_target) return grad_target(p, info, x);
    const GradRow<A> g = grad_row(info);
    if (p.transform == MS_TRANSFORM_IDENTITY) return grad_other_any<MS_TRANSFORM_IDENTITY>(p, g, x, w);
    if (p.transform == MS_TRANSFORM_COSINE) return grad_other_any<MS_TRANSFORM_COSINE>(p, g, x, w);
    return grad_other_any<MS_TRANSFORM_RBF>(p, g, x, w);
}
