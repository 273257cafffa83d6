"""Policies: a whole denoising step each, plan -> (executor) -> commit -> update.

Vanilla    full forward of the whole canvas every step (LLaDA generate(), Dream diffusion_generate()).
FastDLLM   block-wise approximate KV cache (Fast-dLLM, arXiv 2505.22618 §3.2): a full forward at each
           block start; later steps forward the block plus the suffix (prefix cache) or the block
           only (dual cache), reusing cached K/V for everything else.
ESDLLM     early skipping (ES-dLLM, arXiv 2603.10088; research/algorithms.md §1): at the prune layers
           keep only the top-k rows by importance; skipped rows reuse cached K/V and hidden states;
           EOS proposals are delayed while the position before them is undecided.
StreamingDLLM  the prefix cache with the suffix pruned to a window, the dynamic threshold, early exit
           (Streaming-dLLM, arXiv 2601.17917; SuffixWindow).
DyLLM      dense first forwards, then only the salient rows recompute K/V and FFN (arXiv 2603.08026).
(One file for the five: they share the planning helpers and each is a small override of Vanilla.)

Rows of one forward may sit at different blocks and steps (the in-flight engine): every per-row
quantity is a tensor over the rows, and the host values that decide shapes come from active rows.

plan(c) says which canvas rows a forward runs and with what plan (runtime/cache.py); commit(c, logits,
pred) samples proposals, picks the block positions that take them (runtime/sampling.make_rule:
count schedule, threshold or factor), writes them into the canvas and updates the policy's state.

Rows vs positions: logits of row r predict canvas position r + shift (Dream shift = 1), so a step
that must predict block [s, e) forwards rows from s - shift. Rows of a batch entry that has nothing
left to do point at the cache's trash slot, so it neither computes state nor changes anything: a
request's tokens never depend on what it is batched with. Every row has its own block start (c.s).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import sampling as S
from .cache import StepContext, StepPlan
from .config import DecodeConfig, ModelArgs


def _span(B: int, lo: int, hi: int, device) -> Tensor:
    """[B, hi - lo] int64: lo .. hi - 1 for every row (head indices into the forwarded rows)."""
    return torch.arange(lo, hi, device=device).expand(B, hi - lo)


class SuffixWindow:
    """Streaming-dLLM's attenuation-guided suffix pruning (their LLaDA-1.5/sampler.py:4-20): of the
    positions after a row's block keep the first w and, with `trailing`, the generation's last one
    (true RoPE positions, so the model still sees the target length); a suffix of at most w positions
    is kept whole, with no extra tail."""

    def __init__(self, w: int, trailing: bool, trash: int):
        self.w, self.trailing, self.trash = w, trailing, trash

    def rows(self, e: Tensor, end: Tensor, room: int) -> Tensor:
        """[B, n] kept suffix slots after block ends e [B] (trash where there is nothing); end [B]:
        each row's generation end; room: the longest suffix (end - e) of the rows (host), so n is
        what the row with the most suffix keeps."""
        n_near = max(0, min(self.w, room))
        near = e[:, None] + torch.arange(n_near, device=e.device)
        near = torch.where(near < end[:, None], near, self.trash)
        if not (self.trailing and room > self.w):
            return near
        tail = torch.where(end - e > self.w, end - 1, self.trash)[:, None]
        return torch.cat([near, tail], 1)

    def key_slots(self, e: Tensor, end: Tensor, room: int, e_max: int) -> Tensor | None:
        """[B, nk] the key slots a forward attends to: the prefix and block (< e), then the kept
        suffix, in canvas order, then the trash where a row has fewer; None when no row prunes a key.
        The pruned keys are left out of the attention, not masked in it, so they cost nothing; a
        row's real keys come first, so its reduction is the one it has alone (README "Batch
        invariance")."""
        if room <= self.w:  # every row keeps its whole suffix
            return None
        near = torch.arange(e_max, device=e.device).expand(e.shape[0], e_max)
        near = torch.where(near < e[:, None], near, self.trash)
        slots = torch.cat([near, self.rows(e, end, room)], 1)
        order = torch.sort((slots == self.trash).to(torch.int8), dim=1, stable=True).indices
        return slots.gather(1, order)


