"""The HF transformers backend: the reference every other backend is compared with.

It runs ``model.generate`` on any machine (CPU or GPU), batched with left padding, and follows
vLLM's output semantics so records from both backends compare field by field:

* ``logprobs`` are log-softmax of the model's **raw** logits (before temperature, top-k, top-p),
  like vLLM's default ``logprobs_mode="raw_logprobs"``; they come from the very logits the token
  was sampled from (``output_logits``), not from a second forward pass;
* ``temperature: 0`` is greedy; ``n > 1`` repeats each prompt ``n`` times and samples each row
  independently (greedy with ``n > 1`` is a config error, as in vLLM);
* EOS / stop strings / token limits end a completion as :mod:`genbackends_hf.finishing` says;
* beam search (``use_beam_search``) uses ``generate(num_beams=n)``; its per-token logprobs are
  computed by one forward pass over each returned beam.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from genbackends.backend import GenerationBackend
from genbackends.errors import BackendStateError, ConfigError, WeightSyncError
from genbackends.prompts import dataset_from_config
from genbackends.capabilities import BackendCapabilities
from genbackends.records import GenerationRecord
from genbackends.rollouts import AsyncRolloutsMixin
from genbackends.sampling_rules import pad_token_id, token_budget
from genbackends.weights import PhaseTimer, SyncReport, as_weight_source, validate_manifest

from genbackends_hf.finishing import Finish, RowStopper, finish_row

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFOptions(BaseModel):
    """Options of the ``hf`` backend (``options: {hf: {...}}``)."""

    model_config = ConfigDict(extra="forbid")

    attn_implementation: Literal["eager", "sdpa"] | None = Field(None, description="transformers attention kernel")
    trust_remote_code: bool = False
    sync_bucket_bytes: int | None = Field(None, ge=1, description="cap on one bucket of a weight sync")
    sync_rollback: bool = Field(
        True,
        description="atomic syncs: keep a copy (on the parameter's device) of each tensor a sync overwrites, so a "
        "sync that fails at any point (the source raises or breaks its manifest, a NaN further on) restores the "
        "old weights; costs one copy of the synced weights while the sync runs (SyncReport phase 'snapshot')",
    )
    sync_check_finite: bool = Field(
        True,
        description="refuse a sync holding NaN/Inf values, checked before each bucket is written (one fused "
        "max-abs reduction per bucket; phase 'check_finite'); false skips the check",
    )


@dataclass
class HFCompletion:
    """One completion as the HF backend produced it (raw output of ``forward_step``)."""

    token_ids: list[int]
    logprobs: list[float]
    finish: Finish
    top_logprobs: list[dict[int, float]] | None = None  # with sampling.logprobs > 0


@dataclass
class HFPromptOutput:
    """Everything ``forward_step`` produced for one prompt."""

    request_id: str
    prompt: str
    prompt_token_ids: list[int]
    completions: list[HFCompletion] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None  # with prompt_logprobs > 0


class HFBackend(AsyncRolloutsMixin, GenerationBackend):
    """Generation on HF transformers' ``generate`` (backend name ``hf``)."""

    name = "hf"
    options_model = HFOptions

    def __init__(self, config: Any, hooks: Any = None):
        super().__init__(config, hooks)
        _check_config(config)
        self.model: Any = None
        self.tokenizer: Any = None
        self.device = torch.device("cpu")
        self._home_device = torch.device("cpu")
        self._next_request = 0
        self._eos_ids: set[int] = set()

    def capabilities(self) -> BackendCapabilities:
        """HF-named tensors only (a safetensors folder is read into them in this process: the
        ``"hf"`` path); ``sleep`` frees memory only on a GPU (weights to host; level 2 = level 1)."""
        on_gpu = self.config.device == "cuda" or (self.config.device == "auto" and torch.cuda.is_available())
        return BackendCapabilities(sync_paths=frozenset({"hf"}), sleep_levels=(1, 2) if on_gpu else (), async_generation=True)

    def _make_rollout_engine(self) -> Any:
        """Asynchronous rollouts: a scheduler thread doing continuous batching (async_engine.py)."""
        self._require_ready()
        from genbackends_hf.async_engine import HFRolloutEngine

        return HFRolloutEngine(self)

    # ---- lifecycle -----------------------------------------------------------------------
    def setup(self) -> None:
        """Load tokenizer and model from ``config.model`` onto ``config.device``."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg = self.config
        want = cfg.device
        if want == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device: cuda was asked for but torch sees no CUDA device; set device: cpu or auto")
        self.device = torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")
        self._home_device = self.device
        # Local folders only (nothing is downloaded): a missing path must not surface as the hub's
        # "Repo id must be in the form ..." nor a corrupt file as a bare SafetensorError.
        _check_model_folder(cfg.model, "model")
        if cfg.tokenizer:
            _check_model_folder(cfg.tokenizer, "tokenizer", need_config=False)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path, trust_remote_code=self.options.trust_remote_code)
        except Exception as e:  # noqa: BLE001 - any loader failure becomes one line naming the path
            raise ConfigError(f"tokenizer: cannot load {cfg.tokenizer_path!r}: {_first_line(e)}") from None
        kwargs: dict[str, Any] = {"dtype": _DTYPES.get(cfg.dtype, "auto"), "trust_remote_code": self.options.trust_remote_code}
        if self.options.attn_implementation:
            kwargs["attn_implementation"] = self.options.attn_implementation
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.model, **kwargs)
        except Exception as e:  # noqa: BLE001 - any loader failure becomes one line naming the path
            raise ConfigError(f"model: cannot load {_broken_file(cfg.model)!r}: {_first_line(e)}") from None
        self.model = model.to(self.device).eval()
        self._eos_ids = _eos_ids(self.tokenizer, self.model)
        # The model's own generation defaults (eos, top_k=50, ...) would be merged into every
        # call; all sampling comes from our config instead, so start from a neutral config.
        from transformers import GenerationConfig

        self.model.generation_config = GenerationConfig(
            pad_token_id=self._pad_id(), bos_token_id=self.model.generation_config.bos_token_id
        )
        self._mark_ready()  # the base class fires genbackends_on_backend_ready

    def shutdown(self) -> None:
        """Drop the model; a later ``generate`` raises."""
        self._stop_rollouts()
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._mark_shutdown()

    def sleep(self, level: int = 1) -> None:
        """Move the weights to host memory (GPU only; a no-op on the CPU). Level 2 behaves like
        level 1: transformers has nothing cheaper to drop than the weights themselves."""
        self._require_ready()
        if level not in (1, 2):  # the same contract as vllm, even where both levels act alike
            raise ConfigError(f"sleep level must be 1 or 2, got {level!r}")
        before = torch.cuda.memory_allocated() if self.device.type == "cuda" else 0
        if self.device.type == "cuda":
            self.model.to("cpu")
            self.device = torch.device("cpu")
            torch.cuda.empty_cache()
        after = torch.cuda.memory_allocated() if self._home_device.type == "cuda" else 0
        self._add_event_stats(freed_bytes=float(before - after))  # the base class fires the hook

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Move the weights back to the device they were loaded on."""
        self._require_ready()
        if tags is not None:
            bad = [t for t in tags if t not in ("weights", "kv_cache")]
            if bad or isinstance(tags, str):
                raise ConfigError(f"wake_up tags must be 'weights' and/or 'kv_cache', got {bad or tags!r}")
        if self.device != self._home_device:
            self.model.to(self._home_device)
            self.device = self._home_device
        used = torch.cuda.memory_allocated() if self.device.type == "cuda" else 0
        self._add_event_stats(used_bytes=float(used))  # the base class fires the hook

    # ---- the four jobs -------------------------------------------------------------------
    def build_dataset(self, prompts: Any, is_eval: bool = False) -> list[dict[str, Any]]:
        """Prompts -> ``{"prompt", "input_ids"}`` items with this model's tokenizer."""
        if self.tokenizer is None:
            raise BackendStateError("backend 'hf' is not set up; call setup() first")
        return dataset_from_config(prompts, self.tokenizer, self.config)

    def forward_step(self, data: Any, iteration: int = 0, eval_mode: bool = False) -> list[HFPromptOutput]:
        """Generate for a batch of dataset items (or lists of token ids); one
        :class:`HFPromptOutput` per prompt, in order."""
        self._require_ready()
        items = [_as_item(d, self.tokenizer) for d in data]
        if not items:
            return []
        sp = self.config.sampling.resolved(eval_mode)
        if sp.seed is not None:
            torch.manual_seed(sp.seed + iteration)
        outputs = []
        for it in items:
            outputs.append(HFPromptOutput(str(self._next_request), it["prompt"], list(it["input_ids"])))
            self._next_request += 1
        if sp.use_beam_search:
            self._beam_search(outputs, sp)
        else:
            self._sample(outputs, sp)
        if sp.prompt_logprobs is not None:
            scored, tops = self._score([o.prompt_token_ids for o in outputs], top_k=sp.prompt_logprobs)
            for o, lp, top in zip(outputs, scored, tops):
                o.prompt_logprobs = [None, *lp]
                if sp.prompt_logprobs:
                    o.prompt_top_logprobs = [None, *top]
        return outputs

    def decode_internal(self, batched_outputs: Sequence[HFPromptOutput]) -> list[GenerationRecord]:
        """One record per (prompt, completion), prompt order then completion index."""
        records = []
        for p_idx, out in enumerate(batched_outputs):
            for c_idx, c in enumerate(out.completions):
                # the same extra keys as the vLLM backend where transformers has the information
                extra: dict[str, Any] = {"stop_reason": c.finish.stop_reason}
                if c.top_logprobs is not None:
                    extra["top_logprobs"] = c.top_logprobs
                if out.prompt_top_logprobs is not None:
                    extra["prompt_top_logprobs"] = out.prompt_top_logprobs
                records.append(
                    GenerationRecord(
                        request_id=out.request_id,
                        prompt=out.prompt,
                        prompt_token_ids=list(out.prompt_token_ids),
                        index=c_idx,
                        text=c.finish.text,
                        token_ids=list(c.token_ids),
                        logprobs=list(c.logprobs),
                        cumulative_logprob=float(sum(c.logprobs)),
                        finish_reason=c.finish.reason,
                        prompt_logprobs=list(out.prompt_logprobs) if out.prompt_logprobs is not None else None,
                        prompt_index=p_idx,
                        extra=extra,
                    )
                )
        return records

    # ---- weights -------------------------------------------------------------------------
    def expected_weights(self) -> dict[str, tuple[int, ...]]:
        """HF names and shapes this model accepts (tied weights appear under both names)."""
        self._require_ready()
        return {n: tuple(p.shape) for n, p in self.model.named_parameters(remove_duplicate=False)}

    def sync_weights(self, source: Any, *, version: int | None = None) -> SyncReport:
        """Copy HF-named tensors into the model after validating names and shapes of the whole
        sync; a rejected sync writes nothing. With asynchronous rollouts running, only between
        ``pause()`` and ``resume()``; the weight version is bumped (or set to ``version``)."""
        if self._rollouts is not None:
            return self._rollouts.sync_weights(lambda: self._sync_weights_now(source), source, version)
        return self._sync_weights_now(source)

    def _sync_weights_now(self, source: Any) -> SyncReport:
        """The sync itself, atomic: names and shapes of the whole sync are validated first, each
        bucket is checked against the manifest (shape, dtype) and for finite values before it is
        written, and a sync that fails part way restores every tensor it overwrote (options
        ``sync_rollback``, ``sync_check_finite``; ``docs/reliability.md``)."""
        from genbackends.sync_safety import RESTORED, UNCHANGED, StreamChecker, failure_message, refuse_non_float

        self._require_ready()
        timer = PhaseTimer()
        with timer.phase("validate"):
            src = as_weight_source(source)
            manifest = src.manifest()
            validate_manifest(manifest, self.expected_weights(), what="hf model")
            refuse_non_float(manifest)  # a silent cast of int/bool weights is never what the caller meant
            params = dict(self.model.named_parameters(remove_duplicate=False))
        checker = StreamChecker(manifest, check_finite=self.options.sync_check_finite)
        backup: list[tuple[torch.Tensor, torch.Tensor]] = []
        count = nbytes = 0
        try:
            with torch.no_grad():
                for i, bucket in enumerate(src.iter_buckets(self.options.sync_bucket_bytes)):
                    with timer.phase("check"):
                        checker.check_bucket(bucket, i)  # before any byte of the bucket is written
                    for name, t in bucket:
                        dst = params[name]
                        if self.options.sync_rollback:
                            with timer.phase("snapshot"):
                                backup.append((dst, dst.detach().clone()))
                        with timer.phase("load"):
                            dst.copy_(t.to(dst.device, non_blocking=True))
                        count += 1
                        nbytes += t.numel() * t.element_size()
                checker.finish()
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
        except Exception as e:
            if backup or count == 0:
                with torch.no_grad(), timer.phase("restore"):
                    for dst, old in reversed(backup):
                        dst.copy_(old)
                raise WeightSyncError(failure_message(e, RESTORED if count else UNCHANGED)) from e
            raise WeightSyncError(failure_message(
                e, "options.hf.sync_rollback is off, so the model may hold a mix of old and new weights")) from e
        timer.phases["check_finite"] = checker.seconds_finite
        report = SyncReport(
            path="hf-named-copy",
            transport="in-process",
            num_tensors=count,
            bytes_moved=nbytes,
            seconds=timer.total,
            phases=dict(timer.phases),
            details={"snapshot_bytes": sum(o.numel() * o.element_size() for _, o in backup)},
        )
        return report  # the base class fires genbackends_on_after_sync

    # ---- internals -----------------------------------------------------------------------
    def _pad_id(self) -> int:
        return pad_token_id(self.tokenizer)

    def _limits(self, prompt_lens: Sequence[int], sp: Any) -> list[int]:
        """Per-prompt new-token limit (the shared rule, :func:`genbackends.sampling_rules.token_budget`)."""
        return [token_budget(sp, self.config.seq_length, n) for n in prompt_lens]

    def _left_pad(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self._pad_id(), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _chunks(self, n_rows: int) -> list[range]:
        cap = self.config.scheduler.max_num_seqs or n_rows
        return [range(s, min(n_rows, s + cap)) for s in range(0, n_rows, cap)]

    def _gen_config(self, sp: Any, max_new: int, **extra: Any) -> Any:
        from transformers import GenerationConfig

        greedy = sp.temperature == 0 or sp.use_beam_search
        kw: dict[str, Any] = dict(
            max_new_tokens=max_new,
            do_sample=not greedy,
            eos_token_id=None if sp.ignore_eos else sorted(self._eos_ids) or None,
            pad_token_id=self._pad_id(),
            return_dict_in_generate=True,
            output_logits=True,
        )
        if not greedy:
            # top_k 0 disables top-k in transformers (None would fall back to its default of 50)
            kw.update(temperature=sp.temperature, top_k=0 if sp.top_k == -1 else sp.top_k, top_p=sp.top_p)
        kw.update(extra)
        return GenerationConfig(**kw)

    def _sample(self, outputs: list[HFPromptOutput], sp: Any) -> None:
        from transformers import StoppingCriteriaList

        # Rows: prompt-major, n completions each, sampled independently.
        rows = [(i, o.prompt_token_ids) for i, o in enumerate(outputs) for _ in range(sp.n)]
        limits = self._limits([len(r) for _, r in rows], sp)
        for chunk in self._chunks(len(rows)):
            ids, mask = self._left_pad([rows[j][1] for j in chunk])
            ch_limits = [limits[j] for j in chunk]
            stopper = RowStopper(ids.shape[1], ch_limits, self.tokenizer, sp.stop_strings)
            with torch.no_grad():
                res = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    generation_config=self._gen_config(sp, max(ch_limits)),
                    stopping_criteria=StoppingCriteriaList([stopper]),
                )
            gen = res.sequences[:, ids.shape[1] :].tolist()
            # raw logits -> log-softmax in fp32, gathered at the sampled tokens: [rows, steps]
            steps = len(res.logits)
            if steps:
                logits = torch.stack(res.logits, dim=1).float()
                chosen = res.sequences[:, ids.shape[1] : ids.shape[1] + steps]
                logp = torch.log_softmax(logits, dim=-1)
                lps = logp.gather(-1, chosen.unsqueeze(-1)).squeeze(-1).tolist()
                tops = _top_dicts(logp, chosen, sp.logprobs) if sp.logprobs else None
            else:
                lps, tops = [[] for _ in chunk], None
            for k, j in enumerate(chunk):
                fin = finish_row(
                    gen[k],
                    self.tokenizer,
                    limit=ch_limits[k],
                    eos_ids=self._eos_ids,
                    ignore_eos=sp.ignore_eos,
                    stops=sp.stop_strings,
                )
                outputs[rows[j][0]].completions.append(
                    HFCompletion(gen[k][: fin.length], lps[k][: fin.length], fin,
                                 tops[k][: fin.length] if tops is not None else None)
                )

    def _beam_search(self, outputs: list[HFPromptOutput], sp: Any) -> None:
        # Beam search is deterministic; done per prompt because beams of different prompts
        # share nothing and the per-prompt limit may differ.
        for o in outputs:
            limit = self._limits([len(o.prompt_token_ids)], sp)[0]
            ids, mask = self._left_pad([o.prompt_token_ids])
            gc = self._gen_config(sp, limit, num_beams=sp.n, num_return_sequences=sp.n, output_logits=False)
            with torch.no_grad():
                res = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
            beams = []
            for seq in res.sequences[:, ids.shape[1] :].tolist():
                fin = finish_row(seq, self.tokenizer, limit=limit, eos_ids=self._eos_ids, ignore_eos=sp.ignore_eos, stops=sp.stop_strings)
                beams.append((seq[: fin.length], fin))
            scored, tops = self._score([o.prompt_token_ids + b[0] for b in beams], top_k=sp.logprobs)
            p = len(o.prompt_token_ids)
            for (toks, fin), lp, top in zip(beams, scored, tops):
                o.completions.append(HFCompletion(toks, lp[p - 1 :], fin, top[p - 1 :] if sp.logprobs else None))

    def _score(
        self, seqs: Sequence[Sequence[int]], top_k: int | None = 0
    ) -> tuple[list[list[float]], list[list[dict[int, float]]]]:
        """Log-probs of tokens 1.. of each sequence under the model (raw log-softmax, fp32), and
        with ``top_k`` the top-k alternatives per position (else empty lists).

        Right padding: real tokens keep positions 0..len-1, and causal attention means the
        trailing pads never influence them.
        """
        out: list[list[float]] = []
        out_top: list[list[dict[int, float]]] = []
        for chunk in self._chunks(len(seqs)):
            rows = [list(seqs[j]) for j in chunk]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self._pad_id(), dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            lp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            tops = _top_dicts(logp, ids[:, 1:], top_k) if top_k else None
            for i, r in enumerate(rows):
                out.append(lp[i, : len(r) - 1].tolist())
                out_top.append(tops[i][: len(r) - 1] if tops is not None else [])
        return out, out_top


