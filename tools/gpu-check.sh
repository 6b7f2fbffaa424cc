#!/usr/bin/env bash
# One GPU check of the fast path, meant to finish within 8 minutes on one H100 (the step limits add up to 470 s):
#   1. bench       python -m bitlaw.benchmarks.kernels   fp8 torch._scaled_mm vs bf16 torch.mm at the 800M block's GEMM
#                                                        shapes, the quantizer's GB/s vs a copy, each layer vs nn.Linear
#   2. block       python -m bitlaw.benchmarks.block     one 800M block forward + backward, bf16 / quest_w4a4 /
#                                                        quest_w4a4_g8g8, eager and torch.compile, beside the estimate
#   3. train_30m   python -m bitlaw.benchmarks.training  model=30m, 20 steps per recipe: tokens/s
#   4. train_800m  python -m bitlaw.benchmarks.training  model=800m, 4 steps of 32 x 512 tokens per recipe: tokens/s
#   5. pytest_gpu  pytest -m gpu                         the kernel contracts at the 800M shapes
# and prints a summary. Not run: a compression smoke (it needs a trained run directory; the training benchmark's
# runs are temporary). Logs go to $OUT (the device tool's output folder) or ./gpu-check; every benchmark writes its
# JSON record under its records folders (records/, records-800m/): copy them to benchmarks/records/ and commit them,
# and BENCHMARKS.md is generated from them (python -m bitlaw.benchmarks.report).
#
# Run from the repository root on a machine with CUDA:   tools/gpu-check.sh
# Print the plan (every step, its command and time limit) without running anything, on any machine:
#                                                        tools/gpu-check.sh --dry-run
# Where bitlaw is not installed, the script imports it from the checkout (a link farm in .site/) and installs the
# wheels of .whl/ if present: on a machine without a package index, build them beforehand with the packages it
# lacks (docs/kernels.md §4 lists them and gives the command).
set -uo pipefail
cd "$(dirname "$0")/.."
dry_run=0
case "${1:-}" in
  --dry-run) dry_run=1 ;;
  "") ;;
  *) echo "usage: tools/gpu-check.sh [--dry-run]" >&2; exit 2 ;;
esac
out="${OUT:-gpu-check}"
records="$out/records"

# name, time limit (s), command: run in this order.
steps=(
  "bench|100|python3 -m bitlaw.benchmarks.kernels --min-run-time 0.2 --record-dir $records"
  "block|160|python3 -m bitlaw.benchmarks.block --min-run-time 0.3 --quant bf16 quest_w4a4 quest_w4a4_g8g8 --record-dir $records"
  # The Hydra overrides come before --quant, which takes every name after it.
  "train_30m|70|python3 -m bitlaw.benchmarks.training model=30m trainer=gpu seq_len=512 global_batch=64 data.cache_dir=$PWD/$out/data_cache --steps 20 --quant bf16 quest_w4a4 quest_w4a4_g8g8 --record-dir $records"
  # A record of its own folder: both training runs write training-cuda.json.
  "train_800m|80|python3 -m bitlaw.benchmarks.training model=800m trainer=gpu seq_len=512 global_batch=32 data.cache_dir=$PWD/$out/data_cache --steps 4 --quant bf16 quest_w4a4 quest_w4a4_g8g8 --record-dir $out/records-800m"
  "pytest_gpu|60|python3 -m pytest -m gpu -q -x -p no:cacheprovider tests/kernels/triton/test_gpu.py"
)

if [ "$dry_run" = 1 ]; then
  total=0
  echo "GPU check plan (nothing is run; logs and records would go to $out/):"
  for entry in "${steps[@]}"; do
    IFS='|' read -r name limit command <<< "$entry"
    total=$(( total + limit ))
    echo "step $name: limit ${limit} s: $command"
  done
  echo "total limit: ${total} s"
  exit 0
fi

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

for entry in "${steps[@]}"; do  # each with its time limit, logged to $out/NAME.txt, its status reported
  IFS='|' read -r name limit command <<< "$entry"
  t0=$(date +%s)
  read -r -a argv <<< "$command"
  timeout "$limit" "${argv[@]}" > "$out/$name.txt" 2>&1
  status=$?
  echo "$name: exit $status in $(( $(date +%s) - t0 )) s (limit $limit s; log $out/$name.txt)" | tee -a "$out/steps.txt"
done

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
  echo '### python -m bitlaw.benchmarks.block'
  echo '```'
  sed -n '/^device:/,$p' "$out/block.txt"
  echo '```'
  for model in 30m 800m; do
    echo "### training tokens/s, model=$model"
    echo '```'
    sed -n '/^device:/,$p' "$out/train_$model.txt"
    echo '```'
  done
  echo '### pytest -m gpu'
  tail -n 3 "$out/pytest_gpu.txt"
  echo "records: $(ls "$records" "$out/records-800m" 2>/dev/null | tr '\n' ' ')"
  echo "total $(( $(date +%s) - started )) s"
} | tee "$out/summary.md"
