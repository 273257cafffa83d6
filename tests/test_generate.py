"""The diffusion loop and its policies on the tiny checkpoints: vanilla invariants, Fast-dLLM and
ES-dLLM exactness against vanilla where they must agree, parallel-decoding rules, batch invariance."""
from __future__ import annotations

import pytest
import torch

from esdllm.runtime import sampling as S
from esdllm.runtime.config import DecodeConfig
from esdllm.runtime.generate import generate
from esdllm.runtime.policies import prune_schedule
from esdllm.runtime.weights import load_model
from helpers import Spy

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [3], [4, 4, 4, 4, 4, 4, 4, 4, 4]]
ONES = dict(skip_proportions=(1.0,), skip_positions=(0.0,), delay_eos=False)


@pytest.fixture(scope="module", params=["llada", "dream"])
def model(request, tmp_path_factory):
    from esdllm.runtime.weights import make_tiny_checkpoint
    return load_model(make_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param)))


def run(model, cfg, prompts=PROMPTS):
    return generate(model, prompts, cfg).tokens


def test_vanilla_commits_schedule_inside_block(model):
    cfg = DecodeConfig(gen_length=16, block_length=8, steps=8, sampler="llada")
    spy = Spy(model)
    out = generate(spy, PROMPTS[:2], cfg)
    mask = model.args.mask_id
    starts = [len(p) for p in PROMPTS[:2]]  # each row's canvas: its prompt from slot 0, then 16 tokens

    def region(t, b, lo=0, hi=16):  # row b's generation columns [lo, hi) in a vanilla forward's tokens
        return t[b, starts[b] + lo: starts[b] + hi]
    masks = [sum(int((region(t, b) == mask).sum()) for b in range(2)) for t, *_ in spy.calls]
    masks.append(int((out.tokens == mask).sum()))
    assert [a - b for a, b in zip(masks, masks[1:])] == [4] * 8  # 2 tokens a step, 2 rows
    for i, (t, *_) in enumerate(spy.calls):
        blk = i // 4
        later = [region(t, b, (blk + 1) * 8) for b in range(2)]
        assert all(bool((r == mask).all()) for r in later), "a block committed outside itself"
    assert out.stats.nfe == 8 and not bool((out.tokens == mask).any())


def test_greedy_is_deterministic_and_batch_invariant(model):
    for method in ["vanilla", "fast-dllm", "es-dllm"]:
        cfg = DecodeConfig(method=method, gen_length=24, block_length=8)
        out = run(model, cfg)
        assert torch.equal(out, run(model, cfg))
        for i, p in enumerate(PROMPTS):
            assert torch.equal(out[i], run(model, cfg, [p])[0]), (method, i)


@pytest.mark.parametrize("kw", [dict(threshold=0.3), dict(factor=1.0), dict(cache="prefix", threshold=0.3)])
def test_parallel_decoding_batch_invariant(model, kw):
    for method in ["fast-dllm", "es-dllm"]:
        cfg = DecodeConfig(method=method, gen_length=24, block_length=8, **kw)
        out = run(model, cfg)
        for i, p in enumerate(PROMPTS):
            assert torch.equal(out[i], run(model, cfg, [p])[0]), (method, kw, i)


@pytest.mark.parametrize("cache", ["dual", "prefix"])
def test_cache_refreshed_every_step_equals_vanilla(model, cache):
    cfg = DecodeConfig(gen_length=24, block_length=8)
    ref = run(model, cfg)
    assert torch.equal(ref, run(model, cfg.replace(method="fast-dllm", cache=cache, cache_refresh=1)))


def test_es_without_skipping_equals_vanilla_and_dual(model):
    # ES-dLLM commits one token a step on both families (the authors' count): compare with the same
    # count; its Dream rows in token coordinates are exactly the dual cache's
    # (the authors' Dream rows end one before the block end, so there they differ by design)
    cfg = DecodeConfig(gen_length=16, block_length=16, sampler="llada")  # one block: no suffix
    es = cfg.replace(method="es-dllm", es_token_rows=True, **ONES)
    assert torch.equal(run(model, cfg), run(model, es.replace(prompt_update_freq=1)))
    assert torch.equal(run(model, cfg.replace(method="fast-dllm", cache="dual")), run(model, es))


