#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run, from the repository root of a GPU host with the
# project installed (`pip install -e '.[gpu,dev]'`, or its dependencies on PYTHONPATH):
#   1. the `gpu` tests, each skipped one with its reason (TensorRT, pycuda);
#   2. every other engine test, with the GPU present (`auto`, fallbacks, on_gpu);
#   3. `streamscore engines bench` on the GPU (torch: CUDA graphs) and on the CPU;
#   4. deploy/gpu/floors.py: CUDA graphs against eager CUDA, and the fixed cost per batch of
#      the TensorRT backend's pycuda buffers.
# Models come from engine.model_dir (var/models; `streamscore train` makes them). Results go
# to $OUT (default var/gpu-check). Arguments name the steps to run, in order (default: all):
# gpu-tests engine-tests bench floors. The exit status is 1 when a test failed.
set -uo pipefail
out="${OUT:-var/gpu-check}"
python="${PYTHON:-python3}"
mkdir -p "$out"
failed=0

machine() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  "$python" - <<'PY'
import importlib.util

import numba
import numpy
import onnxruntime
import torch

print("python packages: torch", torch.__version__, "cuda", torch.version.cuda,
      "numpy", numpy.__version__, "numba", numba.__version__,
      "onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())
for name in ("pycuda", "tensorrt"):
    print(name, "importable" if importlib.util.find_spec(name) else "missing")
PY
}

gpu-tests() {
  "$python" -m pytest -p no:cacheprovider -m gpu -rs -q tests/engines \
    --junitxml "$out/gpu-tests.xml" || failed=1
}

engine-tests() {  # the rest of the engine tests, with the GPU present
  "$python" -m pytest -p no:cacheprovider -m "not gpu" -rs -q tests/engines \
    --junitxml "$out/engine-tests.xml" || failed=1
}

bench() {
  "$python" -m pipeline.cli engines bench --backends torch,onnxruntime \
    | tee "$out/engines-bench-gpu.txt"
  CUDA_VISIBLE_DEVICES="" "$python" -m pipeline.cli engines bench --backends torch \
    | tee "$out/engines-bench-cpu.txt"
}

floors() {
  "$python" deploy/gpu/floors.py | tee "$out/floors.txt"
}

for step in machine "${@:-gpu-tests engine-tests bench floors}"; do
  for name in $step; do
    echo "== $name"
    "$name"
  done
done
exit "$failed"
