#!/usr/bin/env bash
# One GPU check of the fused kernels, meant to finish within 8 minutes on one H100/H200:
#   1. python -m bitlaw.benchmarks.kernels  (quantizer vs copy, GEMM vs cuBLAS bf16 and int8, layer fwd+bwd vs
#                                           nn.Linear)
#   2. pytest -m gpu                        (the kernel contracts at the 800M shapes, a few GPU training steps)
#   3. 50 steps of model=30m in bf16, quest_w4a4 and quest_w4a4_g8g8 (bitlaw.benchmarks.training): tokens/s ratios
# and prints a summary. Logs go to $OUT (the device tool's output folder) or ./gpu-check; the benchmark records
# (kernels-gpu.json, training-cuda.json) to its records/ folder: copy them to benchmarks/records/ and commit them,
# and BENCHMARKS.md is generated from them (python -m bitlaw.benchmarks.report).
#
# Run from the repository root on a machine with CUDA:   tools/gpu-check.sh
# Where bitlaw is not installed, the script imports it from the checkout (a link farm in .site/) and installs the
# wheels of .whl/ if present: on a machine without a package index, build them beforehand with the packages it
# lacks, e.g. hydra-core, omegaconf, datasets, pytest, iniconfig, pluggy.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
started=$(date +%s)

if ! python3 -c "import bitlaw.kernels.recipe" 2>/dev/null; then
  mkdir -p .site/bitlaw
  for part in core kernels models data train deploy compress scaling benchmarks conf; do ln -sfn "$PWD/$part" ".site/bitlaw/$part"; done
  if [ -d .whl ] && ! python3 -c "import hydra, omegaconf" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl || exit 1
  fi
  export PYTHONPATH="$PWD/.site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this check needs a GPU')" \
  || exit 2

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.txt, report the status
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  local status=$?
  echo "$name: exit $status in $(( $(date +%s) - t0 )) s (log $out/$name.txt)" | tee -a "$out/steps.txt"
}

step bench 180 python3 -m bitlaw.benchmarks.kernels --min-run-time 0.3 --record-dir "$out/records"
step pytest_gpu 180 python3 -m pytest -m gpu -q -x -p no:cacheprovider tests/kernels/triton/test_gpu.py
# The Hydra overrides come before --quant, which takes every name after it.
step train_30m 200 python3 -m bitlaw.benchmarks.training model=30m trainer=gpu seq_len=512 global_batch=64 \
  "data.cache_dir=$PWD/$out/data_cache" --steps 50 --quant bf16 quest_w4a4 quest_w4a4_g8g8 --record-dir "$out/records"

{
  echo "## GPU check, $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  python3 -c "import torch, triton; print(f'device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}')"
  echo
  cat "$out/steps.txt"
  echo
  echo '### python -m bitlaw.benchmarks.kernels'
  echo '```'
  sed -n '/M x K x N/,$p' "$out/bench.txt"
  echo '```'
  echo '### pytest -m gpu'
  tail -n 3 "$out/pytest_gpu.txt"
  echo '### 50 training steps, model=30m, 64 x 512 tokens per step'
  echo '```'
  sed -n '/^device:/,$p' "$out/train_30m.txt"
  echo '```'
  echo "records: $(ls "$out/records" 2>/dev/null | tr '\n' ' ')"
  echo "total $(( $(date +%s) - started )) s"
} | tee "$out/summary.md"
