#!/usr/bin/env bash
# The GPU check: CUDA tests, a trainer smoke run and the LRT benchmarks on one
# lent NVIDIA GPU, sized to finish in under 8 minutes. Needs only torch (+pytest).
# Every stage has its own time limit, so a slow stage cannot hide the others;
# results land under $OUT (default ./out) as JSON and logs.
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LRT_CACHE=/tmp/lrt_cache PYTHONPATH=.
PY=${PY:-python3}
stage() { local name=$1 limit=$2; shift 2; echo "== $name (limit ${limit}s)"; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"; local rc=$?
  echo "   rc=$rc in $((SECONDS - t0))s"; tail -n 3 "$OUT/$name.out"; [ $rc -ne 0 ] && tail -n 15 "$OUT/$name.err"; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.csv"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.csv"

stage tests 120 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_model.py tests/test_recurrence.py tests/test_flops.py
stage train_smoke 60 $PY -m lrt_model.train --device cuda --depth 4 --strategy interleaved --passes 2 \
  --tokens 1000000 --batch-size 32 --eval-tokens 65536 --json --quiet
stage bench_small 75 $PY -m benchmarks.lrt --device cuda --json --depth 6 --head-dim 64 --width 384 \
  --seq-len 1024 --batch 16 --vocab 32768 --rounds 10 --warmup 3 --decode-tokens 128
stage bench_medium_compiled 150 $PY -m benchmarks.lrt --device cuda --json --compile --depth 12 --head-dim 128 \
  --seq-len 2048 --batch 16 --vocab 32768 --rounds 8 --warmup 3 --no-decode --variants interleaved_s2
stage bench_medium_eager 90 $PY -m benchmarks.lrt --device cuda --json --depth 12 --head-dim 128 \
  --seq-len 2048 --batch 16 --vocab 32768 --rounds 5 --warmup 2 --decode-tokens 64
echo "== done; files in $OUT"
