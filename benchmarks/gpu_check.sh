#!/usr/bin/env bash
# Everything pergrad checks on a GPU, in one run of under 8 minutes on one GPU:
#   1. the suite's device-independent checks on CUDA (tests/test_cuda.py), a one-GPU nccl
#      process group among them;
#   2. the benchmark's rows against Opacus (B = 256, the real models at B = 32) and the
#      optimizer-step rows (optim.Adam against torch.optim.Adam, foreach and fused);
#   3. the training-stack rows (torch.compile, PerExampleTrainer).
# Runs from the source tree with the machine's own python3 and packages (nothing installed).
#
#   bash benchmarks/gpu_check.sh [OUT]      # results in OUT (default runs/gpu_check)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_check}
mkdir -p "$out"
export PYTHONPATH="$PWD:$PWD/examples${PYTHONPATH:+:$PYTHONPATH}"
status=0
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nproc
} > "$out/machine.txt" 2>&1
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/tests.txt" || status=1
timeout 200 python3 benchmarks/per_example_cost.py --device cuda --quick --batch-sizes 256 \
  --real-batch-sizes 32 --out "$out" > "$out/per_example_cost.log" 2>&1 || status=1
timeout 120 python3 benchmarks/training_stack.py --device cuda --quick --out "$out" \
  > "$out/training_stack.log" 2>&1 || status=1
tail -n 40 "$out/per_example_cost.log" "$out/training_stack.log"
exit $status
