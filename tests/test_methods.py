"""Streaming-dLLM and DyLLM in the one loop, and their composition with ES-dLLM: the equalities that
pin their semantics, the delta update against dense attention, early exit, batch invariance, and the
combinations that are refused."""
from __future__ import annotations

import pytest
import torch

from esdllm.plugins import ops
from esdllm.runtime.config import DecodeConfig
from esdllm.runtime.generate import generate
from esdllm.runtime.weights import load_model, make_tiny_checkpoint

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [3], [4, 4, 4, 4, 4, 4, 4, 4, 4]]
BASE = DecodeConfig(gen_length=48, block_length=16)
COMPOSED = dict(method="es-dllm", suffix_window=16, dynamic_alpha=0.3, threshold=0.5, early_exit=True)
P1S = dict(method="es-dllm", threshold=0.5, early_exit=True, prompt_update_freq=1, delay_eos=False, prompt_skip=True)


@pytest.fixture(scope="module", params=["llada", "dream"])
def model(request, tmp_path_factory):
    return load_model(make_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param), layers=4))


def run(model, cfg, prompts=PROMPTS):
    return generate(model, prompts, cfg)


def test_streaming_with_the_whole_suffix_and_no_decay_is_the_prefix_cache(model):
    wide = BASE.replace(method="streaming-dllm", suffix_window=10_000, dynamic_alpha=0.0, early_exit=False)
    prefix = BASE.replace(method="fast-dllm", cache="prefix", threshold=0.9)
    a, b = run(model, wide), run(model, prefix)
    if model.args.logits_shift == 0:
        assert torch.equal(a.tokens, b.tokens)
    else:  # Dream, as the authors' code: a block's first step commits exactly its first token
        cfg = wide.replace(gen_length=16, threshold=1e-9)  # every token passes the threshold
        one = run(model, cfg)
        assert one.stats.nfe == 2  # one forward commits the block's first token, the second the rest
        assert run(model, prefix.replace(gen_length=16, threshold=1e-9)).stats.nfe == 1


def test_streaming_forwards_fewer_rows_than_the_prefix_cache(model):
    cfg = BASE.replace(gen_length=96, method="streaming-dllm", suffix_window=8, early_exit=False)
    s = run(model, cfg, PROMPTS[:1]).stats
    p = run(model, cfg.replace(method="fast-dllm", cache="prefix", suffix_window=None, dynamic_alpha=None,
                               threshold=0.9), PROMPTS[:1]).stats
    assert s.positions_per_forward < 0.6 * p.positions_per_forward


def test_dyllm_with_everything_salient_is_vanilla(model):
    cfg = BASE.replace(sampler="llada")  # DyLLM's count is the uniform one, on both families
    assert torch.equal(run(model, cfg).tokens,
                       run(model, cfg.replace(method="dyllm", saliency_tau=1.0, prompt_period=1)).tokens)


def test_dyllm_reuses_rows(model):
    st = run(model, BASE.replace(method="dyllm"), PROMPTS[:1]).stats
    dense = run(model, BASE.replace(method="dyllm", saliency_tau=1.0), PROMPTS[:1]).stats
    assert st.nfe == dense.nfe == 48 and st.extra["cache_bytes"] > 0


@pytest.mark.parametrize("gqa", [False, True])
def test_delta_update_equals_dense_attention_when_every_row_is_salient(gqa):
    """C_old + attention(q, K, V_new - V_old) == attention(q, K, V_new): the update is exact where
    the salient set holds every value row (the softmax weights use the new keys)."""
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, n, S, hd = 2, 4, 2 if gqa else 4, 7, 13, 16
    q = torch.randn(B, H, n, hd, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, hd, generator=g, dtype=torch.float64)
    v_old, v_new = torch.randn(2, B, Hkv, S, hd, generator=g, dtype=torch.float64)
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[0, :3] = False
    c_old = ops.partial_attention(q, k, v_old, valid)
    c_new = c_old + ops.partial_attention(q, k, v_new - v_old, valid)
    torch.testing.assert_close(c_new, ops.partial_attention(q, k, v_new, valid), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kw", [dict(method="vanilla"), dict(method="fast-dllm"), dict(method="es-dllm"),
                                dict(method="streaming-dllm"), dict(method="dyllm")])
