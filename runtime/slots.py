"""The engine's slot table: a Request (one request's host-side state), a Lane (the rows of one
DecodeConfig: canvas [max_batch, max_len], Cache, batched policy and slots), the lane a config
decodes in (lane_key), the policy state narrowed to some rows for one forward (narrowed) and the
cut of a lane's rows into forwards by width (split_runs). runtime/engine.py drives them.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .config import DecodeConfig
from .policies import make_policy


def split_runs(ends: list[int], overhead: float) -> list[tuple[int, int]]:
    """Cut sorted `ends` into runs [i, j) minimising the sum over runs of overhead + (j - i) * ends[j - 1]:
    each run a forward as wide as its last row, overhead a forward's fixed cost in row-positions.
    Dynamic programming over the cut points (a lane has a handful of rows)."""
    n = len(ends)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            c = best[i] + overhead + (j - i) * ends[j - 1]
            if c < best[j]:
                best[j], cut[j] = c, i
    runs, j = [], n
    while j:
        runs.append((cut[j], j))
        j = cut[j]
    return runs[::-1]


def lane_key(cfg: DecodeConfig) -> DecodeConfig:
    """The config of the lane a request decodes in: its own with the generation length taken out.
    A policy reads the length only as steps per block (each row carries its own end), so this keeps
    those and sets one block."""
    return cfg.replace(gen_length=cfg.block_length, steps=cfg.n_steps // (cfg.gen_length // cfg.block_length))


@dataclass
class Request:
    """One request's host-side state (its device state is its row in a lane)."""
    id: int
    prompt: list[int]
    cfg: DecodeConfig
    stop_ids: set[int]
    stream_steps: bool = False
    key: DecodeConfig | None = None  # lane_key(cfg): the lane it decodes in
    lane: "Lane | None" = None
    row: int = -1
    blk: int = 0                 # current block
    step: int = 0                # step inside the current block
    step_cnt: int = 0            # this request's forwards so far, aligned to blocks (refresh periods)
    prev_step: int | None = None  # step inside its block of this request's previous forward
    phase: object = None         # what its forward this step is (Policy.phase)
    done: bool = False
    cancelled: bool = False
    error: str | None = None
    streamed: int = 0            # decided-prefix length at the last "prefix" event
    tokens: list[int] | None = None  # the generation region, once done
    nfe: int = 0                 # forwards this request took part in
    batch_max: int = 0           # the most requests one of them served
    positions: float = 0.0       # rows those forwards ran per layer, summed (kept fraction = / nfe / end)
    t_submit: float = field(default_factory=time.perf_counter)
    t_admit: float = 0.0
    t_done: float = 0.0

    @property
    def n_blocks(self) -> int:
        return self.cfg.gen_length // self.cfg.block_length

    @property
    def start(self) -> int:
        return len(self.prompt)

    @property
    def end(self) -> int:
        return len(self.prompt) + self.cfg.gen_length


class Lane:
    """The rows of one DecodeConfig: canvas, cache, policy and the slot table."""

    def __init__(self, executor, cfg: DecodeConfig, max_batch: int, max_len: int, seed_gen: torch.Generator):
        args, dev = executor.args, executor.device
        self.cfg, self.executor, self.max_batch, self.L = cfg, executor, max_batch, max_len
        self.policy = make_policy(cfg, args, max_len, trash=max_len, gen=seed_gen)
        self.cfg_pair = 2 if cfg.cfg_scale > 0 else 1  # LLaDA's guidance runs an unconditioned copy
        self.cache = executor.new_cache(max_batch * self.cfg_pair, max_len, self.policy.hidden_layers,
                                        **({"saliency": True} if self.policy.saliency else {}))
        self.x = torch.full((max_batch, max_len), args.pad_id, dtype=torch.long, device=dev)
        self.policy.allocate(max_batch, dev)
        self.views: dict[int, object] = {}
        self.slots: list[Request | None] = [None] * max_batch
        self.s = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.start = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.end = torch.zeros(max_batch, dtype=torch.long, device=dev)

    def free_rows(self) -> list[int]:
        return [i for i, r in enumerate(self.slots) if r is None]

    def admit(self, req: Request, row: int) -> None:
        args = self.executor.args
        self.slots[row], req.lane, req.row, req.t_admit = req, self, row, time.perf_counter()
        self.x[row] = args.pad_id
        self.x[row, : req.start] = torch.tensor(req.prompt, dtype=torch.long)
        self.x[row, req.start: req.end] = args.mask_id
        for k in range(self.cfg_pair):
            self.cache.set_row(row + k * self.max_batch, req.end)
        self.start[row], self.end[row], self.s[row] = req.start, req.end, req.start
        self.policy.reset_rows([row])

    def release(self, req: Request) -> None:
        req.tokens = self.x[req.row, req.start: req.end].tolist()
        self.slots[req.row] = None

    def active(self) -> list[Request]:
        return [r for r in self.slots if r is not None]

    def cache_for(self, B: int):
        """The cache of the first B rows: views, one object per B (graph replays key on it)."""
        if B == self.max_batch:
            return self.cache
        if B not in self.views:
            self.views[B] = self.cache.narrow(B)
        return self.views[B]

    def span(self) -> int:
        """Rows a forward runs: up to the last occupied one (rows are taken lowest first), all of
        them with guidance (its second copy sits max_batch rows further)."""
        if self.cfg_pair > 1:
            return self.max_batch
        return 1 + max(i for i, r in enumerate(self.slots) if r is not None)


@contextlib.contextmanager
def narrowed(policy, rows: int | Tensor, B: int):
    """The policy's per-row state (tensors of B rows) for one forward over some rows: views of the
    first `rows` rows (an int), or copies of the rows `rows` (a tensor). What is not a view of the
    state afterwards (copies, replaced tensors) is written back."""
    full = {n: t for n, t in vars(policy).items() if isinstance(t, Tensor) and t.dim() and t.shape[0] == B}
    part = {n: (t[:rows] if isinstance(rows, int) else t.index_select(0, rows)) for n, t in full.items()}
    for n, v in part.items():
        setattr(policy, n, v)
    try:
        yield
    finally:
        for n, t in full.items():
            cur = getattr(policy, n)
            if isinstance(rows, int):
                if cur is not part[n]:
                    t[:rows].copy_(cur)
            else:
                t.index_copy_(0, rows, cur)
            setattr(policy, n, t)
