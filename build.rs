//! Compiles each `kernels/<stem>.cu` under the `cuda` feature into `$OUT_DIR/<stem>.fatbin`, a
//! CUDA fat binary that `src/backends/cuda/module.rs` embeds with
//! `include_bytes!(concat!(env!("OUT_DIR"), "/<stem>.fatbin"))` and loads with
//! `cuModuleLoadData`. Without the feature it does nothing, so a plain build needs no CUDA
//! toolkit.
//!
//! Why a fatbin and not PTX: the driver picks the SASS (machine code) built for the GPU, so there
//! is no JIT compilation on first use (seconds per module for PTX), and sm_90 SASS lets the
//! kernels use Hopper-only features (thread-block clusters, distributed shared memory) behind
//! `#if __CUDA_ARCH__ >= 900`, which PTX for sm_80 cannot.
//!
//! - nvcc: `$NVCC`, else `nvcc` on `PATH`, else `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`,
//!   `/usr/local/cuda/bin/nvcc` (candle's own build looks in the same order). CUDA ≥ 12.
//! - Targets: SASS for each architecture of `MARGIN_SOFTMAX_CUDA_ARCHS` (space- or
//!   comma-separated, each as "80", "8.0", "sm_80", "90a", …), default `80 90`, plus PTX for the
//!   highest of them (without an `a` / `f` suffix: that PTX would not be forward compatible), so
//!   that a newer GPU (Blackwell, …) JIT-compiles from it. SASS for sm_80 runs on every 8.x GPU
//!   (A100, A10, L4, RTX 30xx / 40xx), sm_90 on H100 / H200; nothing else needs the JIT.
//!   No compute_80 PTX: every GPU it could serve runs the sm_80 or sm_90 SASS or the compute_90
//!   PTX already (it would add 12–14 % to each fatbin for nothing).
//! - `CUDA_COMPUTE_CAP` (which candle's own build needs on a machine without a GPU): when
//!   `MARGIN_SOFTMAX_CUDA_ARCHS` is unset, its architecture is added to the default list (e.g.
//!   `86` → SASS for 80, 86, 90; `100` → SASS for 80, 90, 100 and PTX compute_100). An explicit
//!   `MARGIN_SOFTMAX_CUDA_ARCHS` wins: `MARGIN_SOFTMAX_CUDA_ARCHS=90` builds sm_90 only (half the
//!   build time, for iterating on an H100 / H200), whatever `CUDA_COMPUTE_CAP` says.
//! - Flags: `--fatbin -gencode arch=compute_80,code=sm_80 -gencode
//!   arch=compute_90,code=[sm_90,compute_90] -O3 -std=c++17 -I kernels`, no `--use_fast_math`
//!   (the losses need accurate exp / log / acos). `.ci/cuda-kernels.sh` compiles each
//!   architecture with the same flags (`NVCC_FLAGS`): change both. nvcc itself honours
//!   `NVCC_PREPEND_FLAGS`, `NVCC_APPEND_FLAGS` and `NVCC_CCBIN`.
//! - Also writes `$OUT_DIR/<stem>.ptx`, the PTX of the lowest architecture (what the PTX build
//!   used to produce: sm_80 by default), kept from nvcc's intermediate files at no extra cost,
//!   for tools that load or inspect PTX (tools/gpu/pack.sh).
//! - The kernels compile in parallel (`NUM_JOBS` threads, set by cargo); left-over threads go to
//!   nvcc's `--threads`, which compiles a kernel's architectures in parallel.
//! - Sets, for the crate (`env!` them in error messages): `MARGIN_SOFTMAX_CUDA_TARGETS`, what
//!   each fatbin holds (e.g. "sm_80 sm_90 compute_90"), and `MARGIN_SOFTMAX_PTX_ARCH`, the target
//!   of `<stem>.ptx` (e.g. "sm_80").

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The lowest CUDA release the build is tested with (candle 0.11's cudarc needs CUDA 12 too).
const MIN_CUDA_MAJOR: u32 = 12;
/// SASS architectures built when `MARGIN_SOFTMAX_CUDA_ARCHS` is unset: bf16 needs sm_80, whose
/// SASS runs on every 8.x GPU; sm_90 (Hopper) has thread-block clusters. The PTX of the highest
/// covers later GPUs.
const DEFAULT_CUDA_ARCHS: &[&str] = &["80", "90"];
/// nvcc flags besides the architectures, input and output. Keep in sync with
/// `.ci/cuda-kernels.sh`.
const NVCC_FLAGS: &[&str] = &["-O3", "-std=c++17"];

fn main() -> ExitCode {
    println!("cargo::rerun-if-changed=build.rs");
    #[cfg(feature = "kernel-host-check")]
    build_host_check();
    #[cfg(feature = "kernel-emu")]
    if let Err(message) = build_kernel_emu() {
        eprintln!(
            "\nerror: building the emulated kernels (feature `kernel-emu`) failed\n\n{message}"
        );
        return ExitCode::FAILURE;
    }
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return ExitCode::SUCCESS;
    }
    match build_fatbins() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            // Cargo prints a failed build script's stderr in full.
            eprintln!("\nerror: building the CUDA kernels (feature `cuda`) failed\n\n{message}");
            ExitCode::FAILURE
        }
    }
}