# Engine knobs transformers has no counterpart for: accepted (one config serves every backend),
# reported once per backend when set, never silently dropped.
_UNUSED_BY_HF = {
    "scheduler": ("max_num_batched_tokens", "max_paddings"),
    "cache": ("block_size", "gpu_memory_utilization", "swap_space", "sliding_window", "kv_cache_memory_bytes"),
}


def _check_config(config: Any) -> None:
    """Reject what the HF backend cannot do; log the engine knobs it does not use."""
    par = config.parallel
    for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
        if getattr(par, name) != 1:
            raise ConfigError(
                f"parallel.{name}: the hf backend runs one model in one process (got {getattr(par, name)}); "
                "set it to 1 or use backend: vllm"
            )
    if par.executor not in ("auto", "uni") or par.replica_placement != "local":
        raise ConfigError(
            f"parallel.executor={par.executor!r}, parallel.replica_placement={par.replica_placement!r}: "
            "the hf backend supports only executor auto/uni with local placement"
        )
    unused = [
        f"{section}.{knob}={getattr(getattr(config, section), knob)!r}"
        for section, knobs in _UNUSED_BY_HF.items()
        for knob in knobs
        if knob in getattr(config, section).model_fields_set
    ]
    if unused:
        logging.getLogger("genbackends.hf").info(
            "the hf backend does not use these engine settings (they size vLLM's scheduler and KV cache): %s",
            ", ".join(unused),
        )


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _check_model_folder(path: str, what: str, need_config: bool = True) -> None:
    """Fail before loading if ``path`` is not a local HF-format folder."""
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what}: model folder {path!r} does not exist")
    if not p.is_dir():
        raise ConfigError(f"{what}: {path!r} is a file; expected an HF-format model folder")
    if need_config and not (p / "config.json").is_file():
        raise ConfigError(f"{what}: {path!r} has no config.json (expected an HF-format model folder)")


