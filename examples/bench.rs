//! Benchmark of the fused loss against the candle `reference`, made for the GPU (`--features
//! cuda`) and runnable on the CPU (`--cpu`, small shapes) so that it can be tried anywhere.
//!
//! ```text
//! cargo run --release --features cuda --example bench                  # paper shapes, cuda:0
//! cargo run --release --features cuda --example bench -- --shapes small --dtypes bf16
//! cargo run --release --example bench -- --cpu                         # small shapes, CPU
//! ```
//!
//! What it does, in order:
//!
//! 1. **Copy bandwidth.** On CUDA a 1 GiB device-to-device copy of random data (the copy is
//!    checked), timed with CUDA events, median of 20; bytes = read + write. On the CPU a 128 MiB
//!    `copy_from_slice` on one thread, wall clock. This is the ceiling every "% copy" refers to.
//! 2. **Each case** (shape × dtype × head, label smoothing 0.1, reduction mean unless
//!    `--reduction none`): several random input sets are generated up front (f32 random, cast
//!    to the dtype; logits N(0, 2²) for softmax, cosines U(−1, 1) for ArcFace, squared distances
//!    U(0, 4γ) for RBF; targets uniform in [0, C)), enough of them that together they are at
//!    least 4 × the L2 cache (between 2 and 16 sets), and every timed call takes the next set in
//!    turn, so repeated runs do not measure the cache.
//! 3. **Timed**, each after a warm-up that is not counted (module loading, allocator):
//!    - `fwd`: `loss` (a plain tensor, no graph);
//!    - `bwd`: `backward()` of a retained graph (one per input set, built before timing): the
//!      autograd backward alone;
//!    - `fwd+bwd`: `loss` on a `Var` then `backward()`;
//!    - `loss_and_grad`.
//!
//!    On CUDA each call is bracketed by two events on candle's stream (`elapsed_ms`), so host
//!    work inside the call (argument checks, the targets' read-back, small reductions) counts:
//!    it is what a caller waits for. On the CPU, wall clock. Median, p20 and p80 over `--iters`.
//! 4. **Bytes that must move**: fwd reads B·C·sizeof(T); bwd reads and writes it (2×); fwd+bwd
//!    3×; `loss_and_grad` 2× on its fused CUDA path (one block per row, the row held in shared
//!    memory, taken when C ≤ `one_pass_max_classes(device, dtype)`, asked of the crate) and 3× on
//!    the split path (partial, finalize, backward). On the CPU `loss_and_grad` keeps each row in
//!    cache: 2×. GB/s = those bytes / median time, and % of the copy bandwidth.
//! 5. **Reference**: `reference::loss` (plain candle ops, autograd gradient) on the same device and
//!    inputs: its fwd, its fwd+bwd, and its bwd as the difference of the two medians (a retained
//!    reference graph per input set would hold dozens of [B, C] temporaries each). The row of
//!    `loss_and_grad` is compared with the reference's fwd+bwd, which computes the same two
//!    outputs. Its graph peaks at about 20 f32 [B, C] tensors, so on CUDA it is skipped (and the
//!    table says so) where 24·B·C·4 bytes do not fit in 90% of the free memory, or where B·C
//!    exceeds `--ref-max-elems`; a failure (out of memory) is reported, not fatal.
//! 6. **Parity** on the first input set: relative L2 errors ‖a − b‖ / ‖b‖ of the loss and of both
//!    gradients against the reference, and of the autograd gradient against `loss_and_grad`'s.
//!
//! The output is markdown (header, the two tables, notes) on stdout, ready to paste into
//! benches/RESULTS.md; progress goes to stderr.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor, Var};
use candle_margin_softmax::{Head, MarginSoftmaxLoss, Reduction, one_pass_max_classes, reference};
use rand::Rng;

const USAGE: &str = "\
usage: bench [--cpu] [--shapes small|paper|BxC,BxC,...] [--dtypes bf16,f16,f32]
             [--heads softmax,arcface,rbf] [--iters N] [--ref-iters N] [--warmup N]
             [--reduction mean|none] [--no-reference] [--ref-max-elems N]

  --cpu            run on the CPU even when a GPU is there (default shapes: small)
  --shapes         small = 256x1000,64x4096; paper = 8192x32000,4096x128256,512x1000000,1024x45000
                   (default: paper on CUDA, small on the CPU)
  --dtypes         any of f32, f16, bf16, f64 (default bf16,f16,f32)
  --heads          any of softmax, arcface, rbf (default all three)
  --iters          timed runs per measurement (default 50 on CUDA, 10 on the CPU)
  --ref-iters      timed runs per reference measurement (default min(iters, 10))
  --warmup         untimed runs before each measurement (default 3; the reference gets min(it, 2))
  --reduction      the loss's reduction (default mean)
  --no-reference   do not run the candle reference
  --ref-max-elems  run the reference only where B*C <= N (default: no limit; on CUDA it is
                   skipped where its estimated peak memory exceeds the free memory)";

