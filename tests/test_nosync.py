"""A step with no host synchronisation (runtime/nosync.py, DecodeConfig.static_shapes) and a compiled
step (runtime/compiled.py): the same tokens as the eager, host-shaped step, for every method."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from esdllm.runtime import slots as E  # where lanes build their policies
from esdllm.runtime import generate as G
from esdllm.runtime import task
from esdllm.runtime.compiled import CompiledExecutor, compiled
from esdllm.runtime.config import DECODE_PRESETS, DecodeConfig
from esdllm.runtime.cudagraphs import EagerReplay, GraphedExecutor
from esdllm.runtime.nosync import HostSyncError, allow_host_sync, no_host_sync
from esdllm.runtime.pipeline import Pipeline

MODELS = Path(__file__).parents[1] / "models"


def test_guard_raises_on_every_kind_of_host_read():
    t = torch.arange(4)
    reads = {"item": lambda: t[0].item(), "bool": lambda: bool(t.any()), "int": lambda: int(t.sum()),
             "tolist": lambda: t.tolist(), "float": lambda: float(t.sum()), "nonzero": lambda: t.nonzero(),
             "mask index": lambda: t[t > 1], "mask assign": lambda: t.__setitem__(t > 1, 0),
             "index": lambda: [0, 1, 2][t[1]]}
    with no_host_sync():
        for name, read in reads.items():
            with pytest.raises(HostSyncError):
                read()
        with allow_host_sync():
            assert t.sum().item() == 6
        assert torch.equal(torch.where(t > 1, t, 0), torch.tensor([0, 0, 2, 3]))  # device-side ops pass
    assert bool(t.any()) and t[t > 1].tolist() == [2, 3]  # and everything works again outside


def _guarded(monkeypatch, ex):
    """Run ex.step and every policy's plan / commit inside no_host_sync()."""
    def wrap(fn):
        def run(*a, **kw):
            with no_host_sync():
                return fn(*a, **kw)
        return run
    monkeypatch.setattr(ex, "step", wrap(ex.step))
    make = E.make_policy

    def make_guarded(*a, **kw):
        pol = make(*a, **kw)
        pol.plan, pol.commit = wrap(pol.plan), wrap(pol.commit)
        return pol
    monkeypatch.setattr(E, "make_policy", make_guarded)


def _prompts(pipe, n=3):
    # mixed lengths (left padding), a maps and a perm problem; trained weights, so thresholds commit
    # several tokens a step and ES-dLLM's keep counts differ between rows
    probs = task.problems(7, n, split="heldout", family=("maps", "perm"))
    return [pipe.encode(p.prompt, gen_length=64) for p in probs]


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_every_method_runs_without_host_syncs_with_unchanged_tokens(family, monkeypatch):
    pipe = Pipeline.load(MODELS / f"{family}-tiny")
    prompts = _prompts(pipe)
    assert len({len(p) for p in prompts}) > 1
    ex = pipe.executor
    want = {}
    for name, kw in DECODE_PRESETS.items():
        cfg = DecodeConfig(gen_length=64, block_length=32, **kw)
        want[name] = G.generate(ex, prompts, cfg, stop_ids=pipe.stop).tokens
    _guarded(monkeypatch, ex)
    with pytest.raises(HostSyncError):  # the host-shaped ES-dLLM plan reads keep counts: the guard sees it
        G.generate(ex, prompts, DecodeConfig(method="es-dllm", gen_length=64, block_length=32), stop_ids=pipe.stop)
    for name, kw in DECODE_PRESETS.items():
        cfg = DecodeConfig(gen_length=64, block_length=32, static_shapes=True, **kw)
        got = G.generate(ex, prompts, cfg, stop_ids=pipe.stop).tokens
        assert torch.equal(got, want[name]), f"{family} {name}: static shapes changed the tokens"


@pytest.mark.slow
def test_compiled_step_gives_the_eager_tokens():
    pipe = Pipeline.load(MODELS / "llada-tiny")
    prompts = _prompts(pipe, 2)
    ex = CompiledExecutor(pipe.executor)
    for name in ("vanilla", "es-dllm-t0.9"):
        cfg = DecodeConfig(gen_length=32, block_length=16, **DECODE_PRESETS[name])
        want = G.generate(pipe.executor, prompts, cfg, stop_ids=pipe.stop).tokens
        assert torch.equal(G.generate(ex, prompts, cfg, stop_ids=pipe.stop).tokens, want), name


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_graph_replay_over_static_buffers_gives_the_eager_tokens(family):
    """GraphedExecutor's keys, static buffers and rebuilt plans, with the recording itself replaced by
    re-running the step over those buffers (the CUDA recording is left for scripts/gpu-check)."""
    pipe = Pipeline.load(MODELS / f"{family}-tiny")
    prompts = _prompts(pipe)
    ex = GraphedExecutor(pipe.executor, replayer=EagerReplay)
    for name in ("vanilla", "fast-dllm-dual-t0.9", "es-dllm", "es-dllm-t0.9", "streaming-dllm", "dyllm"):
        cfg = DecodeConfig(gen_length=64, block_length=32, **DECODE_PRESETS[name])
        want = G.generate(pipe.executor, prompts, cfg, stop_ids=pipe.stop).tokens
        before = dict(ex.stats)
        assert torch.equal(G.generate(ex, prompts, cfg, stop_ids=pipe.stop).tokens, want), name
        assert ex.stats["replayed"] > before["replayed"], f"{name}: no step was replayed"


def test_compile_modes_are_checked():
    pipe = Pipeline.load(MODELS / "llada-tiny")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        compiled(pipe.executor, "cuda-graphs")
    with pytest.raises(ValueError, match="unknown compile mode"):
        compiled(pipe.executor, "fast")
    with pytest.raises(ValueError, match="applies to the torch executor"):
        compiled(object(), "compile")
