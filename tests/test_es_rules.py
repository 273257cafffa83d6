"""ES-dLLM as its authors' code does it (zhuzj19/ES-dLLM generate.py / early_skipping.py, line
numbers theirs): one hand-made case per rule where esdllm used to differ, on the policy and the
model directly."""
from __future__ import annotations

import pytest
import torch

from esdllm.plugins import ops
from esdllm.plugins.backends import REFERENCE, OpBackend
from esdllm.runtime.cache import StepContext, StepPlan
from esdllm.runtime.config import DecodeConfig
from esdllm.runtime.generate import generate
from esdllm.runtime.model import Transformer, top2
from esdllm.runtime.policies import ESDLLM

from helpers import Spy


def _policy(args, L, **kw):
    cfg = DecodeConfig(method="es-dllm", gen_length=8, block_length=8, **kw)
    return ESDLLM(cfg, args, L, L, torch.Generator().manual_seed(0))


def _ctx(x, s, step=1, phase=("block", True), gen_start=4):
    B = x.shape[0]
    st = torch.full((B,), s)
    return StepContext(x, st, [s] * B, 8, torch.full((B,), step), phase, torch.ones(B, dtype=torch.bool), gen_start)


def _logits(V, want: dict[int, tuple[int, float]], m: int) -> torch.Tensor:
    """[1, m, V] logits whose row j proposes want[j] = (token, probability); other rows token 0."""
    lg = torch.full((1, m, V), -30.0)
    for j in range(m):
        tok, p = want.get(j, (0, 0.9))
        lg[0, j, tok] = 0.0
        others = torch.log(torch.tensor((1 - p) / (V - 1))) - torch.log(torch.tensor(p))
        lg[0, j, :] = torch.where(torch.arange(V) == tok, 0.0, others)
    return lg


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_rule1_buffer_takes_the_delayed_eos_zero_on_llada_only(tiny_args, family):
    """generate.py:89-91 (LLaDA: zeroed, then stored) vs 176-178 (Dream: stored, then zeroed)."""
    a = tiny_args(family)
    sh, L, P = a.logits_shift, 12, 4
    pol = _policy(a, L)
    x = torch.full((1, L), a.mask_id)
    x[0, :P] = 3
    c = _ctx(x, P, step=0, phase=("start", False), gen_start=P)
    pol.begin_block(c, c.active)
    pol._init(x)
    rows = torch.arange(P - sh, P + 8 - sh)[None]
    # the row predicting position 6 proposes EOS (position 5 is masked, no EOS yet): delayed
    lg = _logits(a.vocab_size, {6 - P: (a.eos_id, 0.8), 0: (7, 0.95)}, 8)
    pol.commit(c, lg, rows + sh)
    stored = pol.conf[0, 6 - sh].item()
    if family == "llada":
        assert stored == 0.0
    else:
        assert stored == pytest.approx(0.8, abs=1e-5)
    assert x[0, P].item() == 7 and (x[0, P + 1:] == a.mask_id).all()  # the EOS was not committed


def test_rule2_dream_commits_one_token_a_step(tiny_args):
    """generate.py:192, token_per_step = 1: not Dream's count schedule (0 at a block's first step,
    2 at its last), which vanilla Dream keeps."""
    from esdllm.runtime.policies import Vanilla
    a = tiny_args("dream")
    L, P = 12, 4
    x = torch.full((1, L), a.mask_id)
    x[0, :P] = 3
    C = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]], dtype=torch.float64)
    # (step, masks left in the block, tokens ES-dLLM commits, tokens vanilla Dream commits)
    for step, left, want_es, want_vanilla in ((0, 8, 1, 0), (7, 2, 1, 2)):
        cand = torch.arange(8)[None] < left
        counts = []
        for pol in (_policy(a, L), Vanilla(DecodeConfig(gen_length=8, block_length=8), a, L, L, torch.Generator())):
            c = _ctx(x, P, step=step, gen_start=P)
            pol.begin_block(c, c.active)  # 8 masks over 8 steps
            counts.append(int(pol.rule(torch.where(cand, C, float("-inf")), cand, cand, c.step, pol.quota).sum()))
        assert counts == [want_es, want_vanilla], (step, counts)


