"""The ONNX face: op nodes vs the PyTorch reference, the exported graph variants, and the
onnxruntime executor vs Transformer.step (per step and through the whole generate loop).

Tiny float32 checkpoints (tests/conftest.py): logits within float32 tolerance, argmax and tokens
identical, caches equal outside the trash slot.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as T

pytest.importorskip("onnxruntime")
import onnxruntime as ort  # noqa: E402

from esdllm.build import onnx_ops  # noqa: E402
from esdllm.runtime.artifacts import BuildConfig  # noqa: E402
from esdllm.build.export_onnx import WEIGHTS_FILE, export_artifacts  # noqa: E402
from esdllm.plugins import ops  # noqa: E402
from esdllm.runtime.config import DecodeConfig  # noqa: E402
from esdllm.runtime import contract  # noqa: E402
from esdllm.runtime.artifacts import EngineSpec  # noqa: E402
from esdllm.runtime.cache import StepPlan  # noqa: E402
from esdllm.runtime.executors import TorchExecutor, ort_executor  # noqa: E402
from esdllm.runtime.generate import generate  # noqa: E402
from esdllm.runtime.weights import load_model  # noqa: E402

CFG = BuildConfig(max_batch=4, max_prompt=32, gen_length=16, block_length=8)


def _run(model: onnx.ModelProto, **feeds) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in feeds.items()})


def _report(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a.float() - b.float()).abs()
    return f"max {d.max().item():.3g} mean {d.mean().item():.3g} at {np.unravel_index(int(d.argmax()), d.shape)}"


# --- the three op nodes, alone ------------------------------------------------------------------

def test_token_gather_node_matches_reference():
    g = torch.Generator().manual_seed(0)
    B, n, d = 3, 9, 16
    h, p = torch.randn(B, n, d, generator=g), torch.randn(B, n, d, generator=g)
    conf, bonus = torch.rand(B, n, generator=g), torch.zeros(B, n)
    bonus[:, 4] = 5.0
    h[2] = p[2]          # zero variation and zero confidence: a row of exact ties
    conf[2] = 0.0
    bonus[2] = 0.0
    model = onnx_ops.single_op_model(
        "token_gather", [("hidden", T.FLOAT, ["B", "n", "d"]), ("prev_hidden", T.FLOAT, ["B", "n", "d"]),
                         ("confidence", T.FLOAT, ["B", "n"]), ("bonus", T.FLOAT, ["B", "n"]),
                         ("keep_mask", T.BOOL, ["B", "k"])], alpha=0.3)
    node = model.graph.node[0]
    assert (node.domain, node.op_type) == ("esdllm", "token_gather")
    assert {a.name: a for a in node.attribute}["plugin_namespace"].s == b"esdllm"
    assert model.ir_version == 10
    for k in (1, 4, n):
        for counts in ([k, k, k], [k, max(k - 2, 0), 1]):  # every entry keeps k; entries keep fewer
            mask = torch.arange(k)[None, :] < torch.tensor(counts)[:, None]
            sel, kept = _run(model, hidden=h, prev_hidden=p, confidence=conf, bonus=bonus, keep_mask=mask)
            ref_sel, ref_kept = ops.token_gather(h, p, conf, bonus, mask, 0.3)
            assert np.array_equal(sel, ref_sel.numpy()), (k, counts, sel, ref_sel)
            assert np.array_equal(kept, ref_kept.numpy())
            assert ((sel < n).sum(1) == np.minimum(counts, k)).all()
        if k == n and counts[2] == k:
            assert np.array_equal(sel[2], np.arange(n))  # exact ties keep the row order


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_partial_attention_node_matches_reference(heads, kv_heads):
    g = torch.Generator().manual_seed(1)
    B, n, S, hd = 2, 5, 11, 8
    q = torch.randn(B, heads, n, hd, generator=g)
    kc, vc = torch.randn(B, kv_heads, S, hd, generator=g), torch.randn(B, kv_heads, S, hd, generator=g)
    valid = torch.rand(B, S, generator=g) > 0.3
    valid[:, 0] = True
    valid[:, -1] = False
    model = onnx_ops.single_op_model(
        "partial_attention", [("q", T.FLOAT, ["B", "H", "n", hd]), ("k_cache", T.FLOAT, ["B", "G", "S", hd]),
                              ("v_cache", T.FLOAT, ["B", "G", "S", hd]), ("key_valid", T.BOOL, ["B", "S"])])
    out, = _run(model, q=q, k_cache=kc, v_cache=vc, key_valid=valid)
    ref = ops.partial_attention(q, kc, vc, valid)
    assert torch.allclose(torch.from_numpy(out), ref, atol=1e-5), _report(torch.from_numpy(out), ref)


@pytest.mark.parametrize("dim", [1, 2])
def test_cache_merge_node_matches_reference(dim):
    g = torch.Generator().manual_seed(2)
    B, S, n = 2, 10, 4
    shape = (B, S, 16) if dim == 1 else (B, 3, S, 8)
    cache = torch.randn(*shape, generator=g)
    fresh = torch.randn(*(shape[:dim] + (n,) + shape[dim + 1:]), generator=g)
    rows = torch.stack([torch.randperm(S, generator=g)[:n] for _ in range(B)])
    names = ["a", "b", "c", "d"][: cache.dim()]
    model = onnx_ops.single_op_model("cache_merge", [("cache", T.FLOAT, names), ("fresh", T.FLOAT, names),
                                                     ("rows", T.INT64, ["a", "n"])], dim=dim)
    merged, = _run(model, cache=cache, fresh=fresh, rows=rows)
    assert np.array_equal(merged, ops.cache_merge(cache.clone(), fresh, rows, dim).numpy())


def test_make_node_rejects_bad_signatures():
    with pytest.raises(ValueError, match="unknown esdllm op 'gather'"):
        onnx_ops.make_node("gather", ["a"], ["b"])
    with pytest.raises(ValueError, match="takes attributes"):
        onnx_ops.make_node("cache_merge", ["c", "f", "r"], ["m"])


# --- exported artifacts -------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["llada", "dream"])
def built(request, tmp_path_factory):
    ckpt = request.getfixturevalue(f"{request.param}_ckpt")
    model = load_model(ckpt)
    out = tmp_path_factory.mktemp(f"{request.param}-artifacts")
    spec = export_artifacts(model, CFG, out, model_dir=ckpt)
    return model, ort_executor(EngineSpec.read(out)), spec


def test_artifacts_carry_plugin_nodes_and_share_weights(built):
    model, _, spec = built
    root = spec.root
    assert set(spec.variants) == {"dense", "dense_hidden", "skip", "dense_context", "saliency"}
    assert spec.prune_layers == (1,)  # ES-dLLM default schedule on a 2-layer model
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    big = sum(s for s in sizes if s >= 1024)  # smaller tensors (norm weights) stay inline
    weights = (root / WEIGHTS_FILE).stat().st_size
    assert big <= weights < 1.5 * sum(sizes), "weights are stored once, not once per variant"
    offsets = []
    for name, v in spec.variants.items():
        path = root / v["file"]
        onnx.checker.check_model(str(path), full_check=True)
        m = onnx.load(str(path), load_external_data=False)
        assert m.ir_version == 10
        inline = [t.name for t in m.graph.initializer
                  if t.data_location != onnx.TensorProto.EXTERNAL and t.ByteSize() >= 1024]
        assert not inline, (name, inline)  # every weight lives in the one shared file
        esd = [n for n in m.graph.node if n.domain == "esdllm"]
        counts = {op: sum(n.op_type == op for n in esd) for op in onnx_ops.OP_NAMES}
        L = model.args.n_layers
        n_hidden = len(spec.prune_layers) if name in ("dense_hidden", "skip") else 0
        # saliency: exact + delta attention per layer; K, V, dV, context, FFN (the graph's dV is a fresh
        # zero tensor per layer, so clearing it after use is dead code the exporter drops)
        merges = {"dense_context": 4 * L, "saliency": 5 * L}.get(name, 2 * L + n_hidden)
        assert counts == {"partial_attention": 2 * L if name == "saliency" else L, "cache_merge": merges,
                          "token_gather": len(spec.prune_layers) if name == "skip" else 0}, (name, counts)
        assert all({a.name: a.s for a in n.attribute}["plugin_namespace"] == b"esdllm" for n in esd)
        assert {f.name for f in m.functions} == {op for op, c in counts.items() if c}
        ext = [t for t in m.graph.initializer if t.data_location == T.EXTERNAL]
        assert all({e.key: e.value for e in t.external_data}["location"] == WEIGHTS_FILE for t in ext)
        offsets.append({int({e.key: e.value for e in t.external_data}["offset"]) for t in ext})
        assert [i.name for i in m.graph.input] == [i["name"] for i in v["inputs"]]
        assert [o.name for o in m.graph.output] == [o["name"] for o in v["outputs"]]
    assert all(o == offsets[0] for o in offsets), "every variant points at the same weight bytes"
    meta = json.loads((root / "engine.json").read_text())
    assert meta["plugins"]["namespace"] == "esdllm" and meta["versions"]["ir_version"] == 10
    assert (root / meta["hf_dir"] / "config.json").is_file() and (root / meta["hf_dir"] / "tokenizer.json").is_file()


def _caches(ex, model, B, L, pads, hidden):
    """Same random cache contents for both executors."""
    g = torch.Generator().manual_seed(3)
    c = ex.new_cache(B, L, hidden)
    c.set_layout(pads)
    for t in c.k + c.v:
        t.copy_(0.1 * torch.randn(t.shape, generator=g))
    for l in sorted(c.hidden):
        c.hidden[l].copy_(torch.randn(c.hidden[l].shape, generator=g))
    return c


def _mask(counts, k):
    return torch.arange(k)[None, :] < torch.tensor(counts)[:, None]


def _plans(L, B, prune):
    g = torch.Generator().manual_seed(4)
    conf, bonus = torch.rand(B, L + 1, generator=g), torch.zeros(B, L + 1)
    bonus[:, 13] = 5.0
    bonus[:, L] = -1e4
    blk = torch.arange(10, 18).expand(B, 8).clone()
    blk[1, :3] = L                         # an entry with trash rows
    full = torch.arange(L).expand(B, L).clone()
    es = dict(write_hidden=True, confidence=conf, bonus=bonus, alpha=0.5, top2=2.0)
    return {
        "full-head-hidden": (full, StepPlan(head=torch.arange(9, 17).expand(B, 8), write_hidden=True)),
        "block": (blk, StepPlan()),
        "block-head-rows": (blk, StepPlan(head=torch.tensor([[2, 3], [5, 6], [0, 7]]))),
        "skip": (blk, StepPlan(keep={prune: _mask([3] * B, 3)}, **es)),
        "skip-keep-rows": (blk, StepPlan(keep={prune: _mask([4, 2, 1], 4)}, **es)),
    }


@pytest.mark.parametrize("kind", ["full-head-hidden", "block", "block-head-rows", "skip", "skip-keep-rows"])
def test_ort_step_matches_transformer_step(built, kind):
    model, ort_ex, spec = built
    B, L, pads = 3, 24, torch.tensor([0, 3, 6])
    prune = spec.prune_layers[-1]
    idx, plan = _plans(L, B, prune)[kind]
    tokens = torch.randint(0, model.args.vocab_size, idx.shape, generator=torch.Generator().manual_seed(5))
    ct = _caches(TorchExecutor(model), model, B, L, pads, spec.prune_layers)
    co = _caches(ort_ex, model, B, L, pads, spec.prune_layers)
    with torch.inference_mode():
        lt, pt = model.step(tokens, idx, ct, plan)
        lo, po = ort_ex.step(tokens, idx, co, plan)
    assert lo.shape == lt.shape and torch.equal(po, pt)
    assert torch.allclose(lo, lt, atol=1e-4, rtol=1e-4), _report(lo, lt)
    assert torch.equal(lo.argmax(-1), lt.argmax(-1))
    for a, b in zip(co.k + co.v + list(co.hidden.values()), ct.k + ct.v + list(ct.hidden.values())):
        sl = (slice(None),) * (2 if a.dim() == 4 else 1) + (slice(0, L),)  # slots, trash excluded
        assert torch.allclose(a[sl], b[sl], atol=1e-5), _report(a[sl], b[sl])
    assert ort_ex.calls[contract.variant_of(plan, co)] > 0


METHODS = [dict(method="vanilla"), dict(method="fast-dllm", cache="dual"),
           dict(method="es-dllm", threshold=0.05, block_update_freq=3, prompt_update_freq=8),
           dict(method="streaming-dllm", suffix_window=4), dict(method="dyllm"),
           dict(method="es-dllm", suffix_window=4, dynamic_alpha=0.3, threshold=0.5, early_exit=True)]


@pytest.mark.parametrize("kw", METHODS, ids=[m["method"] + ("+window" if "suffix_window" in m and m["method"] == "es-dllm" else "")
                                             for m in METHODS])
def test_generate_same_tokens_as_torch(built, kw):
    model, ort_ex, _ = built
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    cfg = DecodeConfig(gen_length=16, block_length=8, **kw)
    before = dict(ort_ex.calls)
    a = generate(TorchExecutor(model), prompts, cfg)
    b = generate(ort_ex, prompts, cfg)
    assert torch.equal(a.tokens, b.tokens), (a.tokens, b.tokens)
    assert a.stats.nfe == b.stats.nfe
    if kw["method"] == "es-dllm":
        assert ort_ex.calls["skip"] > before.get("skip", 0), "the ES-dLLM run never used the skip graph"


def test_eager_plans_feed_exactly_the_exported_graph_inputs(built):
    """Every plan the policies make during a real decode becomes feeds whose names, dtypes and ranks
    are the exported graph's inputs (export and eager runs share one contract)."""
    from helpers import Spy

    model, _, spec = built
    onnx_dtype = {T.INT64: torch.int64, T.BOOL: torch.bool, T.FLOAT: torch.float32}
    graphs = {}
    for name, v in spec.variants.items():
        m = onnx.load(str(spec.root / v["file"]), load_external_data=False)
        graphs[name] = {i.name: (onnx_dtype[i.type.tensor_type.elem_type], len(i.type.tensor_type.shape.dim))
                        for i in m.graph.input}
    spy = Spy(model)
    for kw in METHODS:
        generate(spy, [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], DecodeConfig(gen_length=16, block_length=8, **kw))
    seen = set()
    cache = model.new_cache(2, 7 + 16, spec.prune_layers, saliency=True)
    for tokens, idx, plan, _ in spy.calls:
        variant, feeds = contract.step_feeds(model.args, spec.prune_layers, tokens, idx, cache, plan)
        seen.add(variant)
        assert {k: (t.dtype, t.dim()) for k, t in feeds.items()} == graphs[variant], variant
    assert seen == set(spec.variants)