const SMALL_SHAPES: &[(usize, usize)] = &[(256, 1000), (64, 4096)];
const PAPER_SHAPES: &[(usize, usize)] = &[
    (8192, 32000),
    (4096, 128_256),
    (512, 1_000_000),
    (1024, 45000),
];
const LABEL_SMOOTHING: f64 = 0.1;
/// Input sets rotate until together they are at least this many times the cache.
const CACHE_MULTIPLE: usize = 4;
const MIN_SETS: usize = 2;
const MAX_SETS: usize = 16;
/// The cache size assumed where it cannot be read off the device (the CPU; an H100 has 50 MiB).
const DEFAULT_CACHE_BYTES: usize = 50 << 20;
/// The reference's fwd+bwd holds about this many f32 [B, C] tensors at its peak: 19 to 20
/// measured on the CPU (peak RSS with and without the reference, ArcFace and RBF, 512 × 100000,
/// f32 and bf16), rounded up. On CUDA the reference runs only where that fits in the free memory.
const REF_PEAK_TENSORS: usize = 24;

fn main() -> Result<()> {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return Ok(());
        }
        Err(e) => {
            eprintln!("{USAGE}");
            return Err(e);
        }
    };
    let dev = if args.cpu {
        Device::Cpu
    } else {
        Device::cuda_if_available(0).context(
            "no usable CUDA device (build without `--features cuda`, or pass --cpu, to run on \
             the CPU)",
        )?
    };
    let platform = Platform::new(&dev)?;
    let shapes = args.shapes.clone().unwrap_or_else(|| {
        if dev.is_cpu() {
            ShapeSet::named("small")
        } else {
            ShapeSet::named("paper")
        }
        .expect("built-in shape set")
    });
    let iters = args.iters.unwrap_or(if dev.is_cpu() { 10 } else { 50 });
    let ref_iters = args.ref_iters.unwrap_or(iters.min(10));

    eprintln!("measuring copy bandwidth on {} ...", platform.name);
    let copy = platform.copy_bandwidth()?;

    print_header(&args, &platform, &shapes, iters, ref_iters, &copy);

    let bench = Bench {
        platform: &platform,
        warmup: args.warmup,
        iters,
        ref_iters,
        reduction: args.reduction,
        reference: args.reference,
        ref_max_elems: args.ref_max_elems,
    };
    let mut cases = Vec::new();
    for &shape in &shapes.shapes {
        for &dtype in &args.dtypes {
            for &head in &args.heads {
                cases.push(Case { shape, dtype, head });
            }
        }
    }
    let started = Instant::now();
    let mut results = Vec::with_capacity(cases.len());
    for (i, case) in cases.iter().enumerate() {
        eprintln!(
            "[{}/{}] {} {} {} ({:.0} s so far)",
            i + 1,
            cases.len(),
            shape_label(case.shape),
            dtype_name(case.dtype),
            case.head.name(),
            started.elapsed().as_secs_f64()
        );
        let outcome = bench.case(case);
        if let Err(e) = &outcome {
            eprintln!("  failed: {e:#}");
        }
        results.push((case, outcome));
    }
    print_tables(&results, copy.gbps, !dev.is_cpu());
    print_notes(&bench);
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Command line

#[derive(Clone)]
struct ShapeSet {
    label: String,
    shapes: Vec<(usize, usize)>,
}

impl ShapeSet {
    fn named(name: &str) -> Result<Self> {
        let shapes = match name {
            "small" => SMALL_SHAPES.to_vec(),
            "paper" => PAPER_SHAPES.to_vec(),
            list => list
                .split(',')
                .map(|s| {
                    let (b, c) = s
                        .split_once(['x', 'X'])
                        .with_context(|| format!("shape {s:?} is not BxC"))?;
                    let parse = |v: &str| v.trim().replace('_', "").parse::<usize>();
                    match (parse(b), parse(c)) {
                        (Ok(b), Ok(c)) if b > 0 && c > 0 => Ok((b, c)),
                        _ => bail!("shape {s:?} is not BxC with B, C > 0"),
                    }
                })
                .collect::<Result<_>>()?,
        };
        Ok(Self {
            label: name.to_string(),
            shapes,
        })
    }
}

struct Args {
    cpu: bool,
    shapes: Option<ShapeSet>,
    dtypes: Vec<DType>,
    heads: Vec<HeadKind>,
    iters: Option<usize>,
    ref_iters: Option<usize>,
    warmup: usize,
    reduction: Reduction,
    reference: bool,
    ref_max_elems: usize,
}

