#!/usr/bin/env bash
# The 7B's batched step on the GPU machine (issue 13, point 8; bench/bench_step_gpu.py), in one run of the
# device tool from the repository root:
#
#   here, once:   python -m bench.device_pack          (.device/: MLX's CUDA build for sm_90, mlx, soxr)
#   device run:   command "bash bench/device_step.sh", carry [".device"], timeout_s 540
#
# Nothing can be downloaded there: MLX comes from .device/, the package is built from this tree with the
# machine's own setuptools, Cython and numpy, the CUDA libraries are the ones its PyTorch image holds
# (libmlx.so finds them through its rpath, $ORIGIN/../../nvidia/..., hence the link beside it).
# Everything goes to $OUT (step.json, step.log); ARGS passes other options (e.g. "--quantize q8").
set -euo pipefail
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/step.log") 2>&1
SITE=/tmp/callbot-site
rm -rf "$SITE" && mkdir -p "$SITE"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .device/wheels/*.whl
tar -xJf .device/mlx-cuda-sm*.tar.xz -C "$SITE"
NVIDIA_DIR=$(python3 -c 'import nvidia, os; print(os.path.abspath(list(nvidia.__path__)[0]))')
ln -s "$NVIDIA_DIR" "$SITE/nvidia"
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" .
export PYTHONPATH="$SITE:$PWD"
python3 -c 'import mlx.core as mx; print(mx.default_device(), mx.device_info())'
python3 -m bench.bench_step_gpu --size 7b --json "$OUT/step.json" ${ARGS:-}
