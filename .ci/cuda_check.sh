#!/usr/bin/env bash
# Compile-only check of the CUDA kernels (no GPU needed): every csrc/cuda/*.cu with the machine's nvcc for sm_80
# and sm_90 (override: CUDA_CHECK_ARCHS="80 90"), two files at a time, objects to a temp dir; then, when torch
# imports, a syntax-only pass of the torch binding csrc/cuda/bindings_cuda.cpp against torch's headers (a CPU
# torch ships the c10/cuda headers but not their generated cmake macros: a stub stands in). Fails on any error;
# without nvcc it says so loudly and skips (CI machines have it).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || true)}
if [ -z "$NVCC" ]; then
  for c in /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc; do
    if [ -x "$c" ]; then NVCC=$c; break; fi
  done
fi
if [ -z "$NVCC" ]; then
  echo "!!! cuda-check: nvcc not found: the CUDA kernels were NOT compiled on this machine !!!" >&2
  exit 0
fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
GENCODE=()
for a in ${CUDA_CHECK_ARCHS:-80 90}; do GENCODE+=(-gencode "arch=compute_$a,code=sm_$a"); done
CUDA_INC=""
for d in "$(dirname "$(dirname "$(readlink -f "$NVCC")")")/include" "${CUDA_HOME:-/nonexistent}/include" \
    /usr/local/cuda/include /usr/local/cuda-*/include; do
  if [ -f "$d/cuda_runtime.h" ]; then CUDA_INC=$d; break; fi
done
start=$SECONDS
echo "cuda-check: $("$NVCC" --version | tail -1) for ${CUDA_CHECK_ARCHS:-80 90}"
pids=() names=()
for f in csrc/cuda/*.cu; do
  while [ "$(jobs -rp | wc -l)" -ge 2 ]; do sleep 0.2; done
  "$NVCC" -c -std=c++17 -O3 "${GENCODE[@]}" -Xcompiler -Wall -I csrc/include "$f" -o "$OUT/$(basename "$f").o" &
  pids+=($!) names+=("$f")
done
fail=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then echo "cuda-check: FAILED to compile ${names[$i]}" >&2; fail=1; fi
done
if [ -z "$CUDA_INC" ]; then
  echo "cuda-check: FAILED: cuda_runtime.h not found beside $NVCC" >&2; fail=1
elif INCS=$(python3 -c "import os, sysconfig, torch; print(os.path.dirname(torch.__file__) + '/include', sysconfig.get_paths()['include'])" 2>/dev/null); then
  read -r PY_INC PYTHON_INC <<< "$INCS"
  mkdir -p "$OUT/stub/c10/cuda/impl" && echo '#pragma once' > "$OUT/stub/c10/cuda/impl/cuda_cmake_macros.h"
  if ! g++ -std=c++20 -fsyntax-only -w -DFASTINFER_WITH_CUDA -I csrc/include -I "$PY_INC" \
      -I "$PY_INC/torch/csrc/api/include" -I "$PYTHON_INC" -I "$CUDA_INC" -I "$OUT/stub" csrc/cuda/bindings_cuda.cpp; then
    echo "cuda-check: FAILED: csrc/cuda/bindings_cuda.cpp" >&2; fail=1
  fi
else
  echo "cuda-check: torch not importable: csrc/cuda/bindings_cuda.cpp not checked" >&2
fi
[ "$fail" = 0 ] && echo "cuda-check: OK ($(ls csrc/cuda/*.cu | wc -l) .cu files + the binding, $((SECONDS - start)) s)"
exit "$fail"
