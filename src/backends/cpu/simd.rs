//! Runtime CPU-feature dispatch of the CPU row kernels, through `pulp`.
//!
//! The crate compiles for the target's baseline (SSE2 on x86-64). The row kernels are written as
//! plain loops over fixed-size chunks that LLVM auto-vectorizes; [`Dispatch::run`] compiles and
//! runs them once more with AVX2 + FMA ("x86-64-v3") or AVX-512 ("x86-64-v4") enabled, or NEON
//! on aarch64, chosen at run time from what the CPU reports. Every level runs the same source:
//! the arithmetic is the same IEEE operations in the same order (no `mul_add`, no fast-math, and
//! the partial sums are explicit lanes), so every level gives **bitwise** the same results as
//! [`SimdLevel::Scalar`], the baseline build, which stays the oracle. Tests force each level the
//! machine has with [`with_simd_level`] and compare.

use std::cell::Cell;

use candle_core::{Result, bail};

use crate::config::OP_NAME;

/// An instruction-set level of the CPU row kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SimdLevel {
    /// The target's baseline features (SSE2 on x86-64): the reference build of the kernels.
    Scalar,
    /// x86-64-v3: AVX, AVX2, FMA, BMI1/2 (256-bit vectors).
    Avx2,
    /// x86-64-v4: AVX-512 F/BW/CD/DQ/VL (512-bit vectors) on top of v3.
    Avx512,
    /// aarch64 NEON (128-bit vectors).
    Neon,
}

impl SimdLevel {
    /// Every level, lowest first.
    pub const ALL: [SimdLevel; 4] = [Self::Scalar, Self::Avx2, Self::Avx512, Self::Neon];

    /// Whether this CPU can run the level.
    pub fn is_available(self) -> bool {
        Dispatch::of(self).is_some()
    }

    /// The levels this CPU can run, lowest first ([`SimdLevel::Scalar`] always).
    pub fn available() -> Vec<SimdLevel> {
        Self::ALL.into_iter().filter(|l| l.is_available()).collect()
    }

    /// The level the op uses on this thread: the one forced by [`with_simd_level`], else the
    /// highest this CPU has.
    pub fn current() -> SimdLevel {
        Dispatch::current().level()
    }
}

thread_local! {
    static FORCED: Cell<Option<SimdLevel>> = const { Cell::new(None) };
}

/// Runs `f` with the CPU row kernels of every op called **from this thread** forced to `level`
/// (the op reads the level on the calling thread and hands it to its worker threads), then
/// restores the previous choice. For tests and benchmarks: every level gives bitwise the same
/// results, only the speed differs.
///
/// # Errors
/// An `Err` naming the op if this CPU cannot run `level`.
pub fn with_simd_level<R>(level: SimdLevel, f: impl FnOnce() -> R) -> Result<R> {
    if !level.is_available() {
        bail!("{OP_NAME}: SIMD level {level:?} is not available on this CPU")
    }
    struct Restore(Option<SimdLevel>);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FORCED.with(|c| c.replace(Some(level))));
    Ok(f())
}

/// A level proven available: pulp's token for it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Dispatch {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    V3(pulp::x86::V3),
    #[cfg(target_arch = "x86_64")]
    V4(pulp::x86::V4),
    #[cfg(target_arch = "aarch64")]
    Neon(pulp::aarch64::Neon),
}

impl Dispatch {
    fn of(level: SimdLevel) -> Option<Self> {
        match level {
            SimdLevel::Scalar => Some(Self::Scalar),
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => pulp::x86::V3::try_new().map(Self::V3),
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => pulp::x86::V4::try_new().map(Self::V4),
            #[cfg(target_arch = "aarch64")]
            SimdLevel::Neon => pulp::aarch64::Neon::try_new().map(Self::Neon),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    fn level(self) -> SimdLevel {
        match self {
            Self::Scalar => SimdLevel::Scalar,
            #[cfg(target_arch = "x86_64")]
            Self::V3(_) => SimdLevel::Avx2,
            #[cfg(target_arch = "x86_64")]
            Self::V4(_) => SimdLevel::Avx512,
            #[cfg(target_arch = "aarch64")]
            Self::Neon(_) => SimdLevel::Neon,
        }
    }

    /// The forced level of this thread, else the best one available (detected once by pulp).
    pub(crate) fn current() -> Self {
        if let Some(forced) = FORCED.with(Cell::get) {
            // Checked available by `with_simd_level`.
            return Self::of(forced).unwrap_or(Self::Scalar);
        }
        [SimdLevel::Avx512, SimdLevel::Avx2, SimdLevel::Neon]
            .into_iter()
            .find_map(Self::of)
            .unwrap_or(Self::Scalar)
    }

    /// Runs `kernel` compiled with this level's target features. [`RowKernel::run`] and
    /// everything it calls in the hot loop must be `#[inline(always)]` for the features to reach
    /// the loop (a closure would leave that to the inliner's judgement).
    #[inline(always)]
    pub(crate) fn run<K: RowKernel>(self, kernel: K) -> K::Output {
        use pulp::Simd;
        match self {
            Self::Scalar => kernel.run(),
            #[cfg(target_arch = "x86_64")]
            Self::V3(simd) => Simd::vectorize(simd, WithFeatures(kernel)),
            #[cfg(target_arch = "x86_64")]
            Self::V4(simd) => Simd::vectorize(simd, WithFeatures(kernel)),
            #[cfg(target_arch = "aarch64")]
            Self::Neon(simd) => Simd::vectorize(simd, WithFeatures(kernel)),
        }
    }
}

/// A unit of row work that [`Dispatch::run`] compiles once per level.
pub(crate) trait RowKernel {
    type Output;
    /// Must be `#[inline(always)]`.
    fn run(self) -> Self::Output;
}

/// pulp's entry: `with_simd` is called inside a function compiled with the level's features.
struct WithFeatures<K>(K);

impl<K: RowKernel> pulp::WithSimd for WithFeatures<K> {
    type Output = K::Output;
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> K::Output {
        self.0.run()
    }
}
