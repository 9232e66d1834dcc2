"""Asynchronous rollouts on HF transformers: a scheduler thread doing continuous batching.

One thread owns the model while rollouts run. Each iteration is one *step boundary*:

1. cancellations and pause requests are applied (abort ends rows now with partial records; keep
   freezes them; wait stops admitting what was submitted after the pause and drains the rest);
2. new requests are admitted: they are prefilled together (left-padded) and their KV cache is
   merged into the running batch cache (left padding again, so every row's newest token sits in
   the last column);
3. otherwise one decoding step runs for every active row (one token each);
4. finished rows leave the batch (their cache rows are dropped) and their records go out at once.

Logprobs are log-softmax of the raw logits of the step that sampled the token (fp32), like the
synchronous HF backend and vLLM. After a ``sync_weights`` between ``pause("keep")`` and
``resume()`` the frozen rows' KV caches are stale (old weights): they are dropped, and each row is
prefilled again over prompt + its tokens so far with the new weights before it samples on, so the
logprob of each token is the one of the weights that produced it.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from genbackends.records import GenerationRecord
from genbackends.rollouts import ABORT_REASON, Admitted, RolloutEngine

from genbackends_hf.finishing import final_text, find_stop_string, finish_row


@dataclass
class _Row:
    """One request inside the scheduler."""

    adm: Admitted
    limit: int
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)

    @property
    def context(self) -> list[int]:
        return self.adm.prompt_token_ids + self.tokens


class HFRolloutEngine(RolloutEngine):
    """Continuous batching over a transformers ``DynamicCache`` (see the module docstring)."""

    def __init__(self, backend: Any):
        super().__init__(backend.config.sampling, backend.tokenizer)
        self.backend = backend
        self._cv = threading.Condition()
        self._held: collections.deque[_Row] = collections.deque()  # submitted while paused
        self._waiting: collections.deque[_Row] = collections.deque()  # to prefill
        self._rows: list[_Row] = []  # in the batch cache, row order = cache order
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # [rows, cache length] 1 = real token
        self._next: torch.Tensor | None = None  # [rows] last sampled token, not yet fed
        self._cancels: set[str] = set()
        self._pause_req: tuple[str, threading.Event] | None = None
        self._draining: threading.Event | None = None
        self._gate_closed = False  # new submissions are held
        self._frozen = False
        self._stop = False
        self._step_lock = threading.Lock()  # a step and a weight sync never overlap
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name="genbackends-hf-rollouts", daemon=True)
        self._thread.start()

    def progress(self, request_id: str) -> int:
        """Tokens generated so far by an in-flight request (0 if unknown or finished)."""
        with self._cv:
            for r in itertools.chain(self._rows, self._waiting, self._held):
                if r.adm.request_id == request_id:
                    return len(r.tokens)
        return 0

    # ---- RolloutEngine -------------------------------------------------------------------
    def _submit(self, admitted: list[Admitted]) -> None:
        rows = [self._row(a) for a in admitted]
        with self._cv:
            (self._held if self._gate_closed else self._waiting).extend(rows)
            self._cv.notify_all()

    def _cancel(self, request_id: str) -> bool:
        with self._cv:
            self._cancels.add(request_id)
            self._cv.notify_all()
        return True

    async def _pause(self, mode: str) -> None:
        done = threading.Event()
        with self._cv:
            self._gate_closed = True
            self._pause_req = (mode, done)
            self._cv.notify_all()
        await asyncio.to_thread(done.wait)

    async def _resume(self) -> None:
        with self._cv:
            self._gate_closed = False
            self._frozen = False
            self._waiting.extend(self._held)
            self._held.clear()
            self._cv.notify_all()

    def _sync(self, do_sync: Callable[[], Any], source: Any) -> Any:
        with self._step_lock:
            report = do_sync()
            # Frozen rows' KV came from the old weights: recompute it over the same prefix.
            with self._cv:
                self._waiting.extendleft(reversed(self._rows))
                self._rows, self._cache, self._mask, self._next = [], None, None, None
        return report

    def _sync_alone(self, source: Any) -> Any:
        return self._sync(lambda: self.backend._sync_weights_now(source), source)

    def _shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    # ---- the scheduler thread ------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    self._apply_cancels()
                    self._apply_pause()
                    while not self._stop and (self._frozen or not (self._rows or self._waiting)) and not self._cancels and self._pause_req is None:
                        self._cv.wait()
                    if self._stop:
                        return
                    if self._cancels or self._pause_req is not None or self._frozen:
                        continue
                    cap = self.backend.config.scheduler.max_num_seqs or 1 << 30
                    admit = []
                    while self._waiting and len(self._rows) + len(admit) < cap:
                        admit.append(self._waiting.popleft())
                with self._step_lock, torch.no_grad():
                    if admit:
                        self._prefill(admit)
                    elif self._rows:
                        self._decode()
                    self.steps += 1
                with self._cv:
                    self._retire()
                    if self._draining is not None and not (self._rows or self._waiting):
                        self._frozen = True
                        self._draining.set()
                        self._draining = None
        except BaseException as e:  # the stream must not hang on a dead scheduler
            self.records.fail(e)

    def _apply_cancels(self) -> None:
        if not self._cancels:
            return
        ids, self._cancels = self._cancels, set()
        for q in (self._waiting, self._held):
            for r in [r for r in q if r.adm.request_id in ids]:
                q.remove(r)
                self._deliver(self._record(r, abort_cause="cancel"))
        self._drop_rows([i for i, r in enumerate(self._rows) if r.adm.request_id in ids], "cancel")

    def _apply_pause(self) -> None:
        if self._pause_req is None:
            return
        mode, done = self._pause_req
        self._pause_req = None
        if mode == "abort":
            for r in list(self._waiting):
                self._deliver(self._record(r, abort_cause="pause"))
            self._waiting.clear()
            self._drop_rows(list(range(len(self._rows))), "pause")
        if mode == "wait" and (self._rows or self._waiting):
            self._draining = done
            return
        self._frozen = True
        done.set()

    # ---- model steps ---------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any) -> torch.Tensor:
        out = self.backend.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        return out.logits[:, -1].float()

    def _prefill(self, rows: list[_Row]) -> None:
        from transformers import DynamicCache

        dev = self.backend.device
        ctx = [r.context for r in rows]
        width = max(len(c) for c in ctx)
        ids = torch.full((len(rows), width), self.backend._pad_id(), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, c in enumerate(ctx):
            ids[i, width - len(c):] = torch.tensor(c)
            mask[i, width - len(c):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(ids, mask, pos, cache)
        toks = self._sample(rows, logits)
        self._merge(rows, cache, mask, toks)

    def _decode(self) -> None:
        assert self._mask is not None and self._next is not None
        ones = torch.ones((len(self._rows), 1), dtype=self._mask.dtype, device=self._mask.device)
        mask = torch.cat([self._mask, ones], dim=1)
        pos = self._mask.sum(-1, keepdim=True)  # real tokens before the new one
        logits = self._forward(self._next.unsqueeze(-1), mask, pos, self._cache)
        self._mask = mask
        self._next = self._sample(self._rows, logits)

    def _merge(self, rows: list[_Row], cache: Any, mask: torch.Tensor, toks: torch.Tensor) -> None:
        """Append prefilled rows to the batch cache, left-padding the shorter side."""
        if not self._rows:
            self._rows, self._cache, self._mask, self._next = list(rows), cache, mask, toks
            return
        width = max(self._mask.shape[1], mask.shape[1])

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            short = width - t.shape[dim]
            if short == 0:
                return t
            shape = list(t.shape)
            shape[dim] = short
            return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)

        for old, new in zip(self._cache.layers, cache.layers):
            old.keys = torch.cat([pad(old.keys, 2), pad(new.keys, 2)], dim=0)
            old.values = torch.cat([pad(old.values, 2), pad(new.values, 2)], dim=0)
        self._mask = torch.cat([pad(self._mask, 1), pad(mask, 1)], dim=0)
        self._next = torch.cat([self._next, toks])
        self._rows += rows

    def _keep_rows(self, keep: list[int]) -> None:
        if not keep:
            self._rows, self._cache, self._mask, self._next = [], None, None, None
            return
        idx = torch.tensor(keep, device=self._mask.device)
        self._rows = [self._rows[i] for i in keep]
        self._mask, self._next = self._mask[idx], self._next[idx]
        # drop cache columns that are padding in every remaining row
        start = int((self._mask.sum(0) > 0).nonzero()[0]) if self._mask.numel() else 0
        for layer in self._cache.layers:
            layer.keys = layer.keys[idx, :, start:]
            layer.values = layer.values[idx, :, start:]
        self._mask = self._mask[:, start:]

    def _drop_rows(self, drop: list[int], cause: str) -> None:
        if not drop:
            return
        for i in drop:
            self._deliver(self._record(self._rows[i], abort_cause=cause))
        gone = set(drop)
        self._keep_rows([i for i in range(len(self._rows)) if i not in gone])

    def _retire(self) -> None:
        """Records out for rows that finished this step."""
        done = [i for i, r in enumerate(self._rows) if self._finished(r)]
        for i in done:
            self._deliver(self._record(self._rows[i]))
        if done:
            gone = set(done)
            self._keep_rows([i for i in range(len(self._rows)) if i not in gone])

    # ---- sampling and finishing ----------------------------------------------------------
    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """One token per row; rows sharing sampling knobs (and no seed) are sampled together, so
        a step costs a handful of device ops and one host transfer, not one per row."""
        logp = torch.log_softmax(logits, dim=-1)  # raw logprobs, before temperature/top-k/top-p
        toks = logits.argmax(-1)  # greedy rows keep this
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            sp = r.adm.sampling
            if sp.temperature != 0:
                key = (sp.temperature, sp.top_k, sp.top_p, i if r.generator is not None else -1)
                groups.setdefault(key, []).append(i)
        for (temp, top_k, top_p, seeded), idx in groups.items():
            z = logits[idx] / temp
            if 0 < top_k < z.shape[-1]:
                kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
                z = z.masked_fill(z < kth, float("-inf"))
            if top_p < 1.0:
                sz, si = torch.sort(z, descending=True, dim=-1)
                p = torch.softmax(sz, -1)
                cut = (p.cumsum(-1) - p) > top_p  # keep the smallest prefix reaching top_p
                z = z.scatter(-1, si, sz.masked_fill(cut, float("-inf")))
            probs = torch.softmax(z, -1)
            if seeded >= 0:  # per-request seed: its own CPU generator, reproducible anywhere
                pick = torch.multinomial(probs.cpu(), 1, generator=rows[seeded].generator).to(toks.device)
            else:
                pick = torch.multinomial(probs, 1)
            toks[idx] = pick.squeeze(-1)
        lps = logp.gather(-1, toks.unsqueeze(-1)).squeeze(-1).tolist()
        for r, tok, lp in zip(rows, toks.tolist(), lps):
            if not r.spans or r.spans[-1][1] != self.weight_version:
                r.spans.append((len(r.tokens), self.weight_version))
            r.tokens.append(tok)
            r.logprobs.append(lp)
        return toks

    def _finished(self, r: _Row) -> bool:
        sp = r.adm.sampling
        if len(r.tokens) >= r.limit:
            return True
        if not sp.ignore_eos and r.tokens and r.tokens[-1] in self.backend._eos_ids:
            return True
        if sp.stop_strings:
            return find_stop_string(self.tokenizer.decode(r.tokens, skip_special_tokens=True), sp.stop_strings) is not None
        return False

    def _row(self, a: Admitted) -> _Row:
        limit = self.backend._limits([len(a.prompt_token_ids)], a.sampling)[0]
        gen = None
        if a.sampling.seed is not None:
            gen = torch.Generator().manual_seed(a.sampling.seed)
        return _Row(a, limit, gen)

    def _record(self, r: _Row, abort_cause: str | None = None) -> GenerationRecord:
        sp = r.adm.sampling
        extra: dict[str, Any] = {}
        if abort_cause is None:
            fin = finish_row(r.tokens, self.tokenizer, limit=r.limit, eos_ids=self.backend._eos_ids,
                             ignore_eos=sp.ignore_eos, stops=sp.stop_strings)
            n, reason, text = fin.length, fin.reason, fin.text
            extra["stop_reason"] = fin.stop_reason
        else:
            n, reason, text = len(r.tokens), ABORT_REASON, final_text(self.tokenizer, r.tokens)
            extra["abort_cause"] = abort_cause
        toks, lps = r.tokens[:n], r.logprobs[:n]
        spans = [s for s in r.spans if s[0] < n] if n else []
        return GenerationRecord(
            request_id=r.adm.request_id,
            prompt=r.adm.prompt,
            prompt_token_ids=list(r.adm.prompt_token_ids),
            index=r.adm.index,
            text=text,
            token_ids=toks,
            logprobs=lps,
            cumulative_logprob=float(sum(lps)),
            finish_reason=reason,
            extra=extra,
            weight_version=spans[-1][1] if spans else self.weight_version,
            weight_versions=spans,
        )
