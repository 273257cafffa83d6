"""`esdllm eval` on the committed default model: the JSON it promises, and its configuration rules."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from esdllm.runtime import evaluate as E
from esdllm.runtime.config import DecodeConfig

MODEL = Path(__file__).resolve().parents[1] / "models" / "llada-tiny"
METHOD_KEYS = {"accuracy", "per_op", "token_agreement", "nfe", "tokens_per_forward", "tokens_per_second",
               "seconds", "config"}


def test_method_presets_follow_the_issue():
    cfgs = E.EvalConfig().decode_configs()
    assert cfgs["vanilla"] == DecodeConfig(method="vanilla", gen_length=64, block_length=32)
    assert cfgs["fast-dllm-dual-t0.9"].cache == "dual" and cfgs["fast-dllm-dual-t0.9"].threshold == 0.9
    es = cfgs["es-dllm-t0.9"]
    assert es.method == "es-dllm" and es.threshold == 0.9
    assert es.skip_proportions == DecodeConfig().skip_proportions  # the paper defaults, untouched


def test_bad_eval_config_names_the_problem():
    with pytest.raises(ValueError, match="'greedy'"):
        E.EvalConfig(methods=("vanilla", "greedy"))
    with pytest.raises(ValueError, match="positive"):
        E.EvalConfig(n=0)


def test_agreement():
    assert E._agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert E._agreement([1, 2, 3], [1, 9, 3]) == pytest.approx(2 / 3)
    assert E._agreement([1, 2], [1, 2, 3, 4]) == 0.5   # missing positions disagree
    assert E._agreement([], []) == 1.0


@pytest.fixture(scope="module")
def cli_result(tmp_path_factory):
    if not (MODEL / "config.json").is_file():
        pytest.skip(f"no committed default model at {MODEL}")
    from esdllm.runtime.cli import main
    import contextlib
    import io

    png = tmp_path_factory.mktemp("eval") / "eval.png"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["eval", "--model", str(MODEL), "--n", "8", "--batch-size", "8", "--json", "--plot", str(png),
                   "--families", "maps", "--methods", "vanilla,fast-dllm-dual-t0.9,es-dllm-t0.9"])
    assert rc == 0
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 1, "--json prints exactly one line"
    return json.loads(lines[0]), png


def test_eval_cli_json_on_the_committed_model(cli_result):
    res, png = cli_result
    assert res["n"] == 8 and res["split"] == "heldout" and res["family"] == "llada"
    assert list(res["families"]) == ["maps"] and res["families"]["maps"]["gen_length"] == 64
    methods = res["families"]["maps"]["methods"]
    assert set(methods) == {"vanilla", "fast-dllm-dual-t0.9", "es-dllm-t0.9"}
    for name, m in methods.items():
        assert METHOD_KEYS <= m.keys(), name
        assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["token_agreement"] <= 1.0
        assert m["nfe"] > 0 and m["tokens_per_second"] > 0
    assert methods["vanilla"]["token_agreement"] == 1.0
    assert methods["vanilla"]["nfe"] == 64          # one token a step over gen length 64
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the committed model actually solves held-out problems (greedy, so this is a regression check
    # on the checkpoint; a numerics change may flip a close call, hence not 8/8)
    for name, m in methods.items():
        assert m["accuracy"] >= 0.75, (name, m["accuracy"])
    assert methods["es-dllm-t0.9"]["nfe"] < 64 and methods["fast-dllm-dual-t0.9"]["nfe"] < 64


def test_table_lists_every_method(cli_result):
    res, _ = cli_result
    table = E.format_table(res)
    for name in res["families"]["maps"]["methods"]:
        assert name in table


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_committed_models_are_small_hf_checkpoints_that_answer(family):
    """Both embedded defaults: HF layout, well under 25 MB, and right on held-out problems."""
    d = MODEL.parent / f"{family}-tiny"
    if not (d / "config.json").is_file():
        pytest.skip(f"no committed model at {d}")
    from esdllm.runtime import task
    from esdllm.runtime.pipeline import Pipeline
    assert json.loads((d / "config.json").read_text())["model_type"].lower() == family  # Dream spells it "Dream"
    from esdllm.runtime.weights import FAMILY_FILES
    assert {"model.safetensors", *FAMILY_FILES[family]} <= {f.name for f in d.iterdir()}
    assert sum(f.stat().st_size for f in d.iterdir()) < 25 * 2**20
    pipe = Pipeline.load(d)
    probs = task.problems(77, 8, split="heldout", family="maps")
    for method in ("fast-dllm", "es-dllm"):
        res = pipe.generate([p.prompt for p in probs],
                            DecodeConfig(method=method, threshold=0.9, gen_length=64, block_length=32))
        hits = sum(task.check(c.text, p) for c, p in zip(res.completions, probs))
        assert hits >= 6, (method, [c.text for c in res.completions])


def test_sweep_points_cover_every_curve_along_its_knob():
    from esdllm.runtime import sweep
    pts = sweep.points(64, 32)
    assert {curve for curve, *_ in pts.values()} == set(sweep.CURVES)
    assert [pts[f"vanilla k{k}"][3].steps for k in (1, 2, 4)] == [64, 32, 16]
    assert "vanilla k4" not in sweep.points(60, 6)  # 4 tokens a step must divide the block
    for t in sweep.THRESHOLDS:
        p1 = pts[f"es-dllm p1 t{t}"][3]
        assert (p1.method, p1.threshold, p1.prompt_update_freq, p1.delay_eos, p1.early_exit) == \
            ("es-dllm", t, 1, False, True)
        assert pts[f"es-dllm t{t}"][3].prompt_update_freq == DecodeConfig().prompt_update_freq


def test_frontier_is_the_fastest_point_within_two_points_of_one_token_a_step():
    from esdllm.runtime import sweep

    def r(acc, tps):
        return {"accuracy": acc, "tokens_per_second": tps}
    fr = sweep.frontier({"vanilla k1": r(0.90, 10.0), "close": r(0.881, 50.0), "far": r(0.87, 400.0),
                         "slow": r(0.95, 20.0)})
    assert fr["fastest_within_2_points"] == "close" and fr["speedup_over_reference"] == 5.0
    assert sweep.frontier({"vanilla k1": r(0.5, 10.0), "worse": r(0.1, 99.0)})["fastest_within_2_points"] == "vanilla k1"


def test_eval_sweep_cli_runs_every_point_and_draws_the_frontier(tmp_path):
    if not (MODEL / "config.json").is_file():
        pytest.skip(f"no committed default model at {MODEL}")
    import contextlib
    import io

    from esdllm.runtime import sweep
    from esdllm.runtime.cli import main
    png, out = tmp_path / "frontier.png", io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["eval", "--sweep", "--model", str(MODEL), "--n", "2", "--batch-size", "2", "--json",
                   "--plot", str(png), "--families", "maps"])
    assert rc == 0
    res = json.loads(out.getvalue().strip().splitlines()[-1])
    fam = res["families"]["maps"]
    assert set(fam["methods"]) == set(sweep.points(64, 32))
    assert fam["methods"]["vanilla k1"]["nfe"] == 64
    assert fam["frontier"]["fastest_within_2_points"] in fam["methods"]
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