def test_threshold_one_is_one_token_a_step(model):
    cfg = DecodeConfig(method="fast-dllm", gen_length=16, block_length=8, threshold=1.0)
    out = generate(model, PROMPTS[:1], cfg)
    assert out.stats.nfe == 16 and not bool((out.tokens == model.args.mask_id).any())


def test_low_threshold_needs_fewer_forwards_and_terminates(model):
    cfg = DecodeConfig(method="fast-dllm", gen_length=16, block_length=8, threshold=1e-9)
    out = generate(model, PROMPTS[:1], cfg)
    assert out.stats.nfe == 2  # every token passes: one forward per block


def test_select_rules_on_hand_made_confidences():
    inf = float("-inf")
    conf = torch.tensor([[0.95, 0.5, 0.99, inf, 0.2], [0.1, 0.3, inf, inf, 0.2]], dtype=torch.float64)
    assert S.select_threshold(conf, 0.9).tolist() == [[True, False, True, False, False],
                                                      [False, True, False, False, False]]
    # factor f=1: accept sorted prefix while c_(k) >= 1 - 1/(k+1): 0.99 >= 0.5, 0.95 >= 0.667, 0.5 < 0.75
    assert S.select_factor(conf, 1.0).tolist() == [[True, False, True, False, False],
                                                   [False, True, False, False, False]]
    assert S.select_topk(conf, torch.tensor([2, 5])).sum(1).tolist() == [2, 3]
    assert S.llada_quota(torch.tensor([10]), 4).tolist() == [[3, 3, 2, 2]]
    # Dream's float32 timestep schedule commits 0 at the first step when steps == masked count
    assert S.dream_quota(torch.tensor([32]), 32, torch.tensor([0]), 1e-3).item() == 0


def test_es_keep_count_and_leftmost_kept(model):
    # two tokens a step, so the floor min(n_last + 2, block) is 4 on every skipping step
    cfg = DecodeConfig(method="es-dllm", gen_length=32, block_length=16, steps=16,
                       skip_proportions=(1.0, 0.25), skip_positions=(0.0, 0.5), block_update_freq=64,
                       delay_eos=False)
    spy = Spy(model)
    generate(spy, PROMPTS[:2], cfg)
    trash, mask, pruned, sh = 5 + 32, model.args.mask_id, 0, model.args.logits_shift
    prev = None
    for tokens, idx, plan, pred in spy.calls:
        rows = [dict((r, t) for r, t in zip(idx[b].tolist(), tokens[b].tolist()) if r != trash) for b in range(2)]
        if plan.keep:
            pruned += 1
            for b in range(2):  # tokens committed since the previous step, seen in both forwards
                if not rows[b]:  # this row's block is done: it idles on the trash slot (k = 0)
                    assert all(int(plan.keep[layer][b].sum()) == 0 for layer in plan.keep)
                    continue
                n_last = sum(1 for r, t in rows[b].items() if t != mask and prev[b].get(r) == mask)
                for layer in plan.keep:
                    assert int(plan.keep[layer][b].sum()) >= min(n_last + 2, 16) >= 2
            # the leftmost masked block position is always predicted by a kept row
            for b in (b for b in range(2) if rows[b]):
                e = max(rows[b]) + 1 + sh  # rows end at the block end (the authors' Dream rows one before)
                masked = [r for r, t in rows[b].items() if t == mask and r >= e - 16]
                if masked:  # (Dream: the block's last position has no row of its own here)
                    assert min(masked) in pred[b].tolist()
        prev = rows
    assert pruned > 0


def test_prune_schedule_matches_paper_layers():
    cfg = DecodeConfig()
    assert prune_schedule(cfg, 32) == {4: 0.5, 8: 0.25}   # LLaDA-8B
    assert prune_schedule(cfg, 28) == {4: 0.5, 7: 0.25}   # Dream-7B


def test_dream_offset_first_token_from_last_prompt_row(model):
    spy = Spy(model)
    generate(spy, PROMPTS[:1], DecodeConfig(method="fast-dllm", gen_length=8, block_length=8))
    tokens, idx, plan, pred = spy.calls[1]  # a block-only step
    sh = model.args.logits_shift
    assert idx[0, 0].item() == 5 - sh  # Dream runs the last prompt row to predict position 5
    assert pred[0, 0].item() == 5


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="multiple of block_length"):
        DecodeConfig(gen_length=10, block_length=4)
    with pytest.raises(ValueError, match="unknown method"):
        DecodeConfig(method="fast")
    with pytest.raises(ValueError, match="threshold"):
        DecodeConfig(threshold=0.9, factor=1.0)


