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


def _flat(t: Tensor) -> Tensor:
    """[B, H, n, hd] -> [B, n, H * hd]."""
    B, H, n, hd = t.shape
    return t.transpose(1, 2).reshape(B, n, H * hd)


def _salient_rows(salient: Tensor, rows: Tensor, padded: bool, trash: int) -> tuple[Tensor, Tensor]:
    """The salient entries of each batch row, first and in order: gi [B, m] (indices into n; n where
    padding) and their canvas slots [B, m] (the trash slot where padding). m = the most salient rows
    of any entry, or n when padded (shapes known before the data)."""
    B, n = salient.shape
    m = n if padded else int(salient.sum(1).max())
    slot = torch.where(salient, salient.long().cumsum(1) - 1, m)  # each salient row's place; others: m
    gi = torch.full((B, m + 1), n, dtype=torch.long, device=rows.device)
    gi = gi.scatter(1, slot, torch.arange(n, device=rows.device).expand(B, n))[:, :m]
    return gi, torch.cat([rows, torch.full_like(rows[:, :1], trash)], 1).gather(1, gi)


def _take(t: Tensor, gi: Tensor, dim: int = 1) -> Tensor:
    """t's entries at gi along dim (gi [B, m] into t's n; gi == n reads zeros)."""
    pad = torch.zeros_like(t.narrow(dim, 0, 1))
    full = torch.cat([t, pad], dim)
    shape = list(full.shape)
    shape[dim] = gi.shape[1]
    view = [gi.shape[0]] + [1] * (full.dim() - 1)
    view[dim] = gi.shape[1]
    return full.gather(dim, gi.view(view).expand(shape))


def _put(t: Tensor, gi: Tensor, vals: Tensor) -> Tensor:
    """t [B, n, d] with rows gi [B, m] replaced by vals [B, m, d] (gi == n: dropped)."""
    full = torch.cat([t, t[:, :1]], 1)
    full = full.scatter(1, gi[..., None].expand(-1, -1, t.shape[-1]), vals)
    return full[:, :-1]


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

    def heads(self, w: nn.Linear, x: Tensor, n_heads: int, cos: Tensor, sin: Tensor | None) -> Tensor:
        """x [B, n, dim] -> [B, heads, n, hd] through projection w (rotated when cos/sin are given)."""
        B, n, _ = x.shape
        t = w(x).view(B, n, n_heads, self.a.head_dim).transpose(1, 2)
        return t if sin is None else apply_rope(t, cos, sin, self.a.rope_full_precision)

    def context(self, x: Tensor, cos: Tensor, sin: Tensor, rows: Tensor, k_cache: Tensor, v_cache: Tensor,
                key_valid: Tensor, ops: OpBackend, key_slots: Tensor | None = None,
                key_len: int | None = None) -> Tensor:
        """The attention output before wo, heads flattened: x [B, n, dim] -> [B, n, H * hd].
        rows: [B, n] canvas slots of x; caches [B, Hkv, L+1, hd] (updated in place); key_slots
        [B, nk]: attend to these slots only (key_valid [B, nk] then says which are real); key_len: the
        first key_len slots only (a view)."""
        a = self.a
        q = self.heads(self.wq, x, a.n_heads, cos, sin)
        # the rows' fresh K/V go into the cache first, so they override the stale ones: one write, no copy
        k_cache = ops.cache_merge(k_cache, self.heads(self.wk, x, a.n_kv_heads, cos, sin), rows, 2)
        v_cache = ops.cache_merge(v_cache, self.heads(self.wv, x, a.n_kv_heads, cos, None), rows, 2)
        return _flat(ops.partial_attention(q, *_keys(k_cache, v_cache, key_slots, key_len), key_valid))


