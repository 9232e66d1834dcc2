#!/bin/bash
# On the GPU machine, after ../shared/gpu's assemble.sh has unpacked vLLM 0.24 + megatron-core 0.19.2
# into /tmp/site: make genbackends importable with its entry points (offline, no dependencies
# fetched: the image and the bundle hold them). Source it: `source benchmarks/gpu/setup_gpu.sh`.
source /tmp/gpu-env.sh
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# Keep NVLink multicast off (the workplace's rule for shared hosts).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ! python3 -c "import genbackends_vllm" 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | grep -v "^\s*$" | tail -3
fi
python3 - <<'PY'
import torch, vllm, megatron.core, genbackends
from genbackends.registry import get_registry
r = get_registry()
print("gpu:", torch.cuda.get_device_name(0), "x", torch.cuda.device_count(), "| torch", torch.__version__,
      "| vllm", vllm.__version__, "| megatron-core", megatron.core.__version__,
      "| backends", sorted(r.backends), "| broken", [p.name for p in r.broken_plugins()])
PY
