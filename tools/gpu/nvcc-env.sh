# shellcheck shell=bash
# Source this file: it installs (once) a pinned CUDA 13.0 nvcc from PyPI wheels into
# ~/.cache/cuda-13.0 and exports CUDA_HOME, CUDA_PATH, CUDA_ROOT, NVCC, PATH, CUDA_COMPUTE_CAP
# (default 90, the H200) and CUDAFORGE_THREADS for a build with `--features cuda`.
# 13.0 matches the driver on the lent GPU machines: a newer nvcc writes PTX that driver refuses.
CUDA_PIN_DIR=${CUDA_PIN_DIR:-$HOME/.cache/cuda-13.0}
if [ ! -x "$CUDA_PIN_DIR/nvidia/cu13/bin/nvcc" ]; then
  echo "nvcc-env: installing the pinned CUDA 13.0 nvcc into $CUDA_PIN_DIR" >&2
  python3 -m pip install -q --target "$CUDA_PIN_DIR" \
    "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-cccl==13.0.85" "nvidia-cuda-runtime==13.0.*" \
    "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" >&2 || return 1
fi
export CUDA_HOME=$CUDA_PIN_DIR/nvidia/cu13
export CUDA_PATH=$CUDA_HOME CUDA_ROOT=$CUDA_HOME
export NVCC=$CUDA_HOME/bin/nvcc
export PATH=$CUDA_HOME/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-2}
