"""A guard that turns host synchronisation into an error, to prove a step never waits on the device.

On a GPU, reading a tensor's value on the host (`.item()`, `bool(t)`, `int(t)`, `.tolist()`, a
data-dependent shape) blocks until every queued kernel has finished, and a step that does it cannot
be captured into a CUDA graph. On the CPU nothing waits, so the guard makes the same reads raise:
a test that decodes every method inside `no_host_sync()` proves the plan, the forward and the
commit never read device values (runtime/generate.py applies it with `guard_syncs=True`).

Boolean-mask indexing (`t[mask]`) and `nonzero` also synchronise but go through C++; the guard
catches `nonzero`, `masked_select` and a boolean index through __getitem__/__setitem__.
"""
from __future__ import annotations

import contextlib
import threading

import torch

_PATCHED = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "masked_select")
_state = threading.local()


class HostSyncError(RuntimeError):
    """A device value was read on the host inside a no_host_sync() block."""


def _active() -> bool:
    return getattr(_state, "depth", 0) > 0


def _raiser(name: str, orig):
    def method(self, *a, **kw):
        if _active():
            raise HostSyncError(f"Tensor.{name} inside a sync-free step (shape {tuple(self.shape)}): "
                                f"this reads a device value on the host")
        return orig(self, *a, **kw)
    return method


def _index_guard(orig, name: str):
    def method(self, key, *a):
        if _active() and any(isinstance(k, torch.Tensor) and k.dtype == torch.bool
                             for k in (key if isinstance(key, tuple) else (key,))):
            raise HostSyncError(f"boolean-mask Tensor.{name} inside a sync-free step: the result's size is "
                                f"data-dependent (use torch.where or scatter)")
        return orig(self, key, *a)
    return method


_originals: dict[str, object] = {}
_lock = threading.Lock()


def _install() -> None:
    with _lock:
        if _originals:
            return
        for name in _PATCHED:
            _originals[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, _raiser(name, _originals[name]))
        for name in ("__getitem__", "__setitem__"):
            _originals[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, _index_guard(_originals[name], name))


@contextlib.contextmanager
def no_host_sync():
    """Inside, reading a tensor's value on the host raises HostSyncError (this thread only)."""
    _install()
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


@contextlib.contextmanager
def allow_host_sync():
    """Suspends an enclosing no_host_sync() (for the loop's own bookkeeping between steps)."""
    depth = getattr(_state, "depth", 0)
    _state.depth = 0
    try:
        yield
    finally:
        _state.depth = depth
