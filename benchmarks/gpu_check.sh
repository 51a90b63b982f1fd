#!/usr/bin/env bash
# The GPU check: CUDA tests, a trainer smoke run and the LRT benchmarks on one
# lent NVIDIA GPU, sized to finish in under 8 minutes. Needs only torch (+pytest).
# Every stage has its own time limit, so a slow stage cannot hide the others;
# results land under $OUT (default ./out): <stage>.out (JSON or test output) and
# one shared log.txt with every stage's stderr.
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LRT_CACHE=/tmp/lrt_cache PYTHONPATH=. TORCHINDUCTOR_COMPILE_THREADS=16
PY=${PY:-python3}
LOG="$OUT/log.txt"
stage() { local name=$1 limit=$2; shift 2; echo "== $name (limit ${limit}s)" | tee -a "$LOG"; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.out" 2>> "$LOG"; local rc=$?
  echo "   rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"; tail -c 1500 "$OUT/$name.out"; echo; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.csv"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.csv"
git rev-parse HEAD >> "$OUT/gpu.csv" 2>/dev/null

stage tests 150 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_model.py
stage train_smoke 60 $PY -m lrt_model.train --device cuda --depth 4 --strategy interleaved --passes 2 \
  --tokens 1000000 --batch-size 32 --eval-tokens 16384 --eval-every 60 --json --quiet
stage bench_small 60 $PY -m benchmarks.lrt --device cuda --json --depth 6 --head-dim 64 --width 384 \
  --seq-len 1024 --batch 16 --vocab 32768 --rounds 10 --warmup 3 --decode-tokens 128 --decode-rounds 2
stage bench_medium_compiled 200 $PY -m benchmarks.lrt --device cuda --json --compile --depth 12 --head-dim 128 \
  --seq-len 2048 --batch 16 --vocab 32768 --rounds 6 --warmup 2 --no-decode --variants interleaved_s2
echo "== done; files in $OUT"
