"""The three esdllm ops, pure-PyTorch reference: the specification and the CPU path.

token_gather      ES-dLLM importance scoring + top-k + row gather (research/algorithms.md §1.3)
partial_attention kept queries against the whole canvas K/V, fresh rows overriding cached ones
cache_merge       scatter fresh rows into a cache by canvas slot (in place)

Kernels (kernels.py), ONNX nodes and TensorRT plugins carry the same names and must agree with these.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

OP_NAMES = ("token_gather", "partial_attention", "cache_merge")


def importance(hidden: Tensor, prev_hidden: Tensor, confidence: Tensor, bonus: Tensor, alpha: float) -> Tensor:
    """ES-dLLM importance I = alpha * c + (1 - alpha) * normalised variation + bonus.

    hidden, prev_hidden: [B, n, d]; confidence, bonus: [B, n] -> score [B, n] float32.
    variation_i = mean_d |h_i - h'_i| / (||h'_i||_2 / sqrt(d) + 1e-6), then divided per row by
    max(max_j variation_j, 1) so it is only ever scaled down.
    """
    h, p = hidden.float(), prev_hidden.float()
    d = h.shape[-1]
    var = (h - p).abs().mean(-1) / (p.norm(dim=-1) / math.sqrt(d) + 1e-6)
    var = var / var.amax(-1, keepdim=True).clamp_min(1.0)
    return alpha * confidence.float() + (1.0 - alpha) * var + bonus.float()


def token_gather(hidden: Tensor, prev_hidden: Tensor, confidence: Tensor, bonus: Tensor,
                 alpha: float, k: int) -> tuple[Tensor, Tensor]:
    """Keep the k most important rows.

    hidden, prev_hidden: [B, n, d]; confidence, bonus: [B, n] float32.
    Returns sel [B, k] int64 (row indices into n, ascending; ties in score go to the lower index)
    and kept [B, k, d] = hidden rows at sel.
    """
    score = importance(hidden, prev_hidden, confidence, bonus, alpha)
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :k]
    sel = order.sort(dim=-1).values
    kept = hidden.gather(1, sel[..., None].expand(-1, -1, hidden.shape[-1]))
    return sel, kept


def partial_attention(q: Tensor, k_new: Tensor, v_new: Tensor, rows: Tensor,
                      k_cache: Tensor, v_cache: Tensor, key_valid: Tensor) -> Tensor:
    """Bidirectional attention of the given rows against every canvas slot.

    q: [B, H, n, hd]; k_new, v_new: [B, Hkv, n, hd] fresh K/V of the same rows; rows: [B, n] int64
    canvas slots; k_cache, v_cache: [B, Hkv, S, hd]; key_valid: [B, S] bool.
    Keys/values are the cache with the rows' fresh K/V written over their slots (the cache itself
    is not modified). Returns [B, H, n, hd] in q's dtype.
    """
    idx = rows[:, None, :, None].expand(-1, k_cache.shape[1], -1, k_cache.shape[-1])
    keys = k_cache.scatter(2, idx, k_new)
    vals = v_cache.scatter(2, idx, v_new)
    mask = key_valid[:, None, None, :]
    return F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask,
                                          enable_gqa=q.shape[1] != keys.shape[1])


def cache_merge(cache: Tensor, fresh: Tensor, rows: Tensor, dim: int) -> Tensor:
    """Write fresh rows into `cache` in place along its slot dimension `dim`.

    dim = 2: cache [B, H, S, hd], fresh [B, H, n, hd]. dim = 1: cache [B, S, d], fresh [B, n, d].
    rows: [B, n] int64 slots. Returns `cache`.
    """
    shape = [rows.shape[0]] + [1] * (cache.dim() - 1)
    shape[dim] = rows.shape[1]
    idx = rows.reshape(shape).expand_as(fresh)
    return cache.scatter_(dim, idx, fresh.to(cache.dtype))
