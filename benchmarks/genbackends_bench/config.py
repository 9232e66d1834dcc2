"""The benchmark config: one YAML file names the model, the workload and what to measure.

Every backend of a run gets the same prompts (identical token ids), the same sampling and the
same lengths; only ``options.<backend>`` differs (backend-specific engine knobs). Validated once
here with pydantic; errors name the field path and the bad value.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from genbackends.config import format_validation_error
from genbackends.errors import ConfigError

RAW_VLLM = "raw-vllm"
SYNC_PATHS = ("tensors", "safetensors", "megatron-universal", "megatron-direct")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Workload(_Strict):
    """What every backend generates: ``num_prompts`` prompts of exactly ``prompt_tokens`` token
    ids, ``max_new_tokens`` new tokens each (``ignore_eos`` keeps lengths equal)."""

    num_prompts: int = Field(16, ge=1)
    prompt_tokens: int = Field(32, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    batch_size: int | None = Field(None, ge=1, description="prompts per batch (None: all in one batch)")
    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = -1
    ignore_eos: bool = True


class EngineKnobs(_Strict):
    """Engine settings shared by the vLLM rows (our backend and raw vLLM get the same values)."""

    tensor_parallel_size: int = Field(1, ge=1)
    enforce_eager: bool = True
    kv_cache_memory_bytes: int | None = Field(None, ge=1, description="CPU: KV cache size in bytes")
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    max_num_seqs: int | None = Field(None, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=1)


class SyncBench(_Strict):
    """Which ``sync_weights`` paths to time (each against the copy floor of the same bytes)."""

    enabled: bool = True
    paths: list[Literal["tensors", "safetensors", "megatron-universal", "megatron-direct"]] = Field(
        default_factory=lambda: ["tensors", "safetensors", "megatron-universal", "megatron-direct"]
    )
    repeats: int = Field(3, ge=1)
    bucket_bytes: int | None = Field(None, ge=1, description="bucket cap passed to WeightSources")


class SleepBench(_Strict):
    """Sleep/wake cycles to time (and the memory each frees)."""

    enabled: bool = True
    levels: list[Literal[1, 2]] = Field(default_factory=lambda: [1, 2])


class AsyncBench(_Strict):
    """The async row (``async_row.py``): a long-tailed workload (the workload's prompts; most
    responses ``workload.max_new_tokens`` long, ``tail_frac`` of them ``tail_mult`` x longer), time
    until ``consume`` records are consumed, synchronous (batch barrier) vs asynchronous (as they
    finish), and pause("keep") + sync + resume latency with the tail in flight. Runs for every
    listed backend that declares ``async_generation`` (its own worker process)."""

    enabled: bool = False
    tail_frac: float = Field(0.125, gt=0.0, lt=1.0)
    tail_mult: int = Field(10, ge=2)
    consume: int | None = Field(None, ge=1, description="N records; default: the short ones (num_prompts - tail)")


class BenchConfig(_Strict):
    """A whole benchmark run."""

    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9._-]+$", description="results folder name")
    model: str = Field(
        "tiny:llama",
        description="'tiny:<arch>' (genbackends.tiny, real weights), 'synthetic:<preset>' (config.json "
        "+ synthetic tokenizer, dummy weights) or an HF model folder",
    )
    load_format: Literal["auto", "dummy"] = Field("auto", description="'dummy': random weights, no checkpoint read")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"
    seed: int = 0
    seq_length: int | None = Field(None, ge=2, description="default: prompt_tokens + max_new_tokens")
    workload: Workload = Field(default_factory=Workload)
    runs: int = Field(3, ge=1, description="timed runs per backend (median reported)")
    warmup: int = Field(1, ge=0, description="untimed runs before the timed ones")
    engine: EngineKnobs = Field(default_factory=EngineKnobs)
    backends: list[str] = Field(default_factory=lambda: ["vllm", "hf", RAW_VLLM])
    baseline: str = Field(RAW_VLLM, description="row the 'vs baseline' ratio divides by")
    options: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per-backend options blocks")
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-backend dotted GenConfig overrides, e.g. {hf: {'parallel.tensor_parallel_size': 1}}"
    )
    sync: SyncBench = Field(default_factory=SyncBench)
    sleep_wake: SleepBench = Field(default_factory=SleepBench)
    async_rollouts: AsyncBench = Field(default_factory=AsyncBench)
    worker_timeout_s: float = Field(900.0, gt=0)

    @model_validator(mode="after")
    def _lengths(self) -> "BenchConfig":
        need = self.workload.prompt_tokens + self.workload.max_new_tokens * (
            self.async_rollouts.tail_mult if self.async_rollouts.enabled else 1)
        if self.async_rollouts.enabled and (self.async_rollouts.consume or 0) > self.workload.num_prompts:
            raise ValueError(f"async_rollouts.consume {self.async_rollouts.consume} > workload.num_prompts "
                             f"{self.workload.num_prompts}")
        if self.seq_length is None:
            self.seq_length = need
        elif self.seq_length < need:
            raise ValueError(
                f"seq_length {self.seq_length} < workload.prompt_tokens + workload.max_new_tokens "
                f"(x async_rollouts.tail_mult when enabled) = {need}"
            )
        if self.model.startswith("synthetic:") and self.load_format != "dummy":
            raise ValueError(f"model {self.model!r} has no weights; set load_format: dummy")
        return self


def load_bench_config(path: str | Path, overrides: dict[str, Any] | None = None) -> BenchConfig:
    """Read a YAML bench config (``yaml.safe_load``), apply dotted ``overrides`` and validate."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"bench config {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"bench config {str(p)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"bench config {str(p)!r} must be a mapping, got {type(data).__name__}")
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    try:
        return BenchConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(d, "workload.num_prompts", 8)`` sets ``d["workload"]["num_prompts"] = 8``."""
    parts = key.split(".")
    cur = data
    for part in parts[:-1]:
        nxt = cur.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a mapping")
        cur = nxt
    cur[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=3"`` -> ``("a.b", 3)`` (the value parsed as YAML, so numbers/bools/lists work)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)
