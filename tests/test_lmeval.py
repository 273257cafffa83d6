"""lm-evaluation-harness integration (runtime/lmeval.py), offline: the embedded task as a local lm_eval
task over a JSONL file, scored by lm_eval through the esdllm model, equals `esdllm eval`'s score on the
same problems with the same method."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'esdllm[eval]')")

from esdllm.runtime import task  # noqa: E402
from esdllm.runtime.evaluate import EvalConfig, evaluate  # noqa: E402
from esdllm.runtime.pipeline import Pipeline  # noqa: E402

DATA = Path(__file__).parent / "data" / "lm_eval"
MODEL = Path(__file__).parents[1] / "models" / "llada-tiny"
N = 12


def _task_dir(tmp_path: Path, family: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    probs = task.problems(EvalConfig().seed, N, split="heldout", family=family)
    jsonl = tmp_path / "problems.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n" for p in probs))
    (tmp_path / "esdllm_task.yaml").write_text((DATA / "esdllm_task.yaml.in").read_text().replace("@JSONL@", str(jsonl)))
    (tmp_path / "utils.py").write_text((DATA / "utils.py").read_text())
    return tmp_path


@pytest.mark.slow
def test_lm_eval_score_equals_esdllm_eval(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import esdllm.runtime.lmeval  # noqa: F401  (registers the model)
    family = "perm"  # several valid answers: lm_eval must score with the task's own checker
    out = simple_evaluate(model="esdllm", model_args=f"pretrained={MODEL},method=es-dllm,threshold=0.9,"
                          f"gen_length=64,block_length=32", tasks=["esdllm_task"], batch_size=4,
                          task_manager=TaskManager(include_path=str(_task_dir(tmp_path / "task", family))))
    harness = out["results"]["esdllm_task"]["acc,none"]
    ours = evaluate(Pipeline.load(MODEL), EvalConfig(methods=("es-dllm-t0.9",), n=N, families=(family,),
                                                     batch_size=4))
    acc = ours["families"][family]["methods"]["es-dllm-t0.9"]["accuracy"]  # rounded to 4 places
    assert round(harness * N) == round(acc * N) and harness == pytest.approx(acc, abs=5e-5)  # same problems right
    assert 0 < harness < 1  # an instrument that sees right and wrong answers, not a constant


def test_loglikelihood_tasks_are_refused_with_the_reason():
    from esdllm.runtime.lmeval import ESDLLMHarnessModel
    m = ESDLLMHarnessModel(pretrained=str(MODEL), method="es-dllm", threshold="0.9")
    with pytest.raises(NotImplementedError, match="Monte-Carlo"):
        m.loglikelihood([])
    with pytest.raises(ValueError, match="unknown model_args"):
        ESDLLMHarnessModel(pretrained=str(MODEL), methd="es-dllm")
    with pytest.raises(ValueError, match="threshold"):
        ESDLLMHarnessModel(pretrained=str(MODEL), threshold="1.5")


def test_stop_sequences_and_generation_length_follow_the_task():
    from esdllm.runtime.lmeval import ESDLLMHarnessModel
    m = ESDLLMHarnessModel(pretrained=str(MODEL), method="es-dllm", threshold=0.9, block_length=32)
    assert m.config_for({"max_gen_toks": 40}).gen_length == 64  # whole blocks
    p = task.problems(EvalConfig().seed, 1, split="heldout", family="maps")[0]

    class Req:
        args = (p.prompt, {"until": [p.answer[3:5]], "max_gen_toks": 64})
    full = m.pipe.generate([p.prompt], m.config_for({"max_gen_toks": 64})).completions[0].text
    assert p.answer[3:5] in full
    assert m.generate_until([Req()], disable_tqdm=True) == [full[: full.index(p.answer[3:5])]]
