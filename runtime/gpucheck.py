"""`esdllm gpu-check` (scripts/gpu-check): the one prepared run for a bare GPU machine.

Stages, in order; after each, everything so far is written to OUT/gpu-check.json, so a run stopped
at its time limit still leaves what it measured:
  env     device, torch / triton versions
  ops     the kernel and op tests on the device (tests/test_kernels.py, tests/test_ops.py: each kernel
          against its reference by the tolerance rule, bf16 and fp32)
  decode  both default models, every decode preset, on the device: the custom ops (the kernels)
          against the reference ops, and CUDA-graph replay against eager, token for token
  bench   `esdllm bench --preset llada-8b` (bf16 real shapes, batch 8, prompt 1024, gen 256, block 64):
          vanilla, fast-dllm dual and es-dllm at one token a step, then the threshold 0.9 variants on
          the random weights for the step cost, each also with CUDA graphs; ms per forward against
          the bandwidth floor (weight bytes / 4.8 TB/s)
and one stage run only when named (--stages train), as it needs most of a session's device time:
  train   scripts/train_defaults on the device: both default models' recipes (models/*), each timed,
          then vanilla at one token a step on every family (n 64); the models land in OUT/models
          (intermediate stages in artifacts/gpu-train, so a call stopped at its limit resumes there)
--dry-run runs the same sequence on the CPU: the tiny preset, torch.compile in place of CUDA graphs
(and the graph executor's buffers with the recording replaced by re-running), the kernels in the
Triton interpreter. Stages past --budget-s are skipped and say so. The JSON line printed last is
the file's content.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH_METHODS = ("vanilla", "fast-dllm-dual", "es-dllm", "fast-dllm-dual-t0.9", "es-dllm-t0.9")
GRAPHED = ("fast-dllm-dual", "es-dllm", "es-dllm-t0.9")  # the step cost with launches replayed


def stage_env(device: str) -> dict:
    import numpy
    out = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
           "numpy": numpy.__version__, "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d")}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def stage_ops(device: str) -> dict:
    """The kernel and op tests in a child pytest (on CUDA when there is one; interpreter otherwise)."""
    env = dict(os.environ)
    if device == "cpu":
        env.setdefault("TRITON_INTERPRET", "1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py", "tests/test_ops.py"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    tail = (r.stdout + r.stderr).strip().splitlines()
    return {"returncode": r.returncode, "passed": r.returncode == 0, "summary": tail[-1] if tail else "",
            "failures": [l for l in tail if l.startswith(("FAILED", "ERROR"))][:20]}


def stage_decode(device: str) -> dict:
    """Tokens of every preset through the reference ops, the custom ops and graph replay (both models)."""
    from . import task
    from .config import DECODE_PRESETS, DecodeConfig
    from .cudagraphs import EagerReplay, GraphedExecutor
    from .generate import generate
    from .pipeline import Pipeline
    out = {}
    for family in ("llada", "dream"):
        ref = Pipeline.load(ROOT / "models" / f"{family}-tiny", device=device, ops="reference")
        cus = Pipeline.load(ROOT / "models" / f"{family}-tiny", device=device, ops="custom")
        graphed = GraphedExecutor(cus.executor, replayer=None if device == "cuda" else EagerReplay)
        prompts = [ref.encode(p.prompt, gen_length=64) for p in
                   task.problems(11, 8, split="heldout", family=("maps", "perm"))]
        for name, kw in DECODE_PRESETS.items():
            cfg = DecodeConfig(gen_length=64, block_length=32, **kw)
            want = generate(ref.executor, prompts, cfg, stop_ids=ref.stop).tokens
            row = {}
            for label, ex in (("custom", cus.executor), ("graphs", graphed)):
                got = generate(ex, prompts, cfg, stop_ids=ref.stop).tokens
                row[label] = int((got != want).any(1).sum())  # rows that differ from the reference ops
            out[f"{family}/{name}"] = row
    bad = {k: v for k, v in out.items() if any(v.values())}
    return {"rows_differing": out, "all_identical": not bad, "differing": sorted(bad)}


def stage_bench(device: str, preset_name: str, rounds: int) -> dict:
    from .bench import PRESETS, run_bench
    mode = "cuda-graphs" if device == "cuda" else "compile"
    methods = [*BENCH_METHODS, *(f"{m}@{mode}" for m in GRAPHED)]
    out = run_bench(PRESETS[preset_name], methods, device, rounds=rounds, progress=sys.stderr.isatty())
    floor = out.get("bandwidth_floor_ms_per_forward")  # known for H100 / H200
    if floor:
        out["x_bandwidth_floor"] = {m: round(v["ms_per_forward"] / floor, 2) for m, v in out["methods"].items()}
    return out


TRAIN_VANILLA = {"llada": "vanilla", "dream": "vanilla-llada-sampler"}  # one token a step, both families


def stage_train(device: str, out_dir: Path, dry_run: bool) -> dict:
    """scripts/train_defaults on `device`, one model after the other, then each model's vanilla accuracy."""
    from esdllm.scripts.train_tiny import summary
    from .evaluate import EvalConfig, evaluate
    from .pipeline import Pipeline
    models = out_dir / "models"
    res = {"train_seconds": {}, "stages": {}, "vanilla": {}}
    # the rehearsal's stages go to a folder removed after it; the device's stay, for a call that resumes
    work = tempfile.TemporaryDirectory(prefix="gpu-train-") if dry_run else \
        contextlib.nullcontext(str(ROOT / "artifacts" / "gpu-train"))
    with work as work_dir:
        env = dict(os.environ, PYTHON=sys.executable, DEVICE=device, WORK=work_dir, MODELS=str(models), THREADS="4")
        if dry_run:  # every line of the recipe, in seconds
            env.update(STEPS_DIV="1000", VAL_N="1", THREADS="2")
        for fam in ("llada", "dream"):
            t = time.perf_counter()
            r = subprocess.run(["bash", str(ROOT / "scripts" / "train_defaults"), fam], env=env,
                               stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
            if r.returncode:
                raise RuntimeError(f"train_defaults {fam} exited with {r.returncode}: {r.stdout.strip()[-500:]}")
            res["train_seconds"][fam] = round(time.perf_counter() - t, 1)
            rec = summary(models / f"{fam}-tiny")
            res["stages"][fam] = {"hours": rec["hours"], "steps": rec["steps"],
                                  "per_stage_s": {s["stage"]: s["seconds"] for s in rec["stages"]}}
            pipe = Pipeline.load(models / f"{fam}-tiny", device=device)
            # the rehearsal decodes at gen 64 everywhere: an untrained model takes all 512 steps of long's canvas
            cfg = EvalConfig(methods=(TRAIN_VANILLA[fam],), n=2 if dry_run else 64, batch_size=2 if dry_run else 16,
                             natural_lengths=not dry_run)
            ev = evaluate(pipe, cfg)
            res["vanilla"][fam] = {f: v["methods"][TRAIN_VANILLA[fam]]["accuracy"] for f, v in ev["families"].items()}
    # the quality target of the defaults; a report of the run, not a pass/fail of the device
    res["every_family_at_least_0.90"] = {m: min(a.values()) >= 0.90 for m, a in res["vanilla"].items()}
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="esdllm gpu-check", description=__doc__.split("\n")[0],
                                epilog="example: scripts/gpu-check --out $OUT   (CPU rehearsal: --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="the same sequence on the CPU at the tiny preset")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out", help="folder for gpu-check.json "
                   "(default: $OUT, else ./gpu-check-out)")
    p.add_argument("--budget-s", type=float, default=450.0, help="skip stages that start after this (default 450)")
    p.add_argument("--rounds", type=int, default=1, help="timed bench rounds (default 1)")
    p.add_argument("--stages", default="env,ops,decode,bench", help="comma list (default: all but train)")
    ns = p.parse_args(argv)
    device = "cpu" if ns.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("esdllm gpu-check: no CUDA device here (use --dry-run for the CPU rehearsal)", file=sys.stderr)
        return 2
    out_dir = Path(ns.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"dry_run": ns.dry_run, "stages": {}}
    t0 = time.perf_counter()
    runs = {"env": lambda: stage_env(device), "ops": lambda: stage_ops(device), "decode": lambda: stage_decode(device),
            "bench": lambda: stage_bench(device, "tiny" if ns.dry_run else "llada-8b", ns.rounds),
            "train": lambda: stage_train(device, out_dir, ns.dry_run)}
    ok = True
    for name in ns.stages.split(","):
        if name not in runs:
            raise SystemExit(f"esdllm gpu-check: unknown stage {name!r}; expected some of {list(runs)}")
        if time.perf_counter() - t0 > ns.budget_s:
            report["stages"][name] = {"skipped": f"budget of {ns.budget_s:.0f} s spent"}
            continue
        ts = time.perf_counter()
        print(f"gpu-check: {name} ...", file=sys.stderr, flush=True)
        try:
            res = runs[name]()
        except Exception as e:  # a failed stage is reported; the next ones still run
            res = {"error": f"{type(e).__name__}: {e}"}
        res["seconds"] = round(time.perf_counter() - ts, 1)
        ok &= "error" not in res and res.get("passed", True) and res.get("all_identical", True)
        report["stages"][name] = res
        (out_dir / "gpu-check.json").write_text(json.dumps(report, indent=1))
    report["ok"], report["seconds"] = bool(ok), round(time.perf_counter() - t0, 1)
    (out_dir / "gpu-check.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
