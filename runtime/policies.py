"""Policies: which canvas rows one step forwards, against which cache, with what skipping.

Vanilla    full forward of the whole canvas every step (LLaDA generate(), Dream diffusion_generate()).
FastDLLM   block-wise approximate KV cache (Fast-dLLM, arXiv 2505.22618 §3.2): a full forward at each
           block start; later steps forward the block plus the suffix (prefix cache) or the block
           only (dual cache), reusing cached K/V for everything else.
ESDLLM     early skipping (ES-dLLM, arXiv 2603.10088; research/algorithms.md §1): at the prune layers
           keep only the top-k rows by importance; skipped rows reuse cached K/V and hidden states.

Rows vs positions: logits of row r predict canvas position r + shift (Dream shift = 1), so a step
that must predict block [s, e) forwards rows from s - shift. Rows of a batch entry that has nothing
left to do point at the cache's trash slot, so it neither computes state nor changes anything:
a request's tokens never depend on what it is batched with.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import DecodeConfig, ModelArgs
from .model import StepPlan


@dataclass
class StepContext:
    x: Tensor            # [B, L] canvas
    block: int
    s: int               # block start (canvas position)
    e: int               # block end (exclusive)
    step: int            # step inside the block
    step_cnt: int        # global step counter (ES-dLLM refresh periods)
    active: Tensor       # [B] bool: rows still decoding this block


def _rows(B: int, lo: int, hi: int, active: Tensor, trash: int, device) -> Tensor:
    idx = torch.arange(lo, hi, device=device).expand(B, hi - lo).clone()
    idx[~active] = trash
    return idx


class Vanilla:
    """Every step runs the whole canvas; only the block's predicting rows reach the head."""

    hidden_layers: tuple[int, ...] = ()

    def __init__(self, cfg: DecodeConfig, args: ModelArgs, L: int, trash: int):
        self.cfg, self.args, self.L, self.trash = cfg, args, L, trash
        self.sh = args.logits_shift

    def full(self, c: StepContext) -> tuple[Tensor, StepPlan]:
        idx = _rows(c.x.shape[0], 0, self.L, c.active, self.trash, c.x.device)
        return idx, StepPlan(head=slice(c.s - self.sh, c.e - self.sh))

    def plan(self, c: StepContext) -> tuple[Tensor, StepPlan]:
        return self.full(c)

    def update(self, c: StepContext, pred: Tensor, conf: Tensor, chosen: Tensor) -> None:
        pass


class FastDLLM(Vanilla):
    """Fast-dLLM prefix / dual cache, refreshed by a full forward at each block start (and every
    `cache_refresh` steps inside a block when that is set: 1 reproduces vanilla exactly)."""

    def plan(self, c: StepContext) -> tuple[Tensor, StepPlan]:
        mode, every = self.cfg.cache, self.cfg.cache_refresh
        if mode == "none" or c.step == 0 or (every and c.step % every == 0):
            return self.full(c)
        bl = c.e - c.s
        hi = self.L if mode == "prefix" else c.e
        idx = _rows(c.x.shape[0], c.s - self.sh, hi, c.active, self.trash, c.x.device)
        return idx, StepPlan(head=slice(0, bl))


def prune_schedule(cfg: DecodeConfig, n_layers: int) -> dict[int, float]:
    """{layer: keep proportion}: prune at the output of the first layer of each schedule segment.

    LLaDA (32 layers) with proportions 1/0.5/0.25 at 0/0.125/0.25: prune to 0.5 after layer 4 and
    to 0.25 after layer 8, as the ES-dLLM code does (algorithms.md §1.2).
    """
    out: dict[int, float] = {}
    cur = 1.0
    for p, pos in zip(cfg.skip_proportions, cfg.skip_positions):
        layer = math.ceil(pos * n_layers - 1e-9)
        if layer < n_layers and p < cur:
            out[layer] = p
            cur = p
    return out


