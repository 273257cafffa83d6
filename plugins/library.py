"""The three esdllm ops as torch.library custom ops: esdllm::token_gather, partial_attention, cache_merge.

Each op is opaque to torch.export / torch.compile (one node), has a fake (meta) implementation giving
its output shapes, runs the pure-PyTorch reference (plugins/ops.py) by default, and on CUDA tensors
runs the OpenAI Triton kernel (plugins/kernels.py) when triton is installed, else the reference.
Importing this module registers the ops; it needs only torch.
"""
from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

from . import ops

log = logging.getLogger(__name__)


@functools.cache
def _cuda_impl(name: str):
    """Kernel wrapper for `name` when triton imports, else the reference (logged once)."""
    try:
        from . import kernels
    except ImportError as e:  # kernels.py itself imports without triton; this guards anything else
        log.warning("esdllm kernels unavailable (%s); CUDA ops run the PyTorch reference", e)
        return getattr(ops, name)
    if not kernels.available():
        log.warning("triton is not installed; esdllm CUDA ops run the PyTorch reference")
        return getattr(ops, name)
    return getattr(kernels, name)


def _check_keep(hidden: Tensor, keep_mask: Tensor) -> None:
    if keep_mask.dim() != 2 or keep_mask.shape[0] != hidden.shape[0] or keep_mask.shape[1] > hidden.shape[1]:
        raise ValueError(f"keep_mask {tuple(keep_mask.shape)} must be [B, k] with k <= n for hidden of shape "
                         f"{tuple(hidden.shape)}")


# ---------------------------------------------------------------------------------------------
# esdllm::token_gather
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("esdllm::token_gather", mutates_args=())
def token_gather(hidden: Tensor, prev_hidden: Tensor, confidence: Tensor, bonus: Tensor, keep_mask: Tensor,
                 alpha: float) -> tuple[Tensor, Tensor]:
    """ops.token_gather: hidden, prev_hidden [B, n, d]; confidence, bonus [B, n]; keep_mask [B, k] bool
    -> sel [B, k] int64 (n where dropped), kept [B, k, d]."""
    _check_keep(hidden, keep_mask)
    return ops.token_gather(hidden, prev_hidden, confidence, bonus, keep_mask, alpha)


@token_gather.register_kernel("cuda")
def _(hidden, prev_hidden, confidence, bonus, keep_mask, alpha):
    _check_keep(hidden, keep_mask)
    return _cuda_impl("token_gather")(hidden, prev_hidden, confidence, bonus, keep_mask, alpha)


@token_gather.register_fake
def _(hidden, prev_hidden, confidence, bonus, keep_mask, alpha):
    # no k <= n check here: with a symbolic n it would add a guard to the exported graph
    B, k = keep_mask.shape
    return hidden.new_empty(B, k, dtype=torch.int64), hidden.new_empty(B, k, hidden.shape[-1])


# ---------------------------------------------------------------------------------------------
# esdllm::partial_attention
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("esdllm::partial_attention", mutates_args=())
def partial_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_valid: Tensor) -> Tensor:
    """ops.partial_attention: q [B, H, n, hd], k_cache/v_cache [B, Hkv, S, hd], key_valid [B, S] bool
    -> [B, H, n, hd] in q's dtype."""
    # SDPA may return a permuted layout; one fixed (contiguous) layout keeps the fake's strides honest
    return ops.partial_attention(q, k_cache, v_cache, key_valid).contiguous()


@partial_attention.register_kernel("cuda")
def _(q, k_cache, v_cache, key_valid):
    return _cuda_impl("partial_attention")(q, k_cache, v_cache, key_valid).contiguous()


@partial_attention.register_fake
def _(q, k_cache, v_cache, key_valid):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------
# esdllm::cache_merge (in place: returns nothing, since a custom op may not return an alias of an input)
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("esdllm::cache_merge", mutates_args=("cache",))
def cache_merge(cache: Tensor, fresh: Tensor, rows: Tensor, dim: int) -> None:
    """ops.cache_merge in place: cache [B, S, d] (dim=1) or [B, H, S, hd] (dim=2) gets fresh rows at slots rows [B, n]."""
    ops.cache_merge(cache, fresh, rows, dim)


@cache_merge.register_kernel("cuda")
def _(cache, fresh, rows, dim):
    _cuda_impl("cache_merge")(cache, fresh, rows, dim)


@cache_merge.register_fake
def _(cache, fresh, rows, dim):
    return None