def test_on_block_can_stop_a_row_without_touching_the_others(model):
    cfg = DecodeConfig(method="es-dllm", gen_length=24, block_length=8)
    seen = []

    def stop_first(ev):
        seen.append(ev.block)
        return [0] if ev.block == 0 else None

    out = generate(model, PROMPTS[:2], cfg, on_block=stop_first)
    assert seen == [0, 1, 2]
    assert bool((out.tokens[0, 8:] == model.args.mask_id).all())  # row 0 stopped after its first block
    assert torch.equal(out.tokens[1], run(model, cfg, PROMPTS[1:2])[0])


@pytest.mark.parametrize("method", ["vanilla", "es-dllm"])
def test_stream_steps_reports_growing_decided_prefixes_without_changing_tokens(model, method):
    cfg = DecodeConfig(method=method, gen_length=24, block_length=8)
    events = []
    out = generate(model, PROMPTS, cfg, on_block=lambda ev: events.append(ev), stream_steps=True)
    assert torch.equal(out.tokens, run(model, cfg))
    mask = model.args.mask_id
    steps = [ev for ev in events if not ev.block_done]
    assert [ev.block for ev in events if ev.block_done] == [0, 1, 2]
    assert steps, "no step ever lengthened a decided prefix before its block ended"
    last = torch.zeros(len(PROMPTS), dtype=torch.long)
    for ev in events:
        m = ev.canvas == mask
        prefix = torch.where(m.any(1), m.int().argmax(1), m.shape[1])
        assert (prefix >= last).all()                                   # prefixes only grow
        if not ev.block_done:
            assert (prefix > last).any()                                # a step event means growth
        for b in range(len(PROMPTS)):                                   # and what it shows is final
            assert torch.equal(ev.canvas[b, :prefix[b]], out.tokens[b, :prefix[b]])
        last = prefix


def test_a_step_event_can_stop_a_row_mid_block(model):
    cfg = DecodeConfig(method="vanilla", gen_length=16, block_length=8)
    first = []

    def stop_at_first_step_event(ev):
        if not ev.block_done and not first:
            first.append(ev.canvas.clone())
            return [0]
        return None

    out = generate(model, PROMPTS[:2], cfg, on_block=stop_at_first_step_event, stream_steps=True)
    assert first, "no step event fired"
    mask = model.args.mask_id
    decided = int((first[0][0] != mask).sum())
    assert decided % 8 and int((out.tokens[0] != mask).sum()) == decided   # row 0 froze mid-block
    assert torch.equal(out.tokens[1], run(model, cfg, PROMPTS[1:2])[0])


@pytest.mark.parametrize("method", ["vanilla", "fast-dllm", "es-dllm"])
def test_a_model_that_predicts_the_mask_token_still_finishes(model, method):
    """Found against the reference harness: a model whose argmax is the mask id at some position
    made the loop re-propose it forever. Proposals skip the mask id; the loop ends."""
    import copy

    class MaskFirst(torch.nn.Module):  # the mask id's logit is the largest everywhere
        def __init__(self, lin, mask_id):
            super().__init__()
            self.lin, self.mask_id = lin, mask_id

        def forward(self, h):
            out = self.lin(h)
            out[..., self.mask_id] = out.amax(-1) + 5.0
            return out
    m = copy.deepcopy(model)
    m.output = MaskFirst(m.output, m.args.mask_id)
    assert int(m.step(*_one_step(m))[0].argmax(-1).eq(m.args.mask_id).all())
    out = generate(m, PROMPTS[:2], DecodeConfig(method=method, gen_length=16, block_length=8))
    assert not bool((out.tokens == m.args.mask_id).any())
    assert out.stats.nfe <= 2 * 16


def _one_step(m):
    cache = m.new_cache(1, 8)
    cache.set_layout(torch.zeros(1, dtype=torch.long))
    idx = torch.arange(8)[None]
    return idx.clamp(max=5), idx, cache