def _keys(k_cache: Tensor, v_cache: Tensor, key_slots: Tensor | None, key_len: int | None = None
          ) -> tuple[Tensor, Tensor]:
    """The K/V of the slots key_slots [B, nk] ([B, Hkv, nk, hd] each), of the first key_len, or the
    whole caches."""
    if key_slots is None:
        return (k_cache, v_cache) if key_len is None else (k_cache[:, :, :key_len], v_cache[:, :, :key_len])
    i = key_slots[:, None, :, None].expand(-1, k_cache.shape[1], -1, k_cache.shape[-1])
    return k_cache.gather(2, i), v_cache.gather(2, i)


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

    def forward(self, x, cos, sin, rows, k_cache, v_cache, key_valid, ops: OpBackend, key_slots=None,
                key_len=None, dy=None):
        """dy: (context cache, FFN cache) [B, L+1, *] to write the rows' values into (DyLLM's dense steps)."""
        ctx = self.attention.context(self.attention_norm(x), cos, sin, rows, k_cache, v_cache, key_valid, ops,
                                     key_slots, key_len)
        x = x + self.attention.wo(ctx)
        f = self.feed_forward(self.ffn_norm(x))
        if dy is not None:
            ops.cache_merge(dy[0], ctx, rows, 1)
            ops.cache_merge(dy[1], f, rows, 1)
        return x + f

    def forward_salient(self, x, cos, sin, rows, k_cache, v_cache, key_valid, ops: OpBackend, key_slots,
                        key_len, dy, salient, tau: float, padded: bool):
        """DyLLM's sparse layer (algorithms.md §2; younjoo0614/DyLLM models/llada.py, attention.py,
        line numbers theirs). Only the salient rows (salient [B, n] bool) recompute K/V; every row
        attends: salient rows exactly, the others by the delta update C_old + softmax(q K^T) dV
        (partial_attention over dV, which is zero outside the salient slots; attention_ops_kernels.cu
        :309-474); a row is salient for this layer's FFN and the next layer's K/V iff the cosine of
        its new context against the cached one is below tau (:492-538; everything for tau >= 1); the
        other rows reuse their cached FFN output (mlp_cache_manage.py:15-40). The residual stream,
        norms, q and wo run on every row (llada.py:174-188). dy: (context cache, FFN cache, dV scratch
        or None); padded: gather all n rows, not just the salient ones (static shapes for export).
        Returns (x, the salient rows of the next layer)."""
        att, a = self.attention, self.attention.a
        ctx_cache, ffn_cache, dv = dy
        trash = ctx_cache.shape[1] - 1
        h = self.attention_norm(x)
        q = att.heads(att.wq, h, a.n_heads, cos, sin)
        gi, grows = _salient_rows(salient, rows, padded, trash)
        gh = _take(h, gi)
        k = att.heads(att.wk, gh, a.n_kv_heads, _take(cos, gi, 2), _take(sin, gi, 2))
        v = att.heads(att.wv, gh, a.n_kv_heads, cos, None)
        gidx = grows[:, None, :, None].expand(-1, v.shape[1], -1, v.shape[-1])
        v_old = v_cache.gather(2, gidx)
        k_cache = ops.cache_merge(k_cache, k, grows, 2)
        v_cache = ops.cache_merge(v_cache, v, grows, 2)
        dv = torch.zeros_like(v_cache) if dv is None else dv
        dv = ops.cache_merge(dv, v - v_old, grows, 2)
        delta = _flat(ops.partial_attention(q, *_keys(k_cache, dv, key_slots, key_len), key_valid))
        dv = ops.cache_merge(dv, torch.zeros_like(v), grows, 2)  # clean for the next layer
        exact = _flat(ops.partial_attention(_take(q, gi, 2), *_keys(k_cache, v_cache, key_slots, key_len), key_valid))
        c_old = ctx_cache.gather(1, rows[..., None].expand(-1, -1, delta.shape[-1]))
        c_new = _put(c_old + delta, gi, exact)
        # saliency test over all heads, fp32, squared norms clamped at 1e-8 (attention_ops_kernels.cu:28-47)
        cf, of = c_new.float(), c_old.float()
        cos_sim = (cf * of).sum(-1) / ((cf * cf).sum(-1).clamp_min(1e-8).sqrt() * (of * of).sum(-1).clamp_min(1e-8).sqrt())
        real = rows != trash
        salient = real & (cos_sim < tau) if tau < 1 else real
        ops.cache_merge(ctx_cache, c_new, rows, 1)
        x = x + att.wo(c_new)
        gi, grows = _salient_rows(salient, rows, padded, trash)
        f_new = self.feed_forward(self.ffn_norm(_take(x, gi)))
        f_old = ffn_cache.gather(1, rows[..., None].expand(-1, -1, f_new.shape[-1]))
        ops.cache_merge(ffn_cache, f_new, grows, 1)
        return x + _put(f_old, gi, f_new), salient


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

    def new_cache(self, batch: int, length: int, hidden_layers: tuple[int, ...] = (), saliency: bool = False) -> Cache:
        return Cache(self.args, batch, length, self.dtype, self.device, hidden_layers, saliency)

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
        key_valid = plan.keys(cache)
        salient = plan.salient
        for l, layer in enumerate(self.layers):
            args = (h, cos, sin, rows, cache.k[l], cache.v[l], key_valid, ops, plan.key_slots, plan.key_len)
            if salient is not None:
                h, salient = layer.forward_salient(*args, (cache.ctx[l], cache.ffn[l], cache.dv), salient,
                                                   plan.tau, plan.padded)
            else:
                h = layer(*args, dy=(cache.ctx[l], cache.ffn[l]) if plan.write_context else None)
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
