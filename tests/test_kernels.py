"""The OpenAI Triton kernels (plugins/kernels.py) against the reference ops (plugins/ops.py).

On a CUDA machine the kernels are compiled; elsewhere they run in triton's CPU interpreter
(TRITON_INTERPRET=1, set here before the first kernel is jitted). Gather and merge must match exactly;
attention may be at most 2x as far from a float64 reference as same-dtype torch is (flash-attn's rule),
plus twice the output dtype's rounding noise. Shapes are tiny and odd (n=7, S=33, hd=16).
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("OpenAI Triton is not installed (pip install 'esdllm[kernels]')", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    # Must precede triton's first import (which fixes the mode of tl.sum & co.); pytest imports every
    # test module before running any test, so this runs before e.g. torch.export imports triton.
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set; run this file on its own "
                    "or export TRITON_INTERPRET=1", allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"

from esdllm.plugins import kernels, ops  # noqa: E402
from helpers import attention_inputs, diff as _diff, gather_inputs, keep_mask  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def probe():
    """Skip the module, with the reason, if triton cannot run a one-row copy kernel here."""
    try:
        cache = torch.zeros(1, 3, 4, device=DEVICE)
        kernels.cache_merge(cache, torch.ones(1, 1, 4, device=DEVICE), torch.tensor([[1]], device=DEVICE), 1)
    except Exception as e:  # noqa: BLE001 - any failure of the probe means: no usable triton here
        pytest.skip(f"triton cannot run kernels on {DEVICE} (interpreter={DEVICE == 'cpu'}): {e!r}")
    if cache[0, 1].tolist() != [1.0] * 4:
        pytest.skip(f"triton on {DEVICE} ran the probe kernel but wrote {cache.tolist()}")


def _to(args):
    return tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)


# ---------------------------------------------------------------------------------------------
# token_gather
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha,k", [(0.5, 1), (0.5, 3), (0.3, 7), (1.0, 2), (0.0, 4)])
def test_token_gather(dtype, alpha, k):
    args = _to(gather_inputs(n=7, d=20, dtype=dtype, seed=k))
    for mask in (keep_mask(2, k), keep_mask(2, k, [k, 1])):
        sel, kept = kernels.token_gather(*args, mask.to(DEVICE), alpha)
        want_sel, want_kept = ops.token_gather(*args, mask.to(DEVICE), alpha)
        assert sel.dtype == torch.int64 and kept.dtype == dtype
        assert torch.equal(sel, want_sel), (sel, want_sel)
        assert torch.equal(kept, want_kept)


def test_token_gather_ties_and_multiple_chunks():
    # n=70 spans two 64-wide selection chunks (the running offset between them) and d=150 two feature
    # slices (each program re-derives the selection; only the first writes sel)
    hidden, prev, conf, bonus = gather_inputs(B=2, n=70, d=150, seed=5)
    hidden[:, 10:] = prev[:, 10:]  # exact ties: zero variation and equal confidence
    conf[:, 10:] = 0.5
    bonus[1, 66] = 3.0
    args = _to((hidden, prev, conf, bonus))
    for k in (5, 12, 40, 70):
        mask = keep_mask(2, k, [k, k // 2]).to(DEVICE)
        sel, kept = kernels.token_gather(*args, mask, 0.5)
        want_sel, want_kept = ops.token_gather(*args, mask, 0.5)
        assert torch.equal(sel, want_sel), (k, sel, want_sel)
        assert torch.equal(kept, want_kept)


def test_token_gather_strided_input_and_empty_k():
    hidden, prev, conf, bonus = _to(gather_inputs(n=7, d=20))
    wide = torch.randn(2, 7, 40, device=DEVICE)
    wide[..., ::2] = hidden  # hidden as a non-contiguous view
    mask = keep_mask(2, 3).to(DEVICE)
    sel, kept = kernels.token_gather(wide[..., ::2], prev, conf, bonus, mask, 0.5)
    want_sel, want_kept = ops.token_gather(hidden, prev, conf, bonus, mask, 0.5)
    assert torch.equal(sel, want_sel) and torch.equal(kept, want_kept)
    sel, kept = kernels.token_gather(hidden, prev, conf, bonus, keep_mask(2, 0).to(DEVICE), 0.5)
    assert sel.shape == (2, 0) and kept.shape == (2, 0, 20)
    with pytest.raises(ValueError, match="keep_mask"):
        kernels.token_gather(hidden, prev, conf, bonus, keep_mask(2, 8).to(DEVICE), 0.5)


# ---------------------------------------------------------------------------------------------
# partial_attention
# ---------------------------------------------------------------------------------------------

def _check_attention(args):
    """Kernel vs reference in the inputs' dtype, both measured against the reference in float64."""
    up = tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    ref = ops.partial_attention(*up)
    out = kernels.partial_attention(*args)
    pt = ops.partial_attention(*args)
    assert out.dtype == args[0].dtype and out.shape == args[0].shape
    rounding = (ref.to(out.dtype) + 0.3 - 0.3 - ref.to(out.dtype)).abs().max().item()
    err, err_pt = (out.double() - ref).abs().max().item(), (pt.double() - ref).abs().max().item()
    assert err <= 2 * err_pt + 2 * rounding, f"kernel {err:.3g} vs torch {err_pt:.3g}: {_diff(out, ref)}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (6, 1)])
