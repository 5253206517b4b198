//! The online log-sum-exp of a row: its running state ([`Online`]), what a pass over the row
//! needs besides the row ([`RowPass`]), and what the fused path keeps of the forward pass for the
//! gradient ([`RowCache`]).

use num_traits::Float;

use crate::layout::PARTIAL_COLUMNS;
use crate::math::{Acc, Element, SoftCap, Transform, times_nonzero};

/// How many elements the online max / sum-exp takes per step: the chunk's logits are formed
/// first, so the running max is rescaled at most once per chunk and the exps are independent.
pub(super) const CHUNK: usize = 64;
/// Independent partial sums per chunk (a multiple of any SIMD width in use).
pub(super) const LANES: usize = 8;

/// The running state of the online log-sum-exp over a row's non-target entries, seeded with the
/// target logit. v_j = ∂z_j/∂r is the unscaled logit u_j, or sech²(r·u_j/cap)·u_j with
/// soft-capping; w_j is the class weight where the smoothing term reads it, else 1.
pub(super) struct Online<A> {
    pub(super) max: A,
    /// Σ exp(z_j − max) over every entry seen, the target included.
    pub(super) sum_exp: A,
    /// Σ exp(z_j − max)·v_j over the non-target entries (for the row-scale gradient).
    pub(super) sum_exp_v: A,
    /// Σ w_j·v_j over the non-target entries (for the row-scale gradient, and for Σ w_j·z_j
    /// = r·Σ w_j·u_j without soft-capping).
    pub(super) sum_wv: A,
    /// Σ w_j·z_j over the non-target entries, accumulated only with soft-capping.
    pub(super) sum_wz: A,
}

/// What the online pass needs besides the row: the row's scale, the head's transform, the
/// optional soft-capping and, where the smoothing term reads them, the class weights.
pub(super) struct RowPass<'a, A, H> {
    pub(super) scale: A,
    /// Whether dℓ/dr is wanted (a per-row scale that takes a gradient): only then is
    /// Σ exp(z_j − max)·v_j accumulated.
    pub(super) scale_grad: bool,
    pub(super) transform: &'a H,
    pub(super) cap: Option<SoftCap<A>>,
    pub(super) weights: Option<&'a [A]>,
}

/// What the fused path keeps of a row's forward pass for its gradient, in the thread's scratch:
/// e_j = exp(z_j − m_c) for every entry but the target, m_c being the running max when entry j's
/// chunk was absorbed (one per chunk, in order), and u_j where the transform costs an exp
/// ([`Transform::CACHES_U`]). The gradient's p_j = e_j·exp(m_c − M − ln Σ): one exp per chunk
/// instead of one per entry.
pub(super) struct RowCache<'s, A> {
    pub(super) e: &'s mut [A],
    pub(super) u: &'s mut [A],
    pub(super) chunk_max: &'s mut [A],
    pub(super) chunks: usize,
}

impl<'s, A: Acc> RowCache<'s, A> {
    /// The scratch length a row of `classes` entries needs.
    pub(super) fn scratch_len<H: Transform<A>>(classes: usize) -> usize {
        let u = if H::CACHES_U { classes } else { 0 };
        classes + u + classes / CHUNK + 2
    }

    pub(super) fn new<H: Transform<A>>(scratch: &'s mut [A], classes: usize) -> Self {
        let (e, rest) = scratch.split_at_mut(classes);
        let (u, chunk_max) = rest.split_at_mut(if H::CACHES_U { classes } else { 0 });
        Self {
            e,
            u,
            chunk_max,
            chunks: 0,
        }
    }
}

impl<A: Acc> Online<A> {
    /// The state of no entry yet, for a slice's partial statistics. The max starts at the most
    /// negative finite value, not −∞, so that a slice of masked logits (z = −∞) gives
    /// exp(−∞ − max) = 0, not NaN, and sums to an empty state.
    pub(super) fn empty() -> Self {
        Self {
            max: <A as Float>::min_value(),
            sum_exp: A::zero(),
            sum_exp_v: A::zero(),
            sum_wv: A::zero(),
            sum_wz: A::zero(),
        }
    }

    /// The state of two disjoint sets of entries together.
    pub(super) fn merge(self, other: &Self) -> Self {
        let max = if other.max > self.max {
            other.max
        } else {
            self.max
        };
        let (fa, fb) = ((self.max - max).exp(), (other.max - max).exp());
        Self {
            max,
            sum_exp: times_nonzero(self.sum_exp, fa) + times_nonzero(other.sum_exp, fb),
            sum_exp_v: times_nonzero(self.sum_exp_v, fa) + times_nonzero(other.sum_exp_v, fb),
            sum_wv: self.sum_wv + other.sum_wv,
            sum_wz: self.sum_wz + other.sum_wz,
        }
    }

    /// The partial-statistics columns (see [`crate::layout::PARTIAL_COLUMNS`]).
    pub(super) fn to_partial(&self) -> [A; PARTIAL_COLUMNS] {
        [
            self.max,
            self.sum_exp,
            self.sum_exp_v,
            self.sum_wv,
            self.sum_wz,
        ]
    }

    pub(super) fn of_partial(p: &[A]) -> Self {
        Self {
            max: p[0],
            sum_exp: p[1],
            sum_exp_v: p[2],
            sum_wv: p[3],
            sum_wz: p[4],
        }
    }

