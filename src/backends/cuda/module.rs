//! Loads the kernel modules as fat binaries (feature `cuda`): `build.rs` compiles each
//! `kernels/<stem>.cu` into `$OUT_DIR/<stem>.fatbin` (SASS for sm_80 and sm_90, PTX for
//! compute_90 by default: `MARGIN_SOFTMAX_CUDA_ARCHS`), embedded here with `include_bytes!`.
//!
//! Why not candle's `CudaDevice::get_or_load_custom_func`: it only takes PTX text, which the
//! driver JIT-compiles on first use (seconds per module, on every process start unless the JIT
//! cache is warm), and PTX for sm_80 cannot use sm_90-only features (thread-block clusters,
//! distributed shared memory). A fatbin carries SASS, so the driver loads the machine code built
//! for the GPU as is, and the kernels' `#if __CUDA_ARCH__ >= 900` parts run on Hopper; the
//! compute_90 PTX in it is only JIT-compiled on GPUs newer than every SASS target.
//!
//! Every raw cudarc call on modules, functions and device attributes of the crate is here, so
//! that the launch code only sees [`kernel`], [`Kernel`] and [`device_limits`]. Modules, functions
//! and device limits are cached in process-wide maps: each module is loaded once per CUDA context
//! and each function looked up once, whichever `CudaDevice` handle asks.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError};

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::sys::{
    CUdevice_attribute, CUfunction_attribute, CUresult,
};
use candle_core::cuda_backend::cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, LaunchArgs,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::{CudaDevice, Error, Result, bail};

use crate::config::OP_NAME;

/// What the fatbins hold, e.g. "sm_80 sm_90 compute_90" (set by `build.rs`).
const FATBIN_TARGETS: &str = env!("MARGIN_SOFTMAX_CUDA_TARGETS");

/// A kernel module: one `kernels/<stem>.cu`, compiled by `build.rs` into a fatbin.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Module {
    /// The source's stem ("fused"): the cache key, and the name in error messages.
    pub name: &'static str,
    /// The fatbin image (`$OUT_DIR/<stem>.fatbin`).
    pub image: &'static [u8],
}

/// Declares a [`Module`] constant per kernel source and [`MODULES`], the list of them.
macro_rules! modules {
    ($($constant:ident = $stem:literal,)*) => {
        $(
            #[doc = concat!("`kernels/", $stem, ".cu`.")]
            pub(crate) const $constant: Module = Module {
                name: $stem,
                image: include_bytes!(concat!(env!("OUT_DIR"), "/", $stem, ".fatbin")),
            };
        )*
        /// Every kernel module.
        #[cfg(test)]
        pub(crate) const MODULES: &[Module] = &[$($constant),*];
    };
}

// One line per kernels/*.cu (build.rs compiles every one of them).
modules! {
    FORWARD = "forward",
    BACKWARD = "backward",
    FUSED = "fused",
    TARGETS = "targets",
}

/// A loaded kernel function and the stream of the device that asked for it: launches go on
/// candle's stream for that device, ordered with candle's own ops. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Kernel {
    function: Arc<Function>,
    stream: Arc<CudaStream>,
}

/// A function of a loaded module, shared by every [`Kernel`] for it in that context.
struct Function {
    func: CudaFunction,
    /// `{module}::{name}`, for error messages.
    label: String,
    /// The function's CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as last set (read from the
    /// driver at load); the lock also orders concurrent [`Kernel::allow_dynamic_shared`] calls.
    max_dynamic_shared: Mutex<usize>,
}

impl Kernel {
    /// A launch builder for the function on the device's stream; push the arguments, then
    /// `launch` (unsafe: the arguments must match the kernel's signature).
    pub(crate) fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.function.func)
    }

    /// The function's static shared memory (CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES).
    pub(crate) fn static_shared_bytes(&self) -> Result<usize> {
        self.attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
            "static shared memory size",
        )
    }

    /// Opts the function into `bytes` of dynamic shared memory
    /// (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES), only when above what it is already set
    /// to: the value is cached per function, so the driver call happens once per new maximum.
    /// Needed before a launch with more than 48 KiB of dynamic shared memory; `bytes` plus
    /// [`Self::static_shared_bytes`] must not exceed
    /// [`DeviceLimits::max_dynamic_shared_optin`], or the driver refuses it.
    pub(crate) fn allow_dynamic_shared(&self, bytes: usize) -> Result<()> {
        let mut current = lock(&self.function.max_dynamic_shared);
        if bytes <= *current {
            return Ok(());
        }
        let label = &self.function.label;
        let Ok(value) = i32::try_from(bytes) else {
            bail!("{OP_NAME}: {label}: {bytes} bytes of dynamic shared memory is out of range")
        };
        self.stream
            .context()
            .bind_to_thread()
            .and_then(|()| {
                self.function.func.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    value,
                )
            })
            .w()
            .map_err(|e| {
                e.context(format!(
                    "{OP_NAME}: {label}: cannot allow {bytes} bytes of dynamic shared memory"
                ))
            })?;
        *current = bytes;
        Ok(())
    }

    fn attribute(&self, attribute: CUfunction_attribute, what: &str) -> Result<usize> {
        let label = &self.function.label;
        let value = self
            .function
            .func
            .get_attribute(attribute)
            .w()
            .map_err(|e| e.context(format!("{OP_NAME}: {label}: cannot read its {what}")))?;
        usize::try_from(value)
            .map_err(|_| Error::msg(format!("{OP_NAME}: {label}: {what} is {value}")))
    }
}