def test_partial_attention(dtype, H, Hkv):
    # attention_inputs: left padding and a masked trash slot
    _check_attention(_to(attention_inputs(B=2, H=H, Hkv=Hkv, n=7, S=33, hd=16, dtype=dtype, seed=H + Hkv)))


def test_partial_attention_odd_head_dim_and_long_canvas():
    # hd=24 pads to a 32-wide tile; S=150 spans several key blocks
    _check_attention(_to(attention_inputs(B=1, H=2, Hkv=1, n=9, S=150, hd=24, seed=7)))


def test_partial_attention_strided_q_and_empty_key_rows():
    q, k_cache, v_cache, key_valid = _to(attention_inputs(H=2, Hkv=2))
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, n, H, hd] memory, as after a projection
    key_valid[0] = False  # batch row 0 sees no valid key at all: zeros, like SDPA
    args = (q_strided, k_cache, v_cache, key_valid)
    out = kernels.partial_attention(*args)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    _check_attention(args)


# ---------------------------------------------------------------------------------------------
# cache_merge
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("cache_dtype,fresh_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                     (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
def test_cache_merge(dim, cache_dtype, fresh_dtype):
    B, H, S, hd, n = 2, 3, 33, 16, 7
    g = torch.Generator().manual_seed(dim)
    cache = torch.randn((B, S, hd) if dim == 1 else (B, H, S, hd), generator=g).to(cache_dtype).to(DEVICE)
    fresh = torch.randn((B, n, hd) if dim == 1 else (B, H, n, hd), generator=g).to(fresh_dtype).to(DEVICE)
    rows = torch.stack([torch.randperm(S - 1, generator=g)[:n] for _ in range(B)]).to(DEVICE)
    want = ops.cache_merge(cache.clone(), fresh, rows, dim)
    assert kernels.cache_merge(cache, fresh, rows, dim) is cache
    assert torch.equal(cache, want)


def test_cache_merge_strided_cache_in_place_with_trash_duplicates():
    B, H, S, hd, n = 2, 2, 33, 16, 7
    trash = S - 1
    store = torch.randn(B, S, H, 2 * hd, device=DEVICE)
    cache = store[..., :hd].transpose(1, 2)  # [B, H, S, hd] view into a bigger buffer
    fresh = torch.randn(B, H, n, hd, device=DEVICE)
    rows = torch.stack([torch.randperm(S - 1)[:n] for _ in range(B)]).to(DEVICE)
    rows[1, -2:] = trash
    want = ops.cache_merge(cache.clone(), fresh, rows, 2)
    untouched = store[..., hd:].clone()
    kernels.cache_merge(cache, fresh, rows, 2)
    assert torch.equal(cache[:, :, :trash], want[:, :, :trash]) and torch.equal(cache[0], want[0])
    assert any(torch.equal(cache[1, :, trash], fresh[1, :, j]) for j in (n - 2, n - 1))
    assert torch.equal(store[..., hd:], untouched)  # nothing written outside the view


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="the custom ops dispatch to the kernels only for CUDA tensors")
def test_custom_ops_dispatch_to_kernels_on_cuda():
    from esdllm.plugins import library  # noqa: F401 - registers torch.ops.esdllm

    assert library._cuda_impl("partial_attention") is kernels.partial_attention
    args = _to(gather_inputs())
    mask = keep_mask(2, 3, [3, 2]).to(DEVICE)
    for a, b in zip(torch.ops.esdllm.token_gather(*args, mask, 0.5), ops.token_gather(*args, mask, 0.5)):
        assert torch.equal(a, b)
