# Source this file (bash): it provides a CUDA compiler for the `cuda` feature and the kernel
# checks, and exports NVCC, CUDA_HOME, PATH and CUDA_COMPUTE_CAP.
#
# - If NVCC is already set (your own CUDA toolkit), that toolkit is used as is.
# - Otherwise it installs (once) nvcc, ptxas, nvdisasm and the headers from NVIDIA's PyPI
#   wheels, pinned, into a cache outside the clone: $CUDA_TOOLKIT_DIR, default
#   ${XDG_CACHE_HOME:-$HOME/.cache}/candle-margin-softmax/cuda-13.0 (~270 MB; needs python3
#   with pip and network access the first time, no root).
#
# Why CUDA 13.0 and not the newest: PTX carries an ISA version, and a driver refuses PTX newer
# than it knows ("the provided PTX was compiled with an unsupported toolchain"). The GPU machines
# this crate is tested on run a CUDA 13.0 driver, so the PTX is built by nvcc 13.0 (PTX ISA 9.0).
# CUDA 13 no longer targets sm_70 / sm_72 (Volta); the crate's default is sm_80 anyway.

_ms_cuda_pins=(
    "nvidia-cuda-nvcc==13.0.88"   # nvcc, ptxas, fatbinary, cudafe++
    "nvidia-cuda-cccl==13.0.85"   # cuda/std, cub, thrust headers
    "nvidia-cuda-runtime==13.0.*" # cuda_runtime.h, cuda_fp16.h, cuda_bf16.h, libcudart
    "nvidia-cuda-crt==13.0.*"     # crt/host_config.h and the other crt/ headers
    "nvidia-nvvm==13.0.*"         # cicc and libdevice (the device-code front end)
    # nvdisasm (SASS of a cubin) for .ci/sass-budget.sh. PyPI has no 13.0 build of it (its
    # wheels start at 13.2); it only disassembles, so a newer one reads the sm_80 / sm_90 cubins
    # of ptxas 13.0 and changes nothing that is built.
    "nvidia-cuda-nvdisasm==13.2.86"
)

_ms_cuda_setup() {
    if [ -n "${NVCC:-}" ]; then
        if [ ! -x "$NVCC" ] && ! command -v "$NVCC" >/dev/null 2>&1; then
            echo "cuda-toolkit.sh: NVCC=$NVCC is not an executable" >&2
            return 1
        fi
        local nvcc_path
        nvcc_path="$(command -v "$NVCC")"
        export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$nvcc_path")")}"
        export PATH="$(dirname "$nvcc_path"):$PATH"
        echo "cuda-toolkit.sh: using NVCC=$NVCC (set by the caller)" >&2
    else
        local dir="${CUDA_TOOLKIT_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/candle-margin-softmax/cuda-13.0}"
        local stamp="$dir/.pins"
        local want
        want="$(printf '%s\n' "${_ms_cuda_pins[@]}")"
        if [ ! -x "$dir/nvidia/cu13/bin/nvcc" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
            if ! command -v python3 >/dev/null 2>&1 || ! python3 -m pip --version >/dev/null 2>&1; then
                echo "cuda-toolkit.sh: python3 with pip is needed to install nvcc from PyPI" \
                    "(or set NVCC=/path/to/nvcc of a CUDA toolkit >= 12)" >&2
                return 1
            fi
            echo "cuda-toolkit.sh: installing ${_ms_cuda_pins[*]} into $dir" >&2
            local start=$SECONDS
            mkdir -p "$(dirname "$dir")"
            # Install next to the cache and move it in place, so that an interrupted install
            # never leaves a half-filled toolkit behind.
            local tmp
            tmp="$(mktemp -d "$dir.tmp.XXXXXX")" || return 1
            if ! PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-input \
                --target "$tmp" "${_ms_cuda_pins[@]}" >&2; then
                rm -rf "$tmp"
                echo "cuda-toolkit.sh: pip install failed" >&2
                return 1
            fi
            printf '%s\n' "$want" >"$tmp/.pins"
            # Swap by two renames: a build using an older install keeps working meanwhile.
            local old="$dir.old.$$"
            if [ -e "$dir" ]; then mv "$dir" "$old"; fi
            mv "$tmp" "$dir"
            rm -rf "$old"
            echo "cuda-toolkit.sh: installed in $((SECONDS - start)) s" >&2
        fi
        export CUDA_HOME="$dir/nvidia/cu13"
        export NVCC="$CUDA_HOME/bin/nvcc"
        export PATH="$CUDA_HOME/bin:$PATH"
    fi
    export CUDA_PATH="$CUDA_HOME" CUDA_ROOT="$CUDA_HOME"
    # candle's own kernels (cudaforge) query nvidia-smi unless this is set; 80 is the crate's
    # default target (also runs on Ada and Hopper).
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
    command -v ptxas >/dev/null 2>&1 || {
        echo "cuda-toolkit.sh: ptxas is not next to $NVCC" >&2
        return 1
    }
}

_ms_cuda_setup
