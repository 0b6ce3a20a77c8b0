"""Continuous batching on the host: one background thread owns the Engine (every JAX call happens there), takes
requests from a bounded thread-safe queue, prefills each into a free slot between decode chunks, runs the chunks, and
hands each request its new tokens through the request's own `deliver` callback (the HTTP side wraps an asyncio
queue). A request that finishes (stop id, stop string, max_tokens) or is cancelled (client gone) frees its slot
before the next chunk.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable

import numpy as np

from neox_jax.inference.core import prompt_bucket
from neox_jax.inference.textstops import RowTracker
from neox_jax.serve.engine import Engine
from neox_jax.serve.metrics import Metrics
from neox_jax.store.tokenizer import Tokenizer

log = logging.getLogger("neox_jax.serve")


class QueueFull(Exception):
    """The waiting queue is at --max-queue: the caller should answer 429 at once."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new requests."""


class NotReady(Exception):
    """The model is still loading or compiling (/health answers 503): the caller should answer 503 at once."""


@dataclasses.dataclass
class Delta:
    """What one step added to a request: accepted ids, their text, their logprobs ([(logprob, top ids, top
    logprobs)] per id, when asked), and the finish reason once it ended ("stop", "length", "abort")."""

    ids: list[int]
    text: str
    logprobs: list | None = None
    finish_reason: str | None = None
    prompt_logprobs: list | None = None  # first delta of an echo + logprobs request: per prompt token after the first
    error: str | None = None


@dataclasses.dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    max_tokens: int
    row: dict  # per-row sampling settings (numpy scalars; see rows.empty_rows)
    stops: list[str]
    stop_ids: list[int]
    deliver: Callable[[Delta], None]  # called from the scheduler thread
    logprobs: int | None = None
    prompt_logprobs: bool = False
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    cancelled: bool = False
    tracker: RowTracker | None = None

    def cancel(self) -> None:
        """Thread-safe: the scheduler drops it (frees its slot) before its next chunk."""
        self.cancelled = True