impl Args {
    /// The parsed options, or `None` for `--help`. Takes `--flag value` and `--flag=value`.
    fn parse(mut argv: impl Iterator<Item = String>) -> Result<Option<Self>> {
        let mut args = Args {
            cpu: false,
            shapes: None,
            dtypes: vec![DType::BF16, DType::F16, DType::F32],
            heads: vec![HeadKind::Softmax, HeadKind::ArcFace, HeadKind::Rbf],
            iters: None,
            ref_iters: None,
            warmup: 3,
            reduction: Reduction::Mean,
            reference: true,
            ref_max_elems: usize::MAX,
        };
        while let Some(arg) = argv.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) => (f.to_string(), Some(v.to_string())),
                None => (arg.clone(), None),
            };
            let mut value = || -> Result<String> {
                match inline.clone() {
                    Some(v) => Ok(v),
                    None => argv.next().with_context(|| format!("{flag} needs a value")),
                }
            };
            let count = |v: String| -> Result<usize> {
                v.replace('_', "")
                    .parse()
                    .with_context(|| format!("{flag}: {v:?} is not a count"))
            };
            match flag.as_str() {
                "-h" | "--help" => return Ok(None),
                "--cpu" => args.cpu = true,
                "--no-reference" => args.reference = false,
                "--shapes" => args.shapes = Some(ShapeSet::named(&value()?)?),
                "--dtypes" => args.dtypes = parse_list(&value()?, parse_dtype)?,
                "--heads" => args.heads = parse_list(&value()?, HeadKind::parse)?,
                "--iters" => args.iters = Some(count(value()?)?.max(1)),
                "--ref-iters" => args.ref_iters = Some(count(value()?)?.max(1)),
                "--warmup" => args.warmup = count(value()?)?,
                "--ref-max-elems" => args.ref_max_elems = count(value()?)?,
                "--reduction" => {
                    args.reduction = match value()?.as_str() {
                        "mean" => Reduction::Mean,
                        "none" => Reduction::None,
                        other => bail!("--reduction: {other:?} is not mean or none"),
                    }
                }
                other => bail!("unknown argument {other:?}"),
            }
        }
        Ok(Some(args))
    }
}

fn parse_list<T>(list: &str, parse: fn(&str) -> Result<T>) -> Result<Vec<T>> {
    list.split(',').map(|s| parse(s.trim())).collect()
}

fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        "f64" => DType::F64,
        other => bail!("dtype {other:?} is not one of f32, f16, bf16, f64"),
    })
}

fn dtype_name(dtype: DType) -> &'static str {
    dtype.as_str()
}

fn shape_label((b, c): (usize, usize)) -> String {
    format!("{b} × {c}")
}

// ---------------------------------------------------------------------------------------------
// Heads and inputs

#[derive(Clone, Copy, Debug)]
enum HeadKind {
    Softmax,
    ArcFace,
    Rbf,
}

impl HeadKind {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "softmax" => Self::Softmax,
            "arcface" => Self::ArcFace,
            "rbf" => Self::Rbf,
            other => bail!("head {other:?} is not one of softmax, arcface, rbf"),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Softmax => "softmax",
            Self::ArcFace => "arcface",
            Self::Rbf => "rbf",
        }
    }

    fn head(self) -> Head {
        match self {
            Self::Softmax => Head::softmax(),
            Self::ArcFace => Head::arcface(),
            Self::Rbf => Head::rbf(),
        }
    }

    /// A fresh random input of the kind the head takes, drawn in f32 on `dev`, then cast.
    fn random_input(self, shape: (usize, usize), dtype: DType, dev: &Device) -> Result<Tensor> {
        let x = match self {
            Self::Softmax => Tensor::randn(0f32, 2.0, shape, dev)?,
            Self::ArcFace => Tensor::rand(-1f32, 1.0, shape, dev)?,
            Self::Rbf => {
                let gamma = match self.head() {
                    Head::Rbf { gamma, .. } => gamma as f32,
                    _ => unreachable!("HeadKind::Rbf builds Head::Rbf"),
                };
                Tensor::rand(0f32, 4.0 * gamma, shape, dev)?
            }
        };
        Ok(x.to_dtype(dtype)?)
    }

    fn describe(self) -> String {
        match self.head() {
            Head::Softmax { s } => format!("softmax (s = {s}; logits N(0, 2²))"),
            Head::ArcFace { s, m, .. } => format!("arcface (s = {s}, m = {m}; cosines U(−1, 1))"),
            Head::Rbf { s, gamma } => {
                format!(
                    "rbf (s = {s}, γ = {gamma}; squared distances U(0, {}))",
                    4.0 * gamma
                )
            }
            other => format!("{other:?}"),
        }
    }
}

/// Uniform targets in [0, C), u32, on `dev`.
fn random_targets(rows: usize, classes: usize, dev: &Device) -> Result<Tensor> {
    let mut rng = rand::rng();
    let classes = u32::try_from(classes).context("C must fit in u32")?;
    let t: Vec<u32> = (0..rows).map(|_| rng.random_range(0..classes)).collect();
    Ok(Tensor::from_vec(t, rows, dev)?)
}

// ---------------------------------------------------------------------------------------------
// Timing

/// Median, 20th and 80th percentiles of a set of times (ms).
#[derive(Clone, Copy, Debug)]
struct Summary {
    median: f64,
    p20: f64,
    p80: f64,
}

impl Summary {
    fn of(mut samples: Vec<f64>) -> Self {
        samples.sort_by(f64::total_cmp);
        // Linear interpolation between the closest ranks.
        let at = |q: f64| {
            let pos = q * (samples.len() - 1) as f64;
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            samples[lo] + (samples[hi] - samples[lo]) * (pos - lo as f64)
        };
        Self {
            median: at(0.5),
            p20: at(0.2),
            p80: at(0.8),
        }
    }
}

