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


def _check_k(hidden: Tensor, k: int) -> None:
    if not 0 <= k <= hidden.shape[1]:
        raise ValueError(f"k={k} must be in [0, n={hidden.shape[1]}] for hidden of shape {tuple(hidden.shape)}")


# ---------------------------------------------------------------------------------------------
# esdllm::token_gather
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("esdllm::token_gather", mutates_args=())
def token_gather(hidden: Tensor, prev_hidden: Tensor, confidence: Tensor, bonus: Tensor,
                 alpha: float, k: int) -> tuple[Tensor, Tensor]:
    """ops.token_gather: hidden, prev_hidden [B, n, d]; confidence, bonus [B, n] -> sel [B, k] int64, kept [B, k, d]."""
    _check_k(hidden, k)
    return ops.token_gather(hidden, prev_hidden, confidence, bonus, alpha, k)


@token_gather.register_kernel("cuda")
def _(hidden, prev_hidden, confidence, bonus, alpha, k):
    _check_k(hidden, k)
    return _cuda_impl("token_gather")(hidden, prev_hidden, confidence, bonus, alpha, k)


@token_gather.register_fake
def _(hidden, prev_hidden, confidence, bonus, alpha, k):
    # no k <= n check here: with a symbolic n it would add a guard to the exported graph
    B, _, d = hidden.shape
    return hidden.new_empty(B, k, dtype=torch.int64), hidden.new_empty(B, k, d)


# ---------------------------------------------------------------------------------------------
# esdllm::partial_attention
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("esdllm::partial_attention", mutates_args=())
def partial_attention(q: Tensor, k_new: Tensor, v_new: Tensor, rows: Tensor,
                      k_cache: Tensor, v_cache: Tensor, key_valid: Tensor) -> Tensor:
    """ops.partial_attention: q [B, H, n, hd], k_new/v_new [B, Hkv, n, hd], rows [B, n],
    k_cache/v_cache [B, Hkv, S, hd], key_valid [B, S] bool -> [B, H, n, hd] in q's dtype."""
    # SDPA may return a permuted layout; one fixed (contiguous) layout keeps the fake's strides honest
    return ops.partial_attention(q, k_new, v_new, rows, k_cache, v_cache, key_valid).contiguous()


@partial_attention.register_kernel("cuda")
def _(q, k_new, v_new, rows, k_cache, v_cache, key_valid):
    return _cuda_impl("partial_attention")(q, k_new, v_new, rows, k_cache, v_cache, key_valid).contiguous()


@partial_attention.register_fake
def _(q, k_new, v_new, rows, k_cache, v_cache, key_valid):
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
