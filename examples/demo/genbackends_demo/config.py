"""The demo's knobs (a pydantic model; defaults are the CPU run, ``configs/gpu.yaml`` the GPU one)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from genbackends.config import format_validation_error
from genbackends.errors import ConfigError

DEFAULT_PROMPTS = [
    "The quick brown",
    "A policy samples",
    "Tensor parallel splits",
    "The engine keeps a",
]


class DemoConfig(BaseModel):
    """Everything one demo run needs."""

    model_config = ConfigDict(extra="forbid")

    backend: str = Field("vllm", description="generation backend (any registered name: vllm, hf, ...)")
    device: Literal["cpu", "cuda"] = "cpu"
    tp: int | None = Field(None, ge=1, description="Megatron TP size (default: 2 if 2 cores/GPUs, else 1)")
    arch: Literal["llama", "qwen2", "qwen3"] = "llama"
    seed: int = 0
    phases: int = Field(3, ge=1, description="training phases (each followed by sync + generate)")
    steps_per_phase: int = Field(3, ge=1, description="Adam steps per phase (few: the corpus is tiny, so progress is visible phase by phase)")
    lr: float = Field(1e-3, gt=0)
    max_new_tokens: int = Field(40, ge=1)
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), min_length=1)
    kv_cache_memory_bytes: int = Field(32 << 20, ge=1, description="vLLM KV cache on the CPU")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    placement: Literal["auto", "colocated", "rank0"] = Field(
        "auto",
        description="where the engine lives: 'colocated' (vLLM inside every trainer rank, TP = trainer TP, "
        "external_launcher), 'rank0' (one engine on trainer rank 0); auto: colocated for vllm with TP > 1",
    )
    sync_path: Literal["auto", "universal", "direct"] = Field("auto", description="Megatron adapter path")
    master_port: int = Field(29900, ge=1024, le=65535)
    work_dir: str | None = Field(None, description="where the tiny HF model folder goes (default: a temp dir)")
    json_out: str | None = Field(None, description="also write the per-phase results as JSON here")
    async_mode: bool = Field(
        False,
        description="asynchronous rounds (genbackends demo --async): records consumed as they finish, a "
        "pause('keep') -> sync -> resume() while long responses are in flight (docs/async.md)",
    )
    async_short_tokens: int = Field(8, ge=1, description="async mode: length of most responses")
    async_long_tokens: int = Field(80, ge=2, description="async mode: length of the long tail (~10x the short ones)")
    async_long_requests: int = Field(2, ge=1, description="async mode: how many long responses per round")

    @model_validator(mode="after")
    def _async_placement(self) -> "DemoConfig":
        if self.async_mode and self.placement == "colocated":
            raise ValueError("placement: asynchronous rollouts run on one engine on trainer rank 0; "
                             "use placement rank0 (or auto) with async_mode")
        if self.async_mode and self.async_long_tokens <= self.async_short_tokens:
            raise ValueError(f"async_long_tokens ({self.async_long_tokens}) must exceed async_short_tokens "
                             f"({self.async_short_tokens}): the long tail is what the sync lands in")
        return self

    def resolved_tp(self) -> int:
        """TP size: the configured one, else 2 when the machine has 2 cores (CPU) or 2 GPUs."""
        if self.tp is not None:
            return self.tp
        if self.device == "cuda":
            import torch

            return 2 if torch.cuda.device_count() >= 2 else 1
        return 2 if (os.cpu_count() or 1) >= 2 else 1


    def resolved_placement(self, tp: int) -> str:
        """``colocated`` or ``rank0`` (see ``placement``)."""
        if self.placement != "auto":
            return self.placement
        if self.async_mode:
            return "rank0"  # the asynchronous engines are local (AsyncLLM / the HF scheduler thread)
        return "colocated" if self.backend == "vllm" and tp > 1 else "rank0"


def load_demo_config(path: str | None, overrides: dict) -> DemoConfig:
    """Read an optional YAML file, apply command-line values, validate (one-line errors)."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"demo config {path!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"demo config {path!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return DemoConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