/// The device and how to time work on it.
struct Platform {
    dev: Device,
    name: String,
    /// Bytes of the last-level cache the rotation of input sets must defeat.
    cache_bytes: usize,
    /// Whether `cache_bytes` was read off the device (else [`DEFAULT_CACHE_BYTES`]).
    cache_known: bool,
    #[cfg(feature = "cuda")]
    events: Option<cuda_events::Events>,
}

/// The measured copy bandwidth (bytes read + written per second, as GB/s) and how.
struct Bandwidth {
    gbps: Option<f64>,
    how: String,
}

impl Platform {
    fn new(dev: &Device) -> Result<Self> {
        match dev {
            #[cfg(feature = "cuda")]
            Device::Cuda(cuda) => {
                let info = gpu::info(cuda);
                Ok(Self {
                    dev: dev.clone(),
                    name: info.description,
                    cache_bytes: info.l2_bytes.unwrap_or(DEFAULT_CACHE_BYTES),
                    cache_known: info.l2_bytes.is_some(),
                    events: Some(cuda_events::Events::new(cuda)?),
                })
            }
            Device::Cpu => Ok(Self {
                dev: dev.clone(),
                name: format!(
                    "CPU ({} threads for rayon, {})",
                    rayon::current_num_threads(),
                    std::env::consts::ARCH
                ),
                cache_bytes: DEFAULT_CACHE_BYTES,
                cache_known: false,
                #[cfg(feature = "cuda")]
                events: None,
            }),
            other => bail!("unsupported device {:?}", other.location()),
        }
    }

    /// The time of `f` in ms: CUDA events on candle's stream, or a synchronised wall clock.
    fn time_ms(&self, f: impl FnOnce() -> Result<()>) -> Result<f64> {
        #[cfg(feature = "cuda")]
        if let Some(events) = &self.events {
            return events.time_ms(f);
        }
        self.dev.synchronize()?;
        let start = Instant::now();
        f()?;
        self.dev.synchronize()?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    }

    /// `warmup` untimed calls, then `iters` timed ones; `f` gets the call's index (to rotate
    /// inputs).
    fn measure(
        &self,
        warmup: usize,
        iters: usize,
        mut f: impl FnMut(usize) -> Result<()>,
    ) -> Result<Summary> {
        for i in 0..warmup {
            f(i)?;
        }
        let samples = (warmup..warmup + iters)
            .map(|i| self.time_ms(|| f(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Summary::of(samples))
    }

    /// Free device memory in bytes (CUDA only).
    fn free_bytes(&self) -> Option<usize> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(cuda) = &self.dev {
            return gpu::free_bytes(cuda);
        }
        None
    }

    fn copy_bandwidth(&self) -> Result<Bandwidth> {
        #[cfg(feature = "cuda")]
        if let (Device::Cuda(cuda), Some(events)) = (&self.dev, &self.events) {
            return gpu::copy_bandwidth(cuda, events);
        }
        cpu_copy_bandwidth()
    }
}

/// One thread's `copy_from_slice` of 128 MiB of non-zero data, wall clock, median of 10.
fn cpu_copy_bandwidth() -> Result<Bandwidth> {
    const BYTES: usize = 128 << 20;
    const ITERS: usize = 10;
    let n = BYTES / std::mem::size_of::<f32>();
    let src: Vec<f32> = (0..n).map(|i| (i % 1021) as f32 + 0.5).collect();
    let mut dst = vec![0f32; n];
    dst.copy_from_slice(&src); // warm-up: faults the destination's pages in
    let mut samples = Vec::with_capacity(ITERS);
    for _ in 0..ITERS {
        let start = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
        samples.push(start.elapsed().as_secs_f64() * 1e3);
    }
    if dst[n - 1] != src[n - 1] {
        bail!("memcpy check failed");
    }
    let ms = Summary::of(samples).median;
    Ok(Bandwidth {
        gbps: Some(2.0 * BYTES as f64 / (ms * 1e-3) / 1e9),
        how: format!(
            "{} MiB `copy_from_slice` on one thread, bytes read + written, median of {ITERS}, \
             wall clock",
            BYTES >> 20
        ),
    })
}

#[cfg(feature = "cuda")]
#[path = "common/cuda_events.rs"]
mod cuda_events;

#[cfg(feature = "cuda")]
mod gpu {
    //! The CUDA-only parts: device attributes, the device-to-device copy.

    use anyhow::{Result, bail};
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::{CudaDevice, Storage, Tensor};

    use super::cuda_events::Events;
    use super::{Bandwidth, Summary};

