"""Safetensors export: a live or saved Megatron model -> an HF folder transformers and vLLM load.

* :func:`export_hf` (live, collective over trainer ranks): the universal stream to rank 0, written
  as ``model.safetensors`` plus the HF config (and tokenizer files) copied from ``hf_config``.
* :func:`save_shards` / :func:`export_saved`: each rank saves its shards
  (``megatron_shards/pp{p}_vp{v}_tp{t}.safetensors`` plus ``megatron_meta.json``); a later single
  process turns them into an HF folder by the same plan, without megatron or processes.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from genbackends.errors import WeightSyncError
from genbackends_megatron.layout import MegatronParallel, ModelDims, hf_layout, megatron_layout
from genbackends_megatron.plan import apply_local, make_plan

_HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt")


def _copy_side_files(hf_config: str | Path | None, out: Path) -> None:
    if hf_config is None:
        return
    src = Path(hf_config)
    for name in _HF_SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)


def _write(tensors: dict[str, torch.Tensor], out: Path, dims: ModelDims) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt", "exported_by": "genbackends_megatron", "arch": dims.arch})


def export_hf(model: Any, out_dir: str | Path, hf_config: str | Path | None = None) -> Path | None:
    """Collective: every trainer rank calls it; rank 0 writes the folder and returns its path."""
    from genbackends_megatron.source import MegatronWeightSource

    src = MegatronWeightSource(model, engine_ranks=(0,))
    tensors: dict[str, torch.Tensor] = {}
    for bucket in src.iter_buckets():
        for name, t in bucket:
            tensors[name] = t.detach().clone().cpu()
    if src.topo.rank != 0:
        return None
    out = Path(out_dir)
    _write(tensors, out, model.dims)
    _copy_side_files(hf_config, out)
    return out


def save_shards(model: Any, out_dir: str | Path, hf_config: str | Path | None = None) -> None:
    """Each rank writes its own shards (canonical names) and rank 0 the metadata."""
    from safetensors.torch import save_file

    out = Path(out_dir) / "megatron_shards"
    out.mkdir(parents=True, exist_ok=True)
    by_loc: dict[tuple, dict[str, torch.Tensor]] = {}
    for (loc, name), t in model.named_shards().items():
        by_loc.setdefault(loc, {})[name] = t.detach().contiguous().cpu()
    dp0 = True
    try:
        from megatron.core import parallel_state as ps

        dp0 = ps.get_data_parallel_rank() == 0
    except Exception:  # pragma: no cover
        pass
    if dp0:
        for (p, v, t), tensors in by_loc.items():
            save_file(tensors, str(out / f"pp{p}_vp{v}_tp{t}.safetensors"))
    if model.pp_rank == 0 and model.tp_rank == 0 and dp0:
        meta = {"dims": asdict(model.dims), "parallel": asdict(model.par), "dtype": str(model.dtype).replace("torch.", "")}
        (out / "megatron_meta.json").write_text(json.dumps(meta, indent=1))
        _copy_side_files(hf_config, out)


def export_saved(shards_dir: str | Path, out_dir: str | Path) -> Path:
    """Single process, no megatron needed: saved shards -> HF folder, by the plan."""
    from safetensors.torch import load_file

    d = Path(shards_dir)
    if (d / "megatron_shards").is_dir():
        d = d / "megatron_shards"
    meta_p = d / "megatron_meta.json"
    if not meta_p.is_file():
        raise WeightSyncError(f"{str(meta_p)!r} not found: pass a folder written by save_shards")
    meta = json.loads(meta_p.read_text())
    dims, par = ModelDims(**meta["dims"]), MegatronParallel(**meta["parallel"])
    dtype = getattr(torch, meta["dtype"])
    layout = megatron_layout(dims, par, dtype)
    shards: dict = {}
    for (loc, name) in layout:
        f = d / f"pp{loc[0]}_vp{loc[1]}_tp{loc[2]}.safetensors"
        if not f.is_file():
            raise WeightSyncError(f"missing shard file {f.name} in {str(d)!r}")
        if loc not in shards:
            shards[loc] = load_file(str(f))
        if name not in shards[loc]:
            raise WeightSyncError(f"{f.name} lacks Megatron parameter {name!r}")
        if tuple(shards[loc][name].shape) != layout[(loc, name)].shape:
            raise WeightSyncError(f"{f.name}: {name} has shape {tuple(shards[loc][name].shape)}, expected {layout[(loc, name)].shape}")
    target = hf_layout(dims, dtype)
    plan = make_plan(layout, target)
    tensors = {name: torch.empty(spec.shape, dtype=dtype) for (_, name), spec in target.items()}
    apply_local(plan, lambda k: shards[k[0]][k[1]], lambda k: tensors[k[1]])
    out = Path(out_dir)
    _write(tensors, out, dims)
    _copy_side_files(d, out)
    return out
