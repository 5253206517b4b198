#!/usr/bin/env bash
# Builds what a lent GPU machine (no Rust, no network) needs into .gpu/ at the repo root:
#   .gpu/tests/<name>.xz      the test binaries (release, --features cuda), stripped, xz
#   .gpu/examples/<name>.xz   the examples (bench, train, peer: the crate's side of
#                             benches/torch_compare.py), the same way
#   .gpu/ptx/*.ptx            the PTX build.rs produced (what the binaries embed; run.sh's
#                             ptx-load step loads it)
#   .gpu/py/benches/torch_compare.py   the PyTorch comparison's driver (it runs examples/peer)
#   .gpu/run.sh               the runner (tools/gpu/run.sh)
#   .gpu/MANIFEST.txt         revision, toolkit, sizes, sha256 of every packed file
# Usage, from the repo root:
#   nice -n 19 tools/gpu/pack.sh
# Honours CARGO_TARGET_DIR, CUDA_COMPUTE_CAP (default 90: the H200), CUDA_PIN_DIR,
# PACK_XZ_LEVEL (default 6), PACK_MAX_MIB (default 40: the size .gpu must stay under).
# Binaries link against stub CUDA libraries (make-stubs.sh); on the GPU machine run.sh finds the
# real ones. Then call the device tool with carry [".gpu"] and `bash .gpu/run.sh all`.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(git -C "$here" rev-parse --show-toplevel)
cd "$root"
max_mib=${PACK_MAX_MIB:-40}
xz_level=${PACK_XZ_LEVEL:-6}
t0=$SECONDS
step() { echo "pack: [$((SECONDS - t0))s] $*" >&2; }

# shellcheck source-path=SCRIPTDIR source=nvcc-env.sh
source "$here/nvcc-env.sh"
step "nvcc: $(nvcc --version | grep -o 'release [^,]*' || echo '?'), CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
if ! git check-ignore -q .gpu; then
  echo "pack: WARNING: .gpu is not ignored by git (add /.gpu to .gitignore)" >&2
fi
target=$(cargo metadata --no-deps --format-version 1 |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
step "target dir: $target"
stubs=$target/cuda-stubs
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# 1. compile everything but the final links, 2. stubs from what the objects ask for, 3. link.
step "cargo build --release --features cuda --lib"
cargo build --release --features cuda --lib --message-format=json >"$tmp/lib.json"
"$here/make-stubs.sh" "$target/release" "$stubs"
export LIBRARY_PATH=$stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
step "cargo test --release --features cuda --no-run"
cargo test --release --features cuda --no-run --message-format=json >"$tmp/test.json"
step "cargo build --release --features cuda --examples"
cargo build --release --features cuda --examples --message-format=json >"$tmp/ex.json"

rm -rf .gpu
mkdir -p .gpu/tests .gpu/examples .gpu/ptx .gpu/py/benches
# The executables and build.rs's OUT_DIR, from cargo's own messages (no globbing of stale files).
python3 - "$tmp" <<'PY'
import json, os, shutil, sys
tmp = sys.argv[1]
ptx_dirs, n = [], 0
for f in ("lib.json", "test.json", "ex.json"):
    for line in open(os.path.join(tmp, f)):
        try:
            m = json.loads(line)
        except ValueError:
            continue
        if m.get("reason") == "build-script-executed" and "candle-margin-softmax" in m.get("package_id", ""):
            ptx_dirs.append(m["out_dir"])
        if m.get("reason") != "compiler-artifact" or not m.get("executable"):
            continue
        kind = m["target"]["kind"]
        if m["profile"].get("test"):
            dest = os.path.join(".gpu/tests", m["target"]["name"] + ("-lib" if "lib" in kind else ""))
        elif "example" in kind:
            dest = os.path.join(".gpu/examples", m["target"]["name"])
        else:
            continue
        shutil.copy(m["executable"], dest)
        n += 1
if not n:
    sys.exit("pack: cargo reported no executables")
open(os.path.join(tmp, "ptxdir"), "w").write(ptx_dirs[-1] if ptx_dirs else "")
PY
ptxdir=$(cat "$tmp/ptxdir")
if [ -z "$ptxdir" ]; then
  # build.rs did not run this time (fresh): the newest candle-margin-softmax OUT_DIR with PTX.
  ptxdir=$(find "$target/release/build" -path '*/candle-margin-softmax-*/out/*.ptx' -printf '%T@ %h\n' 2>/dev/null |
    sort -n | tail -n 1 | cut -d' ' -f2-)
fi
shopt -s nullglob
ptx=("$ptxdir"/*.ptx)
[ ${#ptx[@]} -gt 0 ] || { echo "pack: no PTX found (build.rs OUT_DIR: '${ptxdir}')" >&2; exit 1; }
cp "${ptx[@]}" .gpu/ptx/
step "PTX from $ptxdir: $(cd .gpu/ptx && echo *.ptx) ($(grep -ho '^\.target [a-z0-9_]*' .gpu/ptx/*.ptx | sort -u | tr '\n' ' '))"

cp benches/torch_compare.py .gpu/py/benches/
cp "$here/run.sh" .gpu/run.sh

bins=(.gpu/tests/* .gpu/examples/*)
step "strip + xz -$xz_level: ${bins[*]}"
strip "${bins[@]}"
xz -T2 "-$xz_level" "${bins[@]}"

{
  echo "packed: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "revision: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src kernels tests examples build.rs Cargo.toml benches/torch_compare.py || echo ' (with uncommitted changes)')"
  echo "nvcc: $(nvcc --version | grep -o 'release [^,]*, V[0-9.]*' || echo '?')"
  echo "CUDA_COMPUTE_CAP: $CUDA_COMPUTE_CAP"
  echo "files (bytes, sha256):"
  (cd .gpu && find . -type f ! -name MANIFEST.txt -printf '%P\n' | sort | while read -r f; do
    printf '  %-40s %10s %s\n' "$f" "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -c1-16)"
  done)
} >.gpu/MANIFEST.txt
cat .gpu/MANIFEST.txt >&2

# Size: .gpu under PACK_MAX_MIB, and the whole carried tree (git's files + .gpu) under 64 MiB.
gpu_bytes=$(du -sb .gpu | cut -f1)
tree_bytes=$(git ls-files -z -co --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)
step "size: .gpu $((gpu_bytes / 1024)) KiB, tree without .gpu $((tree_bytes / 1024)) KiB"
if [ "$gpu_bytes" -gt $((max_mib * 1024 * 1024)) ]; then
  echo "pack: ERROR: .gpu is $((gpu_bytes / 1024 / 1024)) MiB, over the ${max_mib} MiB limit: pack fewer binaries or raise PACK_XZ_LEVEL" >&2
  exit 1
fi
if [ $((gpu_bytes + tree_bytes)) -gt $((64 * 1024 * 1024)) ]; then
  echo "pack: ERROR: tree + .gpu = $(((gpu_bytes + tree_bytes) / 1024 / 1024)) MiB, over the 64 MiB a device run can carry" >&2
  exit 1
fi
step "done. Device tool: carry [\".gpu\"], command: bash .gpu/run.sh all (timeout_s ~480)"