    pub fn free_bytes(dev: &CudaDevice) -> Option<usize> {
        dev.cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, _)| free)
    }

    pub struct Info {
        pub description: String,
        pub l2_bytes: Option<usize>,
    }

    /// The device's name and attributes; "cuda:0" where the driver does not say.
    pub fn info(dev: &CudaDevice) -> Info {
        let stream = dev.cuda_stream();
        let ctx = stream.context();
        let name = ctx.name().unwrap_or_else(|_| "cuda:0".to_string());
        let mut details = vec![format!("cuda:{}", ctx.ordinal())];
        if let Ok((major, minor)) = ctx.compute_capability() {
            details.push(format!("compute capability {major}.{minor}"));
        }
        if let Ok(total) = ctx.total_mem() {
            details.push(format!("{:.1} GiB", total as f64 / (1u64 << 30) as f64));
        }
        let l2_bytes = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
            .ok()
            .and_then(|b| usize::try_from(b).ok())
            .filter(|&b| b > 0);
        if let Some(l2) = l2_bytes {
            details.push(format!("L2 {} MiB", l2 >> 20));
        }
        if let Ok(sms) =
            ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        {
            details.push(format!("{sms} SMs"));
        }
        Info {
            description: format!("{name} ({})", details.join(", ")),
            l2_bytes,
        }
    }

    /// A 1 GiB device-to-device copy of random f32 data (`cuMemcpyDtoDAsync` on candle's
    /// stream), checked, timed with events: median of 20 after 3 warm-ups; bytes read + written.
    pub fn copy_bandwidth(dev: &CudaDevice, events: &Events) -> Result<Bandwidth> {
        const BYTES: usize = 1 << 30;
        const WARMUP: usize = 3;
        const ITERS: usize = 20;
        let n = BYTES / std::mem::size_of::<f32>();
        let device = candle_core::Device::Cuda(dev.clone());
        let src_tensor = Tensor::rand(0.5f32, 1.5, n, &device)?;
        let (storage, _) = src_tensor.storage_and_layout();
        let Storage::Cuda(storage) = &*storage else {
            bail!("a CUDA tensor without CUDA storage")
        };
        let src = storage.as_cuda_slice::<f32>()?;
        let mut dst = dev.alloc_zeros::<f32>(n)?;
        for _ in 0..WARMUP {
            dev.memcpy_dtod(src, &mut dst)?;
        }
        let samples = (0..ITERS)
            .map(|_| events.time_ms(|| Ok(dev.memcpy_dtod(src, &mut dst)?)))
            .collect::<Result<Vec<_>>>()?;
        // The copy happened: both ends of the (zero-initialised) destination hold the source.
        for range in [0..256, n - 256..n] {
            let want = dev.clone_dtoh(&src.slice(range.clone()))?;
            let got = dev.clone_dtoh(&dst.slice(range))?;
            if want != got {
                bail!("device-to-device copy check failed");
            }
        }
        let ms = Summary::of(samples).median;
        Ok(Bandwidth {
            gbps: Some(2.0 * BYTES as f64 / (ms * 1e-3) / 1e9),
            how: format!(
                "{} GiB device-to-device copy of random data (cuMemcpyDtoDAsync), bytes read + \
                 written, median of {ITERS} after {WARMUP} warm-ups, CUDA events",
                BYTES >> 30
            ),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The cases

struct Case {
    shape: (usize, usize),
    dtype: DType,
    head: HeadKind,
}

struct Bench<'a> {
    platform: &'a Platform,
    warmup: usize,
    iters: usize,
    ref_iters: usize,
    reduction: Reduction,
    reference: bool,
    ref_max_elems: usize,
}

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Forward,
    Backward,
    ForwardBackward,
    LossAndGrad,
}

impl Op {
    const ALL: [Op; 4] = [
        Op::Forward,
        Op::Backward,
        Op::ForwardBackward,
        Op::LossAndGrad,
    ];

    fn name(self) -> &'static str {
        match self {
            Op::Forward => "fwd",
            Op::Backward => "bwd",
            Op::ForwardBackward => "fwd+bwd",
            Op::LossAndGrad => "loss_and_grad",
        }
    }
}

/// What the reference did for a case.
enum RefOutcome {
    Ran {
        fwd: Summary,
        fwd_bwd: Summary,
        loss_err: f64,
        grad_err_autograd: f64,
        grad_err_loss_and_grad: f64,
    },
    Skipped(String),
    Failed(String),
}

struct CaseResult {
    sets: usize,
    in_cache: bool,
    /// Timings of `Op::ALL`, in order.
    ours: [Summary; 4],
    fused_path: bool,
    autograd_vs_loss_and_grad: f64,
    reference: RefOutcome,
}