    pub(super) fn new(z_target: A) -> Self {
        Self {
            max: z_target,
            sum_exp: A::one(),
            sum_exp_v: A::zero(),
            sum_wv: A::zero(),
            sum_wz: A::zero(),
        }
    }

    /// Absorbs the entries `xs`, which start at column `first`, in chunks of [`CHUNK`]: the
    /// chunk's logits first (the tail padded with z = −∞ and v = 0, and w = 0 when the weights
    /// are read, which add nothing; w stays 1 otherwise), then one
    /// rescale of the running sums at most, then the exps, summed in [`LANES`] independent
    /// partial sums so that the loops vectorize. Soft-capping and class weights are decided once
    /// per chunk, so the plain path's loops carry no extra work.
    #[inline(always)]
    pub(super) fn absorb<T: Element<Acc = A>, H: Transform<A>>(
        &mut self,
        xs: &[T],
        first: usize,
        pass: &RowPass<'_, A, H>,
        mut cache: Option<&mut RowCache<'_, A>>,
    ) {
        let scale = pass.scale;
        let transform = *pass.transform;
        let mut x = [A::zero(); CHUNK];
        let mut v = [A::zero(); CHUNK];
        let mut z = [A::zero(); CHUNK];
        let mut w = [A::one(); CHUNK];
        for (c, chunk) in xs.chunks(CHUNK).enumerate() {
            let start = first + c * CHUNK;
            T::load_chunk(chunk, &mut x);
            for i in 0..CHUNK {
                v[i] = transform.u(x[i]);
                z[i] = scale * v[i];
            }
            if let Some(cache) = cache.as_deref_mut()
                && H::CACHES_U
            {
                cache.u[start..start + chunk.len()].copy_from_slice(&v[..chunk.len()]);
            }
            if let Some(cap) = &pass.cap {
                for i in 0..chunk.len() {
                    let (zc, dz) = cap.apply(z[i]);
                    z[i] = zc;
                    // A masked logit (u = −∞) has sech² = 0: its ∂z/∂r is 0, not NaN.
                    v[i] = times_nonzero(dz, v[i]);
                }
            }
            if let Some(weights) = pass.weights {
                w[..chunk.len()].copy_from_slice(&weights[start..start + chunk.len()]);
                w[chunk.len()..].fill(A::zero());
            }
            for i in chunk.len()..CHUNK {
                v[i] = A::zero();
                z[i] = A::neg_infinity();
            }
            let mut lane_max = [A::neg_infinity(); LANES];
            for block in z.chunks_exact(LANES) {
                for (m, &v) in lane_max.iter_mut().zip(block) {
                    *m = if v > *m { v } else { *m };
                }
            }
            let chunk_max = lane_max
                .iter()
                .fold(A::neg_infinity(), |m, &v| Float::max(m, v));
            if chunk_max > self.max {
                let rescale = (self.max - chunk_max).exp();
                self.sum_exp *= rescale;
                self.sum_exp_v *= rescale;
                self.max = chunk_max;
            }
            let max = self.max;
            // The exps in a loop of their own: inside the lane loop below LLVM keeps them scalar.
            let mut e = [A::zero(); CHUNK];
            for (ei, &zi) in e.iter_mut().zip(z.iter()) {
                *ei = A::exp_flushed(zi - max);
            }
            if let Some(cache) = cache.as_deref_mut() {
                cache.e[start..start + chunk.len()].copy_from_slice(&e[..chunk.len()]);
                cache.chunk_max[cache.chunks] = max;
                cache.chunks += 1;
            }
            // e·v and w·v per entry in loops of their own, where the select of times_nonzero
            // vectorizes; then plain sums in LANES independent partial sums.
            let mut ev = [A::zero(); CHUNK];
            if pass.scale_grad {
                for i in 0..CHUNK {
                    // A masked logit: e = 0 and v = −∞ must add 0, not NaN.
                    ev[i] = times_nonzero(e[i], v[i]);
                }
            }
            let mut wv = v;
            if pass.weights.is_some() {
                for i in 0..CHUNK {
                    // A zero weight adds 0, also for a masked logit.
                    wv[i] = times_nonzero(w[i], v[i]);
                }
            }
            let mut sum_exp = [A::zero(); LANES];
            let mut sum_exp_v = [A::zero(); LANES];
            let mut sum_wv = [A::zero(); LANES];
            for b in 0..CHUNK / LANES {
                for l in 0..LANES {
                    sum_exp[l] += e[b * LANES + l];
                    sum_wv[l] += wv[b * LANES + l];
                }
            }
            if pass.scale_grad {
                for b in 0..CHUNK / LANES {
                    for l in 0..LANES {
                        sum_exp_v[l] += ev[b * LANES + l];
                    }
                }
            }
            let total = |lanes: [A; LANES]| lanes.iter().fold(A::zero(), |acc, &v| acc + v);
            self.sum_exp += total(sum_exp);
            self.sum_exp_v += total(sum_exp_v);
            self.sum_wv += total(sum_wv);
            if pass.cap.is_some() {
                let mut sum_wz = A::zero();
                for i in 0..chunk.len() {
                    sum_wz += times_nonzero(w[i], z[i]);
                }
                self.sum_wz += sum_wz;
            }
        }
    }
}
