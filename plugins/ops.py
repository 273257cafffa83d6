"""The three esdllm ops, pure-PyTorch reference: the specification and the CPU path.

token_gather      ES-dLLM importance scoring + top-k + row gather (research/algorithms.md §1.3), with
                  per-row keep counts given as a rank mask
partial_attention queries against the whole canvas K/V of the cache (bidirectional, key padding mask)
cache_merge       scatter fresh rows into a cache by canvas slot (in place)

The model writes a step's fresh K/V into the cache first (cache_merge) and then attends to the cache
(partial_attention): one write per layer, no copy of the cache. Kernels (kernels.py), custom ops
(library.py), ONNX nodes (build/onnx_ops.py) and TensorRT plugins (trt_plugins.py) carry these names
(OP_NAMES, in NAMESPACE) and must agree with these functions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

NAMESPACE = "esdllm"  # torch.library namespace, ONNX domain and TensorRT plugin namespace
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


def token_gather(hidden: Tensor, prev_hidden: Tensor, confidence: Tensor, bonus: Tensor, keep_mask: Tensor,
                 alpha: float) -> tuple[Tensor, Tensor]:
    """Keep the k = keep_mask.shape[1] most important rows; entry b keeps its j-th one iff keep_mask[b, j].

    hidden, prev_hidden: [B, n, d]; confidence, bonus: [B, n] float32; keep_mask: [B, k] bool (a
    prefix of True per entry: its own keep count <= k, so a batch entry's result is what it is alone).
    Returns sel [B, k] int64: the top-k row indices in ascending order (ties in score go to the lower
    index), where an entry whose rank j has keep_mask[b, j] False reads n ("dropped", kept in place);
    and kept [B, k, d]: hidden rows at the top-k indices (dropped ones included).
    """
    n, k = hidden.shape[1], keep_mask.shape[1]
    score = importance(hidden, prev_hidden, confidence, bonus, alpha)
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :k]
    top, rank = order.sort(dim=-1)  # ascending rows; rank[b, i] = the score rank of top[b, i]
    kept = hidden.gather(1, top[..., None].expand(-1, -1, hidden.shape[-1]))
    sel = torch.where(keep_mask.gather(1, rank), top, n)
    return sel, kept


def partial_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_valid: Tensor) -> Tensor:
    """Bidirectional attention of the forwarded rows against every canvas slot of the cache.

    q: [B, H, n, hd]; k_cache, v_cache: [B, Hkv, S, hd] (this step's fresh rows already merged);
    key_valid: [B, S] bool. GQA: query head h reads kv head h // (H / Hkv). Scale 1/sqrt(hd).
    Returns [B, H, n, hd] in q's dtype.
    """
    mask = key_valid[:, None, None, :]
    # int(): under the ONNX tracer sizes are traced values, and SDPA wants a plain bool here
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask,
                                          enable_gqa=int(q.shape[1]) != int(k_cache.shape[1]))


def cache_merge(cache: Tensor, fresh: Tensor, rows: Tensor, dim: int) -> Tensor:
    """Write fresh rows into `cache` in place along its slot dimension `dim`.

    dim = 2: cache [B, H, S, hd], fresh [B, H, n, hd]. dim = 1: cache [B, S, d], fresh [B, n, d].
    rows: [B, n] int64 slots. Returns `cache`.
    """
    shape = [rows.shape[0]] + [1] * (cache.dim() - 1)
    shape[dim] = rows.shape[1]
    idx = rows.reshape(shape).expand_as(fresh)
    return cache.scatter_(dim, idx, fresh.to(cache.dtype))
