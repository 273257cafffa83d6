"""The one Transformer for LLaDA and Dream, and the explicit cache it reads and writes.

Every forward, vanilla included, runs a set of canvas rows against the `Cache`: the rows' fresh
K/V (and, at prune layers, hidden states) are merged into the cache by index, and the rows attend
to every valid canvas position (bidirectional, key padding mask). ES-dLLM pruning happens at the
output of the prune layers through the `token_gather` op; deeper layers run the kept rows only.
Dream's one-position logit shift is handled here: the rows returned with the logits are the canvas
positions those logits predict.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelArgs
from ..plugins import dispatch as ops


class Cache:
    """Preallocated per-layer K and V for every canvas position, plus hidden states at prune layers.

    k[l], v[l]: [B, n_kv_heads, L + 1, head_dim]. Slot L is a scratch row ("trash") that is never a
    valid key: plans point padding entries there, so ragged per-row work fits one dense shape.
    hidden[l]: [B, L + 1, dim] for l in the prune layers.
    positions: [B, L + 1] int64, the true RoPE position of each canvas slot (left padding aware).
    key_valid: [B, L + 1] bool, False for left padding and the trash slot.
    """

    def __init__(self, args: ModelArgs, batch: int, length: int, dtype: torch.dtype, device,
                 hidden_layers: tuple[int, ...] = ()):
        self.batch, self.length = batch, length
        shape = (batch, args.n_kv_heads, length + 1, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.hidden = {l: torch.zeros(batch, length + 1, args.dim, dtype=dtype, device=device)
                       for l in hidden_layers}
        self.positions = torch.zeros(batch, length + 1, dtype=torch.long, device=device)
        self.key_valid = torch.zeros(batch, length + 1, dtype=torch.bool, device=device)

    @property
    def trash(self) -> int:
        return self.length

    def set_layout(self, pad_lens: Tensor) -> None:
        """pad_lens: [B] int, number of left-padding slots per row."""
        ar = torch.arange(self.length, device=self.positions.device)
        pos = ar[None, :] - pad_lens.to(ar.device)[:, None]
        self.positions[:, : self.length] = pos.clamp_min(0)
        self.positions[:, self.length] = 0
        self.key_valid[:, : self.length] = pos >= 0
        self.key_valid[:, self.length] = False


@dataclass
class StepPlan:
    """What one forward does beyond running `idx` rows.

    head: row slice of `idx` that reaches the LM head when nothing was pruned (None: all rows).
    keep: {prune layer: k}: keep the top-k rows at that layer's output (empty: no skipping).
    keep_rows: {prune layer: [B] int64}: per-entry keep counts <= k; an entry's rows ranked past its
        own count are sent to the trash slot, so its result is what it would be alone.
    write_hidden: store hidden states of the surviving rows at the prune layers (ES-dLLM).
    confidence, bonus: [B, L + 1] float32 importance inputs in canvas coordinates (ES-dLLM).
    """

    head: slice | None = None
    keep: dict[int, int] | None = None
    keep_rows: dict[int, Tensor] | None = None
    write_hidden: bool = False
    confidence: Tensor | None = None
    bonus: Tensor | None = None
    alpha: float = 0.5


def _truncate(rows: Tensor, sel: Tensor, k_row: Tensor, trash: int, score: Tensor) -> Tensor:
    """Send each entry's selected rows ranked >= k_row[b] (by score, ties to the lower row) to trash."""
    s = score.gather(1, sel)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order))
    return torch.where(rank < k_row[:, None], rows, torch.full_like(rows, trash))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Both families normalise in fp32, cast back, then scale (LLaDA and Qwen2 RMSNorm agree).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(pos: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """pos: [B, n] int -> cos, sin: [B, 1, n, head_dim] float32 (rotate_half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim))
    ang = pos.float()[..., None] * inv_freq
    emb = torch.cat([ang, ang], dim=-1)[:, None]
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, full_precision: bool) -> Tensor:
    """x: [B, H, n, hd]. LLaDA rotates in fp32; Dream casts the tables to the activation dtype."""
    if full_precision:
        xf = x.float()
        half = xf.shape[-1] // 2
        rot = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
        return (xf * cos + rot * sin).to(x.dtype)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.a = a
        hd = a.head_dim
        self.wq = nn.Linear(a.dim, a.n_heads * hd, bias=a.qkv_bias)
        self.wk = nn.Linear(a.dim, a.n_kv_heads * hd, bias=a.qkv_bias)
        self.wv = nn.Linear(a.dim, a.n_kv_heads * hd, bias=a.qkv_bias)
        self.wo = nn.Linear(a.n_heads * hd, a.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, rows: Tensor,
                k_cache: Tensor, v_cache: Tensor, key_valid: Tensor) -> Tensor:
        """x: [B, n, dim]; rows: [B, n] canvas slots of x; caches [B, Hkv, L+1, hd] (updated in place)."""
        a, (B, n, _) = self.a, x.shape
        q = self.wq(x).view(B, n, a.n_heads, a.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, n, a.n_kv_heads, a.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, n, a.n_kv_heads, a.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin, a.rope_full_precision)
        k = apply_rope(k, cos, sin, a.rope_full_precision)
        out = ops.partial_attention(q, k, v, rows, k_cache, v_cache, key_valid)
        ops.cache_merge(k_cache, k, rows, 2)
        ops.cache_merge(v_cache, v, rows, 2)
        return self.wo(out.transpose(1, 2).reshape(B, n, a.n_heads * a.head_dim))


class FeedForward(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(a.dim, a.intermediate_size, bias=False)  # gate (SiLU)
        self.w3 = nn.Linear(a.dim, a.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(a.intermediate_size, a.dim, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(a.dim, a.norm_eps)
        self.attention = Attention(a)
        self.ffn_norm = RMSNorm(a.dim, a.norm_eps)
        self.feed_forward = FeedForward(a)

    def forward(self, x, cos, sin, rows, k_cache, v_cache, key_valid):
        x = x + self.attention(self.attention_norm(x), cos, sin, rows, k_cache, v_cache, key_valid)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.output.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.output.weight.device

    def new_cache(self, batch: int, length: int, hidden_layers: tuple[int, ...] = ()) -> Cache:
        return Cache(self.args, batch, length, self.dtype, self.device, hidden_layers)

    def step(self, tokens: Tensor, idx: Tensor, cache: Cache, plan: StepPlan | None = None
             ) -> tuple[Tensor, Tensor]:
        """Run canvas rows `idx` against the cache.

        tokens: [B, n] int64 token ids at those rows; idx: [B, n] int64 canvas slots (cache.trash
        for padding entries). Returns logits [B, m, V] and pred [B, m]: the canvas positions those
        logits predict (row + logits_shift; rows that reached the head only).
        """
        plan = plan or StepPlan()
        keep = plan.keep or {}
        rows = idx
        h = self.tok_embeddings(tokens)
        pos = cache.positions.gather(1, rows)
        cos, sin = rope_cos_sin(pos, self.args.head_dim, self.args.rope_theta)
        pruned = False
        for l, layer in enumerate(self.layers):
            h = layer(h, cos, sin, rows, cache.k[l], cache.v[l], cache.key_valid)
            if l in keep and keep[l] < rows.shape[1]:
                conf = plan.confidence.gather(1, rows)
                bonus = plan.bonus.gather(1, rows)
                prev = cache.hidden[l].gather(1, rows[..., None].expand(-1, -1, h.shape[-1]))
                # Trash entries get zero variation so they cannot change the per-row normalisation.
                prev = torch.where((rows == cache.trash)[..., None], h, prev)
                h_all = h
                sel, h = ops.token_gather(h_all, prev, conf, bonus, plan.alpha, keep[l])
                rows, pos = rows.gather(1, sel), pos.gather(1, sel)
                # Per-row truncation only when some row keeps fewer than k (always when tracing for export).
                if plan.keep_rows is not None and (torch.jit.is_tracing()
                                                   or bool((plan.keep_rows[l] < keep[l]).any())):
                    rows = _truncate(rows, sel, plan.keep_rows[l], cache.trash,
                                     ops.importance(h_all, prev, conf, bonus, plan.alpha))
                cos, sin = rope_cos_sin(pos, self.args.head_dim, self.args.rope_theta)
                pruned = True
            if plan.write_hidden and l in cache.hidden:
                ops.cache_merge(cache.hidden[l], h, rows, 1)
        if not pruned and plan.head is not None:
            h, rows = h[:, plan.head], rows[:, plan.head]
        logits = self.output(self.norm(h))
        return logits, rows + self.args.logits_shift

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """HF-style full forward. input_ids: [B, L]; attention_mask: [B, L] (1 = token, 0 = left pad).

        Returns logits [B, L, V] where logits[:, p] predicts token p (Dream's shift applied: position 0
        reuses its own row, as the reference sampler does).
        """
        B, L = input_ids.shape
        cache = self.new_cache(B, L)
        if attention_mask is None:
            pads = torch.zeros(B, dtype=torch.long, device=input_ids.device)
        else:
            pads = (attention_mask == 0).long().sum(1)
        cache.set_layout(pads)
        idx = torch.arange(L, device=input_ids.device).expand(B, L)
        logits, _ = self.step(input_ids, idx, cache)
        if self.args.logits_shift:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits
