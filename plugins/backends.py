"""Op backends: the three ops as one object a Transformer is built with (runtime/model.py), so which
implementation runs is an explicit argument, never a module attribute swapped at run time.

REFERENCE  plugins/ops.py, eager PyTorch: the specification and the CPU default
custom()   the torch.library custom ops (plugins/library.py): one opaque node each for torch.compile and
           torch.export; on CUDA tensors they run the OpenAI Triton kernels (plugins/kernels.py)
(export    build/graphs.py builds a third one whose ops write the plugin-form ONNX nodes while tracing)

Every backend has the reference's signatures; cache_merge returns the cache it wrote in place.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from . import ops


@dataclass(frozen=True)
class OpBackend:
    name: str
    token_gather: Callable
    partial_attention: Callable
    cache_merge: Callable


REFERENCE = OpBackend("reference", ops.token_gather, ops.partial_attention, ops.cache_merge)


@functools.cache
def custom() -> OpBackend:
    """The registered esdllm::* custom ops (registering them on first use)."""
    import torch

    from . import library  # noqa: F401  (registers torch.ops.esdllm.*)
    lib = torch.ops.esdllm

    def cache_merge(cache, fresh, rows, dim: int):
        lib.cache_merge(cache, fresh, rows, dim)
        return cache
    return OpBackend("custom", lib.token_gather, lib.partial_attention, cache_merge)


def for_device(device) -> OpBackend:
    """The default backend for a device: the custom ops (Triton kernels) on CUDA, the reference elsewhere."""
    return custom() if str(device).startswith("cuda") else REFERENCE


def by_name(name: str) -> OpBackend:
    if name == "reference":
        return REFERENCE
    if name == "custom":
        return custom()
    raise ValueError(f"unknown op backend {name!r}; expected 'reference' or 'custom'")
