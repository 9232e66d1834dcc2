"""Weight sources for the ``sync_weights`` timings, and the copy floor they are held against.

Paths timed (each a different way bytes reach the engine):

* ``tensors``: a dict of HF-named tensors already on the engine's device (in-process hand-off);
* ``safetensors``: a folder of HF-named ``*.safetensors`` files (read from disk by the backend);
* ``megatron-universal`` / ``megatron-direct``: a live Megatron-core ``GPTModel`` (world size 1)
  through the Megatron adapter's universal (gather -> HF names -> buckets) and direct (plan ->
  write into the engine's parameters) paths.

The copy floor is the time to copy the same tensors once on the same device into a scratch
buffer (2 x bytes of memory traffic): no sync of those bytes can be faster.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch


def hf_state_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """HF parameter names and shapes of the model folder's architecture (built on the meta device,
    so an 8B shape costs nothing)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {n: tuple(p.shape) for n, p in model.state_dict().items() if not n.endswith("rotary_emb.inv_freq")}


def hf_tensors(model_dir: Path, device: str, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF-named tensors for a sync: the folder's own weights when it has them (so outputs stay the
    same), else small random values of the right names and shapes (dummy-weight models)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update({k: v.to(device=device, dtype=dtype) for k, v in load_file(str(f)).items()})
        return out
    gen = torch.Generator(device=device).manual_seed(seed)
    # On the CPU, drawing 8e9 normals one by one takes minutes: tile one random block instead
    # (values only need to be finite and non-degenerate; timings do not depend on them).
    block = torch.empty(1 << 20, device=device, dtype=dtype).normal_(0.0, 0.02, generator=gen) if device == "cpu" else None
    out = {}
    for name, shape in hf_state_shapes(model_dir).items():
        t = torch.empty(shape, device=device, dtype=dtype)
        if "norm" in name:
            t.fill_(1.0)
        elif block is not None:
            flat = t.view(-1)
            for lo in range(0, flat.numel(), block.numel()):
                n = min(block.numel(), flat.numel() - lo)
                flat[lo : lo + n].copy_(block[:n])
        else:
            t.normal_(0.0, 0.02, generator=gen)
        out[name] = t
    return out


def write_safetensors(tensors: dict[str, torch.Tensor], out_dir: Path, shard_bytes: int = 4 << 30) -> Path:
    """Write tensors the way HF checkpoints are laid out: ``model.safetensors``, or shards
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json`` (what
    transformers' ``from_pretrained`` and vLLM look for)."""
    import json

    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    weight_map = {}
    for i, names in enumerate(shards):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: tensors[k].detach().to("cpu").contiguous() for k in names}, str(out_dir / fname),
                  metadata={"format": "pt"})
        weight_map.update({k: fname for k in names})
    if n > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return out_dir


def copy_floor_seconds(tensors: list[torch.Tensor], repeats: int = 3) -> dict[str, float]:
    """Median time to copy every tensor once into a scratch buffer on its own device, and the
    bandwidth that implies (bytes read + written per second)."""
    if not tensors:
        return {"seconds": 0.0, "bytes": 0, "bandwidth_bytes_per_s": 0.0}
    device = tensors[0].device
    biggest = max(t.numel() * t.element_size() for t in tensors)
    scratch = torch.empty(biggest, dtype=torch.uint8, device=device)
    cuda = device.type == "cuda"
    nbytes = sum(t.numel() * t.element_size() for t in tensors)

    def once() -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for t in tensors:
            n = t.numel() * t.element_size()
            scratch[:n].view(t.dtype).view(t.shape).copy_(t)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def median_of(threads: int | None) -> float:
        prev = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            once()  # warm-up (allocator, page faults)
            times = sorted(once() for _ in range(repeats))
        finally:
            torch.set_num_threads(prev)
        return times[len(times) // 2]

    # On a CPU, each copy_ of a large tensor opens an OpenMP parallel region; on a busy machine
    # waking the second thread can cost milliseconds per tensor, so the floor is the faster of
    # the process's thread setting and one thread (a floor is the best the bytes can move at).
    per_threads = {"default": median_of(None)}
    if not cuda:
        per_threads["1-thread"] = median_of(1)
    secs = min(per_threads.values())
    del scratch
    return {"seconds": secs, "bytes": nbytes, "bandwidth_bytes_per_s": 2 * nbytes / secs if secs > 0 else 0.0,
            "by_threads": per_threads}


class MegatronSide:
    """A Megatron-core GPTModel matching the model folder, in this process (world size 1), and the
    adapter's sources over it. Built lazily; ``error`` says why it is unavailable."""

    def __init__(self, model_dir: Path, device: str, dtype: torch.dtype, port: int):
        self.model_dir, self.device, self.dtype, self.port = model_dir, device, dtype, port
        self.side: Any = None
        self.error: str | None = None
        self.build_s: float | None = None

    def build(self) -> bool:
        if self.side is not None or self.error is not None:
            return self.error is None
        t0 = time.perf_counter()
        try:
            from genbackends_bench import megatron_glue

            self.side = megatron_glue.build_single_rank_model(self.model_dir, self.device, self.dtype, self.port)
        except Exception as e:  # recorded in the results as the reason the row is missing
            self.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        self.build_s = time.perf_counter() - t0
        return self.error is None

    def source(self, path: str, bucket_bytes: int | None) -> Any:
        from genbackends_bench import megatron_glue

        return megatron_glue.make_source(self.side, path, bucket_bytes)

    def manifest_tensors(self) -> list[torch.Tensor]:
        """The trainer-side parameter tensors (the bytes a sync starts from)."""
        return [p.detach() for p in self.side.parameters()]
