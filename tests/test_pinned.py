"""Pinned tokens: every method on every executor that runs here decodes exactly the tokens recorded in
tests/data/pinned_tokens.json, on the embedded default models (task prompts) and on random-weight
8-layer checkpoints (random token prompts of mixed lengths, where every method's tokens differ).

A refactor must keep these green. A change that is meant to change tokens (a new decoding rule, a
retrained default model) re-pins them on purpose, in its own commit, and says why:

    ESDLLM_REPIN=1 python -m pytest tests/test_pinned.py
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from esdllm.runtime import task
from esdllm.runtime.config import DecodeConfig
from esdllm.runtime.executors import make_executor
from esdllm.runtime.generate import generate
from esdllm.runtime.tokenizer import encode_prompt, load_tokenizer
from esdllm.runtime.weights import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PINS = Path(__file__).parent / "data" / "pinned_tokens.json"
REPIN = os.environ.get("ESDLLM_REPIN") == "1"

G, BL = 32, 16
METHODS = {
    "vanilla": dict(method="vanilla"),
    "vanilla-sampled": dict(method="vanilla", temperature=0.7, seed=3),
    "fast-dllm-dual": dict(method="fast-dllm", cache="dual"),
    "fast-dllm-prefix": dict(method="fast-dllm", cache="prefix"),
    "fast-dllm-dual-t0.5": dict(method="fast-dllm", cache="dual", threshold=0.5),
    "es-dllm": dict(method="es-dllm"),
    "es-dllm-t0.5": dict(method="es-dllm", threshold=0.5),
    "es-dllm-2tok": dict(method="es-dllm", steps=G // 2),
}
MODELS = ("llada-tiny", "dream-tiny", "llada-random", "dream-random")


def _prompts(name: str, model_dir: Path) -> list[list[int]]:
    if name.endswith("-tiny"):
        tok = load_tokenizer(model_dir)
        return [encode_prompt(tok, p.prompt, chat=False)
                for p in task.problems(99, 4, split="heldout", family=("maps", "perm"))]
    rng = random.Random(name)  # random ids below the special tokens, lengths 3..17
    return [[rng.randrange(0, 200) for _ in range(n)] for n in (3, 17, 9, 12)]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    out = {"llada-tiny": ROOT / "models" / "llada-tiny", "dream-tiny": ROOT / "models" / "dream-tiny"}
    for fam in ("llada", "dream"):
        out[f"{fam}-random"] = make_tiny_checkpoint(fam, tmp_path_factory.mktemp(f"{fam}-random"), layers=8)
    return out


@pytest.fixture(scope="module")
def engines(model_dirs, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from esdllm.build.export_onnx import build_artifacts
    from esdllm.runtime.artifacts import BuildConfig
    cfg = BuildConfig(max_batch=4, max_prompt=48, gen_length=G, block_length=BL)
    return {name: build_artifacts(d, tmp_path_factory.mktemp(f"{name}-onnx"), cfg, progress=False).root
            for name, d in model_dirs.items()}


def _decode(executor, prompts) -> dict[str, list[list[int]]]:
    base = DecodeConfig(gen_length=G, block_length=BL)
    return {m: generate(executor, prompts, base.replace(**kw)).tokens.tolist() for m, kw in METHODS.items()}


def _check(name: str, executor_kind: str, got: dict) -> None:
    pins = json.loads(PINS.read_text()) if PINS.is_file() else {}
    if REPIN:
        pins.setdefault(name, {}).update(got)
        PINS.write_text(json.dumps(pins, indent=0, sort_keys=True) + "\n")
        return
    assert name in pins, f"no pinned tokens for {name}; run with ESDLLM_REPIN=1"
    for m, toks in got.items():
        assert toks == pins[name][m], f"{name} / {m} on {executor_kind}: tokens differ from the pinned ones"


@pytest.mark.parametrize("name", MODELS)
def test_torch_executor_decodes_the_pinned_tokens(model_dirs, name):
    ex = make_executor("torch", model_dir=model_dirs[name])
    _check(name, "torch", _decode(ex, _prompts(name, model_dirs[name])))


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_onnxruntime_executor_decodes_the_pinned_tokens(model_dirs, engines, name):
    if REPIN:
        pytest.skip("pins are written from the torch executor")
    ex = make_executor("onnxruntime", engine_dir=engines[name])
    _check(name, "onnxruntime", _decode(ex, _prompts(name, model_dirs[name])))
