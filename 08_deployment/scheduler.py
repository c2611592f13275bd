"""Continuous batching (Orca, Yu et al. OSDI 2022; vLLM, Kwon et al. SOSP 2023): one background thread loops
   admit waiting requests (prefill each)  ->  one decode step for ALL running sequences together  ->  emit tokens
so a new request starts between two steps instead of waiting for the current batch to finish, and a finished or
cancelled one leaves between steps and frees its KV slot at once.

Requests talk to the asyncio side through ``on_event`` callbacks (called on this thread; the server forwards them to an
asyncio.Queue with ``loop.call_soon_threadsafe``). Sampling uses chapter 07's ``Sampler`` (temperature, top-p) with a
per-request ``torch.Generator``, so a seeded request samples the same tokens alone or in a batch.
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


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    on_event: Callable[[Event], None] = lambda ev: None
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: threading.Event = field(default_factory=threading.Event)
    # filled in by the scheduler
    slot: int | None = None
    generated: list[int] = field(default_factory=list)
    sent_chars: int = 0
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    generator: torch.Generator | None = None
    sampler: Sampler | None = None


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
            self.waiting.append(req)
            self._gauges()
            self.cv.notify()

    def cancel(self, req: GenRequest) -> None:
        req.cancelled.set()
        with self.cv:
            self.cv.notify()

    def stats(self) -> dict:
        with self.cv:
            return {
                "waiting": len(self.waiting),
                "running": len(self.running),
                "free_slots": len(self.engine.free),
                "steps": self.steps,
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
        for req in list(self.waiting) + list(self.running):
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
                while self.waiting and len(self.running) + len(admit) < self.engine.max_slots:
                    admit.append(self.waiting.popleft())
            try:
                self._step(admit)
            except Exception as e:  # one bad step fails the requests in it, never the server
                log.exception("scheduler step failed")
                for req in admit + self.running:
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
            if req.cancelled.is_set():
                self._finish(req, None)
                continue
            req.slot = self.engine.alloc()
            req.generator = torch.Generator().manual_seed(
                req.seed if req.seed is not None else int(torch.randint(0, 2**62, ()).item())
            )
            req.sampler = Sampler(temperature=req.temperature, top_p=req.top_p)
            with self.cv:
                self.running.append(req)
            self._advance(req, self.engine.prefill(req.slot, req.prompt_ids))

    def _sample(self, req: GenRequest, logits: torch.Tensor) -> int:
        return int(req.sampler(logits[None].cpu(), None, req.generator)[0])  # (1, V) -> (1,)

    def _advance(self, req: GenRequest, logits: torch.Tensor):
        token = self._sample(req, logits)
        now = time.perf_counter()
        if req.t_first is None:
            req.t_first = now
            self.metrics.observe("time_to_first_token_seconds", "time from submit to first token", now - req.t_submit)
        finish = None
        if self.eos_id is not None and token == self.eos_id:
            finish = "stop"
        else:
            req.generated.append(token)
        text = self.tok.decode(req.generated)
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
        self.metrics.inc("generation_tokens_total", "tokens generated", 1)
        if finish is None:
            req.on_event(event)
        else:
            self._finish(req, event)

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
