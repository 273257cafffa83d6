"""BuildConfig validation, the engine.json round trip, and every named error: a missing or
mismatched engine.json, artifacts built for another model or shape range, a request or plan
outside what was built; plus `esdllm build` + `esdllm generate --executor onnxruntime` on the CLI."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from esdllm.runtime.artifacts import BuildConfig, EngineError, EngineSpec, ProfileError, profile_dims
from esdllm.runtime.cache import StepPlan

SMALL = dict(max_batch=2, max_prompt=16, gen_length=8, block_length=8)


@pytest.mark.parametrize("kw,msg", [
    (dict(backend="tvm"), "unknown backend 'tvm'"),
    (dict(dtype="int8"), "unknown dtype 'int8'"),
    (dict(max_batch=0), "max_batch must be positive, got 0"),
    (dict(gen_length=8, block_length=16), "block_length 16 exceeds gen_length 8"),
    (dict(variants=("dense", "full")), "variants must be a non-empty subset"),
    (dict(variants=("dense", "dense")), "variants repeat a name"),
    (dict(skip_proportions=(1.0,), skip_positions=(0.0, 0.5)), "equal length"),
    (dict(prune_layers=()), "needs at least one prune layer"),
    (dict(alpha=1.5), "alpha must be in"),
    (dict(plugins="fast"), "unknown plugins mode 'fast'"),
])
def test_build_config_rejects(kw, msg):
    with pytest.raises(ValueError, match=msg):
        BuildConfig(**kw)


def test_prune_layers_follow_the_skip_schedule():
    # ES-dLLM defaults prune LLaDA-8B after layers 4 and 8 and Dream-7B after 4 and 7 (algorithms.md §1.2)
    assert BuildConfig().resolve_prune_layers(32) == (4, 8)
    assert BuildConfig().resolve_prune_layers(28) == (4, 7)
    assert BuildConfig(prune_layers=(3, 1, 3)).resolve_prune_layers(4) == (1, 3)
    with pytest.raises(ValueError, match="prune layer 9 is outside the model's 4 layers"):
        BuildConfig(prune_layers=(9,)).resolve_prune_layers(4)


def test_profile_dims_bound_every_request():
    d = profile_dims(BuildConfig(**SMALL))
    assert d["batch"] == (1, 1, 2) and d["slots"][2] == 16 + 8 + 1 and d["rows"][2] == 25
    assert all(lo <= opt <= hi for lo, opt, hi in d.values())


@pytest.fixture(scope="module")
def dense_only(llada_ckpt, tmp_path_factory):
    from esdllm.build.export_onnx import export_artifacts
    from esdllm.runtime.weights import load_model
    out = tmp_path_factory.mktemp("dense-only")
    export_artifacts(load_model(llada_ckpt), BuildConfig(variants=("dense",), **SMALL), out, model_dir=llada_ckpt)
    return out


def test_engine_json_round_trip(dense_only):
    spec = EngineSpec.read(dense_only)
    assert spec.build == BuildConfig(variants=("dense",), **SMALL)
    again = spec.to_dict()
    spec.write()
    assert EngineSpec.read(dense_only).to_dict() == again
    assert spec.versions["opset"] == 18 and spec.plugins["ops"]["token_gather"]["attributes"] == ["alpha"]


@pytest.fixture
def copy_of(dense_only, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(dense_only, dst)
    return dst


def _edit(root, fn):
    path = root / "engine.json"
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


@pytest.mark.parametrize("breakage,msg", [
    ("no-dir", "does not exist"),
    ("no-json", "no engine.json in"),
    ("bad-json", "is not valid JSON"),
    ("format", "is not an esdllm engine description"),
    ("version", "has format_version 99; this esdllm reads 1"),
    ("no-model", "has no 'model' entry"),
    ("variant", "lists unknown variant 'fast'"),
])
def test_engine_json_errors(copy_of, breakage, msg):
    root = copy_of
    if breakage == "no-dir":
        root = root / "nowhere"
    elif breakage == "no-json":
        (root / "engine.json").unlink()
    elif breakage == "bad-json":
        (root / "engine.json").write_text("{not json")
    else:
        edits = {"format": lambda d: d.update(format="other"), "version": lambda d: d.update(format_version=99),
                 "no-model": lambda d: d.pop("model"),
                 "variant": lambda d: d["variants"].update(fast=d["variants"]["dense"])}
        _edit(root, edits[breakage])
    with pytest.raises(EngineError, match=msg):
        EngineSpec.read(root)


def _ort(root):
    from esdllm.runtime.executors import make_executor
    return make_executor("onnxruntime", engine_dir=root)


def _keep(k: int) -> torch.Tensor:
    return torch.ones(1, k, dtype=torch.bool)


def test_missing_variant_file_and_unbuilt_variant(copy_of):
    ex = _ort(copy_of)
    cache = ex.new_cache(1, 12, (1,))
    cache.set_layout(torch.zeros(1, dtype=torch.long))
    idx = torch.arange(4, 12)[None]
    plan = StepPlan(keep={1: _keep(2)}, write_hidden=True, confidence=torch.zeros(1, 13), bonus=torch.zeros(1, 13),
                    top2=2.0)
    with pytest.raises(EngineError, match="have no 'skip' graph .*built variants: dense"):
        ex.step(idx, idx, cache, plan)
    (copy_of / "dense.onnx").unlink()
    with pytest.raises(EngineError, match="lists variant 'dense' at dense.onnx, but .* is missing"):
        ex.step(idx, idx, cache, StepPlan())


def test_artifacts_for_another_model(dense_only, dream_ckpt, llada_ckpt):
    from esdllm.runtime.executors import make_executor
    with pytest.raises(EngineError, match=r"built for another model: .*family 'llada' \(artifacts\) != 'dream'"):
        make_executor("onnxruntime", model_dir=dream_ckpt, engine_dir=dense_only)
    with pytest.raises(ValueError, match="--dtype bfloat16 requested, but the artifacts .* were built for float32"):
        make_executor("onnxruntime", model_dir=llada_ckpt, engine_dir=dense_only, dtype="bfloat16")
    with pytest.raises(ValueError, match="needs an artifacts directory"):
        make_executor("onnxruntime", model_dir=llada_ckpt)
    ex = make_executor("onnxruntime", model_dir=llada_ckpt, engine_dir=dense_only)
    assert ex.args.family == "llada"


def test_requests_outside_the_profile(dense_only):
    ex = _ort(dense_only)
    with pytest.raises(ProfileError, match="batch 3 is larger than the built profile's max_batch 2"):
        ex.new_cache(3, 10)
    with pytest.raises(ProfileError, match="canvas length 25 .* exceeds .* 16 \\+ 8 = 24"):
        ex.new_cache(1, 25)
    with pytest.raises(ProfileError, match="prompt length 17 is longer than the built profile's max_prompt 16"):
        ex.check_request(1, 17, 8)
    with pytest.raises(ProfileError, match="gen_length 16 is longer than the built profile's gen_length 8"):
        ex.check_request(1, 4, 16)
    ex.check_request(2, 16, 8)


def test_plans_outside_the_build(dense_only):
    ex = _ort(dense_only)
    with pytest.raises(EngineError, match="hidden-state cache at layer 0 .* prune layers \\[1\\]"):
        ex.new_cache(1, 12, (0,))
    cache = ex.new_cache(1, 12, (1,))
    cache.set_layout(torch.zeros(1, dtype=torch.long))
    idx = torch.arange(4, 12)[None]
    es = dict(write_hidden=True, confidence=torch.zeros(1, 13), bonus=torch.zeros(1, 13), top2=2.0)
    with pytest.raises(ValueError, match="the plan prunes at layer 0, but the skip graph prunes at layers \\[1\\]"):
        ex.step(idx, idx, cache, StepPlan(keep={0: _keep(2)}, **es))
    with pytest.raises(ValueError, match="plan alpha 0.7 differs from the alpha 0.5"):
        ex.step(idx, idx, cache, StepPlan(keep={1: _keep(2)}, alpha=0.7, **es))


def test_bfloat16_artifacts_refused_by_onnxruntime(copy_of):
    _edit(copy_of, lambda d: d["build"].update(dtype="bfloat16"))
    with pytest.raises(EngineError, match="runs float32 or float16 graphs; .* are bfloat16"):
        _ort(copy_of)


def test_cli_build_then_generate_with_onnxruntime(llada_ckpt, tmp_path, capsys):
    from esdllm.runtime.cli import main
    out = tmp_path / "artifacts"
    assert main(["build", "--model", str(llada_ckpt), "--out", str(out), "--max-batch", "2", "--max-prompt", "16",
                 "--gen-length", "8", "--block-length", "8", "--quiet"]) == 0
    assert "esdllm build: wrote" in capsys.readouterr().out
    gen = ["generate", "--model", str(llada_ckpt), "--prompt", "the cat", "--gen-length", "8", "--block-length", "4",
           "--method", "es-dllm", "--block-update-freq", "3", "--json"]
    assert main(gen) == 0
    ref = json.loads(capsys.readouterr().out)
    assert main(gen + ["--engine", str(out), "--executor", "onnxruntime"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["token_ids"] == ref["token_ids"] and got["stats"]["nfe"] == ref["stats"]["nfe"]
    assert main(gen + ["--engine", str(out), "--executor", "onnxruntime", "--prompt", "a", "--prompt", "b"]) == 2
    assert "batch 3 is larger than the built profile's max_batch 2" in capsys.readouterr().err
