//! Compiles `kernels/*.cu` to PTX with nvcc under the `cuda` feature; `src/cuda.rs` embeds the
//! result with `include_str!(concat!(env!("OUT_DIR"), "/<stem>.ptx"))`. Without the feature it
//! does nothing, so a plain build needs no CUDA toolkit.
//!
//! - nvcc: `$NVCC`, else `nvcc` on `PATH`, else `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`,
//!   `/usr/local/cuda/bin/nvcc` (candle's own build looks in the same order). CUDA ≥ 12.
//! - Target: `CUDA_COMPUTE_CAP` ("80", "8.0", "sm_80", "90a", …), default 80: PTX for sm_80 is
//!   JIT-compiled by the driver for any later GPU (Ada sm_89, Hopper sm_90, …).
//! - Flags: `--ptx -arch=sm_<cap> -O3 -std=c++17 -I kernels`, no `--use_fast_math` (the losses
//!   need accurate exp / log / acos). `.ci/cuda-kernels.sh` uses the same flags: change both.
//!   nvcc itself honours `NVCC_PREPEND_FLAGS`, `NVCC_APPEND_FLAGS` and `NVCC_CCBIN`.
//! - The kernels compile in parallel (`NUM_JOBS` threads, set by cargo).
//! - Sets `MARGIN_SOFTMAX_PTX_ARCH` (e.g. "sm_80") for the crate: `env!` it in error messages.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The lowest CUDA release the build is tested with (candle 0.11's cudarc needs CUDA 12 too).
const MIN_CUDA_MAJOR: u32 = 12;
/// Compute capability used when `CUDA_COMPUTE_CAP` is unset: bf16 needs sm_80, and sm_80 PTX
/// also runs on every later GPU.
const DEFAULT_COMPUTE_CAP: &str = "80";
/// nvcc flags besides the architecture, input and output. Keep in sync with
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
    match build_ptx() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            // Cargo prints a failed build script's stderr in full.
            eprintln!("\nerror: building the CUDA kernels (feature `cuda`) failed\n\n{message}");
            ExitCode::FAILURE
        }
    }
}

/// Feature `kernel-host-check`: the kernels' math (kernels/heads.cuh, kernels/common.cuh) as host
/// C++ in a static library, for the unit tests of src/kernel_check.rs. Needs a C++ compiler, not
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

/// Feature `kernel-emu`: kernels/emu/capi.cpp (the real kernels/*.cu under the SIMT emulator
/// kernels/emu/cuda_emu.h) in a static library, for src/emu.rs. Needs a C++17 compiler (g++ is
/// what the emulator is tested with) and the CUDA host headers, found in `$CUDA_EMU_INCLUDE`,
/// `$CUDA_HOME/include`, `$CUDA_PATH/include`, the pinned wheels of .ci/cuda-toolkit.sh or
/// `/usr/local/cuda/include`.
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
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let include = cuda_host_headers().ok_or(
        "the CUDA host headers (cuda_fp16.h, cuda_bf16.h) were not found: run \
         `source .ci/cuda-toolkit.sh` (installs them from PyPI, ~6 MB) or set CUDA_EMU_INCLUDE",
    )?;
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .file("kernels/emu/capi.cpp")
        .include("kernels")
        .include("kernels/emu")
        .include(&include)
        .define("CUDA_EMU_CUDA_ARCH", "800")
        // The kernels reinterpret uint4 loads as T[]; #pragma unroll is CUDA's.
        .flag("-fno-strict-aliasing")
        .flag_if_supported("-Wno-unknown-pragmas")
        .debug(true);
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

fn build_ptx() -> Result<(), String> {
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
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

    let cap_var = env::var("CUDA_COMPUTE_CAP")
        .ok()
        .filter(|s| !s.trim().is_empty());
    let arch = parse_compute_cap(cap_var.as_deref().unwrap_or(DEFAULT_COMPUTE_CAP))?;
    // For src/cuda.rs: the architecture the PTX targets (e.g. "sm_80"), for error messages.
    println!("cargo::rustc-env=MARGIN_SOFTMAX_PTX_ARCH={arch}");

    let nvcc = find_nvcc()?;
    check_nvcc_version(&nvcc)?;

    if sources.is_empty() {
        println!("cargo::warning=no kernels/*.cu found: no PTX was built");
        return Ok(());
    }

    let jobs = env::var("NUM_JOBS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(1)
        .clamp(1, sources.len());
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(source) = sources.get(i) else { break };
                    if let Err(e) = compile(&nvcc, &arch, &kernels_dir, source, &out_dir) {
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

/// "80", "8.0", "sm_80", "compute_80", "90a", "sm_90a" → "sm_80" / "sm_90a".
fn parse_compute_cap(raw: &str) -> Result<String, String> {
    let bad = || {
        format!(
            "CUDA_COMPUTE_CAP={raw:?} is not a compute capability: use e.g. 80 (A100, also runs on \
             Ada and Hopper), 86, 89 or 90 (H100); \"8.0\" and \"sm_80\" are accepted too"
        )
    };
    let s = raw.trim().to_ascii_lowercase();
    let s = s
        .strip_prefix("sm_")
        .or_else(|| s.strip_prefix("compute_"))
        .unwrap_or(&s);
    let (digits, suffix) = match s.strip_suffix('a').or_else(|| s.strip_suffix('f')) {
        Some(d) => (d, &s[d.len()..]),
        None => (s, ""),
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
    Ok(format!("sm_{cap}{suffix}"))
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

fn compile(
    nvcc: &Path,
    arch: &str,
    include: &Path,
    source: &Path,
    out_dir: &Path,
) -> Result<(), String> {
    let stem = source.file_stem().ok_or("kernel without a name")?;
    let ptx = out_dir.join(stem).with_extension("ptx");
    let mut cmd = Command::new(nvcc);
    cmd.arg("--ptx")
        .arg(format!("-arch={arch}"))
        .args(NVCC_FLAGS)
        .arg("-I")
        .arg(include)
        .arg("-o")
        .arg(&ptx)
        .arg(source);
    let output = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}\n\n{}", nvcc.display(), install_hint()))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "nvcc failed on {} ({}):\n  {cmd:?}\n{stdout}{stderr}",
            source.display(),
            output.status
        ));
    }
    for line in stdout
        .lines()
        .chain(stderr.lines())
        .filter(|l| !l.trim().is_empty())
    {
        println!("cargo::warning={line}");
    }
    Ok(())
}
