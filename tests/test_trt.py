"""TensorRT: plugin descriptors, AOT PTX, graph preparation, the executor's step logic, TensorRT-RTX
CPU builds of the exported graphs, and (GPU + TensorRT only) plugins and engines against torch.

Runs here (CPU): everything without `tensorrt`; TensorRT-RTX parse + build when tensorrt-rtx-cu12 is
installed (engines cannot be loaded without a GPU). Skipped here: tests marked trt (TensorRT with a
CUDA GPU), each with its reason.
"""
from __future__ import annotations

import inspect
import time

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as T

from esdllm.build import engine, onnx_ops
from esdllm.runtime import contract
from esdllm.runtime.artifacts import BuildConfig, profile_dims
from esdllm.plugins import ops, trt_plugins as tp
from esdllm.runtime.config import DecodeConfig, ModelArgs
from esdllm.runtime.executors import TorchExecutor
from esdllm.runtime.generate import generate
from esdllm.runtime.model import Transformer


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:  # a broken install (missing libnvinfer) counts as missing
        return False


HAS_RTX = _has("tensorrt_rtx")
HAS_TRT_GPU = torch.cuda.is_available() and _has("tensorrt")
_skip_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt-rtx-cu12 is not installed (pip install 'esdllm[tensorrt-rtx]')")
_skip_trt = pytest.mark.skipif(not HAS_TRT_GPU, reason="needs TensorRT >= 10.9 (`import tensorrt`) and a CUDA GPU; "
                               "NVIDIA's TensorRT libraries are not on PyPI")


def needs_rtx(fn):
    """TensorRT-RTX CPU builds: slow, skipped without tensorrt-rtx-cu12."""
    return pytest.mark.slow(_skip_rtx(fn))


def needs_trt(fn):
    """TensorRT with the esdllm plugins on a CUDA GPU."""
    return pytest.mark.trt(pytest.mark.gpu(pytest.mark.slow(_skip_trt(fn))))

CFG = BuildConfig(max_batch=2, max_prompt=16, gen_length=16, block_length=8)

# single-op graphs: (op, inputs (name, onnx dtype, shape with profile axis names), attributes)
SINGLE = {
    "token_gather": ([("hidden", T.FLOAT, ["batch", "rows", 64]), ("prev_hidden", T.FLOAT, ["batch", "rows", 64]),
                      ("confidence", T.FLOAT, ["batch", "rows"]), ("bonus", T.FLOAT, ["batch", "rows"]),
                      ("keep_mask", T.BOOL, ["batch", "keep_0"])], {"alpha": 0.5}),
    "partial_attention": ([("q", T.FLOAT, ["batch", 4, "rows", 16]), ("k_cache", T.FLOAT, ["batch", 2, "slots", 16]),
                           ("v_cache", T.FLOAT, ["batch", 2, "slots", 16]), ("key_valid", T.BOOL, ["batch", "slots"])],
                          {}),
    "cache_merge": ([("cache", T.FLOAT, ["batch", 2, "slots", 16]), ("fresh", T.FLOAT, ["batch", 2, "rows", 16]),
                     ("rows", T.INT64, ["batch", "rows"])], {"dim": 2}),
}


def _single(op: str) -> onnx.ModelProto:
    inputs, attrs = SINGLE[op]
    return onnx_ops.single_op_model(op, inputs, **attrs)