impl Bench<'_> {
    fn case(&self, case: &Case) -> Result<CaseResult> {
        let dev = &self.platform.dev;
        let (rows, classes) = case.shape;
        let row_bytes = classes * case.dtype.size_in_bytes();
        let input_bytes = rows * row_bytes;
        let wanted = (CACHE_MULTIPLE * self.platform.cache_bytes).div_ceil(input_bytes.max(1));
        let sets = wanted.clamp(MIN_SETS, MAX_SETS);
        let cfg = MarginSoftmaxLoss::new(case.head.head())
            .label_smoothing(LABEL_SMOOTHING)
            .reduction(self.reduction);

        let vars = (0..sets)
            .map(|_| {
                Ok(Var::from_tensor(
                    &case.head.random_input(case.shape, case.dtype, dev)?,
                )?)
            })
            .collect::<Result<Vec<_>>>()?;
        // The same storage, outside any graph.
        let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().detach()).collect();
        let targets = (0..sets)
            .map(|_| random_targets(rows, classes, dev))
            .collect::<Result<Vec<_>>>()?;
        dev.synchronize()?;
        let set = |i: usize| i % sets;
        let p = self.platform;

        let fwd = p.measure(self.warmup, self.iters, |i| {
            cfg.loss(&inputs[set(i)], &targets[set(i)])?;
            Ok(())
        })?;
        let graphs = (0..sets)
            .map(|s| cfg.loss(vars[s].as_tensor(), &targets[s]))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let bwd = p.measure(self.warmup, self.iters, |i| {
            graphs[set(i)].backward()?;
            Ok(())
        })?;
        drop(graphs);
        let fwd_bwd = p.measure(self.warmup, self.iters, |i| {
            cfg.loss(vars[set(i)].as_tensor(), &targets[set(i)])?
                .backward()?;
            Ok(())
        })?;
        let loss_and_grad = p.measure(self.warmup, self.iters, |i| {
            cfg.loss_and_grad(&inputs[set(i)], &targets[set(i)])?;
            Ok(())
        })?;

        // Parity on the first set.
        let (lag_loss, lag_grad) = cfg.loss_and_grad(&inputs[0], &targets[0])?;
        let grads = cfg.loss(vars[0].as_tensor(), &targets[0])?.backward()?;
        let auto_grad = grads.get(&vars[0]).context("no gradient for the input")?;
        let autograd_vs_loss_and_grad = rel_err(auto_grad, &lag_grad)?;

        let reference = if !self.reference {
            RefOutcome::Skipped("--no-reference".into())
        } else if rows * classes > self.ref_max_elems {
            RefOutcome::Skipped(format!("B·C > {}", self.ref_max_elems))
        } else if let Some(free) = p.free_bytes().filter(|&free| {
            // Inputs and graphs of this case are allocated; leave 10% to fragmentation.
            REF_PEAK_TENSORS * rows * classes * 4 > free / 10 * 9
        }) {
            RefOutcome::Skipped(format!(
                "needs ~{}, {} free",
                fmt_bytes((REF_PEAK_TENSORS * rows * classes * 4) as f64),
                fmt_bytes(free as f64)
            ))
        } else {
            let run = || -> Result<RefOutcome> {
                let warmup = self.warmup.min(2);
                let fwd = p.measure(warmup, self.ref_iters, |i| {
                    reference::loss(&cfg, &inputs[set(i)], &targets[set(i)])?;
                    Ok(())
                })?;
                let fwd_bwd = p.measure(warmup, self.ref_iters, |i| {
                    reference::loss(&cfg, vars[set(i)].as_tensor(), &targets[set(i)])?
                        .backward()?;
                    Ok(())
                })?;
                let ref_loss = reference::loss(&cfg, vars[0].as_tensor(), &targets[0])?;
                let ref_grads = ref_loss.backward()?;
                let ref_grad = ref_grads
                    .get(&vars[0])
                    .context("no reference gradient for the input")?;
                Ok(RefOutcome::Ran {
                    fwd,
                    fwd_bwd,
                    loss_err: rel_err(&lag_loss, &ref_loss)?,
                    grad_err_autograd: rel_err(auto_grad, ref_grad)?,
                    grad_err_loss_and_grad: rel_err(&lag_grad, ref_grad)?,
                })
            };
            run().unwrap_or_else(|e| RefOutcome::Failed(format!("{e:#}")))
        };

        Ok(CaseResult {
            sets,
            in_cache: sets * input_bytes < CACHE_MULTIPLE * self.platform.cache_bytes,
            ours: [fwd, bwd, fwd_bwd, loss_and_grad],
            // The crate's own planner says whether this row width takes the one-pass path.
            fused_path: classes <= one_pass_max_classes(dev, case.dtype)?,
            autograd_vs_loss_and_grad,
            reference,
        })
    }
}

/// ‖a − b‖₂ / ‖b‖₂, in f32 (NaN if either holds a NaN).
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F32)?;
    let b = b.to_dtype(DType::F32)?;
    let norm = |t: &Tensor| -> Result<f64> {
        Ok(f64::from(t.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?))
    };
    let diff = norm(&(&a - &b)?)?;
    let base = norm(&b)?;
    Ok(if base > 0.0 { diff / base } else { diff })
}

// ---------------------------------------------------------------------------------------------
// Output

