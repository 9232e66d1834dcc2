"""The ``torchkv`` backend: sampling in plain PyTorch over transformers' ``AutoModelForCausalLM``.

Written from ``docs/writing-a-backend.md`` only. Each prompt is one batch of ``n`` identical rows
(no padding, so no attention mask or position bookkeeping), prefilled once and then decoded one
token per step with the model's KV cache (``past_key_values``). Records follow the contract:
raw log-softmax logprobs of the sampled tokens, EOS / stop-completing token kept in ``token_ids``,
``text`` cut before a stop string.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from pydantic import Field

from genbackends import ConfigError, GenerationBackend, GenerationRecord, WeightSyncError
from genbackends.backend import BackendOptions
from genbackends.capabilities import BackendCapabilities
from genbackends.prompts import dataset_from_config
from genbackends.sampling_rules import token_budget
from genbackends.sync_safety import StreamChecker
from genbackends.weights import PhaseTimer, SyncReport, as_weight_source, validate_manifest

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TorchKVOptions(BackendOptions):
    """``options: {torchkv: {...}}`` (BackendOptions: unknown keys are errors)."""

    attn_implementation: Literal["eager", "sdpa"] | None = Field(None, description="transformers attention kernel")


@dataclass
class Completion:
    """One finished completion (raw output of ``forward_step``)."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    stop_reason: str | None = None


@dataclass
class PromptOutput:
    """Everything ``forward_step`` produced for one prompt."""

    request_id: str
    prompt: str
    prompt_token_ids: list[int]
    completions: list[Completion] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None


