"""What batching guarantees, exactly (README "Batch invariance"): the arithmetic of a row depends on its
batch mates only through the canvas geometry (its left padding and the canvas length), never through
their contents. Same geometry: bitwise-equal logits. Another geometry (generate() sizes the canvas to
its longest prompt): logits within float32 rounding of attention over the padded key slots."""
from __future__ import annotations

import random

import pytest
import torch

from esdllm.runtime.cache import StepPlan
from esdllm.runtime.weights import load_model, make_tiny_checkpoint


@pytest.fixture(scope="module", params=["llada", "dream"])
def model(request, tmp_path_factory):
    return load_model(make_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param), layers=4))


def _forward(model, prompts, P, G=16):
    """First full forward of prompts left-padded to P slots: logits [B, P + G, V]."""
    a = model.args
    L = P + G
    x = torch.full((len(prompts), L), a.mask_id)
    for b, p in enumerate(prompts):
        x[b, : P - len(p)] = a.pad_id
        x[b, P - len(p): P] = torch.tensor(p)
    cache = model.new_cache(len(prompts), L)
    cache.set_layout(torch.tensor([P - len(p) for p in prompts]))
    idx = torch.arange(L).expand(len(prompts), L)
    with torch.inference_mode():
        return model.step(x, idx, cache, StepPlan())[0]


def _prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(0, 200) for _ in range(rng.randint(3, 20))] for _ in range(n)]


def test_same_geometry_is_bitwise_whatever_the_batch_mates(model):
    target = _prompts(1, seed=1)[0]
    alone = _forward(model, [target], P=24)[0]
    for seed in range(3):  # other mates, other batch sizes, the target at another row
        mates = _prompts(2 + seed, seed=10 + seed)
        batch = mates[:seed] + [target] + mates[seed:]
        got = _forward(model, batch, P=24)[seed]
        assert torch.equal(got, alone), (seed, (got - alone).abs().max().item())


def test_another_geometry_is_within_rounding_and_the_longest_row_is_exact(model):
    prompts = _prompts(6, seed=3)
    P = max(len(p) for p in prompts)
    batch = _forward(model, prompts, P)
    worst = 0.0
    for b, p in enumerate(prompts):
        alone = _forward(model, [p], len(p))[0]
        d = (batch[b, P - len(p):] - alone).abs().max().item()
        worst = max(worst, d)
        if len(p) == P:  # no left padding: the same geometry as alone
            assert d == 0.0
    assert worst < 1e-5, worst
