#!/usr/bin/env bash
# Prepares the CUDA 13.0 toolchain that `make build-cuda` compiles and links against, from PyPI
# wheels only (no system CUDA, no GPU needed): nvcc/cicc/ptxas and the headers for candle's
# kernels, the CUDA 13 libraries to link against, and a link-time stub of libcuda (the driver,
# which no wheel ships; the real one is found at run time on the GPU machine).
#
#   gpu/toolchain.sh DEST     # idempotent: a complete DEST is left as it is
#
# The versions are those PyTorch 2.11 pins for CUDA 13.0, the GPU machine's driver (580.x) level:
# a newer nvcc emits PTX that driver rejects, and a CUDA 12 build would need libcublas.so.12,
# which the GPU machine does not have (see docs/gpu.md).
set -euo pipefail
dest=${1:?usage: gpu/toolchain.sh DEST}
wheels=(
  nvidia-cuda-nvcc==13.0.88      # nvcc, cudafe++, ptxas, fatbinary, nvlink
  nvidia-nvvm==13.0.88           # cicc, libdevice
  nvidia-cuda-crt==13.0.88       # crt/ headers nvcc includes
  nvidia-cuda-cccl==13.0.85      # cuda/std headers
  nvidia-cuda-runtime==13.0.96   # cuda_runtime.h, cuda.h, cuda_bf16.h, libcudart.so.13
  nvidia-cublas==13.1.0.3        # libcublas.so.13, libcublasLt.so.13 (linked)
  nvidia-curand==10.4.0.35       # libcurand.so.10 (linked)
  nvidia-cuda-nvrtc==13.0.88     # libnvrtc.so.13 (linked)
)
if [[ -f $dest/.complete ]]; then
  exit 0
fi
rm -rf "$dest"
mkdir -p "$dest/wheels"
echo "gpu/toolchain.sh: fetching ${#wheels[@]} CUDA 13.0 wheels (~650 MB) into $dest" >&2
# The version pins are the interface; pip checks each wheel's hash against PyPI's index.
pip download --quiet --no-deps --only-binary=:all: --dest "$dest/wheels" "${wheels[@]%%#*}"
for w in "$dest"/wheels/*.whl; do
  python3 -m zipfile -e "$w" "$dest/unpacked"
done
# Every wheel installs under nvidia/cu13/: that is the toolkit root (bin/, include/, lib/, nvvm/).
mv "$dest/unpacked/nvidia/cu13" "$dest/root"
rm -rf "$dest/unpacked" "$dest/wheels"
root=$dest/root
chmod +x "$root"/bin/* "$root"/nvvm/bin/*
# The linker wants unversioned names.
for lib in cublas cublasLt cudart curand nvrtc; do
  real=$(cd "$root/lib" && ls "lib$lib.so."* | grep -E "^lib$lib\.so\.[0-9]+$" | head -1)
  ln -sf "$real" "$root/lib/lib$lib.so"
done
# libcuda: a stub with the driver's SONAME that defines every driver entry point cudarc's
# bindings declare (the symbol list comes from the cudarc version Cargo.lock pins).
cargo fetch --quiet
cudarc=$(cargo metadata --format-version 1 --features l2t/cuda 2>/dev/null |
  python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc"))')
bindings=$(dirname "$cudarc")/src/driver/sys/mod.rs
grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$bindings" | sed -E 's/^pub unsafe fn (.*)/void \1(void) {}/' | sort -u > "$dest/libcuda_stub.c"
test -s "$dest/libcuda_stub.c" || { echo "gpu/toolchain.sh: no driver symbols found in $bindings" >&2; exit 1; }
mkdir -p "$root/lib/stubs"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib/stubs/libcuda.so" "$dest/libcuda_stub.c"
"$root/bin/nvcc" --version | tail -2 >&2
touch "$dest/.complete"
