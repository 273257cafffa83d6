"""`esdllm generate` and `esdllm bench` from the command line, on both families' tiny checkpoints."""
from __future__ import annotations

import json

import pytest
import torch

from esdllm.runtime import cli
from esdllm.runtime.bench import PRESETS, run_bench


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("method", [["--method", "vanilla"],
                                    ["--method", "fast-dllm", "--cache", "dual", "--threshold", "0.9"],
                                    ["--method", "es-dllm", "--threshold", "0.9"]])
def test_generate_json(family, method, llada_ckpt, dream_ckpt, capsys):
    ckpt = llada_ckpt if family == "llada" else dream_ckpt
    rc = cli.main(["generate", "--model", str(ckpt), "--prompt", "hello there", "--prompt", "hi",
                   "--gen-length", "16", "--block-length", "8", "--json", *method])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, "--json prints exactly one line"
    out = json.loads(lines[0])
    assert len(out["texts"]) == 2 and len(out["token_ids"]) == 2
    assert all(len(ids) <= 16 for ids in out["token_ids"])
    st = out["stats"]
    assert st["nfe"] >= 1 and st["positions_per_forward"] > 0 and st["seconds"] > 0
    assert out["config"]["method"] == method[1]


def test_generate_bad_input_names_the_problem(llada_ckpt, capsys):
    rc = cli.main(["generate", "--model", str(llada_ckpt), "--prompt", "x", "--gen-length", "10",
                   "--block-length", "4"])
    assert rc == 2 and "not a multiple of block_length" in capsys.readouterr().err
    rc = cli.main(["generate", "--model", str(llada_ckpt), "--prompt", "x " * 5000])
    assert rc == 2 and "longer than the limit" in capsys.readouterr().err


def test_bench_tiny_reports_methods_and_compute():
    out = run_bench(PRESETS["tiny"], ["vanilla", "fast-dllm-dual", "es-dllm"], rounds=1, progress=False)
    m = out["methods"]
    assert set(m) == {"vanilla", "fast-dllm-dual", "es-dllm"}
    for v in m.values():
        assert v["tps"] > 0 and v["nfe"] == PRESETS["tiny"].gen and v["seconds"] > 0
    # the work each method does per forward is deterministic: skipping < dual cache < full canvas
    rows = {k: v["positions_per_forward"] for k, v in m.items()}
    assert rows["es-dllm"] < rows["fast-dllm-dual"] < rows["vanilla"]
    assert {"es-dllm/vanilla", "es-dllm/fast-dllm-dual"} <= set(out["speedup"])
    json.dumps(out)


def test_bench_defaults_to_the_committed_model_with_eos_semantics(capsys):
    from esdllm.runtime.pipeline import DEFAULT_MODEL
    if not (DEFAULT_MODEL / "config.json").is_file():
        pytest.skip(f"no committed default model at {DEFAULT_MODEL}")
    rc = cli.main(["bench", "--methods", "vanilla,es-dllm-t0.9", "--batch", "2", "--gen-length", "64",
                   "--block-length", "32", "--rounds", "1"])
    assert rc == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) > 3 and table[0].startswith("model ")  # people get the table, then the JSON line
    rc = cli.main(["bench", "--methods", "vanilla,es-dllm-t0.9", "--batch", "2", "--gen-length", "64",
                   "--block-length", "32", "--rounds", "1", "--json"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 1, "--json prints exactly one line"
    out = json.loads(lines[0])
    assert json.loads(table[-1]).keys() == out.keys()
    assert out["model"] == str(DEFAULT_MODEL) and out["batch"] == 2 and out["preset"] is None
    m = out["methods"]
    # answers are 16-32 tokens: counting stops at EOS, so far fewer than 2 x 64 tokens count
    tokens = m["vanilla"]["tokens_per_forward"] * m["vanilla"]["nfe"]
    assert 2 * 16 <= tokens <= 2 * 32
    assert m["es-dllm-t0.9"]["nfe"] < m["vanilla"]["nfe"] == 64   # parallel decoding fires on a trained model


def test_bench_rejects_preset_with_model(capsys):
    rc = cli.main(["bench", "--preset", "tiny", "--model", "models/llada-tiny"])
    assert rc == 2 and "not both" in capsys.readouterr().err


def test_llada_reference_generate_decodes_what_vanilla_decodes(llada_ckpt):
    """The bench's side-by-side baseline is the same work: LLaDA's loop gives vanilla's tokens."""
    from esdllm.runtime.bench import reference_generate
    from esdllm.runtime.config import DecodeConfig
    from esdllm.runtime.generate import generate
    from esdllm.runtime.weights import load_model
    m = load_model(llada_ckpt)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [3]]
    cfg = DecodeConfig(gen_length=16, block_length=8)
    ref, ours = reference_generate(m, prompts, cfg), generate(m, prompts, cfg)
    assert torch.equal(ref.tokens, ours.tokens) and ref.stats.nfe == ours.stats.nfe == 16


def test_every_option_has_help_and_every_subcommand_an_example():
    import argparse
    from esdllm.runtime.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    described = {a.dest: a.help for a in sub._choices_actions}
    for name, p in sub.choices.items():
        assert described.get(name), f"`esdllm {name}` has no one-line description"
        assert p.epilog and "example: esdllm " + name in p.epilog, f"`esdllm {name}` has no example"
        bare = [a.option_strings[0] for a in p._actions if a.option_strings and not a.help]
        assert not bare, f"`esdllm {name}` options without help: {bare}"
