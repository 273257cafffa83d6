"""The serving loop of in-flight batching: one background thread steps the engine (runtime/engine.py)
and answers each request through its own sender, as the TensorRT-LLM backend drives its executor.

The Triton model's execute() validates a request and hands it to `submit()`, which returns at once
(decoupled mode). The thread admits what arrived, asks every sender whether its client is still
there (every check_every seconds: a departed client's row is free within that and one step),
steps the engine, and
sends: with stream=true a delta each time a request's decided prefix grows, and the final response
with the request's stats when it ends.

Failures. A forward that raises fails the requests of that forward alone (Engine.step reports
them); the others go on. Anything else escaping the loop is fatal: every waiting client gets an
error, never a hang, and on_fatal runs (the model ends its process; the launcher's supervisor
restarts the server). A full queue answers "server busy, try again later".

Nothing here imports Triton: `send(sender, text=None, stats=None, error=None, final=False) -> bool`
and `cancelled(sender) -> bool` are the model's, so the loop is tested with plain objects.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from .engine import Engine
from .serving import Request, StreamText, release_memory, tune_malloc

BUSY = "server busy, try again later: the request queue is full"


@dataclass
class Job:
    req: Request
    sender: object
    stream: StreamText = field(default_factory=StreamText)
    t0: float = field(default_factory=time.perf_counter)


class InflightLoop:
    def __init__(self, pipe, max_batch: int, max_len: int, max_queue: int, send, cancelled, info: dict,
                 log=print, note=print, on_fatal=None, max_lanes: int = 4, check_every: float = 0.02,
                 trim_after: float = 0.5):
        self.pipe, self.send, self.cancelled, self.info, self.log, self.note = pipe, send, cancelled, info, log, note
        self.on_fatal = on_fatal
        self.max_queue = max_queue
        # how often clients are asked whether they are still there: a departed client's row is free
        # within this much time (and one step)
        self.check_every, self.next_check = check_every, 0.0
        # the heap is handed back once the engine has idled this long (release_memory takes ~10 ms:
        # not between back-to-back requests), once per idle spell
        self.trim_after, self.idle_since, self.trimmed = trim_after, None, True
        self.engine = Engine(pipe.executor, max_batch, max_len, max_lanes=max_lanes)
        self.inbox: queue.Queue[Job] = queue.Queue()
        self.jobs: dict[int, Job] = {}
        self.stopping = threading.Event()
        self.dead: str | None = None
        self.thread = threading.Thread(target=self._run, name="esdllm-engine", daemon=True)

    def start(self) -> "InflightLoop":
        tune_malloc()  # this process's activations from the heap; the idle loop trims it
        self.thread.start()
        return self

    def pending(self) -> int:
        """Requests waiting for a row (in the inbox or the engine's queue)."""
        return self.inbox.qsize() + len(self.engine.queue)

    def submit(self, req: Request, sender) -> str | None:
        """Hand a validated request to the loop; an error message instead when it cannot take it."""
        if self.dead is not None:
            return f"the engine stopped: {self.dead}"
        if self.stopping.is_set():
            return "the server is shutting down"
        if self.pending() >= self.max_queue:
            return BUSY
        self.inbox.put(Job(req, sender))
        return None

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout)
        self._fail_all("the server is shutting down")

    # --- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while not self.stopping.is_set():
                    self._admit()
                    if not self.engine.busy():
                        self._idle()
                        self._wait()
                        # the requests that woke an idle loop were asked at admission
                        self.next_check = time.perf_counter() + self.check_every
                        continue
                    self.idle_since, self.trimmed = None, False
                    if time.perf_counter() >= self.next_check:  # each ask is a round trip to the server
                        self.next_check = time.perf_counter() + self.check_every
                        for h, job in list(self.jobs.items()):
                            if self.cancelled(job.sender) and not self.engine.result(h).cancelled:
                                self._hang_up(h)
                    self._answer(self.engine.step())
        except Exception as e:  # a bug in the loop itself: nobody may be left waiting
            self.dead = f"{type(e).__name__}: {e}"
            self.log(f"esdllm: the engine thread died: {self.dead}")
            self._fail_all(f"the engine stopped: {self.dead}")
            if self.on_fatal is not None:
                self.on_fatal(self.dead)

    def _idle(self) -> None:
        now = time.perf_counter()
        if self.idle_since is None:
            self.idle_since = now
        elif not self.trimmed and now - self.idle_since >= self.trim_after:
            release_memory()
            self.trimmed = True

    def _wait(self) -> None:
        try:
            job = self.inbox.get(timeout=0.05)
        except queue.Empty:
            return
        self._take(job)

    def _admit(self) -> None:
        while True:
            try:
                job = self.inbox.get_nowait()
            except queue.Empty:
                return
            self._take(job)

    def _take(self, job: Job) -> None:
        # left while queued: takes no row. A fresh request is not asked: the next check is at most
        # check_every away, and each ask is a round trip to the server on the request's own latency
        if time.perf_counter() - job.t0 >= self.check_every and self.cancelled(job.sender):
            self.send(job.sender, final=True)
            return
        try:
            h = self.engine.submit(job.req.prompt_ids, job.req.cfg, self.pipe.stop, stream_steps=job.req.stream)
        except ValueError as e:
            self.send(job.sender, error=str(e), final=True)
            return
        self.jobs[h] = job

    def _answer(self, events) -> None:
        for h, kind in events:
            job = self.jobs.get(h)
            if job is None:
                continue
            if kind in ("prefix", "block") and job.req.stream:
                text, _ = self.pipe.decode(self.engine.decided(h))
                delta = job.stream.delta(text)
                if delta and not self.send(job.sender, text=delta):
                    self._hang_up(h)
            elif kind == "done":
                self._finish(h, self.jobs.pop(h))

    def _hang_up(self, h: int) -> None:
        r = self.engine.result(h)
        self.engine.cancel(h)
        self.note(f"esdllm: request {h}: the client went away; stopped in block {r.blk + 1} of {r.n_blocks}, "
                  f"its row is free at the next step")

    def _finish(self, h: int, job: Job) -> None:
        r = self.engine.pop(h)
        if r.error is not None:
            self.send(job.sender, error=f"generation failed: {r.error}", final=True)
            return
        if r.cancelled:
            self.send(job.sender, final=True)
            return
        text, ids = self.pipe.decode(r.tokens)
        out = job.stream.delta(text, final=True) if job.req.stream else text
        seconds = time.perf_counter() - job.t0
        stats = {"nfe": r.nfe, "steps": r.nfe, "output_tokens": len(ids), "prompt_tokens": len(r.prompt),
                 "tokens_per_second": round(len(ids) / seconds, 3) if seconds > 0 else 0.0,
                 "tokens_per_forward": round(len(ids) / max(r.nfe, 1), 4),
                 "batch_size": r.batch_max, "kept_fraction": round(r.positions / max(r.nfe, 1) / r.end, 4),
                 "seconds": round(seconds, 6), "queue_seconds": round(r.t_admit - r.t_submit, 6),
                 "blocks": r.blk,  # decoded; fewer than max_tokens / block_length after an early exit
                 "method": r.cfg.method, "scheduler": "inflight", **self.info}
        self.send(job.sender, text=out, stats=stats, final=True)

    def _fail_all(self, msg: str) -> None:
        for h, job in list(self.jobs.items()):
            self.send(job.sender, error=msg, final=True)
            self.jobs.pop(h, None)
        while True:
            try:
                job = self.inbox.get_nowait()
            except queue.Empty:
                return
            self.send(job.sender, error=msg, final=True)
