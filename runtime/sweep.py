"""`esdllm eval --sweep`: every method along its speed knob, the accuracy-vs-speed frontier per family.

Curves (one per method; a point is one setting of its knob, all else the method's defaults):
  vanilla (k/step)   fixed-count decoding, 1 / 2 / 4 tokens a step (steps = gen / k)
  vanilla, fast-dllm-dual, fast-dllm-prefix, es-dllm, es-dllm p1, es-dllm p1s, es-dllm+streaming
                     confidence threshold 0.5 ... 0.95 (es-dllm p1: the prompt rows refreshed every
                     step, EOS not delayed, early exit; p1s: those refreshes skip rows too;
                     config.DECODE_PRESETS "es-dllm-p1-t0.9-exit", "es-dllm-p1s-t0.9-exit")
  streaming-dllm     suffix window 16 ... 96 (its threshold 0.9, dynamic threshold, early exit)
  dyllm              saliency tau 0.9 ... 0.999 (one token a step)
Every point runs on the same held-out problems as the rest (runtime/evaluate.py), interleaved batch
by batch. Per family the result names the fastest point whose accuracy is within 2 points of
vanilla at one token a step; the plot draws one panel per family, accuracy against tokens/s, one
curve per method, that point ringed.
"""
from __future__ import annotations

from pathlib import Path

from .config import DECODE_PRESETS, DecodeConfig

THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)
REFERENCE = "vanilla k1"  # the accuracy every other point is held to
TOLERANCE = 0.02


def _knobless(preset: str) -> dict:
    """A preset's settings without its threshold (the knob a curve moves)."""
    return {k: v for k, v in DECODE_PRESETS[preset].items() if k != "threshold"}


# curve -> (the method's settings, the knob, its values)
CURVES: dict[str, tuple[dict, str, tuple]] = {
    "vanilla (k/step)": (dict(method="vanilla"), "tokens_per_step", (1, 2, 4)),
    "vanilla": (dict(method="vanilla"), "threshold", THRESHOLDS),
    "fast-dllm-dual": (dict(method="fast-dllm", cache="dual"), "threshold", THRESHOLDS),
    "fast-dllm-prefix": (dict(method="fast-dllm", cache="prefix"), "threshold", THRESHOLDS),
    "es-dllm": (dict(method="es-dllm"), "threshold", THRESHOLDS),
    "es-dllm p1": (_knobless("es-dllm-p1-t0.9-exit"), "threshold", THRESHOLDS),
    "es-dllm p1s": (_knobless("es-dllm-p1s-t0.9-exit"), "threshold", THRESHOLDS),
    "es-dllm+streaming": (_knobless("es-dllm+streaming"), "threshold", THRESHOLDS),
    "streaming-dllm": (dict(method="streaming-dllm"), "suffix_window", (16, 32, 64, 96)),
    "dyllm": (dict(method="dyllm"), "saliency_tau", (0.9, 0.95, 0.99, 0.999)),
}
_SHORT = {"tokens_per_step": "k", "threshold": "t", "suffix_window": "w", "saliency_tau": "tau"}


def points(gen_length: int, block_length: int) -> dict[str, tuple[str, str, object, DecodeConfig]]:
    """{point name: (curve, knob, value, DecodeConfig)} for one generation length."""
    base = DecodeConfig(gen_length=gen_length, block_length=block_length)
    out = {}
    for curve, (settings, knob, values) in CURVES.items():
        for v in values:
            if knob == "tokens_per_step":
                if block_length % v:
                    continue
                name, cfg = f"vanilla k{v}", base.replace(**settings, steps=gen_length // v)
            else:
                name, cfg = f"{curve} {_SHORT[knob]}{v}", base.replace(**settings, **{knob: v})
            out[name] = (curve, knob, v, cfg)
    return out


def frontier(methods: dict) -> dict:
    """The fastest point within TOLERANCE of the reference's accuracy (methods: a family's results)."""
    ref = methods[REFERENCE]["accuracy"]
    ok = {m: r for m, r in methods.items() if r["accuracy"] >= ref - TOLERANCE - 1e-9}
    best = max(ok, key=lambda m: ok[m]["tokens_per_second"])
    return {"reference_accuracy": ref, "fastest_within_2_points": best, "accuracy": ok[best]["accuracy"],
            "tokens_per_second": ok[best]["tokens_per_second"],
            "speedup_over_reference": round(ok[best]["tokens_per_second"] /
                                            max(methods[REFERENCE]["tokens_per_second"], 1e-9), 2)}


def plot(result: dict, path: str | Path) -> Path:
    """One panel per family: accuracy against tokens/s, a curve per method, the frontier pick ringed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = list(result["families"])
    cols = min(2, len(fams))
    rows = -(-len(fams) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.0 * cols, 4.4 * rows), dpi=120, squeeze=False)
    for ax, fam in zip(axes.flat, fams):
        fr = result["families"][fam]
        for i, curve in enumerate(CURVES):
            pts = sorted(((r["tokens_per_second"], r["accuracy"], r["value"]) for r in fr["methods"].values()
                          if r["curve"] == curve), key=lambda p: p[2])  # along the knob
            if not pts:
                continue
            xs, ys, vs = zip(*pts)
            ax.plot(xs, ys, marker="os^vDP*X"[i % 8], ms=4, lw=1.2, label=curve, color=f"C{i}")
            ax.annotate(f"{_SHORT[CURVES[curve][1]]}{vs[-1]}", (xs[-1], ys[-1]), fontsize=6, color=f"C{i}",
                        xytext=(3, -8), textcoords="offset points")
        best = fr["frontier"]
        ax.scatter([best["tokens_per_second"]], [best["accuracy"]], s=180, facecolors="none", edgecolors="k",
                   lw=1.5, zorder=5, label=f"fastest within 2 pts: {best['fastest_within_2_points']}")
        ax.axhline(best["reference_accuracy"] - TOLERANCE, color="0.5", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("tokens / s (log)")
        ax.set_ylabel("exact match")
        ax.set_ylim(-0.02, 1.05)
        ax.grid(alpha=0.3, which="both")
        ax.set_title(f"{fam}: n {fr['n']}, gen {fr['gen_length']}, vanilla {best['reference_accuracy']:.2f}",
                     fontsize=9)
        ax.legend(loc="best", fontsize=6)
    for ax in list(axes.flat)[len(fams):]:
        ax.axis("off")
    fig.suptitle(f"{Path(result['model']).name}: accuracy against speed", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