/// Feature `kernel-host-check`: the kernels' math (kernels/heads.cuh, kernels/common.cuh) as host
/// C++ in a static library, for the unit tests of src/backends/kernel_check.rs. Needs a C++ compiler, not
/// a CUDA toolkit.
#[cfg(feature = "kernel-host-check")]
fn build_host_check() {
    println!("cargo::rerun-if-changed=kernels");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("kernels/host_check/host_check.cpp")
        .flag_if_supported("-Wno-unknown-pragmas")
        .warnings_into_errors(true)
        .compile("margin_softmax_host_check");
}

/// Feature `kernel-emu`: kernels/emu/capi.cpp and capi_fused.cpp (the real kernels/*.cu under the
/// SIMT emulator kernels/emu/cuda_emu.h) in a static library, for src/backends/emu/. Needs a C++17
/// compiler (g++ is what the emulator is tested with) and the CUDA host headers, found in
/// `$CUDA_EMU_INCLUDE`, `$CUDA_HOME/include`, `$CUDA_PATH/include`, the pinned wheels of
/// .ci/cuda-toolkit.sh or `/usr/local/cuda/include`.
///
/// `KERNEL_EMU_SANITIZE=address` instruments it with ASan + UBSan (`-fno-sanitize-recover=all`:
/// the first report aborts) and `=thread` with TSan; either also links the sanitizer's runtime
/// into the package's test and example binaries. Use a separate `CARGO_TARGET_DIR` per setting.
#[cfg(feature = "kernel-emu")]
fn build_kernel_emu() -> Result<(), String> {
    println!("cargo::rerun-if-changed=kernels");
    for var in [
        "KERNEL_EMU_SANITIZE",
        "CUDA_EMU_INCLUDE",
        "CUDA_HOME",
        "CUDA_PATH",
        "XDG_CACHE_HOME",
        "HOME",
        "RUSTC_WORKSPACE_WRAPPER",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    if is_lint_pass() {
        return Ok(());
    }
    let include = cuda_host_headers().ok_or(
        "the CUDA host headers (cuda_fp16.h, cuda_bf16.h) were not found: run \
         `source .ci/cuda-toolkit.sh` (installs them from PyPI, ~6 MB) or set CUDA_EMU_INCLUDE",
    )?;
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        // Two translation units, compiled on two cores (cc's `parallel`): the one-pass kernels
        // (fused.cu) are about three quarters of the C++.
        .files(["kernels/emu/capi.cpp", "kernels/emu/capi_fused.cpp"])
        .include("kernels")
        .include("kernels/emu")
        .include(&include)
        .define("CUDA_EMU_CUDA_ARCH", "900")
        // The kernels reinterpret uint4 loads as T[]; #pragma unroll is CUDA's.
        .flag("-fno-strict-aliasing")
        .flag_if_supported("-Wno-unknown-pragmas")
        // Line tables (file:line in emulator and sanitizer reports) without the full debug
        // information, which under ASan + UBSan took a third of the compile.
        .debug(false)
        .flag("-g1");
    // rustc links with -nodefaultlibs, so gcc does not add the sanitizer runtimes itself: they
    // are named here, and the test binaries must run with the runtime preloaded
    // (LD_PRELOAD=$(gcc -print-file-name=libasan.so), as .ci/kernel-emu.sh does) so that its
    // malloc and thread interceptors come first.
    let sanitize = env::var("KERNEL_EMU_SANITIZE").unwrap_or_default();
    let runtimes: &[&str] = match sanitize.as_str() {
        "" => &[],
        "address" => {
            build
                .opt_level(1)
                .flag("-fsanitize=address,undefined")
                .flag("-fno-sanitize-recover=all")
                .flag("-fno-omit-frame-pointer");
            &["-lasan", "-lubsan"]
        }
        "thread" => {
            build.opt_level(1).flag("-fsanitize=thread");
            &["-ltsan"]
        }
        other => {
            return Err(format!(
                "KERNEL_EMU_SANITIZE must be `address`, `thread` or empty, got `{other}`"
            ));
        }
    };
    for runtime in runtimes {
        println!("cargo::rustc-link-arg={runtime}");
    }
    build.compile("margin_softmax_kernel_emu");
    Ok(())
}

/// Whether cargo runs this build for `cargo clippy` (clippy-driver as the workspace wrapper): a
/// lint pass type-checks the crate and links nothing, so the emulated kernels' C++ (minutes of
/// g++) is skipped. The next build without the wrapper reruns this script (the variable is
/// registered with `rerun-if-env-changed`) and compiles them.
#[cfg(feature = "kernel-emu")]
fn is_lint_pass() -> bool {
    env::var_os("RUSTC_WORKSPACE_WRAPPER").is_some_and(|w| {
        Path::new(&w)
            .file_stem()
            .is_some_and(|s| s.to_string_lossy().starts_with("clippy-driver"))
    })
}

/// The folder holding cuda_fp16.h and cuda_bf16.h, for compiling the kernels as host C++.
#[cfg(feature = "kernel-emu")]
fn cuda_host_headers() -> Option<PathBuf> {
    let from_env = |var: &str, sub: &str| env::var_os(var).map(|v| PathBuf::from(v).join(sub));
    let candidates = [
        from_env("CUDA_EMU_INCLUDE", ""),
        from_env("CUDA_HOME", "include"),
        from_env("CUDA_PATH", "include"),
        from_env(
            "XDG_CACHE_HOME",
            "candle-margin-softmax/cuda-13.0/nvidia/cu13/include",
        ),
        from_env(
            "HOME",
            ".cache/candle-margin-softmax/cuda-13.0/nvidia/cu13/include",
        ),
        from_env("HOME", ".cache/cuda-13.0/nvidia/cu13/include"),
        Some(PathBuf::from("/usr/local/cuda/include")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|dir| dir.join("cuda_fp16.h").is_file() && dir.join("cuda_bf16.h").is_file())
}

fn build_fatbins() -> Result<(), String> {
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "MARGIN_SOFTMAX_CUDA_ARCHS",
        "CUDA_COMPUTE_CAP",
        "NVCC_PREPEND_FLAGS",
        "NVCC_APPEND_FLAGS",
        "NVCC_CCBIN",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }

    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR unset")?);
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR unset")?);
    let kernels_dir = manifest_dir.join("kernels");
    let sources = kernel_sources(&kernels_dir)?;

    let targets = Targets::from_env()?;
    // For src/: what the fatbins hold (e.g. "sm_80 sm_90 compute_90"), for error messages.
    println!(
        "cargo::rustc-env=MARGIN_SOFTMAX_CUDA_TARGETS={}",
        targets.describe()
    );
    // The target of the by-product <stem>.ptx (e.g. "sm_80").
    println!(
        "cargo::rustc-env=MARGIN_SOFTMAX_PTX_ARCH={}",
        targets.sass[0].sm()
    );
    if targets.ptx.is_none() {
        println!(
            "cargo::warning=MARGIN_SOFTMAX_CUDA_ARCHS holds only architecture-specific targets \
             ({}): the fatbins carry no PTX and run on those GPUs only",
            targets.describe()
        );
    }

    let nvcc = find_nvcc()?;
    check_nvcc_version(&nvcc)?;

    if sources.is_empty() {
        println!("cargo::warning=no kernels/*.cu found: no fatbin was built");
        return Ok(());
    }

    let num_jobs = env::var("NUM_JOBS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let jobs = num_jobs.min(sources.len());
    // Cores left over (more cores than kernels) compile a kernel's architectures in parallel.
    let nvcc_threads = (num_jobs / jobs).clamp(1, targets.sass.len());
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(source) = sources.get(i) else { break };
                    let job = Job {
                        nvcc: &nvcc,
                        targets: &targets,
                        nvcc_threads,
                        include: &kernels_dir,
                        out_dir: &out_dir,
                    };
                    if let Err(e) = job.compile(source) {
                        failures.lock().unwrap().push((i, e));
                    }
                }
            });
        }
    });
    let mut failures = failures.into_inner().unwrap();
    if failures.is_empty() {
        return Ok(());
    }
    failures.sort_by_key(|(i, _)| *i);
    Err(failures
        .into_iter()
        .map(|(_, e)| e)
        .collect::<Vec<_>>()
        .join("\n\n"))
}

