"""Build a megatron-core ``GPTModel`` that computes what an HF Llama/Qwen2/Qwen3 model computes.

Public API (used by tests, the CPU demo and benchmarks)::

    init_parallel(tp=2, pp=1)                     # torch.distributed must be initialised (gloo/nccl)
    model = build_model(hf_dir, init_parallel_state=False)   # sharded GPTModel chunk(s) of this rank
    load_hf_weights(model, hf_dir)                # inverse mapping: HF tensors -> this rank's shards
    logits = forward_logits(model, input_ids)     # [b, s, hf_vocab] on every rank (pipeline aware)
    lp = forward_logprobs(model, input_ids)       # [b, s-1] logprob of each next token

The model is a :class:`MegatronModel`: the rank's GPTModel chunks (one per virtual pipeline stage)
plus the metadata the adapter needs (dims, parallel layout, this rank's coordinates).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist

from genbackends.errors import WeightSyncError
from genbackends_megatron.cpu_compat import apply_cpu_workarounds, cuda_copies_stay_on_cpu, on_cpu
from genbackends_megatron.layout import (
    MegatronParallel, ModelDims, canonical_megatron_name, hf_layout, megatron_layout, stage_layers,
)
from genbackends_megatron.plan import apply_local, make_plan

Key = tuple[tuple[int, ...], str]


@dataclass
class MegatronModel:
    """This rank's part of a Megatron GPT model and the metadata to map it."""

    chunks: list[Any]  # GPTModel per virtual pipeline stage held by this rank
    dims: ModelDims
    par: MegatronParallel
    pp_rank: int
    tp_rank: int
    dtype: torch.dtype
    ep_rank: int = 0  # expert-parallel rank (MoE; 0 for dense models)
    etp_rank: int = 0  # expert-tensor-parallel rank

    def named_shards(self) -> dict[Key, torch.Tensor]:
        """This rank's parameters keyed like :func:`layout.megatron_layout` (canonical names).

        Accepts ``module.`` wrapper prefixes and Transformer-Engine fused-norm spellings; a
        parameter no table knows raises :class:`WeightSyncError` naming it.
        """
        return shards_from_named_parameters(
            [c.named_parameters() for c in self.chunks], self.dims, self.pp_rank, self.tp_rank, self.ep_rank, self.etp_rank)

    def local_layout(self):
        """The layout entries of this rank's shards."""
        mine = {(self.pp_rank, v, self.tp_rank) for v in range(len(self.chunks))}
        mine |= {(self.pp_rank, v, self.etp_rank, self.ep_rank) for v in range(len(self.chunks))}  # experts
        return {k: s for k, s in megatron_layout(self.dims, self.par, self.dtype).items() if k[0] in mine}


def shards_from_named_parameters(chunk_params, dims: ModelDims, pp_rank: int, tp_rank: int, ep_rank: int = 0,
                                 etp_rank: int = 0) -> dict[Key, torch.Tensor]:
    """Canonical shard keys for named parameters of each virtual-pipeline chunk (expert shards at
    ``(pp, vp, etp_rank, ep_rank)``)."""
    out: dict[Key, torch.Tensor] = {}
    for v, named in enumerate(chunk_params):
        for name, p in named:
            canon = canonical_megatron_name(name, dims)
            if canon is None:
                continue
            loc = (pp_rank, v, etp_rank, ep_rank) if ".local_experts." in canon else (pp_rank, v, tp_rank)
            out[(loc, canon)] = p
    return out


def init_parallel(tp: int = 1, pp: int = 1, vp: int | None = None, backend: str | None = None, *, ep: int = 1,
                  etp: int | None = None) -> None:
    """Initialise torch.distributed (from RANK/WORLD_SIZE/MASTER_* env if needed) and megatron's
    model-parallel groups (``ep``/``etp``: expert parallel and expert tensor parallel sizes, MoE);
    on the CPU also applies the workarounds of :mod:`cpu_compat`."""
    from megatron.core import parallel_state

    if not dist.is_initialized():
        backend = backend or ("gloo" if on_cpu() else "nccl")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29700")
        dist.init_process_group(backend, rank=int(os.environ.get("RANK", 0)),
                                world_size=int(os.environ.get("WORLD_SIZE", 1)))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             virtual_pipeline_model_parallel_size=vp,
                                             expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
    apply_cpu_workarounds()
    if not on_cpu():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(1234)