fn print_header(
    args: &Args,
    platform: &Platform,
    shapes: &ShapeSet,
    iters: usize,
    ref_iters: usize,
    copy: &Bandwidth,
) {
    let command: Vec<String> = std::env::args().collect();
    let build = if cfg!(debug_assertions) {
        "debug (timings not meaningful: use --release)"
    } else {
        "release"
    };
    let features = if cfg!(feature = "cuda") {
        "cuda"
    } else {
        "none"
    };
    let dtypes: Vec<&str> = args.dtypes.iter().map(|&d| dtype_name(d)).collect();
    let heads: Vec<String> = args.heads.iter().map(|h| h.describe()).collect();
    let reduction = match args.reduction {
        Reduction::Mean => "mean",
        Reduction::None => "none",
        Reduction::Sum => "sum",
    };
    let timing = if platform.dev.is_cpu() {
        "synchronised wall clock around each call"
    } else {
        "CUDA events on candle's stream around each call (host work inside the call included)"
    };
    println!(
        "## candle-margin-softmax {} benchmark\n",
        env!("CARGO_PKG_VERSION")
    );
    println!("- date: {}", utc_now());
    println!("- device: {}", platform.name);
    println!("- command: `{}`", command.join(" "));
    println!("- build: {build}; features: {features}");
    match copy.gbps {
        Some(gbps) => println!("- copy bandwidth: **{gbps:.1} GB/s** ({})", copy.how),
        None => println!("- copy bandwidth: not measured ({})", copy.how),
    }
    println!(
        "- timing: {timing}; {} warm-up calls excluded; median, p20, p80 of {iters} calls \
         (reference: {ref_iters}); inputs rotate among pre-generated random sets totalling ≥ {} \
         × the cache ({} MiB, {}), 2 to 16 sets",
        args.warmup,
        CACHE_MULTIPLE,
        platform.cache_bytes >> 20,
        if platform.cache_known {
            "the device's L2"
        } else {
            "assumed"
        }
    );
    let shape_list: Vec<String> = shapes.shapes.iter().map(|&s| shape_label(s)).collect();
    println!(
        "- cases: shapes {} ({}); dtypes {}; label smoothing {LABEL_SMOOTHING}, reduction \
         {reduction}, u32 targets uniform in [0, C)",
        shapes.label,
        shape_list.join(", "),
        dtypes.join(", ")
    );
    println!("- heads: {}", heads.join("; "));
    println!();
}

fn print_tables(results: &[(&Case, Result<CaseResult>)], copy_gbps: Option<f64>, on_gpu: bool) {
    println!("### Time and bandwidth\n");
    println!(
        "| B × C | dtype | head | op | path | ms (median) | p20 | p80 | moved | GB/s | % copy \
         | reference ms | speed-up |"
    );
    println!("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (case, outcome) in results {
        let lead = format!(
            "| {} | {} | {} ",
            shape_label(case.shape),
            dtype_name(case.dtype),
            case.head.name()
        );
        let result = match outcome {
            Ok(r) => r,
            Err(e) => {
                println!("{lead}| all | error: {} | | | | | | | | |", one_line(e));
                continue;
            }
        };
        let tensor_bytes = (case.shape.0 * case.shape.1 * case.dtype.size_in_bytes()) as f64;
        for (op, ours) in Op::ALL.into_iter().zip(result.ours) {
            let (path, passes) = path_and_passes(op, result.fused_path, on_gpu);
            let bytes = passes * tensor_bytes;
            let gbps = bytes / (ours.median * 1e-3) / 1e9;
            let pct = copy_gbps.map_or("—".to_string(), |c| format!("{:.0}%", 100.0 * gbps / c));
            let (ref_ms, speedup) = match (&result.reference, reference_ms(op, &result.reference)) {
                (_, Some(ms)) if ms > 0.0 => (fmt_ms(ms), format!("{:.1}×", ms / ours.median)),
                (_, Some(_)) => ("≤ 0 (noise)".into(), "—".into()),
                (RefOutcome::Skipped(why), None) => (format!("skipped ({why})"), "—".into()),
                (RefOutcome::Failed(_), None) => ("failed (see notes)".into(), "—".into()),
                (RefOutcome::Ran { .. }, None) => ("—".into(), "—".into()),
            };
            println!(
                "{lead}| {} | {path} | {} | {} | {} | {} | {} | {pct} | {ref_ms} | {speedup} |",
                op.name(),
                fmt_ms(ours.median),
                fmt_ms(ours.p20),
                fmt_ms(ours.p80),
                fmt_bytes(bytes),
                fmt_gbps(gbps)
            );
        }
    }

    println!("\n### Parity (first input set; relative L2 error ‖a − b‖ / ‖b‖)\n");
    println!(
        "| B × C | dtype | head | input sets | loss vs ref | grad (autograd) vs ref | grad \
         (loss_and_grad) vs ref | autograd vs loss_and_grad |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|");
    let mut failures = Vec::new();
    for (case, outcome) in results {
        let lead = format!(
            "| {} | {} | {} ",
            shape_label(case.shape),
            dtype_name(case.dtype),
            case.head.name()
        );
        let Ok(r) = outcome else {
            println!("{lead}| — | — | — | — | — |");
            continue;
        };
        let sets = if r.in_cache {
            format!("{} (fit in cache)", r.sets)
        } else {
            r.sets.to_string()
        };
        let (loss, auto, lag) = match &r.reference {
            RefOutcome::Ran {
                loss_err,
                grad_err_autograd,
                grad_err_loss_and_grad,
                ..
            } => (
                fmt_err(*loss_err),
                fmt_err(*grad_err_autograd),
                fmt_err(*grad_err_loss_and_grad),
            ),
            RefOutcome::Skipped(_) => ("—".into(), "—".into(), "—".into()),
            RefOutcome::Failed(e) => {
                failures.push(format!(
                    "{} {} {}: {}",
                    shape_label(case.shape),
                    dtype_name(case.dtype),
                    case.head.name(),
                    one_line(e)
                ));
                ("failed".into(), "failed".into(), "failed".into())
            }
        };
        println!(
            "{lead}| {sets} | {loss} | {auto} | {lag} | {} |",
            fmt_err(r.autograd_vs_loss_and_grad)
        );
    }
    if !failures.is_empty() {
        println!("\nReference failures (out of memory, most likely):\n");
        for f in failures {
            println!("- {f}");
        }
    }
}

