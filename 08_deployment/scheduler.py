"""Continuous batching (Orca, Yu et al. OSDI 2022; vLLM, Kwon et al. SOSP 2023): one background thread loops
   admit waiting requests (prefill each)  ->  one decode step for ALL running sequences together  ->  emit tokens
so a new request starts between two steps instead of waiting for the current batch to finish, and a finished or
cancelled one leaves between steps and frees its KV slot at once.

Requests talk to the asyncio side through ``on_event`` callbacks (called on this thread; the server forwards them to an
asyncio.Queue with ``loop.call_soon_threadsafe``). Sampling uses chapter 07's ``Sampler`` (temperature, top-p) with a
per-request ``torch.Generator``, so a seeded request samples the same tokens alone or in a batch.

Per request, before its token is drawn (``_draw``):
  * ``n_logprobs`` (not None): the model's own log-probabilities, ``log_softmax`` of the raw logits row (before the
    temperature, top-p and any processor), of the drawn token and of the ``n_logprobs`` most likely ones; they ride on
    the ``Event`` that carries the token's text.
  * ``logits_processor(generated_ids, logits) -> logits``: a per-request hook on that row's logits (V,) float32
    before sampling, e.g. a constrained-decoding mask (-inf on forbidden tokens); ``generated_ids`` is the list of
    ids drawn so far (the hook may keep state and consume only the new ones). If the processor has an
    ``is_finished(generated_ids) -> bool`` method, True after a draw finishes the request with ``"stop"``.
  * ``forks``: the other ``n - 1`` choices of the same prompt. They are admitted with it; after its prefill each
    gets a slot that SHARES its KV blocks (``engine.fork``: copy-on-write of the partial last block) and draws its first
    token from the same logits: one prefill for ``n`` choices. A seeded request's fork ``i`` samples with seed + i.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ch07.sampling import Sampler
from ch08.engine import Engine, PagedEngine
from ch08.metrics import Metrics

log = logging.getLogger("ch08.scheduler")
_ids = itertools.count()


@dataclass
class Event:
    text: str = ""  # newly decoded text (may be empty)
    finish_reason: str | None = None  # "stop" | "length" when the request is done
    error: str | None = None  # set when the request failed (then it is done too)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[dict] | None = None  # (n_logprobs set) {"id", "logprob", "top": [(id, logprob)...]} per token


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    on_event: Callable[[Event], None] = lambda ev: None
    n_logprobs: int | None = None  # None: no logprobs; k >= 0: the drawn token's and the k most likely tokens'
    logits_processor: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None  # see the module docstring
    forks: list[GenRequest] = field(default_factory=list)  # n > 1: the other choices, forked after this prefill
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: threading.Event = field(default_factory=threading.Event)
    # filled in by the scheduler
    slot: int | None = None
    generated: list[int] = field(default_factory=list)
    sent_chars: int = 0
    token_info: list[dict] = field(default_factory=list)  # logprob entries of the generated tokens
    sent_tokens: int = 0  # entries already emitted
    decoded_chars: int = 0  # length of the decoded text before the last token
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    generator: torch.Generator | None = None
    sampler: Sampler | None = None

    @property
    def width(self) -> int:
        """Slots this request takes when admitted: itself + its forks."""
        return 1 + len(self.forks)


class Scheduler:
    def __init__(
        self,
        engine: PagedEngine | Engine,
        tokenizer,
        metrics: Metrics | None = None,
        max_queue: int = 1024,
        eos_id: int | None = None,
    ):
        self.engine, self.tok, self.metrics = engine, tokenizer, metrics or Metrics()
        self.max_queue, self.eos_id = max_queue, eos_id
        self.waiting: deque[GenRequest] = deque()
        self.running: list[GenRequest] = []
        self.cv = threading.Condition()
        self.accepting, self.stopped = True, False
        self.steps = 0
        self.thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------------------------------- public (any thread)
    def submit(self, req: GenRequest) -> None:
        with self.cv:
            if not self.accepting:
                raise RuntimeError("server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise OverflowError(f"queue full ({self.max_queue} waiting requests)")
            if req.width > self.engine.max_slots:
                raise ValueError(f"n={req.width} choices need more than the {self.engine.max_slots} batch slots")
            self.waiting.append(req)
            self._gauges()
            self.cv.notify()

    def cancel(self, req: GenRequest) -> None:
        """Cancel a request and its forks (the client went away)."""
        for r in (req, *req.forks):
            r.cancelled.set()
        with self.cv:
            self.cv.notify()

    def stats(self) -> dict:
        """Queue and batch sizes, free slots, and the engine's KV-block / prefix-cache counts where it has them."""
        with self.cv:
            engine_stats = self.engine.stats() if hasattr(self.engine, "stats") else {}
            return {
                "waiting": len(self.waiting),
                "running": len(self.running),
                "free_slots": len(self.engine.free),
                "steps": self.steps,
                **engine_stats,
            }

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop admitting; let running and queued requests finish for up to ``timeout`` s, then cancel the rest."""
        with self.cv:
            self.accepting = False
            self.cv.notify()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self.waiting or self.running):
            time.sleep(0.02)
        with self.cv:
            self.stopped = True
            self.cv.notify()
        self.thread.join(timeout=5.0)
        for req in [r for w in self.waiting for r in (w, *w.forks)] + list(self.running):
            req.on_event(Event(error="server shut down before the request finished"))
        self.waiting.clear()
        self.running.clear()

    # ---------------------------------------------------------------------------------------------- scheduler thread
    def _gauges(self):
        self.metrics.set("queue_depth", "requests waiting for a batch slot", len(self.waiting))
        self.metrics.set("running_sequences", "sequences in the running batch", len(self.running))

    def _loop(self):
        while True:
            with self.cv:
                while not self.stopped and not self.waiting and not self.running:
                    self.cv.wait()
                if self.stopped:
                    return
                admit = []
                taken = len(self.running)
                while self.waiting and taken + self.waiting[0].width <= self.engine.max_slots:
                    admit.append(self.waiting.popleft())
                    taken += admit[-1].width
            try:
                self._step(admit)
            except Exception as e:  # one bad step fails the requests in it, never the server
                log.exception("scheduler step failed")
                for req in {r.id: r for r in [x for a in admit for x in (a, *a.forks)] + self.running}.values():
                    self._finish(req, Event(error=f"internal error: {e}"))
                with self.cv:
                    self.running = []
            with self.cv:
                self._gauges()

    def _step(self, admit: list[GenRequest]):
        for req in list(self.running):
            if req.cancelled.is_set():
                self._finish(req, None)
        decode_batch = list(self.running)  # sequences admitted below are prefilled this step, decoded from the next
        if decode_batch:
            logits = self.engine.decode([r.slot for r in decode_batch], [r.generated[-1] for r in decode_batch])
            self.steps += 1
            self.metrics.observe(
                "batch_size", "sequences per decode step", len(decode_batch), buckets=(1, 2, 4, 8, 16, 32, 64, 128)
            )
            for req, row in zip(decode_batch, logits):
                self._advance(req, row)
        for req in admit:
            self._admit(req)

    def _admit(self, req: GenRequest) -> None:
        """Prefill a new request, fork its ``n - 1`` siblings off the prefilled prompt, draw everyone's first token."""
        if req.cancelled.is_set():  # the client went away while it waited: its forks went with it
            for r in (req, *req.forks):
                self._finish(r, None)
            return
        before = getattr(self.engine, "prefix_hit_tokens", 0)
        req.slot = self.engine.alloc()
        self._start(req, 0)
        logits = self.engine.prefill(req.slot, req.prompt_ids)  # (V,)
        hit = getattr(self.engine, "prefix_hit_tokens", 0) - before
        self.metrics.inc("prefix_cache_hit_tokens_total", "prompt tokens served from the prefix cache", hit)
        self.metrics.inc(
            "prompt_tokens_prefilled_total", "prompt tokens run through the model", len(req.prompt_ids) - hit
        )
        group = [req]
        for i, child in enumerate(req.forks, 1):  # before the parent's first draw: it may finish (and free) at once
            if child.cancelled.is_set():
                self._finish(child, None)
                continue
            child.slot = self.engine.fork(req.slot)
            child.t_submit = req.t_submit
            self._start(child, i)
            group.append(child)
        for r in group:
            self._advance(r, logits)

    def _start(self, req: GenRequest, index: int) -> None:
        """Sampling state of a request (fork ``index`` of its group) and its place in the running batch."""
        req.generator = torch.Generator().manual_seed(
            req.seed + index if req.seed is not None else int(torch.randint(0, 2**62, ()).item())
        )
        req.sampler = Sampler(temperature=req.temperature, top_p=req.top_p)
        with self.cv:
            self.running.append(req)

    def _draw(self, req: GenRequest, logits: torch.Tensor) -> int:
        """The next token from one row of logits (V,): logprob entry (if asked), the request's processor, its sampler."""
        row = logits.float().cpu()
        if req.n_logprobs is not None:
            logp = torch.log_softmax(row, -1)  # the model's own distribution: before temperature, top-p and masks
        if req.logits_processor is not None:
            row = req.logits_processor(req.generated, row)
        token = int(req.sampler(row[None], None, req.generator)[0])  # (1, V) -> (1,)
        if req.n_logprobs is not None:
            entry = {"id": token, "logprob": float(logp[token]), "top": []}
            if req.n_logprobs:
                top = logp.topk(req.n_logprobs)
                entry["top"] = list(zip(top.indices.tolist(), top.values.tolist()))
            req.token_info.append(entry)
        return token

    def _advance(self, req: GenRequest, logits: torch.Tensor):
        token = self._draw(req, logits)
        now = time.perf_counter()
        if req.t_first is None:
            req.t_first = now
            self.metrics.observe("time_to_first_token_seconds", "time from submit to first token", now - req.t_submit)
        finish = None
        if self.eos_id is not None and token == self.eos_id:
            finish = "stop"
            if req.token_info:
                req.token_info.pop()  # the end-of-turn token is not part of the text
        else:
            req.generated.append(token)
            done = getattr(req.logits_processor, "is_finished", None)
            if done is not None and done(req.generated):
                finish = "stop"
        text = self.tok.decode(req.generated)
        if req.token_info and "end" not in req.token_info[-1]:  # the new token's text span
            req.token_info[-1].update(offset=req.decoded_chars, end=len(text))
        req.decoded_chars = len(text)
        cut = min((i for i in (text.find(s) for s in req.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        elif finish is None and (
            len(req.generated) >= req.max_tokens or len(req.prompt_ids) + len(req.generated) >= self.engine.max_context
        ):
            finish = "length"
        safe = len(text)
        if finish is None:  # hold back a possible stop-string prefix and an incomplete UTF-8 character
            safe -= max((len(s) - 1 for s in req.stop), default=0)
            while safe > 0 and text[safe - 1] == "\ufffd":
                safe -= 1
        event = Event(
            text=text[req.sent_chars : max(safe, req.sent_chars)],
            finish_reason=finish,
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(req.generated),
        )
        req.sent_chars = max(safe, req.sent_chars)
        if req.n_logprobs is not None:
            event.logprobs = self._sent_logprobs(req, finish is not None, cut)
        self.metrics.inc("generation_tokens_total", "tokens generated", 1)
        if finish is None:
            req.on_event(event)
        else:
            self._finish(req, event)

    @staticmethod
    def _sent_logprobs(req: GenRequest, done: bool, cut: int) -> list[dict]:
        """The logprob entries of the tokens whose text is now wholly sent; at the end every token's (those starting
        at or after a stop string's cut are not part of the text)."""
        k = req.sent_tokens
        while k < len(req.token_info):
            e = req.token_info[k]
            if (not done and e["end"] > req.sent_chars) or (done and cut >= 0 and e["offset"] >= cut):
                break
            k += 1
        entries, req.sent_tokens = req.token_info[req.sent_tokens : k], k
        return entries

    def _finish(self, req: GenRequest, event: Event | None):
        """Leave the batch and free the slot; ``event`` None = cancelled by the client (nobody to tell)."""
        with self.cv:
            if req in self.running:
                self.running.remove(req)
        if req.slot is not None:
            self.engine.release(req.slot)
            req.slot = None
        if event is None:
            self.metrics.inc("requests_cancelled_total", "requests cancelled (client went away)")
        else:
            req.on_event(event)