class Scheduler:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, metrics: Metrics, max_queue: int = 64):
        self.engine, self.tok, self.metrics = engine, tokenizer, metrics
        self.waiting: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self.slots: list[Request | None] = [None] * engine.slots
        self._made = np.zeros(engine.slots, np.int64)  # tokens each slot's request has made (device count)
        self._accepting = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()
        self.failed: BaseException | None = None
        self._ids = itertools.count()

    # ---- called from any thread ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="neox-jax-scheduler", daemon=True)
        self._thread.start()

    def submit(self, req: Request) -> None:
        if not self._accepting:
            raise ShuttingDown("the server is shutting down")
        if self.failed is not None or (self._thread is not None and not self._thread.is_alive()):
            raise ShuttingDown(f"the model loop has stopped ({self.failed!r}); see the server log")
        self.engine.check_row(req.row)  # (ValueError here, in the caller's thread: never in the model loop)
        if not self.ready.is_set():  # as /health says: nothing waits behind a compile that may take minutes
            raise NotReady("the model is still loading and compiling; GET /health answers 200 once it is ready")
        try:
            self.waiting.put_nowait(req)
        except queue.Full:
            self.metrics.rejected.inc()
            raise QueueFull(f"the queue is full ({self.waiting.maxsize} waiting requests); retry later") from None
        self.metrics.queue_depth.set(self.waiting.qsize())

    def busy(self) -> int:
        return sum(r is not None for r in self.slots) + self.waiting.qsize()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stops taking requests, lets the running and waiting ones finish for up to `timeout` seconds, cancels the
        rest, and ends the thread."""
        self._accepting = False
        end = time.monotonic() + timeout
        while self.busy() and time.monotonic() < end and self._thread and self._thread.is_alive():
            time.sleep(0.05)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, end - time.monotonic()))

    # ---- the scheduler thread --------------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            t = time.perf_counter()
            self.engine.warm_up()
            log.info(
                "compiled %d programs in %.1f s (prompt buckets %s, %d slots)",
                self.engine.compiles,
                time.perf_counter() - t,
                self.engine.buckets,
                self.engine.slots,
            )
            self.ready.set()
            while not self._stop.is_set():
                self._step()
        except BaseException as e:  # a bug or a device failure: fail the requests, let /health say so
            log.exception("the scheduler stopped")
            self.failed = e
        finally:
            for i, r in enumerate(self.slots):
                if r is not None:
                    self._finish(i, "abort")
            while not self.waiting.empty():
                r = self.waiting.get_nowait()
                r.deliver(Delta([], "", finish_reason="abort", error="the server stopped"))

    def _step(self) -> None:
        for i, r in enumerate(self.slots):  # cancelled requests free their slot first
            if r is not None and r.cancelled:
                self._finish(i, "abort")
        while self._admit_waiting():  # those that arrived during a prefill join before the chunk too
            pass
        if all(r is None for r in self.slots):
            try:  # idle: wait for work without spinning
                req = self.waiting.get(timeout=0.05)
            except queue.Empty:
                return
            self._admit(req)
            return
        force_done = np.array([r is None for r in self.slots])
        out, made = self.engine.decode(force_done)
        if self.metrics.spec is not None:
            self.metrics.speculative(*self.engine.spec_stats)
        for i, r in enumerate(self.slots):
            if r is None:
                continue
            n = int(made[i] - self._made[i])
            self._made[i] = made[i]
            self._push(i, r, out["tokens"][i, :n], out, n)
        self._occupancy()

    def _occupancy(self) -> None:
        self.metrics.occupancy.set(sum(r is not None for r in self.slots))

    def _admit_waiting(self) -> int:
        """Every waiting request a free slot can take: those that arrived together share one prefill per prompt
        bucket (Engine.admit_many), up to the engine's batch limit; echo with logprobs goes alone. Returns how many
        it took (cancelled ones included)."""
        reqs, cancelled = [], 0
        while len(reqs) < self.slots.count(None):
            try:
                req = self.waiting.get_nowait()
            except queue.Empty:
                break
            if req.cancelled:
                req.deliver(Delta([], "", finish_reason="abort"))
                cancelled += 1
            else:
                reqs.append(req)
        groups: dict[int, list[Request]] = {}
        for req in reqs:
            if req.prompt_logprobs:
                self._admit(req)
            else:
                groups.setdefault(prompt_bucket(len(req.prompt_ids), self.engine.max_model_len), []).append(req)
        for group in groups.values():
            limit = self.engine.batch_limit(len(group[0].prompt_ids))
            for at in range(0, len(group), limit):
                part = group[at : at + limit]
                if len(part) == 1:
                    self._admit(part[0])
                    continue
                slots = [k for k, r in enumerate(self.slots) if r is None][: len(part)]
                firsts = self.engine.admit_many(slots, [r.prompt_ids for r in part], [r.row for r in part])
                for slot, req, first in zip(slots, part, firsts):
                    self._admitted(slot, req, first)
        return len(reqs) + cancelled

    def _admit(self, req: Request) -> None:
        self.metrics.queue_depth.set(self.waiting.qsize())
        if req.cancelled:
            req.deliver(Delta([], "", finish_reason="abort"))
            return
        slot = self.slots.index(None)
        self._admitted(slot, req, self.engine.admit(slot, req.prompt_ids, req.row, req.prompt_logprobs))

    def _admitted(self, slot: int, req: Request, first: dict) -> None:
        """Takes a request whose prompt is now in `slot`, with its first token's outputs `first`."""
        self.metrics.queue_depth.set(self.waiting.qsize())
        req.tracker = RowTracker(self.tok, req.stop_ids, req.stops, req.max_tokens)
        self.slots[slot] = req
        self._made[slot] = 1
        self.metrics.ttft.observe(time.perf_counter() - req.arrival)
        self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        plp = None
        if req.prompt_logprobs:
            n = len(req.prompt_ids) - 1
            plp = list(
                zip(
                    first["prompt_logprobs"][:n].tolist(),
                    first["prompt_top_ids"][:n].tolist(),
                    first["prompt_top_logprobs"][:n].tolist(),
                )
            )
        self._push(
            slot,
            req,
            first["tokens"][:1],
            {k: v[:, None] for k, v in first.items() if "prompt" not in k},
            1,
            row=0,
            prompt_logprobs=plp,
        )
        self._occupancy()

    def _push(
        self, slot: int, req: Request, new, out: dict, n: int, row: int | None = None, prompt_logprobs=None
    ) -> None:
        row = slot if row is None else row
        ids, text = req.tracker.push(np.asarray(new).tolist())
        lps = None
        if req.logprobs is not None:
            k = len(ids)
            lps = list(
                zip(
                    out["logprobs"][row, :k].tolist(),
                    out["top_ids"][row, :k].tolist(),
                    out["top_logprobs"][row, :k].tolist(),
                )
            )
        self.metrics.generation_tokens.inc(len(ids))
        reason = None
        if req.tracker.finished or n == 0:  # n == 0: the device has stopped the row (it agrees with the tracker)
            tail = req.tracker.finish_length()  # "" once finished; else it ends as "length"
            text += tail or ""
            reason = req.tracker.finish_reason
            self.slots[slot] = None
            self.metrics.requests.labels(reason).inc()
        if ids or text or reason or prompt_logprobs is not None:
            req.deliver(Delta(ids, text, lps, reason, prompt_logprobs))

    def _finish(self, slot: int, reason: str) -> None:
        req = self.slots[slot]
        self.slots[slot] = None
        self._occupancy()  # a cancelled last request leaves no decode step behind it to update the gauge
        self.metrics.requests.labels(reason).inc()
        req.deliver(Delta([], "", finish_reason=reason))
