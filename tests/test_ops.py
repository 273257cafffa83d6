"""The reference ops (plugins/ops.py) against naive explicit-loop versions, and their torch.library faces.

Gather and merge are copies, so they must match exactly; attention must match a float64 loop within
the rounding tolerance of its dtype. opcheck validates the custom-op registrations, torch.export must
see one node per op, and every op name has its reference, custom op and kernel wrapper.
"""
from __future__ import annotations

import inspect
import math
import subprocess
import sys

import pytest
import torch

from esdllm.plugins import kernels, library, ops
from helpers import attention_inputs, diff as _diff, gather_inputs, keep_mask as _keep


# ---------------------------------------------------------------------------------------------
# naive loop implementations: the spec written out one element at a time, in float64
# ---------------------------------------------------------------------------------------------

def naive_importance(hidden, prev_hidden, confidence, bonus, alpha):
    B, n, d = hidden.shape
    h, p = hidden.double(), prev_hidden.double()
    var = torch.zeros(B, n, dtype=torch.float64)
    for b in range(B):
        for i in range(n):
            sad = sum(abs(h[b, i, j] - p[b, i, j]) for j in range(d)) / d
            norm = math.sqrt(sum(p[b, i, j] ** 2 for j in range(d)))
            var[b, i] = sad / (norm / math.sqrt(d) + 1e-6)
        top = max(max(var[b].tolist()), 1.0)
        var[b] /= top
    return alpha * confidence.double() + (1 - alpha) * var + bonus.double()


def naive_token_gather(hidden, prev_hidden, confidence, bonus, keep_mask, alpha):
    score = naive_importance(hidden, prev_hidden, confidence, bonus, alpha)
    B, n, d = hidden.shape
    k = keep_mask.shape[1]
    sel, top = torch.zeros(B, k, dtype=torch.int64), torch.zeros(B, k, dtype=torch.int64)
    for b in range(B):
        chosen = []
        for _ in range(k):  # repeatedly take the best remaining; strict > keeps the lower index on ties
            best = None
            for i in range(n):
                if i not in chosen and (best is None or score[b, i] > score[b, best]):
                    best = i
            chosen.append(best)
        own = int(keep_mask[b].sum())  # this entry keeps its own count of the best, in place
        top[b] = torch.tensor(sorted(chosen))
        sel[b] = torch.tensor([i if chosen.index(i) < own else n for i in sorted(chosen)])
    kept = torch.stack([torch.stack([hidden[b, i] for i in top[b].tolist()]) for b in range(B)])
    return sel, kept


def naive_partial_attention(q, k_cache, v_cache, key_valid):
    B, H, n, hd = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    keys, vals = k_cache.double(), v_cache.double()
    out = torch.zeros(B, H, n, hd, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            hk = h // (H // Hkv)
            for i in range(n):
                logits = [float(q[b, h, i].double() @ keys[b, hk, s]) / math.sqrt(hd) if key_valid[b, s] else None
                          for s in range(S)]
                live = [x for x in logits if x is not None]
                if not live:
                    continue
                top = max(live)
                w = [math.exp(x - top) if x is not None else 0.0 for x in logits]
                total = sum(w)
                for s in range(S):
                    out[b, h, i] += (w[s] / total) * vals[b, hk, s]
    return out


def naive_cache_merge(cache, fresh, rows, dim):
    out = cache.clone()
    for b in range(rows.shape[0]):
        for j in range(rows.shape[1]):
            if dim == 1:
                out[b, rows[b, j]] = fresh[b, j].to(cache.dtype)
            else:
                out[b, :, rows[b, j]] = fresh[b, :, j].to(cache.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# reference ops vs naive loops
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.5, 0.0, 1.0, 0.3])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_token_gather_matches_loops(alpha, k):
    args = gather_inputs()
    score = ops.importance(*args, alpha)
    want = naive_importance(*args, alpha)
    assert torch.allclose(score.double(), want, rtol=1e-5, atol=1e-6), _diff(score, want)
    for mask in (_keep(2, k), _keep(2, k, [k, max(k - 2, 0)])):
        sel, kept = ops.token_gather(*args, mask, alpha)
        nsel, nkept = naive_token_gather(*args, mask, alpha)
        assert torch.equal(sel, nsel)
        assert torch.equal(kept, nkept)
        assert (sel < 7).sum(1).tolist() == mask.sum(1).tolist()