def _from(start: Tensor, n: int, limit, active: Tensor, trash: int) -> Tensor:
    """[B, n] canvas rows start[b] .. start[b] + n - 1; rows at or past `limit` (an int or [B]) and
    rows of idle entries are the trash slot."""
    idx = start[:, None] + torch.arange(n, device=start.device)
    limit = limit[:, None] if isinstance(limit, Tensor) else limit
    return torch.where((idx < limit) & active[:, None], idx, trash)


class Vanilla:
    """Every step runs the whole canvas; only the block's predicting rows reach the head."""

    hidden_layers: tuple[int, ...] = ()
    saliency = False  # the cache holds DyLLM's context and FFN caches

    def __init__(self, cfg: DecodeConfig, args: ModelArgs, L: int, trash: int, gen: torch.Generator):
        self.cfg, self.args, self.L, self.trash, self.gen = cfg, args, L, trash, gen
        self.sh = args.logits_shift
        self.sampler = cfg.sampler or ("llada" if args.family == "llada" else "dream")
        self.steps = cfg.n_steps // (cfg.gen_length // cfg.block_length)  # steps per block
        self.rule = S.make_rule(cfg.replace(threshold=cfg.resolved("threshold")), self.sampler, gen)
        self.quota = None  # [B, steps] LLaDA's tokens per step of each row's current block
        w = cfg.resolved("suffix_window")
        self.window = SuffixWindow(w, cfg.trailing, trash) if w is not None else None
        self.tau0, self.dyn_alpha = cfg.resolved("threshold"), cfg.resolved("dynamic_alpha")

    # --- planning ---------------------------------------------------------------------------

    def phase(self, step: int, step_cnt: int, prev_step: int | None = None) -> str:
        """The kind of forward a row needs at this step of its block, its step_cnt-th forward, after
        a forward at step prev_step (rows of one forward share it)."""
        return "full"

    def kind(self, phase):
        """The forward a row of this phase joins: rows of one kind share a forward, and plan() sees
        each row's own phase in StepContext.phases. Default: the phase itself."""
        return phase

    def reset_rows(self, rows: list[int]) -> None:
        """Rows `rows` take new requests: forget what earlier ones left in the policy's state."""

    def allocate(self, B: int, device) -> None:
        """Per-row state for B rows up front (the engine runs forwards over the first rows only)."""
        self.quota = torch.zeros(B, self.steps, dtype=torch.long, device=device)

    @staticmethod
    def room(c: StepContext) -> int:
        """The longest suffix after a row's block (host): generation end minus block end."""
        return max(end - s - c.bl for end, s in zip(c.ends_host, c.s_host))

    def full(self, c: StepContext) -> tuple[Tensor, StepPlan]:
        """The whole canvas; with a suffix window the prefix, the block and the kept suffix only."""
        B, dev = c.x.shape[0], c.x.device
        head = (c.s - self.sh)[:, None] + torch.arange(c.bl, device=dev)
        head = torch.where(c.active[:, None], head, 0)  # an idle row's block may lie past this forward's rows
        zero = torch.zeros(B, dtype=torch.long, device=dev)
        if self.window is None:
            return _from(zero, max(c.ends_host), c.ends, c.active, self.trash), StepPlan(head=head)
        e = c.s + c.bl
        idx = self.with_suffix(c, _from(zero, max(c.s_host) + c.bl, e, c.active, self.trash))
        return idx, StepPlan(head=head, key_slots=self.keys(c))

    def with_suffix(self, c: StepContext, idx: Tensor) -> Tensor:
        """idx [B, n] followed by the window's kept suffix rows (trash for idle rows)."""
        kept = self.window.rows(c.s + c.bl, c.ends, self.room(c))
        return torch.cat([idx, torch.where(c.active[:, None], kept, self.trash)], 1)

    def keys(self, c: StepContext) -> Tensor | None:
        """StepPlan.key_slots: with a suffix window the prefix, the block and the kept suffix."""
        if self.window is None:
            return None
        return self.window.key_slots(c.s + c.bl, c.ends, self.room(c), max(c.s_host) + c.bl)

    def plan(self, c: StepContext) -> tuple[Tensor, StepPlan]:
        return self.full(c)

    # --- committing -------------------------------------------------------------------------

    def begin_block(self, c: StepContext, rows: Tensor) -> None:
        """Rows `rows` (bool [B]) start a new block: LLaDA's schedule splits its masks over the steps."""
        n_masked = (c.x.gather(1, c.cols) == self.args.mask_id).sum(1)
        quota = S.llada_quota(n_masked, self.steps)
        self.quota = quota if self.quota is None else torch.where(rows[:, None], quota, self.quota)

    def commit(self, c: StepContext, logits: Tensor, pred: Tensor) -> Tensor:
        """Sample proposals, choose the block positions that take them, write the canvas, update.
        logits: [B, m, V]; pred: [B, m] canvas positions they predict. -> chosen [B, bl] bool."""
        B, bl, dev = c.x.shape[0], c.bl, c.x.device
        x0, conf = S.sample(logits, self.cfg, self.sampler, self.gen, self.args.mask_id)
        delayed = self.delayed(c, pred, x0)
        # predictions in block coordinates; everything outside the block falls into column bl
        local = pred - c.s[:, None]
        local = torch.where((local >= 0) & (local < bl), local, bl)
        score = conf if delayed is None else torch.where(delayed, 0.0, conf)
        C = torch.full((B, bl + 1), S.NEG, dtype=torch.float64, device=dev).scatter_(1, local, score)[:, :bl]
        X0 = torch.zeros((B, bl + 1), dtype=torch.long, device=dev).scatter_(1, local, x0)[:, :bl]
        block = c.x.gather(1, c.cols)
        masked = block == self.args.mask_id
        cand = masked & torch.isfinite(C) & c.active[:, None]
        C = torch.where(cand, C, S.NEG)
        chosen = self.choose(c, C, cand, masked)
        c.x.scatter_(1, c.cols, torch.where(chosen, X0, block))
        self.update(c, pred, conf, delayed, chosen)
        return chosen

    def choose(self, c: StepContext, C: Tensor, cand: Tensor, masked: Tensor) -> Tensor:
        """The commit rule; with dynamic_alpha Streaming-dLLM's threshold tau0 (1 - alpha (1 - r)), r
        the masked share of the query region (block + kept suffix) before this step's commit, tau0 at
        a block's first step (their generate.py:121-127, 146-149, 164-172)."""
        if not self.dyn_alpha:
            return self.rule(C, cand, masked, c.step, self.quota)
        tau = self.tau0 * (1 - self.dyn_alpha * (1 - self.masked_share(c)))
        return S.select_threshold(C, torch.where(c.step == 0, self.tau0, tau)[:, None])

    def masked_share(self, c: StepContext) -> Tensor:
        """[B] float64: masked share of each row's block and kept (or whole remaining) suffix."""
        region = c.cols
        if self.window is not None:
            region = torch.cat([region, self.window.rows(c.s + c.bl, c.ends, self.room(c))], 1)
        else:
            region = torch.cat([region, _from(c.s + c.bl, max(0, self.room(c)), c.ends, c.active, self.trash)], 1)
        real = region != self.trash
        m = (torch.cat([c.x, c.x[:, :1]], 1).gather(1, region) == self.args.mask_id) & real
        return m.sum(1).double() / real.sum(1).clamp_min(1)

    def delayed(self, c: StepContext, pred: Tensor, x0: Tensor) -> Tensor | None:
        """[B, m] bool: head rows whose proposal is held back this step (confidence 0), or None."""
        return None

    def update(self, c: StepContext, pred: Tensor, conf: Tensor, delayed: Tensor | None, chosen: Tensor) -> None:
        pass