def _single_feeds(op: str, B: int = 2, n: int = 5, S: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = torch.stack([torch.randperm(S - 1, generator=g)[:n] for _ in range(B)])
    if op == "token_gather":
        keep = torch.ones(B, 3, dtype=torch.bool)
        keep[-1, 1:] = False  # the last entry keeps only its most important row
        return {"hidden": torch.randn(B, n, 64, generator=g), "prev_hidden": torch.randn(B, n, 64, generator=g),
                "confidence": torch.rand(B, n, generator=g), "bonus": torch.zeros(B, n), "keep_mask": keep}
    if op == "partial_attention":
        valid = torch.ones(B, S, dtype=torch.bool)
        valid[:, -1] = False
        return {"q": torch.randn(B, 4, n, 16, generator=g), "k_cache": torch.randn(B, 2, S, 16, generator=g),
                "v_cache": torch.randn(B, 2, S, 16, generator=g), "key_valid": valid}
    return {"cache": torch.randn(B, 2, S, 16, generator=g), "fresh": torch.randn(B, 2, n, 16, generator=g), "rows": rows}


def _reference(op: str, f: dict) -> list[torch.Tensor]:
    if op == "token_gather":
        return list(ops.token_gather(f["hidden"], f["prev_hidden"], f["confidence"], f["bonus"], f["keep_mask"], 0.5))
    if op == "partial_attention":
        return [ops.partial_attention(*f.values())]
    return [ops.cache_merge(f["cache"].clone(), f["fresh"], f["rows"], 2)]


# ---------------------------------------------------------------------------------------------
# Plugin descriptors and AOT (no TensorRT)
# ---------------------------------------------------------------------------------------------

def test_descriptor_rules_give_output_shapes_and_dtypes():
    h = ((2, 7, 64), "bfloat16")
    sel, kept = tp.token_gather_outputs(h, h, ((2, 7), "float32"), ((2, 7), "float32"), ((2, 3), "bool"))
    assert sel == ((2, 3), "int64") and kept == ((2, 3, 64), "bfloat16")
    q, cache = ((2, 8, 5, 16), "float16"), ((2, 2, 12, 16), "float16")
    assert tp.partial_attention_outputs(q, cache, cache, ((2, 12), "bool")) == (q,)
    assert tp.cache_merge_outputs(((2, 12, 64), "float32"), ((2, 5, 64), "float32"), ((2, 5), "int64"), 1) \
        == (((2, 12, 64), "float32"),)


def test_descriptor_rules_name_the_bad_input():
    h = ((2, 7, 64), "float32")
    with pytest.raises(ValueError, match="'confidence' must have rank 2"):
        tp.token_gather_outputs(h, h, ((2, 7, 1), "float32"), ((2, 7), "float32"), ((2, 3), "bool"))
    with pytest.raises(ValueError, match=r"k=9 must be in \[0, n=7\]"):
        tp.token_gather_outputs(h, h, ((2, 7), "float32"), ((2, 7), "float32"), ((2, 9), "bool"))
    with pytest.raises(ValueError, match="'keep_mask' has dtype int64"):
        tp.token_gather_outputs(h, h, ((2, 7), "float32"), ((2, 7), "float32"), ((2, 3), "int64"))
    q, kv, cache = ((2, 6, 5, 16), "float32"), ((2, 4, 5, 16), "float32"), ((2, 4, 12, 16), "float32")
    with pytest.raises(ValueError, match="query heads 6 are not a multiple of kv heads 4"):
        tp.partial_attention_outputs(q, cache, cache, ((2, 12), "bool"))
    with pytest.raises(ValueError, match="'key_valid' has dtype float32"):
        tp.partial_attention_outputs(q, cache, cache, ((2, 12), "float32"))
    with pytest.raises(ValueError, match="dim=3"):
        tp.cache_merge_outputs(cache, kv, ((2, 5), "int64"), 3)


def _decorated(kind: str) -> dict[str, list[tuple[str, str]]]:
    """{op: [(param, annotation source)]} of the functions decorated @trtp.<kind>("esdllm::op")."""
    import ast

    found = {}
    for node in ast.walk(ast.parse(inspect.getsource(tp))):
        if isinstance(node, ast.FunctionDef):
            for d in node.decorator_list:
                if isinstance(d, ast.Call) and ast.unparse(d.func) == f"trtp.{kind}":
                    op = d.args[0].value.split("::")[1]
                    found[op] = [(a.arg, ast.unparse(a.annotation)) for a in node.args.args]
    return found


def test_plugin_registrations_follow_the_onnx_nodes():
    """register/impl/aot_impl take the ONNX node's inputs in order, then its attributes with the
    matching Python types (read from the source: no TensorRT needed)."""
    py = {onnx.AttributeProto.FLOAT: "float", onnx.AttributeProto.INT: "int"}
    reg, impl, aot = _decorated("register"), _decorated("impl"), _decorated("aot_impl")
    assert set(reg) == set(impl) == set(aot) == set(onnx_ops.OP_NAMES)
    for op, (ins, outs, attrs) in onnx_ops.SIGNATURES.items():
        want = [(i, "trtp.TensorDesc") for i in ins] + [(a, py[t]) for a, t in attrs.items()]
        assert reg[op] == want, op
        assert impl[op] == [(i, "trtp.Tensor") for i in ins] + want[len(ins):] + impl[op][-2:], op
        assert [p for p, _ in impl[op][-2:]] == ["outputs", "stream"], op
        assert [p for p, _ in aot[op]] == list(ins) + list(attrs) + ["outputs", "tactic"], op
    for op, fn in (("token_gather", tp.token_gather_outputs), ("partial_attention", tp.partial_attention_outputs),
                   ("cache_merge", tp.cache_merge_outputs)):
        ins = onnx_ops.SIGNATURES[op][0]
        assert list(inspect.signature(fn).parameters)[:len(ins)] == list(ins), op
    assert tp.OPS == onnx_ops.OP_NAMES and tp.NAMESPACE == onnx_ops.PLUGIN_NAMESPACE


def test_trim_ptx_params_keeps_what_tensorrt_passes():
    ptx = (".visible .entry kern(\n\t.param .u64 kern_param_0,\n\t.param .u32 kern_param_1,\n"
           "\t.param .u64 kern_param_2,\n\t.param .u64 kern_param_3\n)\n{\n\tld.param.b64 %rd1, [kern_param_0];\n"
           "\tld.param.b32 %r1, [kern_param_1];\n}\n")
    out = tp.trim_ptx_params(ptx, 2)
    assert "kern_param_2" not in out and "kern_param_3" not in out and "[kern_param_1]" in out
    used = ptx.replace("[kern_param_1];", "[kern_param_1];\n\tld.param.b64 %rd2, [kern_param_3];")
    with pytest.raises(ValueError, match="reads hidden parameter kern_param_3"):
        tp.trim_ptx_params(used, 2)
    with pytest.raises(ValueError, match="declares 4 parameters, TensorRT passes 5"):
        tp.trim_ptx_params(ptx, 5)


@pytest.mark.skipif(not _has("triton"), reason="the AOT path compiles OpenAI Triton kernels: pip install triton")
def test_cache_merge_aot_kernel_compiles_to_ptx_for_hopper():
    """Triton compiles PTX without a GPU; the entry keeps exactly TensorRT's 16 arguments.

    In a fresh process without TRITON_INTERPRET: the interpreter mode the kernel tests use is global
    to a process, and a TensorRT build never runs under it."""
    import json
    import os
    import subprocess
    import sys

    code = (
        "import json\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from esdllm.plugins import trt_plugins as tp\n"
        "sig, consts = tp.cache_merge_aot_signature('bfloat16', 'int64', 16, 128)\n"
        "name, ptx, threads, shared = tp.compile_ptx(tp.cache_merge_aot_kernel(), sig, consts, n_params=16,\n"
        "                                            target=GPUTarget('cuda', 90, 32))\n"
        "print(json.dumps([name, len(tp._ENTRY.search(ptx).group(2).split(',')), threads,\n"
        "                  '.target sm_90' in ptx, shared]))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    name, n_params, threads, sm90, shared = json.loads(out.stdout.strip().splitlines()[-1])
    assert name == "_cache_merge_aot" and n_params == 16
    assert threads == 128 and sm90 and shared >= 0


# ---------------------------------------------------------------------------------------------
# Graph preparation (onnx + onnxruntime)
# ---------------------------------------------------------------------------------------------

def test_tensorrt_preparation_sets_plugin_modes(tmp_path):
    path = tmp_path / "cm.onnx"
    onnx.save(_single("cache_merge"), path)
    for mode, want in (("aot", 1), ("jit", 0)):
        prepared = onnx.load(engine.prepare_onnx(path, "tensorrt", mode))
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in prepared.graph.node[0].attribute}
        assert attrs["aot"] == want and attrs["plugin_namespace"] == b"esdllm" and attrs["dim"] == 2
    assert engine.set_plugin_modes(_single("partial_attention"), "aot") == {"partial_attention": "jit"}


@pytest.mark.parametrize("op", list(SINGLE))
def test_inlined_graph_has_no_esdllm_nodes_and_same_results(op):
    import onnxruntime as ort

    m = _single(op)
    inlined = engine.inline_for_rtx(m)
    assert not engine.esdllm_nodes(inlined) and not inlined.functions
    feeds = {k: v.numpy() for k, v in _single_feeds(op).items()}
    a = ort.InferenceSession(m.SerializeToString()).run(None, feeds)
    b = ort.InferenceSession(inlined.SerializeToString()).run(None, feeds)
    for x, y, ref in zip(a, b, _reference(op, _single_feeds(op))):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_allclose(y, ref.numpy(), rtol=1e-5, atol=1e-5)


def test_profiles_come_from_the_graph_axes():
    axes = profile_dims(CFG)
    prof = engine.profile_from_onnx(_single("cache_merge"), axes)
    assert prof["cache"] == tuple((axes["batch"][j], 2, axes["slots"][j], 16) for j in range(3))
    assert prof["cache"][2] == (CFG.max_batch, 2, CFG.max_prompt + CFG.gen_length + 1, 16)
    engine.check_profiles({"cache": (-1, 2, -1, 16), "fresh": (-1, 2, -1, 16), "rows": (-1, -1)},
                          [engine.profile_from_onnx(_single("cache_merge"), axes)], "cm")
    with pytest.raises(ValueError, match="dynamic input 'rows'"):
        engine.check_profiles({"rows": (-1, -1)}, [{}], "cm")
    with pytest.raises(ValueError, match="sets static dim 1"):
        engine.check_profiles({"cache": (-1, 2, -1, 16)}, [{"cache": ((1, 3, 1, 16),) * 3}], "cm")
    with pytest.raises(ValueError, match="dim 0 is 'people'"):
        engine.profile_from_onnx(onnx_ops.single_op_model("cache_merge", [("cache", T.FLOAT, ["people", 2, 4, 8]),
                                 ("fresh", T.FLOAT, [1, 2, 1, 8]), ("rows", T.INT64, [1, 1])], dim=2), axes)


# ---------------------------------------------------------------------------------------------
# The exported tiny model: executor step logic (onnxruntime) and TensorRT-RTX builds
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from esdllm.build.export_onnx import export_artifacts

    args = ModelArgs(family="llada", vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=4,
                     intermediate_size=128, rope_theta=5e5, norm_eps=1e-5, qkv_bias=False, logits_shift=0,
                     mask_id=127, eos_id=126, pad_id=126)
    torch.manual_seed(0)
    model = Transformer(args).eval()
    spec = export_artifacts(model, CFG, tmp_path_factory.mktemp("trt-export"))
    return model, spec


class _AliasingSession:
    """An engine that merges caches in place, as TensorRT's aliased cache_merge plugin does: runs the
    graph with onnxruntime, writes each merged cache into its input tensor and returns that tensor."""

    def __init__(self, path):
        from esdllm.runtime.executors import OrtSession
        self.inner = OrtSession(path, ["CPUExecutionProvider"])
        self.aliased = 0

    def run(self, feeds):
        outs = self.inner.run(feeds)
        for name, t in feeds.items():
            out = contract.output_name(name) if "." in name and not name.startswith("keep_mask") else None
            if out in outs:
                t.copy_(outs[out])
                outs[out] = t
                self.aliased += 1
        return outs


@pytest.mark.parametrize("method", ["vanilla", "fast-dllm", "es-dllm"])
def test_graph_executor_with_in_place_sessions_matches_torch(tiny_export, method):
    """The TensorRT executor's cache semantics (aliased outputs: nothing copied back), on the CPU."""
    from esdllm.runtime.executors import GraphExecutor

    model, spec = tiny_export
    sessions = {name: _AliasingSession(spec.variant_file(name)) for name in spec.variants}
    ex = GraphExecutor(spec, sessions, "cpu", "tensorrt")
    cfg = DecodeConfig(method=method, gen_length=16, block_length=8, steps=8,
                       threshold=0.9 if method != "vanilla" else None)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    want = generate(TorchExecutor(model), prompts, cfg).tokens
    assert torch.equal(generate(ex, prompts, cfg).tokens, want)
    assert sum(sess.aliased for sess in sessions.values()) > 0


def test_local_functions_avoid_ops_tensorrt_cannot_parse():
    # TensorRT's ONNX parser rejects Compress (checkCompress); cache_merge uses Where + Reshape instead.
    assert not any(n.op_type == "Compress" for n in onnx_ops.cache_merge_function().node)


@needs_rtx
def test_tensorrt_rtx_parses_and_builds_the_exported_graphs(tiny_export, tmp_path):
    """CPU-only AOT build of every exported variant (local functions inlined). Loading the engines
    needs an RTX-class GPU, so this proves parse + build only."""
    _, spec = tiny_export
    paths = {name: spec.variant_file(name) for name in spec.variants}
    t0 = time.perf_counter()
    built = engine.build_engines(paths, CFG, "tensorrt-rtx", tmp_path, len(spec.prune_layers), progress=False)
    assert set(built) == set(spec.variants) == {"dense", "dense_hidden", "skip", "dense_context", "saliency"}
    for name, path in built.items():
        assert path.name == f"{name}.rtx.plan" and path.stat().st_size > 10_000
    assert time.perf_counter() - t0 < 60


@needs_rtx
@pytest.mark.parametrize("op", SINGLE)
def test_tensorrt_rtx_builds_each_op_reference(op, tmp_path):
    import tensorrt_rtx as trt

    path = tmp_path / f"{op}.onnx"
    onnx.save(_single(op), path)
    prepared = engine.prepare_onnx(path, "tensorrt-rtx")
    profile = engine.profile_from_onnx(onnx.load(prepared), profile_dims(CFG, 1))
    plan = engine.build_engine(trt, prepared, [profile], "tensorrt-rtx", graph=op)
    assert len(plan) > 10_000


def test_missing_tensorrt_is_a_clear_import_error():
    if _has("tensorrt"):
        pytest.skip("tensorrt is installed here")
    with pytest.raises(ImportError, match="needs TensorRT >= 10.9"):
        engine.import_backend("tensorrt")
    with pytest.raises(ValueError, match="unknown engine backend 'onnx'"):
        engine.import_backend("onnx")


# ---------------------------------------------------------------------------------------------
# TensorRT with the esdllm plugins (GPU machines with TensorRT only)
# ---------------------------------------------------------------------------------------------

@needs_trt
def test_plugins_are_registered():
    import tensorrt as trt

    tp.register_plugins()
    tp.register_plugins()  # idempotent
    reg = trt.get_plugin_registry()
    for op in tp.OPS:
        assert reg.get_creator(op, "1", "esdllm") is not None, op


@needs_trt
@pytest.mark.parametrize("op", list(SINGLE))
def test_one_plugin_network_matches_reference(op, tmp_path):
    from esdllm.runtime.trt_session import TrtSession, trt_logger

    trt = engine.import_backend("tensorrt")
    path = tmp_path / f"{op}.onnx"
    onnx.save(_single(op), path)
    prepared = engine.prepare_onnx(path, "tensorrt", "jit")
    profile = engine.profile_from_onnx(onnx.load(prepared), profile_dims(CFG, 1))
    plan = engine.build_engine(trt, prepared, [profile], "tensorrt", graph=op)
    sess = TrtSession(trt, trt.Runtime(trt_logger(trt)), plan, op, "cuda")
    feeds = _single_feeds(op)
    outs = sess.run({k: v.clone() for k, v in feeds.items()})
    for name, ref in zip(onnx_ops.SIGNATURES[op][1], _reference(op, feeds)):
        torch.testing.assert_close(outs[name].cpu(), ref, rtol=1e-4, atol=1e-4)


@needs_trt
def test_trt_executor_tokens_match_torch(tiny_export, tmp_path):
    model, spec = tiny_export
    cfg = BuildConfig(**{**CFG.to_dict(), "backend": "tensorrt", "plugins": "jit"})
    built = engine.build_engines({n: spec.variant_file(n) for n in spec.variants}, cfg, "tensorrt", spec.root,
                                 len(spec.prune_layers), progress=False)
    spec.engines = {n: p.name for n, p in built.items()}
    spec.write()
    from esdllm.runtime.executors import GraphExecutor
    from esdllm.runtime.trt_session import load_sessions
    ex = GraphExecutor(spec, load_sessions(spec, "cuda", "tensorrt"), "cuda", "tensorrt")
    ref = TorchExecutor(model.cuda())
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    for method in ("vanilla", "es-dllm"):
        cfg_d = DecodeConfig(method=method, gen_length=16, block_length=8, steps=8)
        assert torch.equal(generate(ex, prompts, cfg_d).tokens.cpu(), generate(ref, prompts, cfg_d).tokens.cpu())
