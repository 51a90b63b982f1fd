#!/usr/bin/env bash
# The GPU check: CUDA tests and the LRT benchmarks on one lent NVIDIA GPU, sized
# to finish in under 8 minutes. Needs only torch (+pytest). Every stage has its
# own time limit, so a slow stage cannot hide the others; results land under
# $OUT (default ./out): <stage>.out (JSON or test output), profile.txt, and one
# shared log.txt with every stage's stderr.
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
  echo "   rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"; tail -c 1800 "$OUT/$name.out"; echo; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.csv"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.csv"
git rev-parse HEAD >> "$OUT/gpu.csv" 2>/dev/null

# Sized from the H100 run at 1e3115c (docs/PERFORMANCE.md): 480 s of stages in all.
# New CUDA tests first (CUDA-graph decode, batched Muon, chunked loss): the compiled-training tests
# are slow and ran out of time there before.
stage tests_new 45 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py \
  -k "cuda_graph or muon or chunked_loss"
# Small, eager training ratios; decode at batch 1/8/32, eager and CUDA-graph, both arms; the
# sequential-view evaluation eager vs CUDA graph.
stage bench_small 80 $PY -m benchmarks.lrt --device cuda --json --depth 6 --head-dim 64 --width 384 \
  --seq-len 1024 --batch 16 --vocab 32768 --rounds 4 --warmup 2 --decode-tokens 64 --decode-rounds 2 \
  --decode-modes eager,cuda_graph --eval-modes eager,cuda_graph \
  --variants interleaved_s2,interleaved_s4,multi_refine_k2
# Muon's step: the batched Newton-Schulz vs torch.optim.Muon's per-matrix loop, at depth 12 and 20.
stage bench_muon 20 $PY -m benchmarks.muon --device cuda --depth 12 20 --width 768 1280 --rounds 5
# Depth 12 at its natural width (768), seq 2048, bf16, compiled (Muon batched): MFU, S=2 ratio, profile.
# Compiling S=2 took 3.0x the baseline's time on the CPU at depth 12 (121 vs 40 s; the baseline took 39-43 s on the H100).
stage bench_medium_compiled 200 $PY -m benchmarks.lrt --device cuda --json --compile --depth 12 --head-dim 128 \
  --seq-len 2048 --batch 16 --vocab 32768 --rounds 5 --warmup 2 --no-decode \
  --variants interleaved_s2 --profile "$OUT/profile.txt"
# The same size eager: every interleaved variant's step ratio and its own peak memory.
stage bench_medium_eager 50 $PY -m benchmarks.lrt --device cuda --json --depth 12 --head-dim 128 \
  --seq-len 2048 --batch 16 --vocab 32768 --rounds 3 --warmup 1 --no-decode \
  --variants interleaved_s2,interleaved_s4,interleaved_s2_recompute
# The chunked loss vs the plain cross-entropy at the depth-12 step's size: time and peak memory.
stage bench_loss 30 $PY -m benchmarks.loss --device cuda --rows 32768 --width 768 --vocab 32768
# The remaining CUDA tests (compiled training equals eager, FlexAttention, the exactness anchor).
stage tests_rest 55 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "not (cuda_graph or muon or chunked_loss)"
echo "== done; files in $OUT"