class ESDLLM(Vanilla):
    """ES-dLLM early skipping (algorithms.md §1.3-1.5), composable with threshold decoding."""

    def __init__(self, cfg: DecodeConfig, args: ModelArgs, L: int, trash: int):
        super().__init__(cfg, args, L, trash)
        self.schedule = prune_schedule(cfg, args.n_layers)
        self.hidden_layers = tuple(sorted(self.schedule))
        self.conf = None          # [B, L + 1] confidence by predicting row, stale where skipped
        self.last = None          # [B, L + 1] bool, token rows committed in the previous step
        self.n_last = None        # [B]
        self.leftmost = None      # [B] leftmost position committed in the previous step

    def _init(self, x: Tensor) -> None:
        B, dev = x.shape[0], x.device
        self.conf = torch.zeros(B, self.L + 1, dtype=torch.float32, device=dev)
        self.last = torch.zeros(B, self.L + 1, dtype=torch.bool, device=dev)
        self.n_last = torch.zeros(B, dtype=torch.long, device=dev)
        self.leftmost = torch.full((B,), self.L, dtype=torch.long, device=dev)

    def plan(self, c: StepContext) -> tuple[Tensor, StepPlan]:
        cfg, sh, B, dev = self.cfg, self.sh, c.x.shape[0], c.x.device
        if self.conf is None:
            self._init(c.x)
        if c.step_cnt == 0:  # the one full forward that fills every K/V and hidden cache
            idx, plan = self.full(c)
            plan.write_hidden = True
            return idx, plan
        prompt_refresh = c.step_cnt % cfg.prompt_update_freq == 0
        all_update = prompt_refresh or c.step_cnt % cfg.block_update_freq == 0
        lo = torch.full((B,), c.s - sh, dtype=torch.long, device=dev)
        if prompt_refresh:
            lo.zero_()
        elif c.step == 0:  # re-run the tokens decoded last step (they sit in the previous block)
            lo = torch.minimum(lo, self.leftmost)
        n = c.e - int(lo.min())
        idx = torch.arange(c.e - n, c.e, device=dev).expand(B, n).clone()
        idx[(idx < lo[:, None]) | ~c.active[:, None]] = self.trash
        bl = c.e - c.s
        plan = StepPlan(head=slice(n - bl - sh, n - sh), write_hidden=True, alpha=cfg.alpha)
        if all_update or not self.schedule:
            return idx, plan
        n_fwd = (idx != self.trash).sum(1)
        floor_k = torch.clamp(self.n_last + 2, max=bl)
        keep, keep_rows = {}, {}
        for layer, p in self.schedule.items():
            k_row = torch.maximum((p * n_fwd.double()).floor().long(), floor_k).clamp(max=n)
            k_row[~c.active] = 0
            keep[layer], keep_rows[layer] = int(k_row.max()), k_row
        plan.keep, plan.keep_rows = keep, keep_rows
        plan.confidence = self.conf
        plan.bonus = self._bonus(c, idx)
        return idx, plan

    def _bonus(self, c: StepContext, idx: Tensor) -> Tensor:
        """[B, L + 1] bonuses by row (§1.3 step 3); the trash slot never outranks a real row."""
        cfg, sh = self.cfg, self.sh
        bonus = torch.zeros_like(self.conf)
        if cfg.alpha > 0:  # +2 for the two most confident forwarded rows
            fwd_conf = self.conf.gather(1, idx).masked_fill(idx == self.trash, -1.0)
            # stable sort: ties go to the leftmost row, whatever trash padding precedes it
            top = torch.sort(fwd_conf, dim=1, descending=True, stable=True).indices[:, :2]
            bonus.scatter_(1, idx.gather(1, top), 2.0)
        masked = c.x[:, c.s:c.e] == self.args.mask_id  # +5 for the leftmost masked block position
        has = masked.any(1)
        left = masked.float().argmax(1) + c.s - sh
        bonus[has, left[has]] += 5.0
        if cfg.alpha < 1:  # +3 for tokens committed last step: recompute their K/V
            bonus += 3.0 * self.last.float()
        bonus[:, self.trash] = -1e4
        return bonus

    def update(self, c: StepContext, pred: Tensor, conf: Tensor, chosen: Tensor) -> None:
        sh, L = self.sh, self.L
        rows = (pred - sh).clamp(0, L)
        self.conf.scatter_(1, rows, conf.float())
        still = torch.ones_like(self.conf, dtype=torch.bool)
        still[:, : L - sh] = c.x[:, sh:] == self.args.mask_id
        still[:, L - sh:] = False
        self.conf *= still
        # Rows idle this step (block already done) keep their state, as they would alone.
        a = c.active
        self.last[a] = False
        self.last[:, c.s:c.e] |= chosen & a[:, None]
        self.n_last = torch.where(a, chosen.sum(1), self.n_last)
        pos = torch.arange(c.s, c.e, device=chosen.device).expand_as(chosen)
        self.leftmost = torch.where(a, torch.where(chosen, pos, L).min(1).values, self.leftmost)


def make_policy(cfg: DecodeConfig, args: ModelArgs, L: int, trash: int):
    cls = {"vanilla": Vanilla, "fast-dllm": FastDLLM, "es-dllm": ESDLLM}[cfg.method]
    return cls(cfg, args, L, trash)
