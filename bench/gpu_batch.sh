#!/usr/bin/env bash
# Every check that needs an NVIDIA GPU, in one run on a bare GPU machine, within 8
# minutes on an H200, with a summary in the folder it is given:
#
#   1. the machine: GPU, driver, CUDA toolkit, PyTorch, and the CUDA libraries found
#   2. `moe info --compile-kernels`: every kernel through NVRTC for sm_80 and sm_90
#   3. `moe check --backend cuda tests/golden`: the 28 golden cases on the device, on one
#      rank and on 4 in-process expert-parallel ranks (bucket, regroup, ranged combine)
#   4. `moe parity --backend cuda`: every op against the cpu reference
#   5. `moe check --backend wgpu` and `moe parity --backend wgpu` on the NVIDIA Vulkan driver
#   6. `bench/gpu_compare.py`: the layer forward against PyTorch (transformers eager and
#      torch._grouped_mm) with the physical floor of every case
#   7. `moe bench layer --nccl` at world size 1: the NCCL communicator (its transport's
#      own-rank copies; with one GPU there is no peer to send to)
#
# The binary: with a Rust toolchain on the machine, built from the source tree
# (`cargo build --release --offline`); otherwise `$MOE_BIN`, or `.gpu/bin/moe` that
# bench/gpu_prepare.sh built beside the sources (the lent machines reach no registry and
# have no cargo). A step that cannot run says why (SKIP) and the batch goes on; each step
# has its own time limit and the whole batch stops starting steps past its budget.
#
# Output (at most 8 files, as the device tool brings back): summary.md (one line per
# step: status, seconds, the key figures), log.txt (every step's output), compare.json
# (gpu_compare.py's rows), parity.md (the cuda support matrix).
#
# usage: bench/gpu_batch.sh OUTDIR [BUDGET_SECONDS=470]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?usage: bench/gpu_batch.sh OUTDIR [BUDGET_SECONDS]}"
BUDGET="${2:-470}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
LOG="$OUT/log.txt"
START=$(date +%s)
: >"$LOG"
{
    echo "# GPU batch $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || cat .gpu/commit 2>/dev/null || echo '?')"
    echo
    echo "| step | status | seconds | figures |"
    echo "| --- | --- | --- | --- |"
} >"$SUMMARY"

elapsed() { echo $(($(date +%s) - START)); }

# step NAME LIMIT CMD...: runs CMD with a time limit, logs it, and records PASS / FAIL
# (with the exit code; 124 is the time limit) in the summary. Steps past the budget are
# recorded as SKIP.
step() {
    local name="$1" limit="$2"
    shift 2
    if [ "$(elapsed)" -ge "$BUDGET" ]; then
        echo "| $name | SKIP | 0 | the batch's $BUDGET s budget is spent |" >>"$SUMMARY"
        return 0
    fi
    local left=$((BUDGET - $(elapsed)))
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$OUT/.step" 2>&1
    local rc=$?
    cat "$OUT/.step" >>"$LOG"
    local secs=$(($(date +%s) - t0))
    local figures
    figures="$(grep -E '^(median|[0-9]+ passed|[0-9]+ cases|\| [0-9])' "$OUT/.step" | tail -n 3 | tr '\n' ' ' | tr '|' '/')"
    if [ $rc -eq 0 ]; then
        echo "| $name | PASS | $secs | $figures |" >>"$SUMMARY"
    else
        echo "| $name | FAIL (exit $rc) | $secs | $figures$(tail -n 2 "$OUT/.step" | tr '\n' ' ' | tr '|' '/') |" >>"$SUMMARY"
    fi
    rm -f "$OUT/.step"
    return 0
}

skip() { echo "| $1 | SKIP | 0 | $2 |" >>"$SUMMARY"; echo "=== $1: SKIP: $2" >>"$LOG"; }

# ---------------------------------------------------------------- 1. the machine
{
    echo "=== machine"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1
} >>"$LOG" 2>&1