def test_token_gather_ties_go_to_lower_index():
    hidden, prev, conf, bonus = gather_inputs(n=9)
    hidden[:, 1:] = prev[:, 1:]  # zero variation everywhere but row 0
    conf[:] = 0.25
    conf[:, 6] = 0.75
    sel, kept = ops.token_gather(hidden, prev, conf, bonus, _keep(2, 4), 0.5)
    # row 2 (bonus), row 6 (confidence), row 0 (variation), then the lowest of the tied rest: row 1
    assert sel.tolist() == [[0, 1, 2, 6]] * 2
    nsel, nkept = naive_token_gather(hidden, prev, conf, bonus, _keep(2, 4), 0.5)
    assert torch.equal(sel, nsel) and torch.equal(kept, nkept)
    # keeping 3 of the 4 drops the last-ranked (row 1) in place; keeping 1 keeps the bonus row
    sel, _ = ops.token_gather(hidden, prev, conf, bonus, _keep(2, 4, [3, 1]), 0.5)
    assert sel.tolist() == [[0, 9, 2, 6], [9, 9, 2, 9]]


def test_token_gather_bf16_rows_are_copied_exactly():
    args = gather_inputs(dtype=torch.bfloat16, seed=3)
    sel, kept = ops.token_gather(*args, _keep(2, 3), 0.5)
    nsel, nkept = naive_token_gather(*args, _keep(2, 3), 0.5)
    assert kept.dtype == torch.bfloat16
    assert torch.equal(sel, nsel) and torch.equal(kept, nkept)


@pytest.mark.parametrize("gqa", [False, True])
def test_partial_attention_matches_loops(gqa):
    args = attention_inputs(H=4, Hkv=2 if gqa else 4)
    out = ops.partial_attention(*args)
    want = naive_partial_attention(*args)
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), want, atol=1e-5, rtol=1e-5), _diff(out, want)


def test_partial_attention_bf16():
    args = attention_inputs(dtype=torch.bfloat16, seed=1)
    out = ops.partial_attention(*args)
    want = naive_partial_attention(*args)
    assert out.dtype == torch.bfloat16
    tol = 4 * torch.finfo(torch.bfloat16).eps * max(1.0, want.abs().max().item())
    assert (out.double() - want).abs().max().item() <= tol, _diff(out, want)


def test_partial_attention_row_without_valid_key_is_zero():
    q, k_cache, v_cache, key_valid = attention_inputs()
    key_valid[0] = False
    out = ops.partial_attention(q, k_cache, v_cache, key_valid)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.allclose(out[1].double(), naive_partial_attention(q, k_cache, v_cache, key_valid)[1], atol=1e-5)


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.bfloat16, torch.bfloat16)])
def test_cache_merge_matches_loops(dim, dtypes):
    cache_dtype, fresh_dtype = dtypes
    B, H, S, hd, n = 2, 3, 33, 16, 7
    g = torch.Generator().manual_seed(dim)
    shape = (B, S, hd) if dim == 1 else (B, H, S, hd)
    cache = torch.randn(shape, generator=g).to(cache_dtype)
    fresh = torch.randn((B, n, hd) if dim == 1 else (B, H, n, hd), generator=g).to(fresh_dtype)
    rows = torch.stack([torch.randperm(S - 1, generator=g)[:n] for _ in range(B)])
    want = naive_cache_merge(cache, fresh, rows, dim)
    got = ops.cache_merge(cache, fresh, rows, dim)
    assert got is cache
    assert torch.equal(cache, want)


def test_cache_merge_duplicate_trash_slots():
    B, S, d, n = 2, 33, 16, 7
    trash = S - 1
    cache = torch.randn(B, S, d)
    fresh = torch.randn(B, n, d)
    rows = torch.stack([torch.randperm(S - 1)[:n] for _ in range(B)])
    rows[0, -3:] = trash
    want = naive_cache_merge(cache, fresh, rows, 1)
    ops.cache_merge(cache, fresh, rows, 1)
    assert torch.equal(cache[:, :trash], want[:, :trash])
    assert torch.equal(cache[1, trash], want[1, trash])
    # which padding row lands in the trash slot is unspecified, but it is one of them, whole
    assert any(torch.equal(cache[0, trash], fresh[0, j]) for j in range(n - 3, n))


# ---------------------------------------------------------------------------------------------
# torch.library faces
# ---------------------------------------------------------------------------------------------

def test_opcheck_token_gather():
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(torch.ops.esdllm.token_gather.default,
                              (*gather_inputs(dtype=dtype), _keep(2, 3, [3, 1]), 0.5))