def _broken_file(folder: str) -> str:
    """The first unreadable ``*.safetensors`` file of ``folder`` (the folder when all open)."""
    from pathlib import Path

    from safetensors import safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception:  # noqa: BLE001 - this is the file to name
            return str(f)
    return folder


def _top_dicts(logp: torch.Tensor, chosen: torch.Tensor, k: int) -> list[list[dict[int, float]]]:
    """Per row and step: the ``k`` most likely tokens and the chosen one -> logprob (vLLM's
    shape of ``logprobs=k``)."""
    vals, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)
    picked = logp.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
    rows = []
    for r in range(logp.shape[0]):
        steps = []
        for t in range(logp.shape[1]):
            d = {int(i): float(v) for i, v in zip(idx[r, t].tolist(), vals[r, t].tolist())}
            d.setdefault(int(chosen[r, t]), float(picked[r, t]))
            steps.append(d)
        rows.append(steps)
    return rows


def _eos_ids(tokenizer: Any, model: Any) -> set[int]:
    """EOS ids from the tokenizer and the model's generation config (vLLM stops on both)."""
    ids: set[int] = set()
    for v in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return ids


def _as_item(d: Any, tokenizer: Any) -> dict[str, Any]:
    """A dataset item, or a bare list of token ids (the prompt text is then decoded)."""
    if isinstance(d, dict) and "input_ids" in d:
        return {"prompt": d.get("prompt") or tokenizer.decode(d["input_ids"]), "input_ids": list(d["input_ids"])}
    if isinstance(d, (list, tuple)) and all(isinstance(t, int) for t in d):
        if not d:
            raise ValueError("forward_step got an empty list of token ids")
        return {"prompt": tokenizer.decode(list(d)), "input_ids": list(d)}
    raise TypeError(f"forward_step items must be dataset dicts or lists of token ids, got {type(d).__name__}")
