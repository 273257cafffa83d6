"""The in-flight engine: a slot table of requests, each decoding at its own block and step, advanced
one denoising step at a time by `step()`.

    eng = Engine(executor, max_batch=8, max_len=512)
    h = eng.submit(prompt_ids, DecodeConfig(method="es-dllm", threshold=0.9), stop_ids={eos})
    while eng.busy(): eng.step()          # each call: one step for every active request
    eng.result(h).tokens

Layout (runtime/slots.py). A lane holds the requests of one DecodeConfig up to the generation length (`lane_key`:
requests that differ only in max_tokens share rows and forwards, each row has its own end): one
canvas [max_batch, max_len] and one Cache of max_batch rows (+ the trash slot), one batched policy.
A request's row holds its prompt from slot 0, then its generation, then nothing (slots that are not
keys), exactly the canvas it has alone, so its arithmetic is the one it has alone: its tokens do not
depend on who joins or leaves around it, nor on when it arrives (greedy, float32).

A step. Every active request needs some kind of forward (Policy.phase: a full forward at a block
start, a cached block step, ES-dLLM's refresh spans, ...). Requests of a lane whose phases are of
one kind (Policy.kind: ES-dLLM's cached steps with and without skipping are one) share one forward:
over the lane's rows up to the last occupied one, the others idling on the trash slot in it, or,
for a group of at most half of those rows, over copies of its own rows (written back after). So a
step costs one forward per (lane, kind) present: at most 2 for fast-dllm (block starts, block
steps), 1 for vanilla, 3 for es-dllm (first forwards, prompt refreshes, cached steps), each cut
in two or more where its rows' canvases differ so much in length that the padding would cost more
than another forward (split_runs; a 64-token answer beside a 512-token one). A request
that joins does its own first forward while the others take their cached steps. A request is done
when its last block is decided, when early exit finds EOS in a finished block, or when cancelled;
its row is free for the next request at the following step.

Events. step() returns the events of the step: (handle, kind) with kind "block" (a block of the
request was decided), "prefix" (its decided prefix grew, with stream_steps) or "done". A forward
that raises ends its requests alone (Request.error says why); the others go on.
"""
from __future__ import annotations

import itertools
import time
from collections import deque

import torch
from torch import Tensor

from .cache import StepContext
from .config import DecodeConfig, Stats
from .slots import Lane, Request, lane_key, narrowed, split_runs


