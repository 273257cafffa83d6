"""`esdllm build`: checkpoint -> ONNX graph variants (+ TensorRT engines) + engine.json.

Only argparse lives here; each flag maps 1:1 onto a BuildConfig field. runtime/cli.py calls
`register(subparsers)`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..runtime.artifacts import BACKENDS, DTYPES, PLUGIN_MODES, VARIANTS, BuildConfig


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(v) for v in s.split(","))


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(",") if v != "")


def _names(s: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in s.split(",") if v.strip())


def register(subparsers) -> argparse.ArgumentParser:
    d = BuildConfig()
    p = subparsers.add_parser("build", help="compile a checkpoint into ONNX graphs (+ TensorRT engines)",
                              description=__doc__.splitlines()[0],
                              epilog="example: esdllm build --model models/llada-tiny --out artifacts/llada-tiny")
    p.add_argument("--model", default=None, help="HF checkpoint dir (default: the embedded models/llada-tiny)")
    p.add_argument("--out", required=True, help="artifacts dir to write (ONNX files, weights.bin, engine.json)")
    p.add_argument("--backend", default=d.backend, choices=BACKENDS, help=f"onnx graphs only, or TensorRT engines too (default {d.backend})")
    p.add_argument("--dtype", default=d.dtype, choices=DTYPES, help=f"graph dtype (default {d.dtype})")
    g = p.add_argument_group("profile (every request must fit)")
    g.add_argument("--max-batch", type=int, default=d.max_batch, help=f"largest batch the profile serves (default {d.max_batch})")
    g.add_argument("--max-prompt", type=int, default=d.max_prompt, help=f"longest prompt in tokens (default {d.max_prompt})")
    g.add_argument("--gen-length", type=int, default=d.gen_length, help=f"longest generation (default {d.gen_length})")
    g.add_argument("--block-length", type=int, default=d.block_length, help=f"block size (default {d.block_length})")
    g = p.add_argument_group("graphs")
    g.add_argument("--variants", type=_names, default=d.variants, help=f"comma list of {','.join(VARIANTS)}")
    g.add_argument("--skip-proportions", type=_floats, default=d.skip_proportions, help="es-dllm schedule baked into the skip graph (default: the paper's)")
    g.add_argument("--skip-positions", type=_floats, default=d.skip_positions, help="its prune positions, fractions of depth (default: the paper's)")
    g.add_argument("--prune-layers", type=_ints, default=None,
                   help="comma list of prune layers (default: where the skip schedule prunes)")
    g.add_argument("--alpha", type=float, default=d.alpha, help="ES-dLLM importance weight baked into the skip graph")
    g.add_argument("--saliency-tau", type=float, default=d.saliency_tau,
                   help="DyLLM saliency threshold baked into the saliency graph")
    g.add_argument("--plugins", default=d.plugins, choices=PLUGIN_MODES,
                   help="TensorRT: AOT or JIT plugin kernels, or none (expand the local functions)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
    return p


def build_config(ns: argparse.Namespace) -> BuildConfig:
    names = BuildConfig.__dataclass_fields__
    return BuildConfig(**{k: v for k, v in vars(ns).items() if k in names})


def _run(ns: argparse.Namespace) -> int:
    from .export_onnx import build_artifacts
    cfg = build_config(ns)
    if ns.model is None:
        from ..runtime.pipeline import default_model
        model_dir = default_model()
    else:
        model_dir = Path(ns.model)
    try:
        spec = build_artifacts(model_dir, ns.out, cfg, progress=not ns.quiet and sys.stderr.isatty())  # no bars in logs
    except ImportError as e:  # a backend's package is missing: say which, no traceback
        print(f"esdllm build: {e}", file=sys.stderr)
        return 2
    files = [v["file"] for v in spec.variants.values()] + list(spec.engines.values())
    size = (spec.root / spec.weights).stat().st_size / 2**20 if spec.weights else 0.0
    print(f"esdllm build: wrote {spec.root}: {', '.join(files)}, {spec.weights} ({size:.1f} MiB), engine.json "
          f"[{cfg.backend}, {cfg.dtype}, batch <= {cfg.max_batch}, prompt <= {cfg.max_prompt}, "
          f"gen <= {cfg.gen_length}, prune layers {list(spec.prune_layers)}]")
    return 0