/// Every `kernels/*.cu`, sorted; registers every file of `kernels/` (headers included) and the
/// directory itself (for added files) with cargo.
fn kernel_sources(kernels_dir: &Path) -> Result<Vec<PathBuf>, String> {
    println!("cargo::rerun-if-changed={}", kernels_dir.display());
    let entries = std::fs::read_dir(kernels_dir)
        .map_err(|e| format!("cannot read {}: {e}", kernels_dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| format!("cannot read {}: {e}", kernels_dir.display()))?
            .path();
        if path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    for file in &files {
        println!("cargo::rerun-if-changed={}", file.display());
    }
    Ok(files
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect())
}

/// A GPU architecture: compute capability ×10 and nvcc's suffix ("" / "a" / "f").
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Arch {
    cap: u32,
    suffix: &'static str,
}

impl Arch {
    /// The real architecture, SASS: "sm_90".
    fn sm(&self) -> String {
        format!("sm_{}{}", self.cap, self.suffix)
    }

    /// The virtual architecture, PTX: "compute_90".
    fn compute(&self) -> String {
        format!("compute_{}{}", self.cap, self.suffix)
    }
}

/// What each fatbin holds: SASS for every architecture of `sass` (sorted, at least one) and the
/// PTX of `ptx`, the highest of them that is not architecture-specific.
struct Targets {
    sass: Vec<Arch>,
    ptx: Option<Arch>,
}

impl Targets {
    /// From `MARGIN_SOFTMAX_CUDA_ARCHS`, else [`DEFAULT_CUDA_ARCHS`] plus `CUDA_COMPUTE_CAP`.
    fn from_env() -> Result<Self, String> {
        let set = |var: &str| env::var(var).ok().filter(|s| !s.trim().is_empty());
        let mut sass = match set("MARGIN_SOFTMAX_CUDA_ARCHS") {
            Some(list) => list
                .split([' ', ',', ';'])
                .filter(|s| !s.is_empty())
                .map(|s| parse_compute_cap("MARGIN_SOFTMAX_CUDA_ARCHS", s))
                .collect::<Result<Vec<_>, _>>()?,
            None => {
                let mut archs = DEFAULT_CUDA_ARCHS
                    .iter()
                    .map(|s| parse_compute_cap("DEFAULT_CUDA_ARCHS", s))
                    .collect::<Result<Vec<_>, _>>()?;
                if let Some(cap) = set("CUDA_COMPUTE_CAP") {
                    archs.push(parse_compute_cap("CUDA_COMPUTE_CAP", &cap)?);
                }
                archs
            }
        };
        sass.sort();
        sass.dedup();
        if sass.is_empty() {
            return Err(
                "MARGIN_SOFTMAX_CUDA_ARCHS names no architecture: unset it for the \
                        default (80 90) or list some, e.g. \"80 90\""
                    .into(),
            );
        }
        let ptx = sass.iter().filter(|a| a.suffix.is_empty()).max().cloned();
        Ok(Self { sass, ptx })
    }

    /// nvcc's `-gencode` arguments.
    fn gencode(&self) -> Vec<String> {
        let mut args = Vec::new();
        for arch in &self.sass {
            let code = if self.ptx.as_ref() == Some(arch) {
                format!("[{},{}]", arch.sm(), arch.compute())
            } else {
                arch.sm()
            };
            args.push("-gencode".to_string());
            args.push(format!("arch={},code={code}", arch.compute()));
        }
        args
    }

    /// "sm_80 sm_90 compute_90".
    fn describe(&self) -> String {
        let mut names: Vec<String> = self.sass.iter().map(Arch::sm).collect();
        names.extend(self.ptx.iter().map(Arch::compute));
        names.join(" ")
    }
}

/// "80", "8.0", "sm_80", "compute_80", "90a", "sm_90a" → sm_80 / sm_90a. `var` names the
/// setting in the error message.
fn parse_compute_cap(var: &str, raw: &str) -> Result<Arch, String> {
    let bad = || {
        format!(
            "{var}={raw:?} is not a compute capability: use e.g. 80 (A100, also runs on Ada), 86, \
             89 or 90 (H100, H200); \"8.0\" and \"sm_80\" are accepted too"
        )
    };
    let s = raw.trim().to_ascii_lowercase();
    let s = s
        .strip_prefix("sm_")
        .or_else(|| s.strip_prefix("compute_"))
        .unwrap_or(&s);
    let (digits, suffix) = if let Some(d) = s.strip_suffix('a') {
        (d, "a")
    } else if let Some(d) = s.strip_suffix('f') {
        (d, "f")
    } else {
        (s, "")
    };
    let number = |t: &str| -> Option<u32> {
        (!t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
            .then(|| t.parse().ok())
            .flatten()
    };
    let cap = match digits.split_once('.') {
        Some((major, minor)) => {
            let (major, minor) = (
                number(major).ok_or_else(bad)?,
                number(minor).ok_or_else(bad)?,
            );
            if minor > 9 {
                return Err(bad());
            }
            major * 10 + minor
        }
        None => {
            let n = number(digits).ok_or_else(bad)?;
            // "8" means 8.0.
            if n < 10 { n * 10 } else { n }
        }
    };
    if cap < 30 {
        return Err(bad());
    }
    Ok(Arch { cap, suffix })
}

fn find_nvcc() -> Result<PathBuf, String> {
    if let Some(nvcc) = env::var_os("NVCC").filter(|v| !v.is_empty()) {
        let path = PathBuf::from(&nvcc);
        if path.components().count() > 1 {
            return if path.is_file() {
                Ok(path)
            } else {
                Err(format!(
                    "NVCC={} does not exist.\n\n{}",
                    path.display(),
                    install_hint()
                ))
            };
        }
        // A bare name: look it up on PATH.
        return search_path(&nvcc).ok_or_else(|| {
            format!(
                "NVCC={} is not on PATH.\n\n{}",
                path.display(),
                install_hint()
            )
        });
    }
    if let Some(path) = search_path(&OsString::from("nvcc")) {
        return Ok(path);
    }
    let mut candidates: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(|v| env::var_os(v).filter(|v| !v.is_empty()))
        .map(|home| PathBuf::from(home).join("bin").join("nvcc"))
        .collect();
    candidates.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| format!("nvcc was not found.\n\n{}", install_hint()))
}

fn search_path(name: &OsString) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn install_hint() -> String {
    format!(
        "The `cuda` feature compiles kernels/*.cu with nvcc from the CUDA toolkit (>= \
         {MIN_CUDA_MAJOR}.0). Either\n\
         - install the CUDA toolkit (https://developer.nvidia.com/cuda-downloads) and put its \
           bin/ on PATH, or set NVCC=/path/to/nvcc or CUDA_HOME=/path/to/cuda; or\n\
         - install nvcc from PyPI without root, e.g. for CUDA 13.0:\n      \
           python3 -m pip install --target ~/.cache/cuda-13.0 nvidia-cuda-nvcc==13.0.88 \
           nvidia-cuda-cccl==13.0.85 'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-crt==13.0.*' \
           'nvidia-nvvm==13.0.*'\n      \
           export CUDA_HOME=~/.cache/cuda-13.0/nvidia/cu13 NVCC=~/.cache/cuda-13.0/nvidia/cu13/bin/nvcc \
           PATH=~/.cache/cuda-13.0/nvidia/cu13/bin:$PATH\n    \
           (.ci/cuda-kernels.sh does this); pick a CUDA release no newer than your driver \
           supports (`nvidia-smi` shows it).\n\
         Also set CUDA_COMPUTE_CAP (e.g. 80 or 90) on a machine without a GPU: candle's own \
         kernels need it."
    )
}

fn check_nvcc_version(nvcc: &Path) -> Result<(), String> {
    let output = Command::new(nvcc).arg("--version").output().map_err(|e| {
        format!(
            "cannot run {} --version: {e}\n\n{}",
            nvcc.display(),
            install_hint()
        )
    })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "{} --version failed ({}):\n{stdout}{}",
            nvcc.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    // "Cuda compilation tools, release 13.0, V13.0.88"
    let release = stdout
        .split("release ")
        .nth(1)
        .and_then(|rest| rest.split([',', '.']).next())
        .and_then(|major| major.trim().parse::<u32>().ok());
    match release {
        Some(major) if major < MIN_CUDA_MAJOR => Err(format!(
            "{} is CUDA {major}: CUDA >= {MIN_CUDA_MAJOR}.0 is needed.\n\n{}",
            nvcc.display(),
            install_hint()
        )),
        Some(_) => Ok(()),
        None => {
            println!(
                "cargo::warning=could not read the CUDA release from `{} --version`",
                nvcc.display()
            );
            Ok(())
        }
    }
}

/// One nvcc run: a kernel source → `<stem>.fatbin` (and the by-product `<stem>.ptx`).
struct Job<'a> {
    nvcc: &'a Path,
    targets: &'a Targets,
    nvcc_threads: usize,
    include: &'a Path,
    out_dir: &'a Path,
}

