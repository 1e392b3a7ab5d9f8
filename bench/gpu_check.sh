#!/usr/bin/env bash
# GPU check, one short run on a lent device (about 4 minutes on an H200):
#  1. the CUDA tests (graphed static step vs eager, the engine on graphs vs eager);
#  2. bench.gpu_graphs: 100M and ~1B Llama shapes built on the GPU in bfloat16, K = 3:
#     one model's step graphed vs eager, the engine at c = 1 and 16 graphed vs eager,
#     GPU memory, and graphed-vs-eager exactness. Results: $OUT/gpu_graphs.json.
# FULL=1 also runs the older bench.run matrix (every mode incl. http; ~8 more minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
"$PY" -c 'import torch, transformers; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name(0), torch.__version__, transformers.__version__)'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

echo "== CUDA tests"
"$PY" -m pytest -q -p no:cacheprovider tests/core/test_static_cache.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 \
    || echo "gpu_check: CUDA tests failed (see $OUT/gpu_tests.log)"

echo "== graphed vs eager"
timeout 420 "$PY" -m bench.gpu_graphs --sizes "${SIZES:-100m,1b}" --k 3 --out "$OUT/gpu_graphs.json" \
    2>&1 | tee "$OUT/gpu_graphs.log" | grep -v '^ *"\|^ *[{}]' || true
"$PY" -m bench.gpu_report "$OUT/gpu_graphs.json" | tee "$OUT/gpu_graphs.md" || true

if [ "${FULL:-0}" = 1 ]; then
    common=(--k 3 --concurrency 1,16 --modes single,diy-mix,engine,http --device cuda
            --dtype bfloat16 --new-tokens 64 --diy-requests 4 --overhead-pairs 1
            --models-dir "${MODELS:-/tmp/mpo-bench-models}")
    timeout 270 "$PY" -m bench.run --size 100m --runs 3 "${common[@]}" --out "$OUT/gpu_100m.json" || true
    timeout 180 "$PY" -m bench.run --size 1b --runs 1 "${common[@]}" --out "$OUT/gpu_1b.json" || true
fi

# Adapter family (docs/adapters.md): the 1B base with K = 3 rank-16 LoRA adapters on every
# linear layer, against base-rows / full / base; target (c) adapters / base <= 1.3x.
# Opt-in (ADAPTERS=1): it builds a base, 3 adapters and 3 merged copies (~10 GB in bf16).
if [ "${ADAPTERS:-0}" = 1 ]; then
    timeout 300 "$PY" -m bench.adapters --size 1b --k 3 --rank 16 --concurrency 1,16 --runs 1 \
        --device cuda --dtype bfloat16 --new-tokens 64 \
        --models-dir "${MODELS:-/tmp/mpo-bench-models}/adapters" \
        --out "$OUT/gpu_adapters_1b.json" \
        || echo "gpu_check: the adapter run stopped early (status $?)"
fi