def test_opcheck_partial_attention():
    torch.library.opcheck(torch.ops.esdllm.partial_attention.default, attention_inputs())
    torch.library.opcheck(torch.ops.esdllm.partial_attention.default, attention_inputs(H=4, Hkv=4))


@pytest.mark.parametrize("dim", [1, 2])
def test_opcheck_cache_merge(dim):
    cache = torch.randn((2, 9, 16) if dim == 1 else (2, 3, 9, 16))
    fresh = torch.randn((2, 4, 16) if dim == 1 else (2, 3, 4, 16))
    rows = torch.tensor([[0, 3, 5, 8], [1, 2, 4, 7]])
    torch.library.opcheck(torch.ops.esdllm.cache_merge.default, (cache, fresh, rows, dim))


def test_custom_ops_agree_with_references():
    g_args = gather_inputs()
    for a, b in zip(torch.ops.esdllm.token_gather(*g_args, _keep(2, 3), 0.5), ops.token_gather(*g_args, _keep(2, 3), 0.5)):
        assert torch.equal(a, b)
    a_args = attention_inputs()
    assert torch.equal(torch.ops.esdllm.partial_attention(*a_args), ops.partial_attention(*a_args))
    cache, fresh, rows = torch.randn(2, 3, 9, 16), torch.randn(2, 3, 4, 16), torch.tensor([[0, 3, 5, 8], [1, 2, 4, 7]])
    want = ops.cache_merge(cache.clone(), fresh, rows, 2)
    assert torch.ops.esdllm.cache_merge(cache, fresh, rows, 2) is None
    assert torch.equal(cache, want)
    with pytest.raises(ValueError, match=r"keep_mask \(2, 8\) must be \[B, k\] with k <= n"):
        torch.ops.esdllm.token_gather(*g_args, _keep(2, 8), 0.5)


class _ThreeOps(torch.nn.Module):
    def forward(self, hidden, prev, conf, bonus, keep, q, k_cache, v_cache, key_valid, k_new, rows):
        sel, kept = torch.ops.esdllm.token_gather(hidden, prev, conf, bonus, keep, 0.5)
        torch.ops.esdllm.cache_merge(k_cache, k_new, rows, 2)
        out = torch.ops.esdllm.partial_attention(q, k_cache, v_cache, key_valid)
        return sel, kept, out


def test_export_sees_one_node_per_op():
    k_new, rows = torch.randn(2, 4, 3, 16), torch.tensor([[0, 1, 2], [3, 4, 5]])
    ep = torch.export.export(_ThreeOps(), (*gather_inputs(), _keep(2, 3), *attention_inputs(H=4, Hkv=4),
                                           k_new, rows))
    # a functionalising export would wrap the mutating op in auto_functionalized: look inside it too
    targets = [str(node.args[0] if "auto_functionalized" in str(node.target) else node.target)
               for node in ep.graph.nodes if node.op == "call_function"]
    for name in ops.OP_NAMES:
        assert targets.count(f"esdllm.{name}.default") == 1, f"{name}: {targets}"


def test_every_op_has_all_faces_under_one_name():
    assert set(ops.OP_NAMES) == {"token_gather", "partial_attention", "cache_merge"}
    for name in ops.OP_NAMES:
        params = list(inspect.signature(getattr(ops, name)).parameters)
        custom = getattr(library, name)
        assert isinstance(custom, torch._library.custom_ops.CustomOpDef), name
        assert custom._qualname == f"esdllm::{name}"
        schema = getattr(torch.ops.esdllm, name).default._schema
        assert [a.name for a in schema.arguments] == params, name
        assert list(inspect.signature(getattr(kernels, name)).parameters) == params, name


def test_plugins_import_and_fall_back_without_triton():
    code = """
import sys
sys.modules["triton"] = None  # as if triton were not installed
import torch
from esdllm.plugins import kernels, library, ops
assert not kernels.available()
assert library._cuda_impl("cache_merge") is ops.cache_merge  # CUDA ops would run the reference
from esdllm.plugins import backends
assert backends.for_device("cpu") is backends.REFERENCE
try:
    kernels.cache_merge(torch.zeros(1, 2, 3), torch.ones(1, 1, 3), torch.tensor([[0]]), 1)
except ImportError as e:
    assert "triton" in str(e), e
else:
    raise AssertionError("a kernel wrapper ran without triton")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
