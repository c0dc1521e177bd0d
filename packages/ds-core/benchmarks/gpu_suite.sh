#!/usr/bin/env bash
# One device call: GPU pytest of ds-core + ds-models, then the benchmarks, JSON + logs under $OUT.
#   bash packages/ds-core/benchmarks/gpu_suite.sh [tests] [mlp] [attn] [models]   (default: all)
# Run from the repository root on a CUDA machine (the lent H100); OUT defaults to ./gpu_out.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=packages/ds-core/src:packages/ds-models/src:packages/ds-core/benchmarks${PYTHONPATH:+:$PYTHONPATH}
parts=${*:-tests mlp attn models}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
python3 -m pip list 2>/dev/null | grep -iE "^(torch|triton|transformers|pytest|hypothesis) " >> "$OUT/gpu.txt"
has() { [[ " $parts " == *" $1 "* ]]; }
if has tests; then
  python3 -c "import hypothesis" 2>/dev/null || echo "hypothesis missing" >> "$OUT/gpu.txt"
  # real GPU kernels (TRITON_INTERPRET=0): CPU-tensor tests of the kernels move to the GPU
  TRITON_INTERPRET=0 timeout 300 python3 -m pytest packages/ds-core/tests packages/ds-models/tests \
    -q -n 8 -rfE --tb=short --import-mode=importlib -p no:cacheprovider -o addopts="" > "$OUT/pytest_gpu.txt" 2>&1
  tail -3 "$OUT/pytest_gpu.txt"
fi
if has mlp; then
  timeout 240 python3 packages/ds-core/benchmarks/bench_sparse_mlp.py ${MLP_ARGS:-} --out "$OUT/sparse_mlp.json" > "$OUT/mlp.txt" 2>&1
  grep "^ratio 0" "$OUT/mlp.txt"; tail -36 "$OUT/mlp.txt"
fi
if has attn; then
  timeout 240 python3 packages/ds-core/benchmarks/bench_attention.py --check-dtypes bfloat16 --layers 8 --reps 100 \
    --skip prefill --out "$OUT/attention.json" > "$OUT/attn.txt" 2>&1
  tail -8 "$OUT/attn.txt"
fi
if has models; then
  timeout ${MODEL_TIMEOUT:-300} python3 packages/ds-models/benchmarks/bench_decode.py --out "$OUT/decode.json" ${MODEL_ARGS:-} > "$OUT/models.txt" 2>&1
  grep -E "^\[" "$OUT/models.txt" | cut -c1-220
fi