class FastDLLM(Vanilla):
    """Fast-dLLM prefix / dual cache, refreshed by a full forward at each block start (and every
    `cache_refresh` steps inside a block when that is set: 1 reproduces vanilla exactly)."""

    def phase(self, step: int, step_cnt: int, prev_step: int | None = None) -> str:
        every = self.cfg.cache_refresh
        full = self.cfg.cache == "none" or step == 0 or (every and step % every == 0)
        return "full" if full else self.cfg.cache

    start_shift = True  # later steps forward from s - shift (Dream's row s - 1 predicts s)

    def plan(self, c: StepContext) -> tuple[Tensor, StepPlan]:
        if c.phase == "full":
            return self.full(c)
        B, dev = c.x.shape[0], c.x.device
        sh = self.sh if self.start_shift else 0
        # dual: the block (from s - shift); prefix: the block and the suffix (the kept suffix, windowed)
        if c.phase == "dual" or self.window is not None:
            idx = _from(c.s - sh, c.bl + sh, c.ends, c.active, self.trash)
            if c.phase == "prefix":
                idx = self.with_suffix(c, idx)
        else:
            idx = _from(c.s - sh, self.room(c) + c.bl + sh, c.ends, c.active, self.trash)
        return idx, StepPlan(head=_span(B, 0, c.bl, dev), key_slots=self.keys(c))