/// A module loaded in one context, and the functions looked up in it so far.
struct LoadedModule {
    module: Arc<CudaModule>,
    functions: Mutex<HashMap<String, Arc<Function>>>,
}

/// Loaded modules by (CUcontext handle, module name). A [`CudaModule`] holds its
/// `Arc<CudaContext>`, so a context stays alive (retained) while its modules are cached here,
/// and a handle can never be reused by another context; candle's devices use the primary context
/// of their GPU (one per GPU, retained by candle anyway), so this keeps one set of modules per
/// GPU for the life of the process.
type ModuleCache = HashMap<(usize, &'static str), Arc<LoadedModule>>;
static LOADED: LazyLock<Mutex<ModuleCache>> = LazyLock::new(Default::default);

/// The function `name` of `module`, loaded (once per CUDA context) for `dev`, launching on
/// `dev`'s stream.
pub(crate) fn kernel(dev: &CudaDevice, module: &Module, name: &str) -> Result<Kernel> {
    let stream = dev.cuda_stream();
    let loaded = load_module(stream.context(), module)?;
    let function = {
        let mut functions = lock(&loaded.functions);
        match functions.get(name) {
            Some(function) => function.clone(),
            None => {
                let function = Arc::new(load_function(
                    stream.context(),
                    &loaded.module,
                    module,
                    name,
                )?);
                functions.insert(name.to_string(), function.clone());
                function
            }
        }
    };
    Ok(Kernel { function, stream })
}

fn load_module(ctx: &Arc<CudaContext>, module: &Module) -> Result<Arc<LoadedModule>> {
    let key = (ctx.cu_ctx() as usize, module.name);
    // Held while loading: a module is loaded once even when several threads ask at once.
    let mut loaded = lock(&LOADED);
    if let Some(found) = loaded.get(&key) {
        return Ok(found.clone());
    }
    // The fatbin header's fields are 8-byte words, and nvcc aligns the fatbins it embeds in
    // executables to 8 at least: give the driver an image aligned the same way. A Vec<u8> from
    // the system allocator (malloc) is 16-byte aligned at these sizes, but a global allocator
    // only promises 1 for u8, so check rather than hand the driver a misaligned image.
    let image = module.image.to_vec();
    if image.as_ptr().align_offset(8) != 0 {
        bail!(
            "{OP_NAME}: kernels/{}.cu: the copy of its fatbin is not 8-byte aligned (the global \
             allocator returned {:p})",
            module.name,
            image.as_ptr()
        );
    }
    let cuda_module = match ctx.load_module(Ptx::from_binary(image)) {
        Ok(cuda_module) => cuda_module,
        Err(e) => {
            let hint = match e.0 {
                CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU => {
                    ": no SASS for this GPU and no PTX it can JIT; rebuild with its architecture \
                     in MARGIN_SOFTMAX_CUDA_ARCHS (see build.rs)"
                }
                CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION => {
                    ": the driver is older than the nvcc that built the PTX; build with a CUDA \
                     toolkit no newer than the driver, or with this GPU's architecture in \
                     MARGIN_SOFTMAX_CUDA_ARCHS"
                }
                _ => "",
            };
            let context = format!(
                "{OP_NAME}: cannot load kernels/{}.cu (a fatbin of {FATBIN_TARGETS}) on GPU \
                 {}{}{hint}",
                module.name,
                ctx.ordinal(),
                describe_gpu(ctx),
            );
            return Err(e).w().map_err(|err| err.context(context));
        }
    };
    let entry = Arc::new(LoadedModule {
        module: cuda_module,
        functions: Mutex::new(HashMap::new()),
    });
    loaded.insert(key, entry.clone());
    Ok(entry)
}

/// The function `name` of `cuda_module`, loaded in `ctx`.
fn load_function(
    ctx: &Arc<CudaContext>,
    cuda_module: &Arc<CudaModule>,
    module: &Module,
    name: &str,
) -> Result<Function> {
    let label = format!("kernels/{}.cu::{name}", module.name);
    let func = match ctx
        .bind_to_thread()
        .and_then(|()| cuda_module.load_function(name))
    {
        Ok(func) => func,
        Err(e) => {
            let hint = if e.0 == CUresult::CUDA_ERROR_NOT_FOUND {
                " (misspelt, or not compiled for this GPU's architecture: the bf16 kernels need \
                 sm_80)"
            } else {
                ""
            };
            let context = format!(
                "{OP_NAME}: no kernel {label} in the fatbin ({FATBIN_TARGETS}) loaded on GPU \
                 {}{}{hint}",
                ctx.ordinal(),
                describe_gpu(ctx),
            );
            return Err(e).w().map_err(|err| err.context(context));
        }
    };
    let max_dynamic_shared = func
        .get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)
        .w()
        .map_err(|e| e.context(format!("{OP_NAME}: {label}: cannot read its attributes")))?;
    Ok(Function {
        func,
        max_dynamic_shared: Mutex::new(usize::try_from(max_dynamic_shared).unwrap_or(0)),
        label,
    })
}