def transformer_config(dims: ModelDims, par: MegatronParallel, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A megatron ``TransformerConfig`` matching the HF architecture (RMSNorm, SwiGLU, GQA, RoPE)."""
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(
        num_layers=dims.num_layers, hidden_size=dims.hidden_size, num_attention_heads=dims.num_heads,
        num_query_groups=dims.num_kv_heads, kv_channels=dims.head_dim, ffn_hidden_size=dims.intermediate_size,
        normalization="RMSNorm", layernorm_epsilon=dims.norm_eps, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=dims.qkv_bias, qk_layernorm=dims.qk_norm,
        hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=par.tp, pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vp,
        use_cpu_initialization=True, params_dtype=dtype, pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        # Fusions need CUDA kernels (and change numerics); keep the plain paths.
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
    )
    if dims.num_experts:
        kw.update(_moe_config(dims, par))
    if par.first_stage_layers is not None:
        kw["num_layers_in_first_pipeline_stage"] = par.first_stage_layers
    if par.last_stage_layers is not None:
        kw["num_layers_in_last_pipeline_stage"] = par.last_stage_layers
    kw.update(overrides)
    return TransformerConfig(**kw)


def _moe_config(dims: ModelDims, par: MegatronParallel) -> dict[str, Any]:
    """TransformerConfig fields of a Qwen3-MoE-like MoE: softmax router with the top-k
    probabilities renormalised (HF ``norm_topk_prob``: megatron's softmax after top-k), no aux
    loss or capacity (inference numerics), SequentialMLP experts, allgather token dispatcher
    (its collectives all exist on gloo)."""
    return dict(
        num_moe_experts=dims.num_experts, moe_router_topk=dims.moe_top_k, moe_ffn_hidden_size=dims.moe_intermediate_size,
        moe_router_pre_softmax=False, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        moe_grouped_gemm=False, moe_token_dispatcher_type="allgather", moe_router_dtype="fp32",
        expert_model_parallel_size=par.ep, expert_tensor_parallel_size=par.expert_tp,
        # (megatron wants sequence parallelism with MoE x TP only when training; callers add it)
    )


def build_model(
    hf_config: str | Path | Mapping[str, Any] | ModelDims,
    par: MegatronParallel | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    init_parallel_state: bool = True,
    seed: int = 1234,
    transformer_engine: bool = False,
    config_overrides: Mapping[str, Any] | None = None,
) -> MegatronModel:
    """Build this rank's GPTModel chunk(s) for an HF config (folder, dict, or :class:`ModelDims`).

    ``par`` defaults to the TP/PP sizes of the already-initialised megatron parallel state (or
    initialises it when ``init_parallel_state`` and ``par`` is given). Weights are random
    (seeded); call :func:`load_hf_weights` to load an HF checkpoint. ``config_overrides`` go to
    megatron's ``TransformerConfig``.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    dims = hf_config if isinstance(hf_config, ModelDims) else ModelDims.from_hf_config(hf_config)
    if par is None:
        par = MegatronParallel(
            tp=parallel_state.get_tensor_model_parallel_world_size(),
            pp=parallel_state.get_pipeline_model_parallel_world_size(),
            vp=parallel_state.get_virtual_pipeline_model_parallel_world_size(),
            ep=parallel_state.get_expert_model_parallel_world_size(),
            etp=parallel_state.get_expert_tensor_parallel_world_size() if dims.num_experts else None,
        )
    elif init_parallel_state and not parallel_state.model_parallel_is_initialized():
        init_parallel(par.tp, par.pp, par.vp, ep=par.ep, etp=par.etp)
    apply_cpu_workarounds()
    torch.manual_seed(seed)
    # On GPUs, build on the device (CPU initialisation of an 8B model takes minutes); callers
    # may also skip megatron's init (config_overrides={"perform_initialization": False}).
    over = {} if on_cpu() else {"use_cpu_initialization": False}
    over.update(config_overrides or {})
    config = transformer_config(dims, par, dtype, **over)
    if transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=dims.qk_norm)
    else:
        spec = get_gpt_layer_local_spec(num_experts=dims.num_experts or None, moe_grouped_gemm=False,
                                        qk_layernorm=dims.qk_norm, normalization="RMSNorm")
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    vp = par.vp or 1
    chunks = []
    with cuda_copies_stay_on_cpu():
        for v in range(vp):
            chunks.append(GPTModel(
                config=config, transformer_layer_spec=spec, vocab_size=par.padded_vocab(dims.vocab_size),
                max_sequence_length=dims.max_position_embeddings,
                pre_process=pp_rank == 0 and v == 0, post_process=pp_rank == par.pp - 1 and v == vp - 1,
                parallel_output=False, share_embeddings_and_output_weights=dims.tied,
                position_embedding_type="rope", rotary_base=int(dims.rope_theta),
                **({"vp_stage": v} if par.vp else {}),
            ))
    for c in chunks:
        c.eval()
        # Without Apex/TE, megatron's norm falls back to torch's, which ignores params_dtype and
        # the init device: fp32 weights on the CPU. megatron's own Float16Module casts the whole
        # model for mixed precision; do the same, and put them where the other weights are.
        home = torch.device("cpu") if on_cpu() else torch.device("cuda", torch.cuda.current_device())
        for prm in c.parameters():
            if prm.is_floating_point() and (prm.dtype != dtype or prm.device != home):
                prm.data = prm.data.to(device=home, dtype=dtype)
    ep_rank = parallel_state.get_expert_model_parallel_rank() if dims.num_experts else 0
    etp_rank = parallel_state.get_expert_tensor_parallel_rank() if dims.num_experts else 0
    model = MegatronModel(chunks, dims, par, pp_rank, tp_rank, dtype, ep_rank, etp_rank)
    _check_layer_numbers(model)
    return model


def _check_layer_numbers(model: MegatronModel) -> None:
    """The layout's stage-local numbering must agree with megatron's own layer offsets."""
    want = stage_layers(model.dims.num_layers, model.par)
    for v, chunk in enumerate(model.chunks):
        got = [layer.layer_number - 1 for layer in chunk.decoder.layers]
        if got != want[(model.pp_rank, v)]:
            raise WeightSyncError(f"megatron placed layers {got} on pp{model.pp_rank}/vp{v}; the layout expects "
                                  f"{want[(model.pp_rank, v)]}")


def load_hf_state(hf: str | Path | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF tensors from a safetensors folder/file or a dict."""
    if isinstance(hf, Mapping):
        return dict(hf)
    from safetensors.torch import load_file

    p = Path(hf)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


@torch.no_grad()
def load_hf_weights(model: MegatronModel, hf: str | Path | Mapping[str, torch.Tensor]) -> None:
    """Write HF tensors into this rank's shards (inverse of the adapter's mapping; padding zero)."""
    state = load_hf_state(hf)
    dims = model.dims
    if dims.tied:
        state.pop("lm_head.weight", None)  # a tied checkpoint may carry a duplicate
    src = hf_layout(dims, model.dtype)
    missing = [name for (_, name) in src if name not in state]
    if missing:
        raise WeightSyncError(f"HF checkpoint lacks {missing[:5]}")
    plan = make_plan(src, model.local_layout())
    shards = model.named_shards()
    apply_local(plan, lambda k: state[k[1]].to(model.dtype), lambda k: shards[k].data)


def causal_mask(seq: int) -> torch.Tensor:
    """Boolean [1, 1, s, s] mask, True = masked (megatron's default mask is built on CUDA)."""
    dev = "cpu" if on_cpu() else torch.cuda.current_device()
    return torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=dev), diagonal=1)[None, None]