class StreamingDLLM(FastDLLM):
    """Streaming-dLLM (arXiv 2601.17917; xiaoshideta/Streaming-dLLM, line numbers theirs): the prefix
    cache with the suffix pruned to a window and the trailing position (SuffixWindow), the dynamic
    threshold (Vanilla.choose) and early exit (the loop), defaults from its main setting
    (config.STREAMING_DEFAULTS). As their code: later steps query [s, e) + the kept suffix, not from
    s - shift (LLaDA-1.5/generate.py:139-150), so on Dream the block's first step commits exactly its
    first token, unconditionally (Dream/model/generation_utils_block.py:473-475): nothing later can
    predict it."""

    start_shift = False

    def phase(self, step: int, step_cnt: int, prev_step: int | None = None) -> str:
        return "full" if step == 0 else "prefix"

    def choose(self, c: StepContext, C: Tensor, cand: Tensor, masked: Tensor) -> Tensor:
        chosen = super().choose(c, C, cand, masked)
        if self.sh:  # Dream: the first step takes the block's first token alone
            first = torch.zeros_like(chosen)
            first[:, 0] = cand[:, 0]
            chosen = torch.where((c.step == 0)[:, None], first, chosen)
        return chosen


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


def top2_bonus(alpha: float) -> float:
    """ES-dLLM's bonus for the two most confident rows alive at each prune layer (0 when alpha = 0)."""
    return 2.0 if alpha > 0 else 0.0


