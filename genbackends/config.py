"""Config models: every knob of a generation backend, validated once at the edge.

The field names follow the seed's ChatLearn vLLM guide. After :func:`load_config` returns, nothing
downstream re-checks values. Backend-specific knobs live in ``options`` and are validated by the
selected backend's own ``options_model`` (see :meth:`GenConfig.backend_options`).
"""
from __future__ import annotations

from typing import Any, Literal

import typing

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from genbackends.errors import ConfigError


class _Strict(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default. `.inf`/`.nan` are
    # valid YAML floats but no knob means anything with them, so they are refused too.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode turns `n: true` into 1; a boolean where a number is expected is
        # a mistake (YAML `yes`/`on` are booleans too), so it is refused.
        if isinstance(v, bool) and info.field_name is not None:
            ann = cls.model_fields[info.field_name].annotation
            kinds = {ann, *typing.get_args(ann)}
            if bool not in kinds and kinds & {int, float}:
                raise ValueError("must be a number, not a boolean")
        return v


class SamplingConfig(_Strict):
    """Sampling knobs for training rollouts, plus the ``eval_*`` overrides used in eval mode."""

    n: int = Field(1, ge=1, description="completions per prompt (beam width with use_beam_search)")
    ignore_eos: bool = Field(False, description="keep generating past the EOS token")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling: keep the smallest token set with this much probability")
    top_k: int = Field(-1, description="-1 considers all tokens")
    temperature: float = Field(1.0, ge=0.0, description="0 means greedy")
    use_beam_search: bool = Field(False, description="beam search with beam width n (deterministic; temperature ignored)")
    eval_temperature: float | None = Field(None, ge=0.0, description="temperature in eval mode (default: temperature)")
    eval_top_k: int | None = Field(None, description="top_k in eval mode (default: top_k)")
    eval_top_p: float | None = Field(None, gt=0.0, le=1.0, description="top_p in eval mode (default: top_p)")
    stop_token_list: str | None = Field(None, description="stop strings separated by ';'")
    new_token_limit: bool = Field(
        True, description="true: stop at max_new_tokens; false: fill up to seq_length minus the prompt"
    )
    max_new_tokens: int = Field(64, ge=1, description="response token cap (with new_token_limit); max_prompt_length = seq_length - max_new_tokens")
    prompt_logprobs: int | None = Field(None, ge=0, description="None skips prompt logprob computation")
    logprobs: int = Field(0, ge=0, description="extra top-k logprobs per sampled token (the sampled one is always returned)")
    seed: int | None = Field(None, ge=0, description="sampling seed (None: not reproducible)")

    @field_validator("top_k", "eval_top_k")
    @classmethod
    def _top_k(cls, v: int | None) -> int | None:
        if v is not None and v != -1 and v < 1:
            raise ValueError("must be -1 (all tokens) or >= 1")
        return v

    @property
    def stop_strings(self) -> list[str]:
        """``stop_token_list`` split on ';' (empty entries dropped)."""
        if not self.stop_token_list:
            return []
        return [s for s in self.stop_token_list.split(";") if s]

    def resolved(self, eval_mode: bool) -> "SamplingConfig":
        """The sampling to use: the eval overrides applied when ``eval_mode`` is true."""
        if not eval_mode:
            return self
        upd: dict[str, Any] = {}
        if self.eval_temperature is not None:
            upd["temperature"] = self.eval_temperature
        if self.eval_top_k is not None:
            upd["top_k"] = self.eval_top_k
        if self.eval_top_p is not None:
            upd["top_p"] = self.eval_top_p
        return self.model_copy(update=upd)


class SchedulerConfig(_Strict):
    """Batch scheduling limits."""

    max_num_batched_tokens: int | None = Field(None, ge=1, description="tokens per engine step (vLLM); None: engine default")
    max_paddings: int | None = Field(
        None, ge=0, description="accepted for ChatLearn configs; vLLM's V1 engine no longer uses it (logged)"
    )
    max_num_seqs: int | None = Field(None, ge=1, description="sequences per engine step (vLLM) / rows per generate call (hf); None: engine default")


class CacheConfig(_Strict):
    """KV-cache sizing."""

    block_size: int | None = Field(None, ge=1, description="tokens per KV-cache block")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="fraction of accelerator memory the engine may use")
    swap_space: float | None = Field(None, ge=0, description="GiB of host swap (not used by vLLM V1; logged)")
    sliding_window: int | None = Field(None, ge=1, description="attention window override (vLLM takes it from the model config; logged)")
    kv_cache_memory_bytes: int | None = Field(
        None, ge=1, description="KV cache size in bytes; on the CPU this replaces gpu_memory_utilization"
    )


class ParallelConfig(_Strict):
    """How the engine is spread over devices and processes."""

    tensor_parallel_size: int = Field(1, ge=1, description="engine tensor-parallel ranks")
    pipeline_parallel_size: int = Field(1, ge=1, description="engine pipeline stages")
    data_parallel_size: int = Field(1, ge=1, description="engine replicas behind one backend")
    executor: Literal["auto", "mp", "uni", "ray", "external_launcher"] = Field(
        "auto", description="'external_launcher' is the colocated mode (engine inside trainer ranks)"
    )
    replica_placement: Literal["local", "ray"] = Field(
        "local", description="where data-parallel replicas live: this process tree, or Ray actors"
    )