@torch.no_grad()
def forward_logits(model: MegatronModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[b, s, hf_vocab]`` (fp32) on every rank; pipeline stages pass activations p2p.

    Every rank of the model's world must call this with the same ``input_ids``. Virtual pipeline
    chunks run in model order: (stage 0, chunk 0), (stage 1, chunk 0), ..., (stage 0, chunk 1), ...
    """
    from megatron.core import parallel_state

    dev = next(model.chunks[0].parameters()).device
    input_ids = input_ids.to(dev)
    b, s = input_ids.shape
    pos = torch.arange(s, device=dev).unsqueeze(0).expand(b, s)
    mask = causal_mask(s)
    pp = model.par.pp
    vp = len(model.chunks)
    nxt = parallel_state.get_pipeline_model_parallel_next_rank() if pp > 1 else None
    prv = parallel_state.get_pipeline_model_parallel_prev_rank() if pp > 1 else None
    out = None
    for v in range(vp):
        chunk = model.chunks[v]
        first = model.pp_rank == 0 and v == 0
        last = model.pp_rank == pp - 1 and v == vp - 1
        if not first:
            buf = torch.empty(s, b, model.dims.hidden_size, dtype=model.dtype, device=dev)
            dist.recv(buf, src=prv)
            chunk.set_input_tensor(buf)
        y = chunk(input_ids=input_ids, position_ids=pos, attention_mask=mask)
        if last:
            out = y
        else:
            dist.send(y.contiguous(), dst=nxt)
    vocab = model.dims.vocab_size
    if pp > 1:
        last_rank = parallel_state.get_pipeline_model_parallel_last_rank()
        if out is None:
            out = torch.empty(b, s, model.par.padded_vocab(vocab), dtype=model.dtype, device=dev)
        dist.broadcast(out, src=last_rank, group=parallel_state.get_pipeline_model_parallel_group())
    return out[..., :vocab].float()


def forward_logprobs(model: MegatronModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each next token: ``[b, s-1]`` (fp32), over the HF vocab."""
    logits = forward_logits(model, input_ids)
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return lp.gather(-1, input_ids[:, 1:].to(lp.device).unsqueeze(-1)).squeeze(-1)