/// ", sm_90 (NVIDIA H200)" or "" when the driver cannot say.
fn describe_gpu(ctx: &CudaContext) -> String {
    let cc = ctx
        .compute_capability()
        .map(|(major, minor)| format!(", sm_{major}{minor}"))
        .unwrap_or_default();
    let name = ctx.name().map(|n| format!(" ({n})")).unwrap_or_default();
    format!("{cc}{name}")
}

/// What the launch planner needs to know about a GPU. Raw driver values: subtracting the
/// per-block reserve and the kernels' static shared memory is the planner's business.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DeviceLimits {
    /// CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT.
    pub sm_count: usize,
    /// CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: the most shared memory (static +
    /// dynamic) a block may use after [`Kernel::allow_dynamic_shared`].
    pub max_dynamic_shared_optin: usize,
    /// CU_DEVICE_ATTRIBUTE_CLUSTER_LAUNCH: thread-block clusters can be launched (sm_90+).
    pub cluster_launch: bool,
    /// CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH: cooperative grids (grid-wide barriers).
    pub cooperative_launch: bool,
    /// CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE, in bytes.
    pub l2_bytes: usize,
}

/// Device limits by CUdevice ordinal: they are properties of the GPU, not of a context.
static LIMITS: Mutex<Vec<(i32, DeviceLimits)>> = Mutex::new(Vec::new());

/// The limits of `dev`'s GPU, read from the driver once per GPU.
pub(crate) fn device_limits(dev: &CudaDevice) -> Result<DeviceLimits> {
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    let device = ctx.cu_device();
    if let Some((_, limits)) = lock(&LIMITS).iter().find(|(d, _)| *d == device) {
        return Ok(*limits);
    }
    let read = |attribute: CUdevice_attribute, what: &str| -> Result<usize> {
        let value = ctx.attribute(attribute).w().map_err(|e| {
            e.context(format!(
                "{OP_NAME}: cannot read the {what} of GPU {}",
                ctx.ordinal()
            ))
        })?;
        usize::try_from(value).map_err(|_| {
            Error::msg(format!(
                "{OP_NAME}: GPU {}: its {what} is {value}",
                ctx.ordinal()
            ))
        })
    };
    let limits = DeviceLimits {
        sm_count: read(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            "multiprocessor count",
        )?,
        max_dynamic_shared_optin: read(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            "opt-in shared memory per block",
        )?,
        cluster_launch: read(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CLUSTER_LAUNCH,
            "cluster launch support",
        )? != 0,
        cooperative_launch: read(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH,
            "cooperative launch support",
        )? != 0,
        l2_bytes: read(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE,
            "L2 cache size",
        )?,
    };
    let mut cache = lock(&LIMITS);
    if !cache.iter().any(|(d, _)| *d == device) {
        cache.push((device, limits));
    }
    Ok(limits)
}

/// Locks a cache. A panic while one was held cannot leave it inconsistent (entries are inserted
/// whole), so a poisoned lock is used as is.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every embedded image is a fatbin (fatBinaryHeader magic 0xBA55ED50, little-endian), not
    /// PTX text or a bare cubin.
    #[test]
    fn images_are_fatbins() {
        for module in MODULES {
            assert!(
                module.image.starts_with(&0xBA55_ED50u32.to_le_bytes()),
                "kernels/{}.cu: not a fatbin: {:02x?}",
                module.name,
                &module.image[..module.image.len().min(8)]
            );
        }
        assert!(
            FATBIN_TARGETS.contains("sm_"),
            "MARGIN_SOFTMAX_CUDA_TARGETS={FATBIN_TARGETS}"
        );
    }
}