class PromptConfig(_Strict):
    """How prompts become token ids (see :mod:`genbackends.prompts`)."""

    file: str | None = Field(None, description="prompt file: text (one prompt per line) or .jsonl with a 'prompt' field")
    apply_chat_template: bool = Field(False, description="wrap each prompt as a user message with the tokenizer's chat template")
    system_prompt: str | None = Field(None, description="system message added when apply_chat_template is on")
    truncation: Literal["left", "right", "error"] = Field(
        "left",
        description="prompts longer than max_prompt_length tokens: 'left' keeps the last tokens, "
        "'right' keeps the first, 'error' rejects them",
    )
    batch_size: int | None = Field(None, ge=1, description="prompts per forward_step (None: all at once)")


class GenConfig(_Strict):
    """The whole config of one generation backend."""

    backend: str = Field(..., min_length=1, description="registered backend name (`genbackends backends` lists them)")
    model: str = Field(..., min_length=1, description="HF-format model folder")
    tokenizer: str | None = Field(None, description="tokenizer folder (default: model)")
    seq_length: int = Field(..., ge=2, description="prompt + response token budget")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="weights/activations dtype; auto: as saved")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available (backends that run one engine per platform may ignore it)")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    prompts: PromptConfig = Field(default_factory=PromptConfig)
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="backend-specific options keyed by backend name ({vllm: {...}, hf: {...}}); only the "
        "selected backend's block is validated (by its options_model), so switching `backend` keeps working",
    )
    plugins: list[str] | None = Field(
        None, description="allow-list of plugin (entry-point) names to load; None loads all (see GENBACKENDS_PLUGINS)"
    )

    # The file this config was loaded from (set by load_config), so errors found after loading
    # (a backend validating its options block) still name it.
    _source: str | None = PrivateAttr(default=None)

    def set_source(self, path: str | None) -> None:
        """Record the config file this config came from (used in later error messages)."""
        self._source = path

    def __eq__(self, other: object) -> bool:
        # Where a config was loaded from is not part of its value: compare the fields only.
        if not isinstance(other, GenConfig):
            return NotImplemented
        return type(self) is type(other) and self.__dict__ == other.__dict__

    @field_validator("options", mode="before")
    @classmethod
    def _options_keyed(cls, v: Any) -> Any:
        if isinstance(v, dict):
            for key, block in v.items():
                if block is not None and not isinstance(block, dict):
                    raise ValueError(
                        f"options must be keyed by backend name, e.g. 'options: {{vllm: {{...}}}}'; "
                        f"options.{key} is {block!r}"
                    )
            return {k: (b or {}) for k, b in v.items()}
        return v

    @model_validator(mode="after")
    def _prompt_budget(self) -> "GenConfig":
        if self.seq_length - self.sampling.max_new_tokens <= 0:
            raise ValueError(
                f"max_prompt_length = seq_length - sampling.max_new_tokens = {self.seq_length} - "
                f"{self.sampling.max_new_tokens} = {self.seq_length - self.sampling.max_new_tokens}; it must be > 0"
            )
        return self

    @model_validator(mode="after")
    def _greedy_n(self) -> "GenConfig":
        # vLLM refuses n > 1 with greedy sampling (the completions would all be equal); every
        # backend follows, so one config behaves the same on all of them.
        from genbackends.sampling_rules import greedy_n_problem  # the rule is written once, there

        problem = greedy_n_problem(self.sampling)
        if problem:
            raise ValueError(problem)
        return self

    @property
    def max_prompt_length(self) -> int:
        """Tokens a prompt may keep: ``seq_length - max_new_tokens`` (always > 0 once validated)."""
        return self.seq_length - self.sampling.max_new_tokens

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model

    def backend_options(self, model: type[BaseModel], name: str | None = None) -> BaseModel:
        """Validate the options block of backend ``name`` (default: the selected ``backend``) with
        that backend's option model; errors name ``options.<backend>.<field>``."""
        from pydantic import ValidationError

        name = name or self.backend
        try:
            return model.model_validate(self.options.get(name, {}))
        except ValidationError as e:
            msg = format_validation_error(e, prefix=f"options.{name}")
            if self._source:
                msg = msg.replace("invalid config:", f"invalid config {self._source}:", 1)
            raise ConfigError(msg) from None


def format_validation_error(err: Any, prefix: str = "") -> str:
    """One line per problem: ``field.path: message (got <value>)``, joined by '; '."""
    parts = []
    for item in err.errors():
        loc = ".".join(str(x) for x in item.get("loc", ()))
        if prefix:
            loc = f"{prefix}.{loc}" if loc else prefix
        msg = item.get("msg", "invalid")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        got = item.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        parts.append(f"{loc}: {msg}{shown}" if loc else f"{msg}{shown}")
    return "invalid config: " + "; ".join(parts)