class TorchKVBackend(GenerationBackend):
    """Greedy / temperature / top-k / top-p sampling with a KV cache (backend name ``torchkv``)."""

    name = "torchkv"
    options_model = TorchKVOptions

    def __init__(self, config: Any, hooks: Any = None):
        super().__init__(config, hooks)
        _refuse_beam_search(config.sampling)
        for knob in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            if getattr(config.parallel, knob) != 1:
                raise ConfigError(f"parallel.{knob}: the torchkv backend runs one model in one process; set it to 1")
        self.model: Any = None
        self.tokenizer: Any = None
        self.device = torch.device("cpu")
        self._home = torch.device("cpu")
        self._eos: set[int] = set()
        self._next_request = 0

    # ---- lifecycle -------------------------------------------------------------------------
    def setup(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg = self.config
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device: cuda was asked for but torch sees no CUDA device; set device: cpu or auto")
        use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        self.device = self._home = torch.device("cuda" if use_cuda else "cpu")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"tokenizer: cannot load {cfg.tokenizer_path!r}: {str(e).splitlines()[0]}") from None
        kwargs: dict[str, Any] = {"dtype": _DTYPES.get(cfg.dtype, "auto")}
        if self.options.attn_implementation:
            kwargs["attn_implementation"] = self.options.attn_implementation
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.model, **kwargs)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model: cannot load {cfg.model!r}: {str(e).splitlines()[0]}") from None
        self.model = model.to(self.device).eval()
        self._eos = _eos_ids(self.tokenizer, self.model)
        # returning marks the backend ready; the base class fires genbackends_on_backend_ready

    def shutdown(self) -> None:
        self.model = None  # the base class marks the backend shut down; later calls raise

    def capabilities(self) -> BackendCapabilities:
        # Moving the weights to the host frees memory only on an accelerator.
        return BackendCapabilities(sleep_levels=(1,) if self._home.type == "cuda" else ())

    def sleep(self, level: int = 1) -> None:
        if self._home.type == "cuda":
            self.model.to("cpu")
            self.device = torch.device("cpu")
            torch.cuda.empty_cache()

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        if self.device != self._home:
            self.model.to(self._home)
            self.device = self._home

    # ---- the four jobs ---------------------------------------------------------------------
    def build_dataset(self, prompts: Any, is_eval: bool = False) -> list[dict[str, Any]]:
        self._require_ready()  # not guarded by the base class: the tokenizer comes with setup()
        return dataset_from_config(prompts, self.tokenizer, self.config)

    def forward_step(self, data: Any, iteration: int = 0, eval_mode: bool = False) -> list[PromptOutput]:
        sp = self.config.sampling.resolved(eval_mode)  # this call's sampling, eval_* applied
        _refuse_beam_search(sp)  # sampling may have changed for this call
        gen = torch.Generator(device=self.device)
        if sp.seed is not None:
            gen.manual_seed(sp.seed + iteration)  # same call, same weights -> same tokens
        else:
            gen.seed()
        outputs = []
        for item in data:
            out = PromptOutput(str(self._next_request), item["prompt"], list(item["input_ids"]))
            self._next_request += 1
            self._generate_prompt(out, sp, gen)
            outputs.append(out)
        return outputs

    def decode_internal(self, batched_outputs: Sequence[PromptOutput]) -> list[GenerationRecord]:
        records = []
        for p_idx, out in enumerate(batched_outputs):  # prompt order, then completion index
            for c_idx, c in enumerate(out.completions):
                records.append(
                    GenerationRecord(
                        request_id=out.request_id,
                        prompt=out.prompt,
                        prompt_token_ids=list(out.prompt_token_ids),
                        index=c_idx,
                        text=c.text,
                        token_ids=list(c.token_ids),
                        logprobs=list(c.logprobs),
                        cumulative_logprob=float(sum(c.logprobs)),
                        finish_reason=c.finish_reason,
                        prompt_logprobs=list(out.prompt_logprobs) if out.prompt_logprobs is not None else None,
                        prompt_index=p_idx,
                        extra={"stop_reason": c.stop_reason},
                    )
                )
        return records

    # ---- weights ---------------------------------------------------------------------------
    def expected_weights(self) -> dict[str, tuple[int, ...]]:
        self._require_ready()
        return {n: tuple(p.shape) for n, p in self.model.named_parameters(remove_duplicate=False)}

    def sync_weights(self, source: Any) -> SyncReport:
        timer = PhaseTimer()
        with timer.phase("validate"):
            src = as_weight_source(source)
            manifest = src.manifest()
            validate_manifest(manifest, self.expected_weights(), what="torchkv model")
            params = dict(self.model.named_parameters(remove_duplicate=False))
        checker = StreamChecker(manifest)  # each bucket vs the manifest, finite values
        backup: list[tuple[torch.Tensor, torch.Tensor]] = []
        count = nbytes = 0
        try:
            with timer.phase("load"), torch.no_grad():
                for i, bucket in enumerate(src.iter_buckets()):
                    checker.check_bucket(bucket, i)  # before any byte of this bucket is written
                    for name, t in bucket:
                        dst = params[name]
                        backup.append((dst, dst.detach().to("cpu", copy=True)))
                        dst.copy_(t.to(dst.device))
                        count += 1
                        nbytes += t.numel() * t.element_size()
                checker.finish()  # every announced tensor arrived
        except Exception as e:
            with torch.no_grad():  # a source that broke its manifest mid-stream: put the old weights back
                for dst, old in reversed(backup):
                    dst.copy_(old.to(dst.device))
            if isinstance(e, WeightSyncError):
                raise
            raise WeightSyncError(f"weight sync failed ({type(e).__name__}: {e}); the previous weights were restored") from e
        # the base class fires genbackends_on_after_sync with this report
        return SyncReport(path="hf", transport="in-process", num_tensors=count, bytes_moved=nbytes,
                          seconds=timer.total, phases=dict(timer.phases))

    # ---- internals -------------------------------------------------------------------------
    def _generate_prompt(self, out: PromptOutput, sp: Any, gen: torch.Generator) -> None:
        ids = out.prompt_token_ids
        rows = sp.n
        limit = token_budget(sp, self.config.seq_length, len(ids))
        x = torch.tensor([ids] * rows, dtype=torch.long, device=self.device)
        tokens: list[list[int]] = [[] for _ in range(rows)]
        lps: list[list[float]] = [[] for _ in range(rows)]
        done: list[Completion | None] = [None] * rows
        with torch.no_grad():
            res = self.model(input_ids=x, use_cache=True)
            if sp.prompt_logprobs is not None:
                plp = torch.log_softmax(res.logits[0, :-1].float(), dim=-1)
                picked = plp.gather(-1, x[0, 1:].unsqueeze(-1)).squeeze(-1).tolist()
                out.prompt_logprobs = [None, *picked]
            past, logits = res.past_key_values, res.logits[:, -1].float()
            for step in range(limit):
                logp = torch.log_softmax(logits, dim=-1)  # raw: before temperature / top-k / top-p
                nxt = self._pick(logits, sp, gen)
                chosen = logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1).tolist()
                for r, (t, lp) in enumerate(zip(nxt.tolist(), chosen)):
                    if done[r] is None:
                        tokens[r].append(t)
                        lps[r].append(lp)
                        done[r] = self._finish(tokens[r], lps[r], sp)
                if all(d is not None for d in done) or step == limit - 1:
                    break
                res = self.model(input_ids=nxt.unsqueeze(-1), past_key_values=past, use_cache=True)
                past, logits = res.past_key_values, res.logits[:, -1].float()
        for r in range(rows):
            out.completions.append(done[r] or Completion(tokens[r], lps[r], self._text(tokens[r]), "length"))

    def _finish(self, toks: list[int], lps: list[float], sp: Any) -> Completion | None:
        """A completion if ``toks`` ends here (stop string or EOS), else None."""
        if sp.stop_strings:
            # the whole prefix each step: a stop string can span token boundaries
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            hits = [(text.find(s), s) for s in sp.stop_strings if s in text]
            if hits:
                pos, stop = min(hits)
                return Completion(list(toks), list(lps), text[:pos], "stop", stop)
        if not sp.ignore_eos and toks[-1] in self._eos:
            return Completion(list(toks), list(lps), self._text(toks), "stop")
        return None

    def _text(self, toks: list[int]) -> str:
        # drop the U+FFFD of an unfinished trailing UTF-8 sequence
        return self.tokenizer.decode(toks, skip_special_tokens=True).rstrip("\ufffd")

    @staticmethod
    def _pick(logits: torch.Tensor, sp: Any, gen: torch.Generator) -> torch.Tensor:
        """Next token per row: argmax for temperature 0, else temperature / top-k / top-p sampling."""
        if sp.temperature == 0:
            return logits.argmax(dim=-1)
        scaled = logits / sp.temperature
        if sp.top_k > 0:
            kth = scaled.topk(min(sp.top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if sp.top_p < 1.0:
            sorted_l, order = scaled.sort(dim=-1, descending=True)
            probs = sorted_l.softmax(dim=-1)
            drop = probs.cumsum(dim=-1) - probs > sp.top_p  # keep the smallest set reaching top_p
            sorted_l = sorted_l.masked_fill(drop, float("-inf"))
            scaled = torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_l)
        return torch.multinomial(scaled.softmax(dim=-1), 1, generator=gen).squeeze(-1)


def _refuse_beam_search(sampling: Any) -> None:
    if sampling.use_beam_search:
        raise ConfigError("sampling.use_beam_search: the torchkv backend only samples; set it false or use backend: hf")


def _eos_ids(tokenizer: Any, model: Any) -> set[int]:
    ids: set[int] = set()
    for v in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return ids
