"""Shared test helpers: op inputs (tiny, odd shapes), keep masks, a difference report, the Spy
executor that records every step, and random task-free prompts. Imported by test modules as
`helpers` (tests/ is on sys.path through conftest.py)."""
from __future__ import annotations

import torch


def diff(actual: torch.Tensor, expected: torch.Tensor) -> str:
    d = (actual.double() - expected.double()).abs()
    worst = tuple(int(i) for i in torch.unravel_index(d.argmax(), d.shape))
    return f"max diff {d.max().item():.3g}, mean {d.mean().item():.3g}, worst at {worst}"


def keep_mask(B: int, k: int, counts=None) -> torch.Tensor:
    """[B, k] bool: entry b keeps its first counts[b] (default: all k) most important rows."""
    counts = torch.full((B,), k) if counts is None else torch.tensor(counts)
    return torch.arange(k)[None, :] < counts[:, None]


def gather_inputs(B=2, n=7, d=20, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    prev = torch.randn(B, n, d, generator=g)
    hidden = prev + 0.5 * torch.rand(B, n, 1, generator=g) * torch.randn(B, n, d, generator=g)
    conf = torch.rand(B, n, generator=g)
    bonus = torch.zeros(B, n)
    bonus[:, 2] = 5.0  # leftmost masked position of the block
    return hidden.to(dtype), prev.to(dtype), conf, bonus


def attention_inputs(B=2, H=4, Hkv=2, n=7, S=33, hd=16, dtype=torch.float32, seed=0):
    """Slot S-1 is the trash slot (masked); the first rows of batch entry 0 are left padding."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, n, hd, generator=g)
    k_cache, v_cache = torch.randn(2, B, Hkv, S, hd, generator=g)
    key_valid = torch.ones(B, S, dtype=torch.bool)
    key_valid[:, -1] = False
    key_valid[0, :5] = False  # left padding of a shorter prompt
    cast = lambda t: t.to(dtype)
    return cast(q), cast(k_cache), cast(v_cache), key_valid




class Spy:
    """Executor wrapper that records every step's input canvas rows, plan and predicted rows."""

    def __init__(self, model):
        self.m, self.args, self.device, self.calls = model, model.args, model.device, []

    def new_cache(self, *a, **kw):
        return self.m.new_cache(*a, **kw)

    def step(self, tokens, idx, cache, plan):
        logits, pred = self.m.step(tokens, idx, cache, plan)
        self.calls.append((tokens.clone(), idx.clone(), plan, pred.clone()))
        return logits, pred
