"""`esdllm eval`: decoding methods side by side on held-out problems of the synthetic task.

    esdllm eval --model models/llada-tiny --methods vanilla,fast-dllm,es-dllm --n 200

Per method: exact-match accuracy (overall and per task op), token agreement with vanilla, NFE per
generate call, tokens per forward and tokens/s. Problems come from the task's held-out split
(runtime/task.py: disjoint from anything training can draw) at a seed training never used.
Methods run interleaved batch by batch after one warm-up call each, so their speeds share the
machine's conditions. Prints a table, writes a PNG of accuracy against tokens/s, and ends with
one JSON line.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import task
from .config import DECODE_PRESETS, DecodeConfig

EVAL_SEED = 1234  # training draws split "train" with its own seed; this seed is for held-out only


@dataclass(frozen=True)
class EvalConfig:
    methods: tuple[str, ...] = ("vanilla", "fast-dllm-dual-t0.9", "es-dllm-t0.9", "streaming-dllm", "dyllm-t0.9",
                                "es-dllm+streaming")  # config.DECODE_PRESETS
    n: int = 200
    seed: int = EVAL_SEED
    gen_length: int = 64
    block_length: int = 32
    steps: int | None = None           # None: gen_length (one token a step without a threshold)
    families: tuple[str, ...] = task.FAMILIES
    natural_lengths: bool = True       # each family at task.NATURAL_GEN (gen_length only where it has none)
    batch_size: int = 16
    chat: bool = False

    def __post_init__(self):
        bad = [m for m in self.methods if m not in DECODE_PRESETS]
        if bad or not self.methods:
            raise ValueError(f"unknown method {bad[0] if bad else '(none)'!r}; expected some of {tuple(DECODE_PRESETS)}")
        badf = [f for f in self.families if f not in task.FAMILIES]
        if badf or not self.families:
            raise ValueError(f"unknown task family {badf[0] if badf else '(none)'!r}; expected some of {task.FAMILIES}")
        if self.n <= 0 or self.batch_size <= 0:
            raise ValueError(f"n and batch_size must be positive, got {self.n}, {self.batch_size}")

    def gen_length_of(self, family: str) -> int:
        return task.NATURAL_GEN[family] if self.natural_lengths else self.gen_length

    def decode_configs(self, family: str | None = None) -> dict[str, DecodeConfig]:
        gen = self.gen_length if family is None else self.gen_length_of(family)
        steps = self.steps if gen == self.gen_length else None
        base = DecodeConfig(gen_length=gen, block_length=min(self.block_length, gen), steps=steps)
        return {m: base.replace(**DECODE_PRESETS[m]) for m in self.methods}


def _agreement(a: list[int], b: list[int]) -> float:
    """Share of positions where two completions (ids before their stop token) hold the same id."""
    n = max(len(a), len(b))
    if n == 0:
        return 1.0
    return sum(x == y for x, y in zip(a, b)) / n


def evaluate(pipe, cfg: EvalConfig, progress: bool = False, sweep: bool = False) -> dict:
    """Every method of cfg on cfg.n held-out problems of each family, with `pipe` (a runtime Pipeline).
    sweep: every point of runtime/sweep.py's curves instead of cfg.methods, and each family's frontier."""
    from . import sweep as SW
    plans = {}
    for f in cfg.families:
        gen = cfg.gen_length_of(f)
        plans[f] = SW.points(gen, min(cfg.block_length, gen)) if sweep else None
    bar = None
    if progress:
        from tqdm import tqdm
        per_family = [len(plans[f]) if sweep else len(cfg.methods) for f in cfg.families]
        bar = tqdm(total=-(-cfg.n // cfg.batch_size) * sum(per_family), desc="eval", unit="call", file=sys.stderr)
    fams = {}
    for f in cfg.families:
        if sweep:
            fams[f] = _evaluate_family(pipe, cfg, f, bar, {m: p[3] for m, p in plans[f].items()})
            for m, (curve, knob, value, _) in plans[f].items():
                fams[f]["methods"][m].update(curve=curve, knob=knob, value=value)
            fams[f]["frontier"] = SW.frontier(fams[f]["methods"])
        else:
            fams[f] = _evaluate_family(pipe, cfg, f, bar)
    if bar is not None:
        bar.close()
    return {"model": str(pipe.model_dir), "family": pipe.args.family, "n": cfg.n, "seed": cfg.seed,
            "split": "heldout", "block_length": cfg.block_length, "batch_size": cfg.batch_size, "chat": cfg.chat,
            "dtype": str(pipe.executor.dtype).removeprefix("torch."), "device": str(pipe.executor.device),
            "sweep": sweep, "families": fams}


def _evaluate_family(pipe, cfg: EvalConfig, family: str, bar, dcfgs: dict | None = None) -> dict:
    probs = task.problems(cfg.seed, cfg.n, split="heldout", family=family)
    dcfgs = dcfgs or cfg.decode_configs(family)
    batches = [probs[i: i + cfg.batch_size] for i in range(0, len(probs), cfg.batch_size)]
    for m, dc in dcfgs.items():  # warm-up: first calls pay for allocation and lazy init
        pipe.generate([probs[0].prompt], dc.replace(gen_length=dc.block_length, steps=None), chat=cfg.chat)
    acc = {m: dict(hits=[], ids=[], nfe=0, tokens=0, seconds=0.0, calls=0) for m in dcfgs}
    for batch in batches:
        for m, dc in dcfgs.items():  # interleaved: every method sees the same machine state
            res = pipe.generate([p.prompt for p in batch], dc, chat=cfg.chat)
            r = acc[m]
            r["hits"] += [task.check(c.text, p) for c, p in zip(res.completions, batch)]
            r["ids"] += [c.token_ids for c in res.completions]
            r["nfe"] += res.stats.nfe
            r["tokens"] += res.stats.generated_tokens
            r["seconds"] += res.stats.seconds
            r["calls"] += 1
            if bar is not None:
                bar.update(1)
    ref = next((acc[m]["ids"] for m in ("vanilla", "vanilla k1") if m in acc), None)
    methods = {}
    for m, r in acc.items():
        per_op = {op: [h for h, p in zip(r["hits"], probs) if p.op == op] for op in task.FAMILY_OPS[family]}
        methods[m] = {
            "accuracy": round(sum(r["hits"]) / len(probs), 4),
            "per_op": {op: round(sum(h) / len(h), 4) for op, h in per_op.items() if h},
            "token_agreement": (round(sum(_agreement(a, b) for a, b in zip(r["ids"], ref)) / len(probs), 4)
                                if ref is not None else None),
            "nfe": round(r["nfe"] / r["calls"], 2),
            "tokens_per_forward": round(r["tokens"] / max(r["nfe"], 1), 3),
            "tokens_per_second": round(r["tokens"] / r["seconds"], 2) if r["seconds"] > 0 else 0.0,
            "seconds": round(r["seconds"], 3),
            "config": dcfgs[m].to_dict(),
        }
    return {"n": len(probs), "gen_length": cfg.gen_length_of(family), "methods": methods}


def format_table(result: dict) -> str:
    w = max([18] + [len(m) + 2 for fr in result["families"].values() for m in fr["methods"]])
    head = f"{'family':<7}{'method':<{w}}{'accuracy':>9}{'agree':>8}{'NFE':>8}{'tok/fwd':>9}{'tok/s':>10}  per op"
    lines = [f"{result['model']} ({result['family']}): {result['n']} held-out problems per family, seed "
             f"{result['seed']}, block {result['block_length']}, batch {result['batch_size']}, "
             f"{result['dtype']} on {result['device']}", head, "-" * len(head)]
    for fam, fr in result["families"].items():
        for m, r in fr["methods"].items():
            agree = "-" if r["token_agreement"] is None else f"{r['token_agreement']:.3f}"
            ops = " ".join(f"{op}={v:.2f}" for op, v in r["per_op"].items()) if len(r["per_op"]) > 1 else ""
            lines.append(f"{fam:<7}{m:<{w}}{r['accuracy']:>9.3f}{agree:>8}{r['nfe']:>8.1f}"
                         f"{r['tokens_per_forward']:>9.2f}{r['tokens_per_second']:>10.1f}  {ops}")
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> Path:
    """PNG of accuracy against tokens/s, one panel per family, one labelled point per method."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    fams = list(result["families"])
    rows = max(-(-len(fr["methods"]) // 2) for fr in result["families"].values())  # legend rows
    fig, axes = plt.subplots(1, len(fams), figsize=(4.2 * len(fams), 3.2 + 0.2 * rows), dpi=120,
                             squeeze=False)
    markers = "osD^vP*X"
    for ax, fam in zip(axes[0], fams):
        fr = result["families"][fam]
        for i, (m, r) in enumerate(fr["methods"].items()):
            ax.scatter(r["tokens_per_second"], r["accuracy"], s=60, marker=markers[i % len(markers)],
                       label=f"{m} (NFE {r['nfe']:.0f})", alpha=0.85)
        ax.set_xlabel("tokens / s")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.05)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        # below the panel, not on it: a legend inside covers points wherever it goes (perm's slow ones)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2, fontsize=6.5, frameon=False)
        ax.set_title(f"{fam}: n {fr['n']}, gen {fr['gen_length']}", fontsize=9)
    fig.suptitle(Path(result["model"]).name, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def _run(ns) -> int:
    from .pipeline import Pipeline

    d_gen = EvalConfig().gen_length
    cfg = EvalConfig(methods=tuple(m.strip() for m in ns.methods.split(",") if m.strip()), n=ns.n,
                     seed=ns.seed, gen_length=ns.gen_length or d_gen, block_length=ns.block_length, steps=ns.steps,
                     families=tuple(f.strip() for f in ns.families.split(",") if f.strip()),
                     natural_lengths=ns.gen_length is None,
                     batch_size=ns.batch_size, chat=ns.chat)
    pipe = Pipeline.load(ns.model, dtype=ns.dtype, device=ns.device, executor=ns.executor, engine_dir=ns.engine,
                         compile=ns.compile, ops=ns.ops)
    t0 = time.perf_counter()
    result = evaluate(pipe, cfg, progress=sys.stderr.isatty() and not ns.json, sweep=ns.sweep)
    result["wall_seconds"] = round(time.perf_counter() - t0, 2)
    if ns.plot:
        from . import sweep
        result["plot"] = str((sweep.plot if ns.sweep else plot)(result, ns.plot))
    if not ns.json:
        print(format_table(result))
        for fam, fr in result["families"].items() if ns.sweep else ():
            f = fr["frontier"]
            print(f"{fam}: fastest within 2 points of vanilla ({f['reference_accuracy']:.3f}): "
                  f"{f['fastest_within_2_points']} at {f['accuracy']:.3f}, {f['tokens_per_second']:.0f} tok/s "
                  f"({f['speedup_over_reference']:.2f}x)")
        if ns.plot:
            print(f"plot: {result['plot']}")
    print(json.dumps(result, sort_keys=True))
    return 0


def register(subparsers) -> None:
    from .flags import add_model_args

    d = EvalConfig()
    p = subparsers.add_parser("eval", help="accuracy, agreement, NFE and tokens/s of methods on held-out task problems",
                              epilog="example: esdllm eval --methods vanilla,es-dllm-t0.9,streaming-dllm --n 64")
    add_model_args(p)
    p.add_argument("--methods", default=",".join(d.methods), help=f"comma-separated, from {','.join(DECODE_PRESETS)}")
    p.add_argument("--n", type=int, default=d.n, help="number of held-out problems")
    p.add_argument("--seed", type=int, default=d.seed, help="held-out problem stream")
    p.add_argument("--families", default=",".join(d.families), help="comma-separated task families (runtime/task.py)")
    p.add_argument("--gen-length", type=int, default=None,
                   help="one generation length for every family (default: each family's natural one)")
    p.add_argument("--block-length", type=int, default=d.block_length, help=f"block size (default {d.block_length})")
    p.add_argument("--steps", type=int, default=None, help="default: gen length")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"problems per generate call (default {d.batch_size})")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the checkpoint's chat template")
    p.add_argument("--plot", default="esdllm-eval.png", help="PNG path for accuracy vs tokens/s ('' to skip)")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.add_argument("--sweep", action="store_true",
                   help="every method along its speed knob (runtime/sweep.py) instead of --methods; the plot "
                        "becomes the accuracy-vs-speed frontier per family")
    p.set_defaults(func=_run)
