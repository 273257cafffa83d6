"""The one Transformer for LLaDA and Dream over the explicit cache (runtime/cache.py).

A forward runs a set of canvas rows: each layer writes the rows' fresh K/V into the cache by index
(cache_merge) and attends to every valid canvas slot (partial_attention; bidirectional, key padding
mask). ES-dLLM pruning happens at the output of the prune layers through token_gather; deeper layers
run the kept rows only. The ops come from the backend the model is built with (plugins/backends.py).
Dream's one-position logit shift is handled here: the rows returned with the logits are the canvas
positions those logits predict.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..plugins.backends import REFERENCE, OpBackend
from .cache import Cache, StepPlan
from .config import ModelArgs


def top2(x: Tensor) -> Tensor:
    """[B, n] -> [B, n] float 0/1: each row's two largest entries. Ties go to the lower index (the
    authors leave them to an unsorted topk); pairwise ranks keep it deterministic on every executor."""
    i = torch.arange(x.shape[1], device=x.device)
    beats = (x[:, None, :] > x[:, :, None]) | ((x[:, None, :] == x[:, :, None]) & (i[None, :] < i[:, None]))
    return (beats.sum(-1) < 2).to(x.dtype)


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
                k_cache: Tensor, v_cache: Tensor, key_valid: Tensor, ops: OpBackend) -> Tensor:
        """x: [B, n, dim]; rows: [B, n] canvas slots of x; caches [B, Hkv, L+1, hd] (updated in place)."""
        a, (B, n, _) = self.a, x.shape
        q = self.wq(x).view(B, n, a.n_heads, a.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, n, a.n_kv_heads, a.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, n, a.n_kv_heads, a.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin, a.rope_full_precision)
        k = apply_rope(k, cos, sin, a.rope_full_precision)
        # the rows' fresh K/V go into the cache first, so they override the stale ones: one write, no copy
        k_cache = ops.cache_merge(k_cache, k, rows, 2)
        v_cache = ops.cache_merge(v_cache, v, rows, 2)
        out = ops.partial_attention(q, k_cache, v_cache, key_valid)
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

    def forward(self, x, cos, sin, rows, k_cache, v_cache, key_valid, ops: OpBackend):
        x = x + self.attention(self.attention_norm(x), cos, sin, rows, k_cache, v_cache, key_valid, ops)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """ops: the op backend every forward calls (plugins/backends.py; the reference by default)."""

    def __init__(self, args: ModelArgs, ops: OpBackend = REFERENCE):
        super().__init__()
        self.args, self.ops = args, ops
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    def new_cache(self, batch: int, length: int, hidden_layers: tuple[int, ...] = ()) -> Cache:
        return Cache(self.args, batch, length, self.dtype, self.device, hidden_layers)

    def step(self, tokens: Tensor, idx: Tensor, cache: Cache, plan: StepPlan | None = None,
             ops: OpBackend | None = None) -> tuple[Tensor, Tensor]:
        """Run canvas rows `idx` against the cache.

        tokens: [B, n] int64 token ids at those rows; idx: [B, n] int64 canvas slots (cache.trash
        for padding entries). Returns logits [B, m, V] and pred [B, m]: the canvas positions those
        logits predict (row + logits_shift; rows that reached the head only). ops: a backend for this
        call only (the exporter traces with its own).
        """
        plan, ops = plan or StepPlan(), ops or self.ops
        rows = idx
        h = self.tok_embeddings(tokens)
        pos = cache.positions.gather(1, rows)
        cos, sin = rope_cos_sin(pos, self.args.head_dim, self.args.rope_theta)
        trash_col = torch.full_like(rows[:, :1], cache.trash)
        for l, layer in enumerate(self.layers):
            h = layer(h, cos, sin, rows, cache.k[l], cache.v[l], cache.key_valid, ops)
            keep = plan.keep.get(l)
            if keep is not None:
                prev = cache.hidden[l].gather(1, rows[..., None].expand(-1, -1, h.shape[-1]))
                # Trash entries get zero variation so they cannot change the per-row normalisation.
                prev = torch.where((rows == cache.trash)[..., None], h, prev)
                conf = plan.confidence.gather(1, rows)
                bonus = plan.bonus.gather(1, rows)
                if plan.top2:  # recomputed over the rows alive at this layer (early_skipping.py:170)
                    bonus = bonus + plan.top2 * top2(conf)
                sel, h = ops.token_gather(h, prev, conf, bonus, keep, plan.alpha)
                # a dropped entry (sel == n) reads the appended trash slot; its position is never used
                rows = torch.cat([rows, trash_col], 1).gather(1, sel)
                pos = torch.cat([pos, pos[:, :1]], 1).gather(1, sel)
                cos, sin = rope_cos_sin(pos, self.args.head_dim, self.args.rope_theta)
            if plan.write_hidden and l in cache.hidden:
                ops.cache_merge(cache.hidden[l], h, rows, 1)
        if plan.head is not None:
            h = h.gather(1, plan.head[..., None].expand(-1, -1, h.shape[-1]))
            rows = rows.gather(1, plan.head)
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