def test_early_exit_never_changes_the_tokens_up_to_the_eos_block(kw):
    """On the embedded model, whose answers end in EOS: the rows stop after their EOS block."""
    from pathlib import Path

    from esdllm.runtime import task
    from esdllm.runtime.tokenizer import encode_prompt, load_tokenizer
    d = Path(__file__).resolve().parents[1] / "models" / "llada-tiny"
    m, tok = load_model(d), load_tokenizer(d)
    prompts = [encode_prompt(tok, p.prompt, chat=False) for p in task.problems(3, 4, split="heldout", family="maps")]
    eos, cfg = m.args.eos_id, BASE.replace(**kw, gen_length=64)
    full, early = run(m, cfg.replace(early_exit=False), prompts), run(m, cfg.replace(early_exit=True), prompts)
    exited = 0
    for b in range(len(prompts)):
        row = full.tokens[b]
        blocks = [i for i in range(0, 64, 16) if bool((row[i:i + 16] == eos).any())]
        end = blocks[0] + 16 if blocks else 64
        assert torch.equal(early.tokens[b, :end], row[:end]), b
        assert bool((early.tokens[b, end:] == eos).all())
        exited += end < 64
    assert exited > 0 and early.stats.nfe < full.stats.nfe


def test_prompt_skip_ranks_the_prompt_rows_with_the_blocks(model):
    """es-dllm with the prompt refreshed every step: the authors' refreshes run every row through
    every layer; with prompt_skip they prune, and prompt rows compete for the deep layers' places."""
    cfg = BASE.replace(method="es-dllm", prompt_update_freq=1, delay_eos=False)
    P, L = len(PROMPTS[0]), len(PROMPTS[0]) + BASE.gen_length
    seen = {}
    for skip in (False, True):
        rows = {0: [], -1: []}  # per forward: the canvas rows the first and the last layer run
        hooks = [model.layers[l].register_forward_pre_hook(
            lambda m, a, l=l: rows[l].append({r for r in a[3][0].tolist() if r < L})) for l in rows]
        try:
            stats = run(model, cfg.replace(prompt_skip=skip), PROMPTS[:1]).stats
        finally:
            for h in hooks:
                h.remove()
        seen[skip] = stats, list(zip(rows[0], rows[-1]))[1:]  # after the first, full forward
    (dense, dense_fwd), (skipped, skip_fwd) = seen[False], seen[True]
    assert all(0 in first and first == last for first, last in dense_fwd)
    assert all(0 in first for first, _ in skip_fwd)  # still a prompt refresh every step
    pruned = [last for first, last in skip_fwd if last < first]
    assert len(pruned) >= len(skip_fwd) - len(skip_fwd) // 16 - 1  # all but the all-update steps
    prompt_kept = [len(last & set(range(P - 1))) for last in pruned]
    assert max(prompt_kept) > 0 and min(prompt_kept) < P - 1  # prompt rows kept, and dropped
    assert skipped.positions_computed < dense.positions_computed


@pytest.mark.parametrize("kw", [dict(method="streaming-dllm"), dict(method="dyllm"), COMPOSED, P1S],
                         ids=["streaming-dllm", "dyllm", "es-dllm+streaming", "es-dllm-p1s"])
def test_batch_invariance(model, kw):
    cfg = BASE.replace(**kw)
    out = run(model, cfg)
    for i, p in enumerate(PROMPTS):
        assert torch.equal(out.tokens[i], run(model, cfg, [p]).tokens[0]), (kw, i)


def test_composition_prunes_the_suffix_es_dllm_attends_to(model):
    """es-dllm + suffix window: the first forward skips the pruned suffix and no step attends to it."""
    from helpers import Spy
    spy = Spy(model)
    generate(spy, PROMPTS[:1], BASE.replace(**COMPOSED, gen_length=96))
    L = len(PROMPTS[0]) + 96
    first = spy.calls[0][1]
    assert first.shape[1] < L
    pruned = [plan.key_slots is not None for _, _, plan, _ in spy.calls]
    assert pruned[0] and not pruned[-1]  # the last block has no suffix left to prune
    keys = set(spy.calls[0][2].key_slots[0].tolist()) - {L}
    assert L - 1 in keys and len(keys) < L  # the trailing position is a key, the far suffix not


@pytest.mark.parametrize("kw,msg", [
    (dict(method="vanilla", suffix_window=8), "suffix_window applies to"),
    (dict(method="dyllm", suffix_window=8), "suffix_window applies to"),
    (dict(method="fast-dllm", cache="none", suffix_window=8), "needs a cache"),
    (dict(method="es-dllm", dynamic_alpha=0.3), "give --threshold"),
    (dict(method="streaming-dllm", factor=1.0), "factor does not apply"),
    (dict(method="dyllm", saliency_tau=0.0), "saliency_tau"),
    (dict(method="es-dllm", temperature=float("nan")), "finite"),
])
def test_meaningless_combinations_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        DecodeConfig(**kw)


def test_streaming_defaults_are_its_main_setting():
    cfg = DecodeConfig(method="streaming-dllm")
    assert [cfg.resolved(k) for k in ("threshold", "suffix_window", "dynamic_alpha", "early_exit")] == [0.9, 96, 0.3, True]
    assert DecodeConfig(method="es-dllm").resolved("suffix_window") is None