impl Job<'_> {
    fn compile(&self, source: &Path) -> Result<(), String> {
        let stem = source
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or("kernel without a UTF-8 name")?;
        // nvcc's intermediate files, for the PTX of the lowest architecture.
        let keep = self.out_dir.join("nvcc-keep").join(stem);
        let _ = std::fs::remove_dir_all(&keep);
        std::fs::create_dir_all(&keep)
            .map_err(|e| format!("cannot create {}: {e}", keep.display()))?;
        let mut cmd = Command::new(self.nvcc);
        cmd.arg("--fatbin")
            .args(self.targets.gencode())
            .args(NVCC_FLAGS);
        if self.nvcc_threads > 1 {
            cmd.arg("--threads").arg(self.nvcc_threads.to_string());
        }
        cmd.arg("-I")
            .arg(self.include)
            .arg("--keep")
            .arg("--keep-dir")
            .arg(&keep)
            .arg("-o")
            .arg(self.out_dir.join(format!("{stem}.fatbin")))
            .arg(source);
        self.run(cmd, source)?;

        let lowest = &self.targets.sass[0];
        let ptx = self.out_dir.join(format!("{stem}.ptx"));
        // nvcc names it <stem>.compute_80.ptx when it builds several architectures, <stem>.ptx
        // for one.
        let kept = [
            format!("{stem}.{}.ptx", lowest.compute()),
            format!("{stem}.ptx"),
        ];
        if !kept
            .iter()
            .any(|name| std::fs::rename(keep.join(name), &ptx).is_ok())
        {
            // Another nvcc release may name its intermediates differently: compile the PTX.
            let mut cmd = Command::new(self.nvcc);
            cmd.arg("--ptx")
                .arg(format!("-arch={}", lowest.sm()))
                .args(NVCC_FLAGS)
                .arg("-I")
                .arg(self.include)
                .arg("-o")
                .arg(&ptx)
                .arg(source);
            self.run(cmd, source)?;
        }
        let _ = std::fs::remove_dir_all(&keep);
        // Fails while another kernel's nvcc still keeps files there; the last one removes it.
        let _ = std::fs::remove_dir(self.out_dir.join("nvcc-keep"));
        Ok(())
    }

    /// Runs nvcc; its warnings become cargo warnings (each once: nvcc repeats a warning for
    /// every architecture), a failure the error with nvcc's output in full.
    fn run(&self, mut cmd: Command, source: &Path) -> Result<(), String> {
        let output = cmd.output().map_err(|e| {
            format!(
                "cannot run {}: {e}\n\n{}",
                self.nvcc.display(),
                install_hint()
            )
        })?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            return Err(format!(
                "nvcc failed on {} ({}):\n  {cmd:?}\n{stdout}{stderr}",
                source.display(),
                output.status
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for line in stdout
            .lines()
            .chain(stderr.lines())
            .filter(|l| !l.trim().is_empty())
        {
            if seen.insert(line) {
                println!("cargo::warning={line}");
            }
        }
        Ok(())
    }
}
