#!/usr/bin/env bash
# Prepares the bundle bench/gpu_batch.sh needs on a bare GPU machine that cannot reach a
# package registry and has no Rust toolchain: a release `moe` built here (stripped, ~10
# MB; it loads CUDA, cuBLAS, NCCL and Vulkan at run time, so it needs none of them to
# build), and Debian's Vulkan/EGL loader packages for the wgpu checks on the NVIDIA
# driver. Everything goes into .gpu/ (ignored by git); copy or carry that folder with the
# source tree, then run `bench/gpu_batch.sh OUT` there.
#
# usage: bench/gpu_prepare.sh            (from anywhere in the checkout)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu/bin .gpu/debs

echo "== release build of moe"
cargo build --release -p moe-cli
strip -o .gpu/bin/moe target/release/moe
ls -l .gpu/bin/moe

echo "== Vulkan / EGL loaders (Debian packages, unpacked on the GPU machine if it lacks them)"
if command -v apt-get >/dev/null 2>&1; then
    lists="$(mktemp -d)"
    opts=(-o APT::Architecture=amd64 -o APT::Architectures=amd64 -o Dir::State::Lists="$lists")
    mkdir -p "$lists/partial"
    if apt-get "${opts[@]}" update -q >/dev/null 2>&1; then
        (cd .gpu/debs && apt-get "${opts[@]}" download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2 \
            >/dev/null 2>&1) || echo "could not download the loader packages; the wgpu checks need the machine's own"
    else
        echo "apt-get update failed; the wgpu checks will need the GPU machine's own Vulkan loader"
    fi
    rm -rf "$lists"
fi
du -sh .gpu
echo "prepared .gpu/ (binary $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
git rev-parse HEAD > .gpu/commit 2>/dev/null || true
