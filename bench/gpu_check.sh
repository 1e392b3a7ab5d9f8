#!/usr/bin/env bash
# GPU check: the 100M and ~1B configurations on CUDA in bfloat16, K = 3, concurrency 1
# and 16, every mode; prints the same table and ratios as the CPU benchmark.
# Budget: under 8 minutes on one H100 (model building included). Results land in
# ${OUT:-bench/results}/gpu_*.json, gpu_tables.md and gpu_throughput.png.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=${OUT:-bench/results}
MODELS=${MODELS:-/tmp/mpo-bench-models}
mkdir -p "$OUT"
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name(0))'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

common=(--k 3 --concurrency 1,16 --modes single,diy-mix,engine,http --device cuda
        --dtype bfloat16 --new-tokens 64 --diy-requests 4 --overhead-pairs 1
        --models-dir "$MODELS")
# 100M: medians of 3 runs; ~1B: one run (its build and load dominate the budget)
# (bench.run writes its JSON after every worker, so a timeout keeps what was measured)
rm -f "$OUT/gpu_100m.json" "$OUT/gpu_1b.json"
timeout 270 "$PY" -m bench.run --size 100m --runs 3 "${common[@]}" --out "$OUT/gpu_100m.json" \
    || echo "gpu_check: the 100M matrix stopped early (status $?); reporting what finished"
timeout 180 "$PY" -m bench.run --size 1b --runs 1 "${common[@]}" --out "$OUT/gpu_1b.json" \
    || echo "gpu_check: the 1B matrix stopped early (status $?); reporting what finished"
results=()
for f in "$OUT/gpu_100m.json" "$OUT/gpu_1b.json"; do [ -f "$f" ] && results+=("$f"); done
"$PY" -m bench.report "${results[@]}" --markdown "$OUT/gpu_tables.md" \
    --plot "$OUT/gpu_throughput.png"
# Adapter family (docs/adapters.md): the 1B base with K = 3 rank-16 LoRA adapters on every
# linear layer, against base-rows / full / base; target (c) adapters / base <= 1.3x.
# Opt-in (ADAPTERS=1): it builds a base, 3 adapters and 3 merged copies (~10 GB in bf16).
if [ "${ADAPTERS:-0}" = 1 ]; then
    timeout 300 "$PY" -m bench.adapters --size 1b --k 3 --rank 16 --concurrency 1,16 --runs 1 \
        --device cuda --dtype bfloat16 --new-tokens 64 --models-dir "$MODELS/adapters" \
        --out "$OUT/gpu_adapters_1b.json" \
        || echo "gpu_check: the adapter run stopped early (status $?)"
fi
