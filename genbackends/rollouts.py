"""The asynchronous side of the backend contract: streamed, interruptible rollouts.

Engine-neutral pieces every asynchronous backend shares (no engine is imported here):

* :class:`RolloutRequest`: what to generate (prompt text, token ids, or a :class:`Session` turn),
  with per-request sampling overrides validated by :class:`~genbackends.config.SamplingConfig`;
* :class:`RecordStream`: the thread-safe, completion-ordered record queue behind
  ``async for record in backend.stream()``, with exact accounting (every submitted request comes
  back exactly once: finished, aborted by ``pause("abort")`` or cancelled);
* :class:`RolloutEngine`: the abstract engine (HF scheduler thread, vLLM ``AsyncLLM``) with the
  contract ``submit`` / ``stream`` / ``cancel`` / ``pause(mode)`` / ``resume`` and weight versions;
* :class:`AsyncRolloutsMixin`: the methods a backend exposes (``backend.submit(...)``, ...).

Pause modes (applied at a step boundary of the engine):

* ``"abort"``: in-flight requests end now; each comes back as a partial record with its tokens
  and logprobs so far and ``finish_reason="abort"``;
* ``"wait"``: admission stops, in-flight requests finish first, then the engine is idle;
* ``"keep"``: in-flight requests are frozen; after :meth:`RolloutEngine.resume` they go on. A
  ``sync_weights`` in between makes them continue on the new weights: the engine recomputes the
  KV cache of their prefix with the new weights, so every sampled token's logprob is the one of
  the weights that sampled it.

Weight versions: the engine starts at version 0 (or what the caller sets); each sync bumps it by
one, or sets it to ``sync_weights(..., version=v)``. Each record carries ``weight_version`` (the
version of its last token) and ``weight_versions`` = ``[(start token index, version), ...]``.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Literal, Sequence

from pydantic import ValidationError

from genbackends.config import SamplingConfig
from genbackends.errors import BackendStateError, ConfigError, PromptError
from genbackends.records import GenerationRecord
from genbackends.sampling_rules import greedy_n_problem

PauseMode = Literal["abort", "wait", "keep"]
PAUSE_MODES: tuple[str, ...] = ("abort", "wait", "keep")
ABORT_REASON = "abort"


# ---- requests --------------------------------------------------------------------------------
def resolve_sampling(base: SamplingConfig, overrides: dict[str, Any] | None, where: str = "sampling") -> SamplingConfig:
    """``base`` with ``overrides`` applied, validated like the config (errors name the field)."""
    if not overrides:
        return base
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: per-request sampling must be a dict, got {type(overrides).__name__}")
    try:
        sp = SamplingConfig.model_validate({**base.model_dump(exclude_unset=False), **overrides})
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{where}.{loc}: {err['msg']} (got {err.get('input')!r})") from None
    if sp.use_beam_search:
        raise ConfigError(f"{where}.use_beam_search: beam search is not offered by asynchronous rollouts")
    problem = greedy_n_problem(sp)  # the shared rule (genbackends.sampling_rules), not a copy
    if problem:
        raise ConfigError(f"{where}: {problem}")
    return sp


@dataclass
class RolloutRequest:
    """One asynchronous request: exactly one of ``prompt`` (text), ``prompt_token_ids`` or
    ``session`` (continue that conversation from its current end). ``sampling`` overrides the
    config's sampling for this request only; ``n > 1`` becomes ``n`` requests (ids
    ``<request_id>-<i>``; with a seed, completion ``i`` uses ``seed + i``)."""

    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    session: "Session | None" = None
    sampling: dict[str, Any] | None = None
    request_id: str | None = None

    def check(self, index: int = 0) -> None:
        given = [k for k in ("prompt", "prompt_token_ids", "session") if getattr(self, k) is not None]
        if len(given) != 1:
            raise PromptError(f"request {index}: give exactly one of prompt, prompt_token_ids, session (got {given or 'none'})")
        if self.prompt is not None and not self.prompt.strip():
            raise PromptError(f"request {index}: prompt is empty")
        if self.prompt_token_ids is not None:
            if not self.prompt_token_ids or not all(isinstance(t, int) for t in self.prompt_token_ids):
                raise PromptError(f"request {index}: prompt_token_ids must be a non-empty list of ints")


def as_requests(items: Any) -> list[RolloutRequest]:
    """One request, a string, a token-id list, a :class:`Session`, a dict of request fields, or a
    list of those -> a list of :class:`RolloutRequest` (checked)."""
    if isinstance(items, (RolloutRequest, str, Session, dict)) or (
        isinstance(items, list) and items and all(isinstance(t, int) for t in items)
    ):
        items = [items]
    out = []
    for i, it in enumerate(items):
        if isinstance(it, RolloutRequest):
            req = it
        elif isinstance(it, str):
            req = RolloutRequest(prompt=it)
        elif isinstance(it, Session):
            req = RolloutRequest(session=it)
        elif isinstance(it, dict):
            try:
                req = RolloutRequest(**it)
            except TypeError as e:
                raise PromptError(f"request {i}: {e}") from None
        elif isinstance(it, (list, tuple)):
            req = RolloutRequest(prompt_token_ids=[int(t) for t in it])
        else:
            raise PromptError(f"request {i}: expected a prompt string, token ids, Session or RolloutRequest, got {type(it).__name__}")
        req.check(i)
        out.append(req)
    if not out:
        raise PromptError("submit needs at least one request")
    return out


@dataclass
class Admitted:
    """A request after id assignment and sampling resolution, as an engine receives it."""

    request_id: str
    prompt: str
    prompt_token_ids: list[int]
    sampling: SamplingConfig
    index: int = 0
    session: "Session | None" = None


# ---- multi-turn sessions ---------------------------------------------------------------------
class Session:
    """A multi-turn conversation: an initial prompt, then model turns and appended tool /
    environment tokens. Submit it (``backend.submit(session)``) for the next model turn; when the
    turn's record arrives the session is extended with the response. :meth:`to_record` gives the
    record of the whole conversation: ``token_ids`` = everything after the initial prompt,
    ``loss_mask`` 1 on model tokens and 0 on appended ones, ``logprobs`` the model's logprobs (0.0
    at appended positions).

    Continuing a session resubmits prompt + everything so far; engines with a prefix cache (vLLM)
    reuse the KV of that prefix (``record.extra["num_cached_tokens"]``).
    """

    _ids = itertools.count()

    def __init__(self, prompt_token_ids: Sequence[int], prompt: str = "", session_id: str | None = None,
                 messages: list[dict[str, str]] | None = None):
        if not prompt_token_ids:
            raise PromptError("session: prompt_token_ids is empty")
        self.session_id = session_id or f"session-{next(Session._ids)}"
        self.prompt = prompt
        self.prompt_token_ids = [int(t) for t in prompt_token_ids]
        self.token_ids: list[int] = []
        self.loss_mask: list[int] = []
        self.logprobs: list[float] = []
        self.weight_versions: list[tuple[int, int]] = []
        self.turn_records: list[GenerationRecord] = []
        self.messages = list(messages) if messages is not None else None
        self.busy = False  # a turn is in flight

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def from_messages(cls, messages: list[dict[str, str]], tokenizer: Any, session_id: str | None = None) -> "Session":
        """A session whose prompt is ``messages`` through the tokenizer's chat template (with the
        generation prompt)."""
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
        return cls(ids, prompt=text, session_id=session_id, messages=messages)

    @property
    def context(self) -> list[int]:
        """Prompt + everything after it: what the next turn is generated from."""
        return self.prompt_token_ids + self.token_ids

    def append(self, token_ids: Sequence[int]) -> None:
        """Append tool / environment tokens (not the model's: mask 0)."""
        self._idle("append")
        toks = [int(t) for t in token_ids]
        self.token_ids += toks
        self.loss_mask += [0] * len(toks)
        self.logprobs += [0.0] * len(toks)

    def append_text(self, text: str, tokenizer: Any) -> list[int]:
        """Append ``text`` tokenized without special tokens; returns the appended ids."""
        ids = tokenizer.encode(text, add_special_tokens=False)
        self.append(ids)
        return ids

    def append_messages(self, messages: list[dict[str, str]], tokenizer: Any) -> list[int]:
        """Append chat messages (e.g. a tool result) through the chat template: the template's
        close of the model's last turn, the new messages and the next generation prompt. The
        model's own tokens are kept as generated (never re-tokenized)."""
        self._idle("append_messages")
        if self.messages is None:
            raise PromptError("session: append_messages needs a session made with Session.from_messages")
        hist = self.messages
        before = tokenizer.apply_chat_template(hist, tokenize=False, add_generation_prompt=False)
        after = tokenizer.apply_chat_template(hist + list(messages), tokenize=False, add_generation_prompt=True)
        closing = ""
        if hist and hist[-1]["role"] == "assistant":
            opened = tokenizer.apply_chat_template(hist[:-1], tokenize=False, add_generation_prompt=True)
            start = opened + hist[-1]["content"]
            if not before.startswith(start):
                raise PromptError("session: the chat template does not render the assistant turn as opened prompt + content")
            closing = before[len(start):]
        if not after.startswith(before):
            raise PromptError("session: the chat template re-renders earlier turns differently; append token ids instead")
        ids = self.append_text(closing + after[len(before):], tokenizer)
        self.messages = hist + list(messages)
        return ids

    def add_response(self, record: GenerationRecord) -> None:
        """Extend with a model turn (called by the engine when the turn's record is ready)."""
        start = len(self.token_ids)
        self.token_ids += list(record.token_ids)
        self.loss_mask += [1] * len(record.token_ids)
        self.logprobs += list(record.logprobs)
        for tok_idx, ver in record.weight_versions or []:
            if not self.weight_versions or self.weight_versions[-1][1] != ver:
                self.weight_versions.append((start + tok_idx, ver))
        self.turn_records.append(record)
        if self.messages is not None:
            self.messages = self.messages + [{"role": "assistant", "content": record.text}]
        self.busy = False

    def to_record(self, tokenizer: Any = None) -> GenerationRecord:
        """The whole conversation as one record (see the class docstring)."""
        last = self.turn_records[-1] if self.turn_records else None
        text = tokenizer.decode(self.token_ids, skip_special_tokens=True) if tokenizer is not None else ""
        return GenerationRecord(
            request_id=self.session_id,
            prompt=self.prompt,
            prompt_token_ids=list(self.prompt_token_ids),
            index=0,
            text=text,
            token_ids=list(self.token_ids),
            logprobs=list(self.logprobs),
            cumulative_logprob=float(sum(lp for lp, m in zip(self.logprobs, self.loss_mask) if m)),
            finish_reason=last.finish_reason if last else None,
            extra={"turns": len(self.turn_records)},
            weight_version=last.weight_version if last else None,
            weight_versions=list(self.weight_versions) or None,
            loss_mask=list(self.loss_mask),
        )

    def _idle(self, what: str) -> None:
        if self.busy:
            raise BackendStateError(f"session {self.session_id}: {what} while a model turn is in flight")


# ---- records out -----------------------------------------------------------------------------
class RecordStream:
    """Completion-ordered records, fed from any thread, consumed by ``async for``.

    Accounting: :meth:`expect` counts a submitted request, :meth:`put` its one record; a second
    record for the same id is a bug and raises. ``pending`` = submitted and not yet put.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready: collections.deque[GenerationRecord] = collections.deque()
        self._outstanding: set[str] = set()
        self._done: set[str] = set()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._closed: BaseException | None = None

    def expect(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._outstanding or request_id in self._done:
                raise PromptError(f"request id {request_id!r} was already submitted")
            self._outstanding.add(request_id)

    def put(self, record: GenerationRecord) -> None:
        with self._lock:
            rid = record.request_id
            if rid not in self._outstanding:
                raise RuntimeError(f"record for request {rid!r}, which is not outstanding (duplicate or unknown)")
            self._outstanding.discard(rid)
            self._done.add(rid)
            self._ready.append(record)
            self._wake()

    def fail(self, err: BaseException) -> None:
        """The engine died: wake every consumer with ``err``."""
        with self._lock:
            self._closed = err
            self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for loop, ev in waiters:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # that loop is closed: its consumer is gone
                pass

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._outstanding)

    def outstanding(self) -> set[str]:
        with self._lock:
            return set(self._outstanding)

    async def records(self, max_records: int | None = None, timeout: float | None = None) -> AsyncIterator[GenerationRecord]:
        """Yield records as they complete; stop after ``max_records``, or when nothing is
        pending and everything was yielded. ``timeout`` (s) bounds each wait."""
        got = 0
        loop = asyncio.get_running_loop()
        while max_records is None or got < max_records:
            with self._lock:
                if self._ready:
                    rec = self._ready.popleft()
                elif self._closed is not None:
                    raise BackendStateError(f"rollout engine stopped: {self._closed}") from self._closed
                elif not self._outstanding:
                    return
                else:
                    rec = None
                    ev = asyncio.Event()
                    self._waiters.append((loop, ev))
            if rec is None:
                try:
                    await asyncio.wait_for(ev.wait(), timeout)
                except asyncio.TimeoutError:
                    raise TimeoutError(f"no record within {timeout} s ({self.pending} pending)") from None
                continue
            got += 1
            yield rec


# ---- the engine contract ---------------------------------------------------------------------
class RolloutEngine(ABC):
    """One asynchronous engine. Subclasses implement the ``_``-methods; the public methods do
    the engine-neutral bookkeeping (ids, sampling, accounting, weight versions, sessions)."""

    def __init__(self, base_sampling: SamplingConfig, tokenizer: Any = None, weight_version: int = 0):
        self.base_sampling = base_sampling
        self.tokenizer = tokenizer
        self.records = RecordStream()
        self.weight_version = int(weight_version)
        self.paused: str | None = None
        self._ids = itertools.count()
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    # -- public --------------------------------------------------------------------------------
    def submit(self, requests: Any, sampling: dict[str, Any] | None = None) -> list[str]:
        """Queue one or many requests (see :func:`as_requests`); ``sampling`` applies to all of
        them (a request's own ``sampling`` wins). Returns the request ids, one per completion.
        Requests submitted while paused start after :meth:`resume`."""
        reqs = as_requests(requests)
        admitted: list[Admitted] = []
        for i, r in enumerate(reqs):
            sp = resolve_sampling(self.base_sampling, {**(sampling or {}), **(r.sampling or {})}, where=f"request {i} sampling")
            if r.session is not None:
                if r.session.busy:
                    raise BackendStateError(f"session {r.session.session_id} already has a turn in flight")
                if sp.n != 1:
                    raise ConfigError(f"request {i} sampling.n: a session turn takes n=1 (got {sp.n})")
                ids, text = r.session.context, r.session.prompt
            elif r.prompt_token_ids is not None:
                ids = list(r.prompt_token_ids)
                text = self.tokenizer.decode(ids) if self.tokenizer is not None else ""
            else:
                if self.tokenizer is None:
                    raise PromptError(f"request {i}: text prompts need a tokenizer; pass prompt_token_ids")
                ids, text = self.tokenizer.encode(r.prompt), r.prompt
            base_id = r.request_id or f"req-{next(self._ids)}"
            for k in range(sp.n):
                rid = base_id if sp.n == 1 else f"{base_id}-{k}"
                one = sp.model_copy(update={"n": 1, "seed": None if sp.seed is None else sp.seed + k})
                admitted.append(Admitted(rid, text, list(ids), one, index=k, session=r.session))
        with self._lock:
            for a in admitted:
                self.records.expect(a.request_id)
                if a.session is not None:
                    a.session.busy = True
                    self._sessions[a.request_id] = a.session
            self._submit(admitted)
        return [a.request_id for a in admitted]

    def stream(self, max_records: int | None = None, timeout: float | None = None) -> AsyncIterator[GenerationRecord]:
        """``async for record in engine.stream()``: records in completion order (see
        :meth:`RecordStream.records`)."""
        return self.records.records(max_records, timeout)

    @property
    def pending(self) -> int:
        """Submitted requests whose record has not been produced yet."""
        return self.records.pending

    def cancel(self, request_id: str) -> bool:
        """End one request now; it comes back as a partial record with ``finish_reason="abort"``
        (``extra["abort_cause"] = "cancel"``). False if it already finished."""
        if request_id not in self.records.outstanding():
            return False
        return self._cancel(request_id)

    async def pause(self, mode: PauseMode = "keep") -> None:
        """Pause at the next step boundary (see the module docstring for the modes); returns
        once the engine is idle."""
        if mode not in PAUSE_MODES:
            raise ConfigError(f"pause mode must be one of {', '.join(PAUSE_MODES)}, got {mode!r}")
        if self.paused is not None:
            raise BackendStateError(f"already paused (mode {self.paused!r}); call resume() first")
        await self._pause(mode)
        self.paused = mode

    async def resume(self) -> None:
        """Continue after :meth:`pause`: frozen requests go on (on new weights if a sync ran),
        queued ones are admitted."""
        if self.paused is None:
            raise BackendStateError("resume() without pause()")
        await self._resume()
        self.paused = None

    def progress(self, request_id: str) -> int:
        """Tokens generated so far by an in-flight request (0 if unknown or finished)."""
        return 0

    def set_weight_version(self, version: int) -> None:
        """Label the weights now in the engine (records produced from now on carry it)."""
        self.weight_version = int(version)
        self._version_changed()

    def sync_weights(self, do_sync: Callable[[], Any], source: Any, version: int | None = None) -> Any:
        """Load new weights (only while paused, or with nothing in flight), then bump or set the
        weight version. ``do_sync()`` is the backend's own synchronous sync; engines whose weights
        live elsewhere (vLLM ``AsyncLLM``) move ``source`` themselves."""
        if self.paused is None and self.pending:
            raise BackendStateError(
                f"sync_weights with {self.pending} request(s) in flight: call pause('keep'|'wait'|'abort') first"
            )
        report = self._sync(do_sync, source)
        self.set_weight_version(self.weight_version + 1 if version is None else version)
        return report

    def shutdown(self) -> None:
        """Stop the engine; pending requests are lost (the stream raises)."""
        self._shutdown()
        self.records.fail(BackendStateError("rollout engine shut down"))

    # -- for subclasses ------------------------------------------------------------------------
    def _deliver(self, record: GenerationRecord) -> None:
        """Hand a finished (or aborted) record to the stream; extends its session first."""
        with self._lock:
            session = self._sessions.pop(record.request_id, None)
        if session is not None:
            session.add_response(record)
            record.extra["session_id"] = session.session_id
        self.records.put(record)

    def _version_changed(self) -> None:
        """Hook: the weight version changed (engines tracking versions themselves override)."""

    def _sync_alone(self, source: Any) -> Any:
        """Load ``source`` into this engine only (as one replica of a
        :class:`ReplicatedRolloutEngine`); same conditions as :meth:`_sync`."""
        raise NotImplementedError(f"{type(self).__name__} cannot be a replica")

    @abstractmethod
    def _submit(self, admitted: list[Admitted]) -> None: ...

    @abstractmethod
    def _cancel(self, request_id: str) -> bool: ...

    @abstractmethod
    async def _pause(self, mode: str) -> None: ...

    @abstractmethod
    async def _resume(self) -> None: ...

    @abstractmethod
    def _sync(self, do_sync: Callable[[], Any], source: Any) -> Any: ...

    @abstractmethod
    def _shutdown(self) -> None: ...


class ReplicatedRolloutEngine(RolloutEngine):
    """Data-parallel replicas behind one contract. A request goes to the replica with the fewest
    requests in flight (a session's turns stay on the replica that served its first turn, for
    its prefix cache); one record stream, one weight version; pause, resume and syncs reach
    every replica (a sync loads the same source into each, one after the other)."""

    def __init__(self, replicas: Sequence[RolloutEngine]):
        if not replicas:
            raise ValueError("ReplicatedRolloutEngine needs at least one replica")
        first = replicas[0]
        super().__init__(first.base_sampling, first.tokenizer, first.weight_version)
        self.replicas = list(replicas)
        for r in self.replicas:
            # replicas deliver straight into the shared stream, session table and lock
            r.records, r._sessions, r._lock = self.records, self._sessions, self._lock
            r.weight_version = self.weight_version
        self._owner: dict[str, int] = {}
        self._home: dict[str, int] = {}

    def progress(self, request_id: str) -> int:
        k = self._owner.get(request_id)
        return 0 if k is None else self.replicas[k].progress(request_id)

    def _submit(self, admitted: list[Admitted]) -> None:
        outstanding = self.records.outstanding()
        self._owner = {rid: k for rid, k in self._owner.items() if rid in outstanding}
        load = [0] * len(self.replicas)
        for k in self._owner.values():
            load[k] += 1
        parts: dict[int, list[Admitted]] = {}
        for a in admitted:
            sid = a.session.session_id if a.session is not None else None
            k = self._home[sid] if sid in self._home else min(range(len(load)), key=load.__getitem__)
            if sid is not None:
                self._home[sid] = k
            load[k] += 1
            self._owner[a.request_id] = k
            parts.setdefault(k, []).append(a)
        for k, items in parts.items():
            self.replicas[k]._submit(items)

    def _cancel(self, request_id: str) -> bool:
        k = self._owner.get(request_id)
        return k is not None and self.replicas[k]._cancel(request_id)

    async def _pause(self, mode: str) -> None:
        await asyncio.gather(*(r.pause(mode) for r in self.replicas))  # type: ignore[arg-type]

    async def _resume(self) -> None:
        await asyncio.gather(*(r.resume() for r in self.replicas))

    def _sync(self, do_sync: Callable[[], Any], source: Any) -> Any:
        report = self.replicas[0]._sync(do_sync, source)
        for r in self.replicas[1:]:
            r._sync_alone(source)
        if isinstance(getattr(report, "details", None), dict):
            report.details["replicas"] = len(self.replicas)
        return report

    def _version_changed(self) -> None:
        for r in self.replicas:
            r.weight_version = self.weight_version
            r._version_changed()

    def _shutdown(self) -> None:
        for r in self.replicas:
            r._shutdown()


def version_spans(starts: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge ``(start token, version)`` marks: drop repeats of the same version."""
    out: list[tuple[int, int]] = []
    for s, v in starts:
        if out and out[-1][1] == v:
            continue
        if out and out[-1][0] == s:
            out[-1] = (s, v)
            continue
        out.append((s, v))
    return out


# ---- what a backend exposes ------------------------------------------------------------------
class AsyncRolloutsMixin:
    """The asynchronous methods of a backend; the backend supplies ``_make_rollout_engine()``.

    The engine starts on the first call (``start_async()`` starts it explicitly)."""

    _rollouts: RolloutEngine | None = None

    def _make_rollout_engine(self) -> RolloutEngine:  # pragma: no cover - backends override
        raise NotImplementedError

    def start_async(self) -> RolloutEngine:
        """Start (once) and return the asynchronous engine."""
        if self._rollouts is None:
            self._rollouts = self._make_rollout_engine()
        return self._rollouts

    def submit(self, requests: Any, sampling: dict[str, Any] | None = None) -> list[str]:
        """See :meth:`RolloutEngine.submit`."""
        return self.start_async().submit(requests, sampling)

    def stream(self, max_records: int | None = None, timeout: float | None = None) -> AsyncIterator[GenerationRecord]:
        """See :meth:`RolloutEngine.stream`."""
        return self.start_async().stream(max_records, timeout)

    def cancel(self, request_id: str) -> bool:
        """See :meth:`RolloutEngine.cancel`."""
        return self.start_async().cancel(request_id)

    async def pause(self, mode: PauseMode = "keep") -> None:
        """See :meth:`RolloutEngine.pause`."""
        await self.start_async().pause(mode)

    async def resume(self) -> None:
        """See :meth:`RolloutEngine.resume`."""
        await self.start_async().resume()

    def set_weight_version(self, version: int) -> None:
        """See :meth:`RolloutEngine.set_weight_version`."""
        self.start_async().set_weight_version(version)

    @property
    def weight_version(self) -> int:
        """The version of the weights now in the asynchronous engine (0 before any sync)."""
        return self._rollouts.weight_version if self._rollouts is not None else 0

    def _stop_rollouts(self) -> None:
        eng, self._rollouts = self._rollouts, None
        if eng is not None:
            eng.shutdown()
