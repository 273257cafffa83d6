"""The in-flight engine (runtime/engine.py): requests that arrive at random steps, with other methods
beside them and cancellations around them, get exactly the tokens they get alone; rows are freed
the step after a request ends and reused; nothing is left behind."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from esdllm.runtime import task
from esdllm.runtime.config import DECODE_PRESETS, DecodeConfig
from esdllm.runtime.engine import Engine, split_runs
from esdllm.runtime.generate import generate
from esdllm.runtime.pipeline import Pipeline

MODELS = Path(__file__).parents[1] / "models"


@pytest.fixture(scope="module", params=["llada", "dream"])
def pipe(request):
    return Pipeline.load(MODELS / f"{request.param}-tiny")


def _prompts(pipe, n, seed=5):
    return [pipe.encode(p.prompt, gen_length=64) for p in task.problems(seed, n, split="heldout", family=("maps", "perm"))]


def _alone(pipe, prompt, cfg):
    return generate(pipe.executor, [prompt], cfg, stop_ids=pipe.stop).tokens[0].tolist()


def _drive(eng, arrivals, cancels=()):
    """arrivals: [(step, prompt, cfg)]; cancels: {request index: step}. -> handles in arrival order."""
    handles, step = [None] * len(arrivals), 0
    while eng.busy() or any(h is None for h in handles):
        for i, (at, prompt, cfg, stop) in enumerate(arrivals):
            if at == step:
                handles[i] = eng.submit(prompt, cfg, stop)
        for i, at in dict(cancels).items():
            if at == step and handles[i] is not None:
                eng.cancel(handles[i])
        eng.step()
        step += 1
        assert step < 2000
    return handles


@pytest.mark.parametrize("preset", list(DECODE_PRESETS))
def test_staggered_arrivals_and_cancellations_give_the_tokens_alone(pipe, preset):
    # requests that differ in max_tokens only share a lane: rows of 1, 2 and 3 blocks side by side
    cfgs = [DecodeConfig(gen_length=g, block_length=32, **DECODE_PRESETS[preset]) for g in (64, 32, 96)]
    prompts = _prompts(pipe, 6)
    rng = random.Random(preset)
    arrivals = [(rng.randrange(0, 40), p, cfgs[i % 3], pipe.stop) for i, p in enumerate(prompts)]
    eng = Engine(pipe.executor, max_batch=3, max_len=160)  # fewer rows than requests: some queue
    handles = _drive(eng, arrivals, cancels={1: arrivals[1][0] + 1})  # after at most one forward
    assert not eng.queue and not any(l.active() for l in eng.lanes.values()), "the engine kept a request"
    assert len(eng.lanes) == 1, "requests that differ only in gen_length took separate lanes"
    for i, (h, (_, p, c, _)) in enumerate(zip(handles, arrivals)):
        r = eng.pop(h)
        assert r.done
        if i == 1 and r.cancelled:  # (threshold decoding with early exit may finish in one forward)
            assert r.nfe <= 1
        else:
            assert r.tokens == _alone(pipe, p, c), f"{preset}: request {i} differs from alone"


def test_split_runs_cuts_where_padding_costs_more_than_a_forward():
    assert split_runs([90, 95, 100, 750], 64) == [(0, 3), (3, 4)]   # one long row goes apart
    assert split_runs([90, 95, 100, 110], 64) == [(0, 4)]           # near widths share one forward
    assert split_runs([80, 300, 310, 760, 770], 64) == [(0, 1), (1, 3), (3, 5)]
    assert split_runs([5, 6, 7], 0) == [(0, 1), (1, 2), (2, 3)]     # no fixed cost: every width alone
    assert split_runs([5, 600], 1e9) == [(0, 2)]


@pytest.mark.parametrize("preset", ["vanilla-t0.9-exit", "fast-dllm-prefix-t0.9", "es-dllm-t0.9"])
def test_rows_of_different_widths_forward_apart_and_still_as_alone(pipe, preset):
    """A 224-token canvas beside 32-token ones: cut apart the short rows stop paying for its width;
    either way every request gets its tokens alone."""
    cfgs = [DecodeConfig(gen_length=g, block_length=32, **DECODE_PRESETS[preset]) for g in (32, 32, 224)]
    prompts = _prompts(pipe, 3, seed=11)

    class Counted:  # the executor, counting the positions its forwards run (rows x columns)
        def __init__(self, ex):
            self.ex, self.positions = ex, 0

        def __getattr__(self, name):
            return getattr(self.ex, name)

        def step(self, tokens, *a, **kw):
            self.positions += tokens.numel()
            return self.ex.step(tokens, *a, **kw)

    out = {}
    for cost in (0.0, 1e9):  # every width its own forward; one forward for all
        ex = Counted(pipe.executor)
        eng = Engine(ex, max_batch=3, max_len=320, forward_cost=cost)
        handles = _drive(eng, [(0, p, c, pipe.stop) for p, c in zip(prompts, cfgs)])
        for h, p, c in zip(handles, prompts, cfgs):
            assert eng.pop(h).tokens == _alone(pipe, p, c), f"{preset}, forward_cost {cost}: differs from alone"
        out[cost] = (eng.stats.nfe, ex.positions)
    (split_nfe, split_pos), (joint_nfe, joint_pos) = out[0.0], out[1e9]
    assert split_nfe > joint_nfe and split_pos < joint_pos  # more forwards over fewer positions


def test_stepping_outside_inference_mode_keeps_no_autograd_graph(pipe):
    """The weights require grad; a cache written outside inference mode would hold every forward."""
    assert torch.is_grad_enabled() and any(p.requires_grad for p in pipe.executor.model.parameters())
    eng = Engine(pipe.executor, max_batch=2, max_len=128)
    h = eng.submit(_prompts(pipe, 1)[0], DecodeConfig(gen_length=64, block_length=32, method="es-dllm"), pipe.stop)
    eng.step()
    lane = eng.result(h).lane
    assert all(t.grad_fn is None and not t.requires_grad for t in lane.cache.k + lane.cache.v + [lane.x])


def test_different_methods_decode_side_by_side_each_as_alone(pipe):
    names = ["vanilla", "fast-dllm-dual-t0.9", "es-dllm-t0.9", "streaming-dllm", "dyllm", "es-dllm+streaming",
             "es-dllm-p1-t0.9-exit", "es-dllm-p1s-t0.9-exit"]
    prompts = _prompts(pipe, len(names), seed=8)
    cfgs = [DecodeConfig(gen_length=64, block_length=32, **DECODE_PRESETS[n]) for n in names]
    arrivals = [(2 * i, p, c, pipe.stop) for i, (p, c) in enumerate(zip(prompts, cfgs))]
    eng = Engine(pipe.executor, max_batch=4, max_len=128, max_lanes=3)
    handles = _drive(eng, arrivals)
    for h, (_, p, c, _), name in zip(handles, arrivals, names):
        assert eng.result(h).tokens == _alone(pipe, p, c), name


def test_a_row_is_freed_the_step_after_its_request_ends_and_reused(pipe):
    cfg = DecodeConfig(gen_length=64, block_length=32, method="es-dllm", threshold=0.9)
    a, b, c = _prompts(pipe, 3, seed=9)
    eng = Engine(pipe.executor, max_batch=2, max_len=128)
    ha, hb, hc = eng.submit(a, cfg, pipe.stop), eng.submit(b, cfg, pipe.stop), eng.submit(c, cfg, pipe.stop)
    eng.step()
    assert len(eng.queue) == 1 and eng.result(hc).lane is None  # no row for c yet
    eng.cancel(ha)
    events = eng.step()
    assert (ha, "done") in events and eng.result(hc).row == eng.result(ha).row  # a's row went to c
    while eng.busy():
        eng.step()
    assert eng.result(hc).tokens == _alone(pipe, c, cfg) and eng.result(hb).tokens == _alone(pipe, b, cfg)


def test_requests_that_do_not_fit_are_refused_by_name(pipe):
    eng = Engine(pipe.executor, max_batch=2, max_len=80)
    with pytest.raises(ValueError, match="exceeds the engine's maximum length 80"):
        eng.submit([5] * 20, DecodeConfig(gen_length=64), pipe.stop)
    with pytest.raises(ValueError, match="at least one token"):
        eng.submit([], DecodeConfig(gen_length=64), pipe.stop)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_a_row_of_the_engine_layout_computes_bitwise_what_it_computes_alone(family, tmp_path):
    """The engine's canvas: each row's prompt from slot 0, its generation, then slots that are not
    keys. Logits of every row of a mixed-length batch equal its logits alone, bit for bit."""
    from esdllm.runtime.cache import StepPlan
    from esdllm.runtime.weights import load_model, make_tiny_checkpoint
    m = load_model(make_tiny_checkpoint(family, tmp_path, layers=8))
    g, G = torch.Generator().manual_seed(0), 32
    prompts = [torch.randint(0, 200, (n,), generator=g) for n in (3, 17, 9, 12)]
    L = max(len(p) for p in prompts) + G

    def logits(rows):
        cache, B = m.new_cache(len(rows), L), len(rows)
        x, idx = torch.full((B, L), m.args.pad_id), torch.full((B, L), L)
        for b, p in enumerate(rows):
            n = len(p) + G
            x[b, :len(p)], x[b, len(p):n], idx[b, :n] = p, m.args.mask_id, torch.arange(n)
            cache.set_row(b, n)
        tokens = torch.cat([x, torch.full((B, 1), m.args.mask_id)], 1).gather(1, idx)
        with torch.inference_mode():
            return m.step(tokens, idx, cache, StepPlan())[0]
    batch = logits(prompts)
    for b, p in enumerate(prompts):
        n = len(p) + G
        assert torch.equal(batch[b, :n], logits([p])[0, :n]), f"row {b} differs from alone"


def test_a_request_cancelled_while_queued_ends_without_a_row(pipe):
    cfg = DecodeConfig(gen_length=64, block_length=32, method="vanilla")
    a, b, c = _prompts(pipe, 3, seed=12)
    eng = Engine(pipe.executor, max_batch=1, max_len=128)
    ha, hb, hc = (eng.submit(p, cfg, pipe.stop) for p in (a, b, c))
    eng.step()
    eng.cancel(hc)  # behind b in the queue
    events = eng.step()
    assert (hc, "done") in events and eng.result(hc).tokens == [] and eng.result(hc).row == -1
    while eng.busy():
        eng.step()
    assert eng.result(hb).tokens == _alone(pipe, b, cfg)


def test_a_copy_of_a_rows_own_slots_forwards_as_the_whole_rows_do(tmp_path):
    """Cache.take(rows, upto) copies only slots [0, upto) and the trash slot. A forward over that
    copy, attending to the first upto slots as the engine's forwards do, gives the logits and cache
    writes of the same forward over a full copy; put() writes them back and leaves every other slot
    as it was."""
    from esdllm.runtime.cache import StepPlan
    from esdllm.runtime.weights import load_model, make_tiny_checkpoint
    m = load_model(make_tiny_checkpoint("llada", tmp_path, layers=2))
    B, L, upto = 4, 48, 20
    g = torch.Generator().manual_seed(1)
    cache = m.new_cache(B, L, hidden_layers=(0,))
    for b in range(B):
        cache.set_row(b, upto - b)
    for t in [*cache.k, *cache.v, *cache.hidden.values()]:
        t.copy_(torch.randn(t.shape, generator=g))
    rows, n = torch.tensor([3, 1]), 8
    idx = torch.stack([torch.arange(upto - 3 - n, upto - 3), torch.arange(upto - 1 - n, upto - 1)])
    tokens = torch.randint(0, 60, idx.shape, generator=g)
    before = [t.clone() for _, _, t in cache._tensors()]

    def run(part):
        sub = cache.take(rows, upto if part else None)
        plan = StepPlan(write_hidden=True, key_len=upto)  # as the engine plans: keys end with the rows
        with torch.inference_mode():
            out = m.step(tokens, idx, sub, plan)[0]
        return out, sub
    full_out, full = run(False)
    part_out, part = run(True)
    assert torch.equal(full_out, part_out)
    for (name, _, a), (_, _, b) in zip(full._tensors(), part._tensors()):
        d = 2 if name in ("k", "v") else 1
        assert torch.equal(a.narrow(d, 0, upto), b.narrow(d, 0, upto)), name
        assert torch.equal(a.narrow(d, L, 1), b.narrow(d, L, 1)), name
    cache.put(rows, part, upto)
    for (name, _, t), old, (_, _, f) in zip(cache._tensors(), before, full._tensors()):
        d = 2 if name in ("k", "v") else 1
        for r, row in enumerate(rows.tolist()):
            assert torch.equal(t[row].narrow(d - 1, 0, upto), f[r].narrow(d - 1, 0, upto)), name
            assert torch.equal(t[row].narrow(d - 1, upto, L - upto), old[row].narrow(d - 1, upto, L - upto)), name
        others = [i for i in range(B) if i not in rows.tolist()]
        assert torch.equal(t[others], old[others]), name