@pytest.mark.parametrize("token_rows", [False, True])
def test_rules3_4_dream_bonus_and_block_start_rows(tiny_args, token_rows):
    """+3 on the predicting row p - 1 (generate.py:503, 555) and the block-start forward from it
    (:442, 557); es_token_rows puts both on the token's own row p."""
    a = tiny_args("dream")
    L, P = 20, 4
    pol = _policy(a, L, es_token_rows=token_rows)
    x = torch.full((1, L), a.mask_id)
    x[0, :P] = 3
    pol._init(x)
    c = _ctx(x, P, step=3, phase=("block", True), gen_start=P)
    pol.begin_block(c, c.active)
    chosen = torch.zeros(1, 8, dtype=torch.bool)
    chosen[0, 5] = True  # position P + 5 committed this step
    pol.update(c, torch.arange(P, P + 8)[None], torch.rand(1, 8).double(), None, chosen)
    p = P + 5
    row = p if token_rows else p - 1
    assert pol._bonus(c)[0, row].item() == 3.0 and pol.leftmost.item() == row
    # the next block starts its forward at that row
    nxt = _ctx(x, P + 8, step=0, phase=("start", True), gen_start=P)
    idx, _ = pol.plan(nxt)
    assert idx[0][idx[0] != L].min().item() == row


@pytest.mark.parametrize("token_rows,end", [(False, 11), (True, 12)])
def test_rule5_dream_rows_end_one_before_the_block_end(tiny_args, token_rows, end):
    """end_index = e - token_offset (generate.py:431-432, 445): row e - 1 is not forwarded."""
    a = tiny_args("dream")
    L, P = 20, 4
    pol = _policy(a, L, es_token_rows=token_rows)
    x = torch.full((1, L), a.mask_id)
    x[0, :P] = 3
    c = _ctx(x, P, step=2, phase=("block", False), gen_start=P)
    idx, plan = pol.plan(c)
    assert idx[0].tolist() == list(range(P - 1, end))
    # whatever the rows, the head rows predict exactly the block
    assert (idx.gather(1, plan.head) + 1).tolist() == [list(range(P, P + 8))]


def test_rule6_top2_ties_go_to_the_lower_index():
    """The authors' topk(2, sorted=False) leaves ties unspecified; esdllm takes the lowest rows."""
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.1, 0.5, 0.5, -1.0], [-1.0, 0.2, 0.2, 0.2]])
    assert top2(x).tolist() == [[1, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0]]


def test_rule7_top2_is_recomputed_over_the_rows_alive_at_each_prune_layer(tiny_args):
    """early_skipping.py:170: the +2 goes to the two most confident rows still alive at that layer."""
    a = tiny_args("llada", n_layers=3)
    torch.manual_seed(0)
    model = Transformer(a).eval()
    seen = []

    def spy_gather(hidden, prev, conf, bonus, keep, alpha):
        seen.append(bonus.clone())
        return ops.token_gather(hidden, prev, conf, bonus, keep, alpha)
    model.ops = OpBackend("spy", spy_gather, REFERENCE.partial_attention, REFERENCE.cache_merge)
    L = 10
    cache = model.new_cache(1, L, (1, 2))
    cache.set_layout(torch.zeros(1, dtype=torch.long))
    idx = torch.arange(2, 10)[None]
    conf = torch.tensor([[0, 0, 0.9, 0.8, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, -1.0]])
    bonus = torch.zeros(1, L + 1)
    bonus[0, 9] = 5.0   # rows 9 and 8 outrank the two most confident (2 and 3) at the first prune
    bonus[0, 8] = 3.0
    bonus[0, L] = -1e4
    keep = {1: torch.ones(1, 2, dtype=torch.bool), 2: torch.ones(1, 1, dtype=torch.bool)}
    with torch.inference_mode():
        model.step(torch.zeros_like(idx), idx, cache, StepPlan(keep=keep, write_hidden=True, confidence=conf,
                                                                 bonus=bonus, alpha=0.5, top2=2.0))
    first, second = seen
    # canvas rows 2 and 3 (the most confident forwarded) get +2 at the first prune layer ...
    assert first[0].tolist() == [2.0, 2.0, 0, 0, 0, 0, 3.0, 5.0]
    # ... and at the second the two survivors (rows 8 and 9) do, on top of their own bonuses
    assert second[0].tolist() == [3.0 + 2.0, 5.0 + 2.0]
