"""The ops as the model calls them: CUDA tensors run the OpenAI Triton kernels (when triton is
installed), everything else runs the PyTorch reference in ops.py. Same names, same signatures."""
from __future__ import annotations

from torch import Tensor

from . import ops
from .ops import importance  # noqa: F401  (scoring only; used to rank per-row keep counts)


def _impl(name: str, t: Tensor):
    if t.is_cuda:
        from .library import _cuda_impl
        return _cuda_impl(name)
    return getattr(ops, name)


def token_gather(hidden, prev_hidden, confidence, bonus, alpha: float, k: int):
    return _impl("token_gather", hidden)(hidden, prev_hidden, confidence, bonus, alpha, k)


def partial_attention(q, k_new, v_new, rows, k_cache, v_cache, key_valid):
    return _impl("partial_attention", q)(q, k_new, v_new, rows, k_cache, v_cache, key_valid)


def cache_merge(cache, fresh, rows, dim: int):
    return _impl("cache_merge", cache)(cache, fresh, rows, dim)