class Engine:
    """Slot table over any executor (torch, onnxruntime, TensorRT: the Transformer.step interface).

    max_batch: rows per lane and requests decoding at once; max_len: the longest prompt + generation
    a request may have; max_lanes: distinct decoding configs decoding at once (each lane holds a
    cache of max_batch rows); later requests queue."""

    def __init__(self, executor, max_batch: int, max_len: int, max_lanes: int = 4, seed: int = 0,
                 isolate_errors: bool = True, forward_cost: float | None = None):
        self.executor, self.max_batch, self.max_len, self.max_lanes = executor, max_batch, max_len, max_lanes
        # a forward's fixed cost in row-positions, for cutting rows of different widths apart: on a
        # CPU about 40 (one row of 32 positions 2.3 ms, 8 rows 8.3 ms), taken a little higher so
        # that rows of near widths stay together; a GPU forward of a few thousand positions costs
        # about what one of a few does
        self.forward_cost = forward_cost if forward_cost is not None else (
            64.0 if torch.device(executor.device).type == "cpu" else 4096.0)
        self.isolate_errors = isolate_errors  # False: a failing forward raises out of step()
        self.lanes: dict[DecodeConfig, Lane] = {}
        self.queue: deque[Request] = deque()
        self.requests: dict[int, Request] = {}
        self.ids = itertools.count()
        self.gen = torch.Generator(device=executor.device).manual_seed(seed)
        self.stats = Stats()

    # --- requests -------------------------------------------------------------------------

    def submit(self, prompt: list[int], cfg: DecodeConfig, stop_ids: set[int] | None = None,
               stream_steps: bool = False) -> int:
        """Queue a request; it joins at the next step that has a free row. -> handle."""
        if not prompt:
            raise ValueError("every prompt needs at least one token")
        if getattr(self.executor, "static_shapes", False) and not cfg.static_shapes:
            cfg = cfg.replace(static_shapes=True)  # a compiled step needs shapes decided on the host
        if len(prompt) + cfg.gen_length > self.max_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + gen_length ({cfg.gen_length}) = "
                             f"{len(prompt) + cfg.gen_length} exceeds the engine's maximum length {self.max_len}")
        args = self.executor.args
        req = Request(next(self.ids), list(prompt), cfg, set(stop_ids) if stop_ids is not None else {args.eos_id},
                      stream_steps, lane_key(cfg))
        self.requests[req.id] = req
        self.queue.append(req)
        return req.id

    def cancel(self, handle: int) -> None:
        """Stop a request: its row is free at the next step (its tokens so far stay readable)."""
        req = self.requests[handle]
        if not req.done:
            req.cancelled = True

    def result(self, handle: int) -> Request:
        return self.requests[handle]

    def pop(self, handle: int) -> Request:
        """The finished request, forgotten by the engine."""
        req = self.requests[handle]
        if not req.done:
            raise ValueError(f"request {handle} is still decoding")
        return self.requests.pop(handle)

    def busy(self) -> bool:
        return bool(self.queue) or any(lane.active() for lane in self.lanes.values())


    def decided(self, handle: int) -> list[int]:
        """The request's decided prefix: tokens before its first undecided position (final)."""
        req = self.requests[handle]
        if req.tokens is not None:
            return req.tokens
        row = req.lane.x[req.row, req.start: req.end].tolist()
        mask = self.executor.args.mask_id
        return row[: row.index(mask)] if mask in row else row

    # --- one step -------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[tuple[int, str]]:
        """One denoising step for every active request. -> events [(handle, kind)]. In inference
        mode whoever calls it: otherwise every cache write would chain the forwards' autograd
        graphs onto the lane's caches, holding each forward's activations for good."""
        events: list[tuple[int, str]] = []
        self._finish_cancelled(events)
        self._admit(events)
        for lane in list(self.lanes.values()):
            groups: dict[object, list[Request]] = {}
            for req in lane.active():
                req.phase = lane.policy.phase(req.step, req.step_cnt, req.prev_step)
                groups.setdefault(lane.policy.kind(req.phase), []).append(req)
            for phase, group in groups.items():
                for reqs in self._by_width(lane, group):
                    try:
                        self._forward(lane, phase, reqs, events)
                    except Exception as e:  # this forward's requests fail; the others go on
                        if not self.isolate_errors:
                            raise
                        for r in reqs:
                            if not r.done:
                                r.error = f"{type(e).__name__}: {e}"
                                self._done(r, events)
        return events

    def _by_width(self, lane: Lane, reqs: list[Request]) -> list[list[Request]]:
        """The forwards one kind's rows run in. A forward is as wide as its widest row (a row's
        canvas ends at its own prompt + gen length, and keys reach the last end), so a short request
        beside a 512-token one would pay for 512 columns: rows are cut into runs of similar ends
        where the padding saved outweighs a forward's fixed cost. Static shapes and guidance keep
        one forward (their layouts are the lane's)."""
        if len(reqs) < 2 or lane.cfg.static_shapes or lane.cfg_pair > 1:
            return [reqs]
        reqs = sorted(reqs, key=lambda r: r.end)
        return [reqs[i:j] for i, j in split_runs([r.end for r in reqs], self.forward_cost)]

    def _finish_cancelled(self, events) -> None:
        for lane in self.lanes.values():
            for req in lane.active():
                if req.cancelled:
                    self._done(req, events)

    def _admit(self, events) -> None:
        waiting = deque()
        while self.queue:
            req = self.queue.popleft()
            if req.cancelled:  # cancelled while queued: it never takes a row
                req.done, req.tokens, req.t_done = True, [], time.perf_counter()
                events.append((req.id, "done"))
                continue
            key = req.key
            lane = self.lanes.get(key)
            used = sum(len(l.active()) for l in self.lanes.values())
            if lane is None and len(self.lanes) >= self.max_lanes:  # an idle lane makes room
                idle = next((c for c, l in self.lanes.items() if not l.active()), None)
                if idle is not None:
                    del self.lanes[idle]
            if used >= self.max_batch or (lane is None and len(self.lanes) >= self.max_lanes):
                waiting.append(req)
                continue
            if lane is None:
                lane = self.lanes[key] = Lane(self.executor, key, self.max_batch, self.max_len, self.gen)
                self.stats.extra["cache_bytes"] = max(self.stats.extra.get("cache_bytes", 0), lane.cache.nbytes())
            lane.admit(req, lane.free_rows()[0])
        self.queue = waiting

    def _context(self, lane: Lane, phase, reqs: list[Request], B: int, sel: Tensor | None = None) -> StepContext:
        """The forward's view of the lane's first B rows, or (sel) of copies of the rows sel, in the
        order of reqs."""
        if sel is not None:
            dev = lane.x.device
            step = torch.tensor([r.step for r in reqs], device=dev)
            s_host = [r.start + r.blk * r.cfg.block_length for r in reqs]
            return StepContext(lane.x.index_select(0, sel), lane.s.index_select(0, sel), s_host,
                               lane.cfg.block_length, step, phase, torch.ones(len(reqs), dtype=torch.bool, device=dev),
                               lane.start.index_select(0, sel), lane.end.index_select(0, sel), [r.end for r in reqs],
                               [r.start for r in reqs], [r.phase for r in reqs])
        rows = [r.row for r in reqs]
        dev = lane.x.device
        active = torch.zeros(B, dtype=torch.bool, device=dev)
        active[rows] = True
        step = torch.zeros(B, dtype=torch.long, device=dev)
        step[rows] = torch.tensor([r.step for r in reqs], device=dev)
        s_host, e_host, g_host = [reqs[0].start + reqs[0].blk * reqs[0].cfg.block_length] * B, \
            [reqs[0].end] * B, [reqs[0].start] * B  # idle rows repeat an active row: no shape widens
        phases = [reqs[0].phase] * B
        for r in reqs:
            s_host[r.row], e_host[r.row], g_host[r.row] = r.start + r.blk * r.cfg.block_length, r.end, r.start
            phases[r.row] = r.phase
        return StepContext(lane.x[:B], lane.s[:B], s_host, lane.cfg.block_length, step, phase, active,
                           lane.start[:B], lane.end[:B], e_host, g_host, phases)

    def _forward(self, lane: Lane, phase, reqs: list[Request], events) -> None:
        span = lane.span()  # idle rows past the last occupied one cost nothing
        # a few rows of a wide lane (a newcomer's full forward, say) run on copies of their own rows
        # rather than beside idle ones; static shapes and guidance keep the lane's layout
        sel = None
        if 2 * len(reqs) <= span and lane.cfg_pair == 1 and not lane.cfg.static_shapes:
            sel = torch.tensor([r.row for r in reqs], device=lane.x.device)
        B = span if sel is None else len(reqs)
        at = {r.row: (i if sel is not None else r.row) for i, r in enumerate(reqs)}  # each row's place
        c = self._context(lane, phase, reqs, B, sel)
        upto = max(r.end for r in reqs)  # the slots these rows have: a copy needs no more
        cache = lane.cache_for(B) if sel is None else lane.cache.take(sel, upto)
        with narrowed(lane.policy, B if sel is None else sel, lane.max_batch):
            starting = [at[r.row] for r in reqs if r.step == 0]
            if starting:
                rows = torch.zeros_like(c.active)
                rows[starting] = True
                lane.policy.begin_block(c, rows)
            idx, plan = lane.policy.plan(c)
            keys = max(c.ends_host)
            if plan.key_slots is None and keys < lane.L:  # attend to the slots these rows have, not max_len
                plan.key_len = keys
            logits, pred = self._run(lane, c, idx, plan, cache)
            lane.policy.commit(c, logits, pred)
        if sel is not None:  # the copies' new state goes back into the lane's rows
            lane.cache.put(sel, cache, upto)
            lane.x.index_copy_(0, sel, c.x)
        st = self.stats
        st.nfe, st.steps = st.nfe + 1, st.steps + 1
        rows = plan.rows_per_layer(idx.shape[1], self.executor.args.n_layers)
        st.positions_computed += rows
        undecided = (c.x.gather(1, c.cols) == self.executor.args.mask_id).any(1).tolist()
        spb = lane.policy.steps
        for r in reqs:
            r.nfe, r.prev_step, r.step, r.step_cnt = r.nfe + 1, r.step, r.step + 1, r.step_cnt + 1
            r.batch_max, r.positions = max(r.batch_max, len(reqs)), r.positions + rows
            if undecided[at[r.row]]:
                if r.step > spb + r.cfg.block_length:  # past its schedule every step commits a token
                    raise RuntimeError(f"request {r.id}: block {r.blk} is still undecided after {r.step} steps")
                if r.stream_steps:
                    self._maybe_prefix_event(r, events)
                continue
            self._block_done(lane, r, events)

    def _run(self, lane: Lane, c: StepContext, idx: Tensor, plan, cache):
        """One forward of rows idx [B, n]; LLaDA's classifier-free guidance runs a second copy with the
        prompt masked in the same batch: logits = un + (scale + 1) * (cond - un)."""
        x, mask_id = c.x, self.executor.args.mask_id
        pad_col = torch.full_like(x[:, :1], mask_id)
        tokens = torch.cat([x, pad_col], 1).gather(1, idx)
        tf = time.perf_counter()
        if lane.cfg.cfg_scale > 0:
            col = torch.arange(x.shape[1], device=x.device)
            un = torch.cat([torch.where(col < c.starts[:, None], mask_id, x), pad_col], 1)
            logits, pred = self.executor.step(torch.cat([tokens, un.gather(1, idx)]), torch.cat([idx, idx]),
                                              cache, plan)
            cond, unc = logits.chunk(2)
            logits, pred = unc + (lane.cfg.cfg_scale + 1) * (cond - unc), pred[: x.shape[0]]
        else:
            logits, pred = self.executor.step(tokens, idx, cache, plan)
        self.stats.forward_seconds += time.perf_counter() - tf
        return logits, pred

    def _block_done(self, lane: Lane, r: Request, events) -> None:
        bl, eos = r.cfg.block_length, self.executor.args.eos_id
        s = r.start + r.blk * bl
        r.step_cnt = (r.blk + 1) * lane.policy.steps  # refresh periods stay aligned to blocks (§1.4)
        r.blk, r.step, r.streamed = r.blk + 1, 0, max(r.streamed, s + bl - r.start)
        events.append((r.id, "block"))
        # a finished block holding EOS ends the request (Streaming-dLLM; only where EOS stops it:
        # random-weight benchmarks pass no stop ids and count every token, so they decode every token)
        exit_now = r.cfg.resolved("early_exit") and eos in r.stop_ids and bool((lane.x[r.row, s: s + bl] == eos).any())
        if exit_now:
            lane.x[r.row, s + bl: r.end] = eos
        if exit_now or r.blk == r.n_blocks:
            self._done(r, events)
        else:
            lane.s[r.row] = r.start + r.blk * bl

    def _maybe_prefix_event(self, r: Request, events) -> None:
        n = len(self.decided(r.id))
        if n > r.streamed:
            r.streamed = n
            events.append((r.id, "prefix"))

    def _done(self, r: Request, events) -> None:
        r.lane.release(r)
        r.done, r.t_done = True, time.perf_counter()
        events.append((r.id, "done"))
