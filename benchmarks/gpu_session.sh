#!/usr/bin/env bash
# One call on a lent GPU machine (see DEVELOPERS.md, "GPU"): CUDA tests, then the GPU benchmarks.
#   bash benchmarks/gpu_session.sh OUTDIR [tests|tiles|dispatch|bench|all]
# Runs from the repository root with the machine's own python3 (torch with CUDA); nothing is installed.
set -uo pipefail
out=${1:?usage: gpu_session.sh OUTDIR [tests|tiles|dispatch|bench|all]}
what=${2:-all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD MOESURGERY_CACHE=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
if [[ $what == tiles || $what == all ]]; then
  timeout ${TILES_S:-150} python3 benchmarks/triton_tiles.py 2>&1 | tee "$out/triton_tiles.log"
fi
if [[ $what == dispatch || $what == all ]]; then
  timeout ${DISPATCH_S:-200} python3 benchmarks/moe_dispatch.py --device cuda --json "$out/moe_dispatch_cuda.json" --markdown 2>&1 | tee "$out/moe_dispatch_cuda.log"
fi
if [[ $what == tests || $what == all ]]; then
  timeout ${TESTS_S:-170} python3 -m pytest -q -p no:cacheprovider -rs tests -k "cuda or triton" 2>&1 | tee "$out/tests.log" | tail -15
fi
if [[ $what == bench || $what == all ]]; then
  timeout ${BENCH_S:-60} python3 -m moesurgery bench --synthetic mixtral-8x7b --granularity 8 --shared 0 --layers 2 --device cuda --tokens 1,16,256,4096 --batch 1,16 --json > "$out/bench_cuda.json" 2> "$out/bench_cuda.err"
  echo "bench exit $?"; tail -3 "$out/bench_cuda.err"
fi