class ESDLLM(Vanilla):
    """ES-dLLM early skipping (algorithms.md §1.3-1.5) as the authors' code does it (zhuzj19/ES-dLLM
    generate.py, early_skipping.py; line numbers below are theirs), composable with threshold decoding.

    Rows: for Dream the authors keep every per-row quantity in predicting-row coordinates (row p - 1
    predicts token p): the just-committed bonus (generate.py:503, 555), the block-start forward
    (:442, 557) and the forward's end (e - 1, :431-432, 445). es_token_rows moves the three to the
    token's own row (README). Both families commit one token a step (token_per_step, :104, :192)."""

    def __init__(self, cfg: DecodeConfig, args: ModelArgs, L: int, trash: int, gen: torch.Generator):
        super().__init__(cfg, args, L, trash, gen)
        self.rule = S.make_rule(cfg, "llada", gen)  # the authors' count: steps split evenly, any family
        # (es-dllm's threshold, if any, is cfg.threshold: resolved() changes nothing for it)
        self.schedule = prune_schedule(cfg, args.n_layers)
        self.hidden_layers = tuple(sorted(self.schedule))
        # the refresh rows of positions p are p - row_shift: predicting rows (authors) or token rows
        self.row_shift = 0 if cfg.es_token_rows else self.sh
        self.conf = None          # [B, L + 1] importance confidence by predicting row; trash slot -1
        self.last = None          # [B, L + 1] bool, rows of the tokens committed in the previous step
        self.n_last = None        # [B]
        self.leftmost = None      # [B] leftmost row of the previous step's commits
        self.dense = None         # [B] bool, set by plan() for commit(): see kind()

    def _init(self, x: Tensor) -> None:
        B, dev = x.shape[0], x.device
        self.conf = torch.zeros(B, self.L + 1, dtype=torch.float32, device=dev)
        self.conf[:, self.trash] = -1.0  # below every real confidence: the trash never takes a top-2 bonus
        self.last = torch.zeros(B, self.L + 1, dtype=torch.bool, device=dev)
        self.n_last = torch.zeros(B, dtype=torch.long, device=dev)
        self.leftmost = torch.full((B,), self.L, dtype=torch.long, device=dev)

    def allocate(self, B: int, device) -> None:
        super().allocate(B, device)
        self._init(torch.zeros(B, 1, device=device))

    def reset_rows(self, rows: list[int]) -> None:
        if self.conf is not None:
            self.conf[rows] = 0.0
            self.conf[rows, self.trash] = -1.0
            self.last[rows] = False
            self.n_last[rows] = 0
            self.leftmost[rows] = self.L

    def phase(self, step: int, step_cnt: int, prev_step: int | None = None) -> tuple:
        """(range, skip, last_max): the forward range (full canvas, prompt + blocks so far, block start,
        block), whether the prune layers skip rows (refresh periods are all-update steps, §1.4), and
        the most tokens a row can have committed last step (the keep bound of static shapes)."""
        cfg = self.cfg
        # the most tokens a row can have committed last step, from host values only (static shapes):
        # a count schedule's share per step, everything once a block runs past its schedule
        counted = cfg.threshold is None and cfg.factor is None and prev_step is not None and prev_step < self.steps
        last_max = -(-cfg.block_length // self.steps) if counted else cfg.block_length
        if not cfg.static_shapes:  # only static shapes need the bound: leave it out of the forward's kind
            last_max = None
        if step_cnt == 0:  # the one full forward that fills every K/V and hidden cache
            return ("full", False, last_max)
        prompt = step_cnt % cfg.prompt_update_freq == 0
        # the authors' prompt refreshes are all-update steps; prompt_skip lets them skip, so the prompt
        # rows whose states moved (a perm letter just used) are the ones recomputed in deep layers
        skip = (bool(self.schedule) and (cfg.prompt_skip or not prompt)
                and step_cnt % cfg.block_update_freq != 0)
        if prompt:
            return ("prompt", skip, last_max)
        # block starts and block steps share a forward (rows right-aligned, each its own first row);
        # static shapes keep them apart, their row counts differ
        return ("start" if step == 0 else "block") if cfg.static_shapes else "cached", skip, last_max

    def kind(self, phase):
        """Cached steps with and without skipping share a forward (dynamic shapes): a row at an
        all-update step keeps every row at the prune layers, which is its forward alone."""
        if not self.cfg.static_shapes and phase[0] == "cached":
            return ("cached", None, None)
        return phase

    def plan(self, c: StepContext) -> tuple[Tensor, StepPlan]:
        cfg, sh, B, dev = self.cfg, self.sh, c.x.shape[0], c.x.device
        if self.conf is None:
            self._init(c.x)
        span, skip, last_max = (*c.phase, c.bl)[:3]  # (span, skip) alone: last step may have taken the block
        last_max = c.bl if last_max is None else last_max
        self.dense = None  # [B] bool: rows of a skipping forward that skip nothing (their own phase)
        if skip is None:  # a merged kind: each row's phase says
            flags = [p[1] for p in c.phases]
            skip = any(flags)
            if skip and not all(flags):
                self.dense = torch.tensor([not f for f in flags], device=dev) & c.active
        if span == "full":
            idx, plan = self.full(c)
            plan.write_hidden = True
            return idx, plan
        lo = c.s - sh
        # rows at a block start re-run the rows decoded last step (they sit in the previous block)
        starts = c.step == 0 if span == "cached" else torch.full_like(c.active, span == "start")
        if span == "prompt":
            lo = torch.zeros_like(lo)
        else:
            lo = torch.where(starts, torch.minimum(lo, self.leftmost), lo)
        end = c.s + c.bl - self.row_shift  # the authors' rows end at e - shift (:431-432)
        n = self._span_length(c, span) if cfg.static_shapes else int(torch.where(c.active, end - lo, 1).max())
        idx = (end - n)[:, None] + torch.arange(n, device=dev)  # right-aligned at each row's end
        idx = torch.where((idx >= lo[:, None]) & c.active[:, None], idx, self.trash)
        if self.window is not None and span != "block":  # block starts (and prompt refreshes) recompute
            kept = self.window.rows(c.s + c.bl, c.ends, self.room(c))  # the kept suffix
            renew = c.active if span == "prompt" else c.active & starts
            idx = torch.cat([idx, torch.where(renew[:, None], kept, self.trash)], 1)
        tail = sh - self.row_shift  # forwarded rows past the last predicting one
        head = StepPlan(head=_span(B, n - c.bl - tail, n - tail, dev), write_hidden=True, alpha=cfg.alpha,
                        key_slots=self.keys(c))
        if not skip:
            return idx, head
        n_fwd = (idx != self.trash).sum(1)
        floor_k = torch.clamp(self.n_last + 2, max=c.bl)
        n = idx.shape[1]
        keep, alive = {}, n
        for layer, p in sorted(self.schedule.items()):
            k_row = torch.maximum((p * n_fwd.double()).floor().long(), floor_k).clamp(max=n)  # :462
            if self.dense is not None:
                k_row = torch.where(self.dense, n, k_row)
            k_row = torch.where(c.active, k_row, 0)
            if cfg.static_shapes:  # k_row's bound from host values (n, p, last step's most commits);
                k_max, k_min = min(n, max(math.floor(p * n), min(last_max + 2, c.bl))), 0  # any row may prune
            else:
                k_max, k_min = torch.stack([k_row.max(), torch.where(c.active, k_row, n).min()]).tolist()
            # a layer is listed where some row prunes, each row to its own count: a batch mate that
            # keeps everything must not spare a row its pruning (README "Batch invariance")
            if k_min < alive:
                k = min(k_max, alive)
                keep[layer] = torch.arange(k, device=dev)[None, :] < k_row[:, None]
                alive = k
        if not keep:
            return idx, head
        plan = StepPlan(keep=keep, write_hidden=True, alpha=cfg.alpha, confidence=self.conf,
                        bonus=self._bonus(c), top2=top2_bonus(cfg.alpha), key_slots=self.keys(c))
        return idx, plan

    def _span_length(self, c: StepContext, span: str) -> int:
        """The forward's row count from host values (static shapes): block steps forward the block
        (from s - shift), prompt refreshes everything before the block end, and a block start at most
        two blocks: last step's tokens lie in the previous block (right-aligned; the rest is trash)."""
        e_max = max(c.s_host) + c.bl - self.row_shift
        if span == "block":
            return c.bl + self.sh - self.row_shift
        return e_max if span == "prompt" else min(e_max, max(2 * c.bl, c.bl + self.sh - self.row_shift))

    def _bonus(self, c: StepContext) -> Tensor:
        """[B, L + 1] constant bonuses by row (§1.3 step 3; generate.py:492-503), assigned in the
        authors' order; the +2 for the two most confident rows is per prune layer (StepPlan.top2,
        early_skipping.py:86, 170). The trash slot never outranks a real row."""
        bonus = torch.zeros_like(self.conf)
        masked = c.x.gather(1, c.cols) == self.args.mask_id  # +5: the row predicting the leftmost masked position
        left = torch.where(masked.any(1), masked.float().argmax(1) + c.s - self.sh, self.trash)
        bonus.scatter_(1, left[:, None], 5.0)  # rows with no masked position mark the trash (reset below)
        if self.cfg.alpha < 1:  # +3: rows of last step's tokens, so their K/V are recomputed
            bonus = torch.where(self.last, 3.0, bonus)
        bonus[:, self.trash] = -1e4
        return bonus

    def delayed(self, c: StepContext, pred: Tensor, x0: Tensor) -> Tensor | None:
        """Delayed EOS (generate.py:89, 178): an EOS proposal for p, while p - 1 is masked and the row
        has no EOS yet, gets confidence 0. -> [B, m] bool over the head rows."""
        if not self.cfg.delay_eos:
            return None
        col = torch.arange(c.x.shape[1], device=c.x.device)
        in_gen = (col >= c.starts[:, None]) & (col < c.ends[:, None])
        has_eos = ((c.x == self.args.eos_id) & in_gen).any(1)
        prev = torch.cat([c.x, c.x[:, :1]], 1).gather(1, (pred - 1).clamp(0, self.L))
        return (x0 == self.args.eos_id) & (prev == self.args.mask_id) & ~has_eos[:, None]

    def update(self, c: StepContext, pred: Tensor, conf: Tensor, delayed: Tensor | None, chosen: Tensor) -> None:
        sh, L = self.sh, self.L
        # the confidence a head row stores: its target's, if that is a masked position of the block,
        # else 0 (:90, 175); LLaDA stores it after the delayed-EOS zeroing, Dream before (:89-91, 176-178)
        if delayed is not None and self.args.family == "llada":
            conf = torch.where(delayed, 0.0, conf)
        local = pred - c.s[:, None]
        in_block = (local >= 0) & (local < c.bl)
        target_masked = in_block & (torch.cat([c.x, c.x[:, :1]], 1).gather(1, pred.clamp(0, L)) == self.args.mask_id)
        rows = (pred - sh).clamp(0, L)
        new = torch.where(target_masked, conf.float(), 0.0)
        if self.dense is not None:  # alone, an all-update step writes the rows predicting its block only
            new = torch.where(self.dense[:, None] & ~in_block, self.conf.gather(1, rows), new)
            self.dense = None
        self.conf.scatter_(1, rows, new)  # after this step's commit
        self.conf[:, self.trash] = -1.0
        # Rows idle this step (block already done) keep their state, as they would alone.
        a = c.active
        committed_rows = (c.cols - self.row_shift).clamp(0, L)
        self.last &= ~a[:, None]
        self.last.scatter_(1, committed_rows, self.last.gather(1, committed_rows) | (chosen & a[:, None]))
        self.n_last = torch.where(a, chosen.sum(1), self.n_last)
        self.leftmost = torch.where(a, torch.where(chosen, committed_rows, L).min(1).values, self.leftmost)


class DyLLM(Vanilla):
    """DyLLM (arXiv 2603.08026; younjoo0614/DyLLM, line numbers theirs): the first full_steps forwards
    of a request are dense and fill the K/V, context and FFN caches (engine/scheduler.py:43-54);
    afterwards every forward is sparse: starting from the rows committed last step, each layer
    recomputes K/V and FFN only for its salient rows (Block.forward_salient). The query rows are the
    response (from the last prompt row on Dream, which predicts the first answer token) except on
    forwards whose number is <= prompt_period or a multiple of it, which query the whole canvas
    (model_runner.py:179-192; their period is 4). Both families commit one token a step (the constant
    k = max_new_tokens // steps, sequence.py:68-71). Nothing is reset at block boundaries."""

    saliency = True

    def __init__(self, cfg: DecodeConfig, args: ModelArgs, L: int, trash: int, gen: torch.Generator):
        super().__init__(cfg, args, L, trash, gen)
        self.rule = S.make_rule(cfg, "llada", gen)
        self.last = None  # [B, L + 1] bool: slots of last step's tokens (their inputs changed)

    def allocate(self, B: int, device) -> None:
        super().allocate(B, device)
        self.last = torch.zeros(B, self.L + 1, dtype=torch.bool, device=device)

    def reset_rows(self, rows: list[int]) -> None:
        if self.last is not None:
            self.last[rows] = False

    def phase(self, step: int, step_cnt: int, prev_step: int | None = None) -> str:
        f, cfg = step_cnt + 1, self.cfg  # the forward's number in the request
        if f <= cfg.full_steps:
            return "full"
        return "whole" if f <= cfg.prompt_period or f % cfg.prompt_period == 0 else "response"

    def plan(self, c: StepContext) -> tuple[Tensor, StepPlan]:
        if self.last is None:
            self.last = torch.zeros(c.x.shape[0], self.L + 1, dtype=torch.bool, device=c.x.device)
        idx, plan = self.full(c)
        if c.phase == "full":
            plan.write_context = True
            return idx, plan
        if c.phase == "response":
            start = c.starts - self.sh
            n = max(end - g for end, g in zip(c.ends_host, c.starts_host)) + self.sh
            idx = _from(start, n, c.ends, c.active, self.trash)
            plan.head = torch.where(c.active[:, None], plan.head - start[:, None], 0)
        # tau >= 1 declares every row salient: nothing is reused, the exact limit of the method
        changed = self.last.gather(1, idx) if self.cfg.saliency_tau < 1 else torch.ones_like(idx, dtype=torch.bool)
        plan.salient = changed & (idx != self.trash)
        plan.tau, plan.padded = self.cfg.saliency_tau, self.cfg.static_shapes
        return idx, plan

    def update(self, c: StepContext, pred: Tensor, conf: Tensor, delayed: Tensor | None, chosen: Tensor) -> None:
        a = c.active
        self.last &= ~a[:, None]
        self.last.scatter_(1, c.cols, self.last.gather(1, c.cols) | (chosen & a[:, None]))


POLICIES = {"vanilla": Vanilla, "fast-dllm": FastDLLM, "es-dllm": ESDLLM, "streaming-dllm": StreamingDLLM,
            "dyllm": DyLLM}


def make_policy(cfg: DecodeConfig, args: ModelArgs, L: int, trash: int, gen: torch.Generator):
    return POLICIES[cfg.method](cfg, args, L, trash, gen)
