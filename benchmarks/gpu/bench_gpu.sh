#!/usr/bin/env bash
# GPU benchmarks (H100): our vLLM backend vs raw vLLM vs HF, every sync path vs the copy floor,
# sleep/wake, on Llama-shaped 1B and 8B models with dummy weights (no network, no checkpoints).
#
#   bash benchmarks/gpu/bench_gpu.sh 1b          # ~4-5 min
#   bash benchmarks/gpu/bench_gpu.sh 8b-vllm     # ~5 min: vllm + raw-vllm rows, sync, sleep/wake
#   bash benchmarks/gpu/bench_gpu.sh 8b-hf       # ~3 min: the HF row, appended to the same result
#   bash benchmarks/gpu/bench_gpu.sh cpu-debug   # the same code paths at toy size on a CPU
#
# Results go to $OUT/<name>/results.{json,md,png} (+ worker_logs.json); $OUT defaults to
# benchmarks/results. On the GPU machine (vLLM 0.24, megatron-core 0.19.2, torch 2.11 cu130 from
# shared/gpu's bundle in /tmp/site) it sources benchmarks/gpu/setup_gpu.sh first, which makes
# genbackends importable with its entry points.
set -euo pipefail
cd "$(dirname "$0")/../.."
what="${1:-1b}"
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
if [ -f /tmp/gpu-env.sh ] && [ -f benchmarks/gpu/setup_gpu.sh ]; then
  # shellcheck disable=SC1091
  source benchmarks/gpu/setup_gpu.sh
fi
PY="${PYTHON:-python3}"
export VLLM_ENABLE_V1_MULTIPROCESSING=0       # engines in the worker process (memory + direct sync)
export VLLM_USE_FLASHINFER_SAMPLER="${VLLM_USE_FLASHINFER_SAMPLER:-0}"   # FlashInfer is not bundled

"$PY" - <<'PYEOF'
import importlib, sys
for m in ("genbackends", "genbackends_bench", "genbackends_vllm", "genbackends_hf", "genbackends_megatron"):
    importlib.import_module(m)
from genbackends.registry import get_registry
names = sorted(get_registry().backends)
print("backends:", names, file=sys.stderr)
assert {"vllm", "hf"} <= set(names), "genbackends is not installed with its entry points (pip install -e . --no-deps)"
PYEOF

case "$what" in
  1b)        "$PY" -m genbackends_bench benchmarks/configs/gpu-llama-1b.yaml --results "$OUT" ;;
  8b-vllm)   "$PY" -m genbackends_bench benchmarks/configs/gpu-llama-8b.yaml --backends vllm,raw-vllm --results "$OUT" ;;
  8b-hf)     "$PY" -m genbackends_bench benchmarks/configs/gpu-llama-8b.yaml --backends hf --append --results "$OUT" ;;
  cpu-debug) "$PY" -m genbackends_bench benchmarks/configs/gpu-debug-cpu.yaml --results "$OUT" ;;
  *) echo "usage: $0 1b|8b-vllm|8b-hf|cpu-debug" >&2; exit 2 ;;
esac
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>/dev/null || true