/// The path an op takes and how many passes over B·C·sizeof(T) it must make.
fn path_and_passes(op: Op, fused: bool, on_gpu: bool) -> (&'static str, f64) {
    match op {
        Op::Forward => ("read", 1.0),
        Op::Backward => ("read + write", 2.0),
        Op::ForwardBackward => ("read, read + write", 3.0),
        Op::LossAndGrad if !on_gpu => ("cpu: row in cache, read + write", 2.0),
        Op::LossAndGrad if fused => ("fused: read + write", 2.0),
        Op::LossAndGrad => ("split: 2 reads + write", 3.0),
    }
}

/// The reference's time for the row of `op`: its fwd, the difference fwd+bwd − fwd for bwd, its
/// fwd+bwd for both fwd+bwd and loss_and_grad.
fn reference_ms(op: Op, outcome: &RefOutcome) -> Option<f64> {
    let RefOutcome::Ran { fwd, fwd_bwd, .. } = outcome else {
        return None;
    };
    Some(match op {
        Op::Forward => fwd.median,
        Op::Backward => fwd_bwd.median - fwd.median,
        Op::ForwardBackward | Op::LossAndGrad => fwd_bwd.median,
    })
}

fn print_notes(bench: &Bench) {
    println!("\nNotes:\n");
    println!(
        "- moved: the bytes the op cannot avoid, in passes over the [B, C] input of \
         B·C·sizeof(T) bytes: fwd reads it (1); bwd reads it and writes the gradient (2); \
         fwd+bwd both (3); loss_and_grad reads and writes once on the fused CUDA path (rows of \
         at most `one_pass_max_classes(device, dtype)` classes, one block per row held in \
         shared memory) and \
         makes 2 reads + 1 write on the split path; on the CPU it keeps each row in cache (2). \
         GB/s is that over the median; % copy compares it with the copy bandwidth above."
    );
    println!(
        "- bwd: `backward()` of a graph built before timing (one per input set): candle's \
         autograd backward alone (the reduction's backward, the per-row constants, the backward \
         kernel). The reference's bwd is its fwd+bwd median minus its fwd median."
    );
    let limit = if bench.ref_max_elems == usize::MAX {
        String::new()
    } else {
        format!(" and for B·C ≤ {} (--ref-max-elems)", bench.ref_max_elems)
    };
    let skipped = if bench.reference {
        ""
    } else {
        " This run skipped it (--no-reference)."
    };
    println!(
        "- reference: `candle_margin_softmax::reference::loss` (plain candle ops, autograd) on \
         the same device and inputs; its row for loss_and_grad is its fwd+bwd, which yields the \
         same loss and gradient. Its autograd graph peaks at about 20 f32 [B, C] tensors: on \
         CUDA it runs only where {REF_PEAK_TENSORS}·B·C·4 bytes fit in 90% of the free memory\
         {limit}; elsewhere the table says why it was skipped.{skipped}"
    );
    println!(
        "- On CUDA every call of the op reads the targets back to the host to validate them (as \
         the CPU path does), so each timed call includes one device-to-host synchronisation."
    );
}

fn fmt_ms(ms: f64) -> String {
    if !ms.is_finite() {
        return "NaN".into();
    }
    if ms >= 100.0 {
        format!("{ms:.1}")
    } else if ms >= 1.0 {
        format!("{ms:.3}")
    } else {
        format!("{ms:.4}")
    }
}

fn fmt_err(e: f64) -> String {
    if e.is_nan() {
        "**NaN**".into()
    } else if e == 0.0 {
        "0".into()
    } else {
        format!("{e:.1e}")
    }
}

/// Bytes in decimal units, three significant digits: "1.05 GB", "512 kB".
fn fmt_bytes(bytes: f64) -> String {
    let (value, unit) = match bytes {
        b if b >= 1e9 => (b / 1e9, "GB"),
        b if b >= 1e6 => (b / 1e6, "MB"),
        b => (b / 1e3, "kB"),
    };
    // Three significant digits.
    match value {
        v if v >= 100.0 => format!("{v:.0} {unit}"),
        v if v >= 10.0 => format!("{v:.1} {unit}"),
        v => format!("{v:.2} {unit}"),
    }
}

fn fmt_gbps(gbps: f64) -> String {
    if gbps >= 100.0 {
        format!("{gbps:.0}")
    } else {
        format!("{gbps:.2}")
    }
}

fn one_line(e: &impl std::fmt::Display) -> String {
    e.to_string().replace(['\n', '|'], " ")
}

/// The current UTC date and time, as "YYYY-MM-DD HH:MM UTC".
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}
