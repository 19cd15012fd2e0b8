#!/usr/bin/env bash
# Build / download, on this CPU machine, the wheels the GPU machines' image lacks, into
# benchmarks/wheels/ (git-ignored; the device run carries it: carry ["benchmarks/wheels"]).
#
#   bash benchmarks/prepare_gpu_wheels.sh
#
# The GPU image (docs: FIELD_NOTES §7, .library/device/KINDS.md) has Python 3.12, torch 2.11
# (cu130), transformers 5.17, accelerate, safetensors, tokenizers, numpy, msgpack, ninja,
# psutil, py-cpuinfo, einops, tqdm, nvidia-ml-py ... but no deepspeed. Carried here:
#   deepspeed 0.19.8  (PyPI ships only an sdist: built here into a pure-Python wheel)
#   its missing needs: hjson, pydantic + pydantic-core (a cp312 x86_64 build), annotated-types,
#                      typing-inspection, typing-extensions
#   transformers 5.23.0 (the version llave-ds is tested with; gpu_run.sh falls back to the
#                      image's 5.17 if it does not import there) + regex (it needs >= 2025.10)
#   liger-kernel 0.8.5 (pure Python + Triton kernels; no deps carried: triton ships with the
#                      image's CUDA torch) for gpu_run's 2b_z3_liger (model.fused_kernels)
# Versions are the ones constraints.txt pins for CI (deepspeed and liger-kernel: set below). Needs only PyPI (pip).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=benchmarks/wheels
mkdir -p "$OUT"
rm -f "$OUT"/*.whl

pin() {  # the version constraints.txt pins for a package (case/underscore-insensitive)
    local want
    want=$(echo "$1" | tr 'A-Z_' 'a-z-')
    awk -F'==' -v w="$want" '{n=tolower($1); gsub("_","-",n); if (n==w) print $2}' constraints.txt
}
DS=0.19.8
LIGER=0.8.5
PURE="hjson==$(pin hjson) pydantic==$(pin pydantic) annotated-types==$(pin annotated-types) \
typing-inspection==$(pin typing-inspection) typing-extensions==$(pin typing_extensions) \
transformers==$(pin transformers) liger-kernel==$LIGER"
BINARY="pydantic-core==$(pin pydantic_core) regex==$(pin regex)"
TARGET=(--python-version 3.12 --implementation cp --abi cp312
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

echo "== deepspeed $DS: building a pure-Python wheel from the sdist"
# DeepSpeed's setup.py only needs torch to decide which C++/CUDA ops to pre-build; with
# DS_BUILD_OPS=0 it builds none (they JIT-compile on demand; llave-ds uses none of them).
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation "deepspeed==$DS" -w "$OUT"

echo "== pure-Python wheels: $PURE"
# shellcheck disable=SC2086
"$PY" -m pip download --quiet --no-deps --only-binary=:all: "${TARGET[@]}" -d "$OUT" $PURE

echo "== binary wheels for CPython 3.12 x86_64: $BINARY"
# shellcheck disable=SC2086
"$PY" -m pip download --quiet --no-deps --only-binary=:all: "${TARGET[@]}" -d "$OUT" $BINARY

echo "== carried wheels ($(du -sh "$OUT" | cut -f1)):"
ls -1 "$OUT"
for w in "$OUT"/deepspeed-*.whl; do
    case "$w" in *-py3-none-any.whl) ;; *) echo "deepspeed wheel is not pure Python: $w" >&2; exit 1 ;; esac
done
n_ds=$(ls "$OUT"/deepspeed-*.whl | wc -l)
[ "$n_ds" = 1 ] || { echo "expected one deepspeed wheel, found $n_ds" >&2; exit 1; }