# cudarc loads libnvrtc / libcublas / libnccl by name at run time (the CUDA 12.2 API, which
# later drivers and libraries keep). Gather what this machine has under the names cudarc
# tries (the unversioned .so first) in one folder on the loader path.
SHIM="$(mktemp -d)"
link_lib() {  # link_lib NAME: the first libNAME.so* found, as libNAME.so
    local found
    found="$( (ls /usr/local/cuda*/lib64/lib"$1".so* /usr/lib/x86_64-linux-gnu/lib"$1".so* 2>/dev/null;
        python3 - "$1" 2>/dev/null <<'PY'
import glob, os, site, sys
for d in site.getsitepackages():
    for f in sorted(glob.glob(os.path.join(d, "nvidia", "*", "lib", f"lib{sys.argv[1]}.so*"))):
        print(f)
PY
    ) | head -n 1)"
    if [ -n "$found" ]; then
        ln -sf "$found" "$SHIM/lib$1.so"
        # Its own versioned dependencies (libcublasLt.so.N beside libcublas) load from there.
        LIB_DIRS="${LIB_DIRS:+$LIB_DIRS:}$(dirname "$(readlink -f "$found")")"
        echo "lib$1: $found" >>"$LOG"
    else
        echo "lib$1: not found" >>"$LOG"
    fi
}
LIB_DIRS=""
for lib in nvrtc cublas cublasLt nccl; do link_lib "$lib"; done
export LD_LIBRARY_PATH="$SHIM${LIB_DIRS:+:$LIB_DIRS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MOE_KERNEL_CACHE="$OUT/.kernels" MOE_LOG="${MOE_LOG:-warn}"

# The Vulkan loader for wgpu on the NVIDIA driver, from bench/gpu_prepare.sh's packages
# when the machine lacks it.
if ! ldconfig -p 2>/dev/null | grep -q libvulkan.so.1 && ls .gpu/debs/*.deb >/dev/null 2>&1; then
    for f in .gpu/debs/*.deb; do dpkg -x "$f" / 2>>"$LOG"; done
    ldconfig 2>>"$LOG"
fi
for f in /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json /usr/share/vulkan/icd.d/nvidia_icd.json; do
    [ -f "$f" ] && export VK_DRIVER_FILES="$f" && break
done
for f in /usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json /usr/share/glvnd/egl_vendor.d/10_nvidia.json; do
    [ -f "$f" ] && export __EGL_VENDOR_LIBRARY_FILENAMES="$f" && break
done
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"

# ---------------------------------------------------------------- the binary
MOE="${MOE_BIN:-}"
if [ -z "$MOE" ] && command -v cargo >/dev/null 2>&1; then
    step "build moe from the source tree" 240 cargo build --release --offline -p moe-cli
    [ -x target/release/moe ] && MOE="$PWD/target/release/moe"
fi
[ -z "$MOE" ] && [ -x .gpu/bin/moe ] && MOE="$PWD/.gpu/bin/moe"
if [ -z "$MOE" ]; then
    skip "every moe step" "no cargo on this machine and no .gpu/bin/moe (run bench/gpu_prepare.sh beside the sources)"
    cat "$SUMMARY"
    exit 1
fi
echo "moe: $MOE" >>"$LOG"

# ---------------------------------------------------------------- 2-5. correctness
step "moe info" 60 "$MOE" info
step "NVRTC compile of every kernel (sm_80, sm_90)" 90 "$MOE" info --compile-kernels
step "golden cases on cuda" 120 "$MOE" check --backend cuda tests/golden
step "golden cases on 4 in-process cuda ranks (exchange kernels on the device)" 120 "$MOE" check --backend cuda --ep 4 --ep-per-node 2 tests/golden
step "parity cuda vs cpu" 120 sh -c "\"$MOE\" parity --backend cuda > \"$OUT/parity.md\"; rc=\$?; tail -n 30 \"$OUT/parity.md\"; exit \$rc"
step "golden cases on wgpu (NVIDIA Vulkan)" 90 "$MOE" check --backend wgpu --device NVIDIA tests/golden
step "parity wgpu (NVIDIA Vulkan) vs cpu" 90 "$MOE" parity --backend wgpu --device NVIDIA

# ---------------------------------------------------------------- 6. speed against PyTorch
if python3 -c 'import torch, transformers; assert torch.cuda.is_available()' >/dev/null 2>&1; then
    step "layer forward vs PyTorch (gpu_compare.py)" 240 python3 bench/gpu_compare.py --moe "$MOE" \
        --shape 4096,14336,8,2 --shape 2048,1408,64,6 --tokens 1,64,512,4096 --iters 10 --json "$OUT/compare.json"
else
    skip "layer forward vs PyTorch" "python3 lacks torch with CUDA or transformers"
fi

# ---------------------------------------------------------------- 7. NCCL at world size 1
step "NCCL communicator, world size 1" 90 env RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 \
    MASTER_PORT=29531 "$MOE" bench layer --backend cuda --nccl --dtype bf16 --hidden 1024 --ffn 2816 --experts 8 \
    --top-k 2 --tokens 512 --iters 5

rm -rf "$SHIM" "$OUT/.kernels"
echo >>"$SUMMARY"
echo "total $(elapsed) s of a $BUDGET s budget" >>"$SUMMARY"
cat "$SUMMARY"
