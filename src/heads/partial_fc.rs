//! Partial FC (InsightFace's arcface_torch, An et al. 2021): the classes one call of a head
//! computes its loss over, sampled afresh per call.

/// Partial FC (InsightFace's arcface_torch): each call samples ⌊rate·C⌋ classes (at least 1),
/// every class that is a target of the batch plus uniformly drawn others (the targets alone when
/// they are more), and computes the loss over those classes only, as if they were all the
/// classes: label smoothing spreads over them and the smoothing's Σ w_j sums their class weights.
/// W's gradient (and the bias's) is zero outside them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PartialFc {
    /// The fraction of classes sampled per call, in (0, 1].
    pub rate: f64,
    /// The seed of the sampler: call k of a head samples from the stream (seed, k), so a run is
    /// reproducible.
    pub seed: u64,
}

/// The classes of one Partial FC call, sorted, and the targets as positions among them.
pub(super) struct Sample {
    pub(super) classes: Vec<u32>,
    pub(super) targets: Vec<Option<usize>>,
}

/// SplitMix64: a small, well-mixed generator for the sampler (no dependency, stable output).
pub(super) struct SplitMix64(pub(super) u64);

impl SplitMix64 {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, n) (Lemire's multiply-shift; the bias is below 2⁻³² for n < 2³²).
    pub(super) fn below(&mut self, n: usize) -> usize {
        ((self.next() >> 32).wrapping_mul(n as u64) >> 32) as usize
    }
}

/// Every class that is a target of the batch, plus uniformly drawn others up to ⌊rate·C⌋ classes
/// in all (InsightFace's `sample`: the positives alone when they are more), sorted.
pub(super) fn sample_classes(
    pfc: PartialFc,
    call: u64,
    targets: &[Option<usize>],
    classes: usize,
) -> Sample {
    let wanted = ((pfc.rate * classes as f64) as usize).clamp(1, classes);
    let mut positive = vec![false; classes];
    for &y in targets.iter().flatten() {
        positive[y] = true;
    }
    let mut chosen: Vec<u32> = (0..classes as u32)
        .filter(|&j| positive[j as usize])
        .collect();
    let extra = wanted.saturating_sub(chosen.len());
    if extra > 0 {
        let mut negatives: Vec<u32> = (0..classes as u32)
            .filter(|&j| !positive[j as usize])
            .collect();
        let mut rng = SplitMix64(pfc.seed ^ call.wrapping_mul(0xD1B5_4A32_D192_ED03));
        // A partial Fisher–Yates shuffle: the first `extra` entries are a uniform sample.
        for k in 0..extra {
            let pick = k + rng.below(negatives.len() - k);
            negatives.swap(k, pick);
        }
        chosen.extend_from_slice(&negatives[..extra]);
        chosen.sort_unstable();
    }
    let mut position = vec![u32::MAX; classes];
    for (k, &j) in chosen.iter().enumerate() {
        position[j as usize] = k as u32;
    }
    let targets = targets
        .iter()
        .map(|t| t.map(|y| position[y] as usize))
        .collect();
    Sample {
        classes: chosen,
        targets,
    }
}
