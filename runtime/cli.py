"""`esdllm` command line: the only place with argparse. Each flag maps 1:1 onto a dataclass field.

Subcommands: generate, bench (here); eval, build, serve, client, bench-serve (registered by their
modules, imported only when the command line is built so a missing optional extra names itself).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from .config import DecodeConfig

# subcommand modules with a `register(subparsers)` function
_MODULES = ("esdllm.runtime.bench", "esdllm.runtime.evaluate", "esdllm.build.cli",
            "esdllm.runtime.serve", "esdllm.runtime.client")


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(v) for v in s.split(","))


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF checkpoint dir (default: the embedded models/llada-tiny)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--executor", default="torch", choices=["torch", "onnxruntime", "tensorrt"])
    p.add_argument("--engine", default=None, help="artifacts dir from `esdllm build` (onnxruntime / tensorrt)")


def add_decode_args(p: argparse.ArgumentParser, **defaults) -> None:
    d = DecodeConfig()
    g = p.add_argument_group("decoding")
    g.add_argument("--method", default=d.method, choices=["vanilla", "fast-dllm", "es-dllm"])
    g.add_argument("--gen-length", type=int, default=d.gen_length)
    g.add_argument("--block-length", type=int, default=d.block_length)
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: gen length, one token a step)")
    g.add_argument("--sampler", default=None, choices=["llada", "dream"], help="default: the model family's")
    g.add_argument("--temperature", type=float, default=d.temperature)
    g.add_argument("--remasking", default=d.remasking, choices=["low_confidence", "random"])
    g.add_argument("--cfg-scale", type=float, default=d.cfg_scale)
    g.add_argument("--alg", default=d.alg, choices=["origin", "maskgit_plus", "topk_margin", "entropy"])
    g.add_argument("--alg-temp", type=float, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--eps", type=float, default=d.eps)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--threshold", type=float, default=None, help="parallel decoding: commit every token with confidence >= T")
    g.add_argument("--factor", type=float, default=None, help="parallel decoding: Fast-dLLM factor rule")
    g.add_argument("--cache", default=d.cache, choices=["prefix", "dual", "none"])
    g.add_argument("--cache-refresh", type=int, default=d.cache_refresh)
    g.add_argument("--skip-proportions", type=_floats, default=d.skip_proportions)
    g.add_argument("--skip-positions", type=_floats, default=d.skip_positions)
    g.add_argument("--alpha", type=float, default=d.alpha)
    g.add_argument("--prompt-update-freq", type=int, default=d.prompt_update_freq)
    g.add_argument("--block-update-freq", type=int, default=d.block_update_freq)
    g.add_argument("--no-delay-eos", dest="delay_eos", action="store_false")
    g.add_argument("--stop-at-eos", action="store_true")
    p.set_defaults(**defaults)


def decode_config(ns: argparse.Namespace) -> DecodeConfig:
    names = DecodeConfig.__dataclass_fields__
    return DecodeConfig(**{k: v for k, v in vars(ns).items() if k in names})


def _generate(ns: argparse.Namespace) -> int:
    from .pipeline import Pipeline
    cfg = decode_config(ns)
    pipe = Pipeline.load(ns.model, dtype=ns.dtype, device=ns.device, executor=ns.executor, engine_dir=ns.engine)
    res = pipe.generate(ns.prompt, cfg, chat=ns.chat, progress=sys.stderr.isatty() and not ns.json)
    st = res.stats.to_dict()
    if ns.json:
        print(json.dumps({"texts": [c.text for c in res.completions],
                          "token_ids": [c.token_ids for c in res.completions],
                          "text": res.completions[0].text, "stats": st, "config": cfg.to_dict()}))
        return 0
    for i, c in enumerate(res.completions):
        head = f"[{i}] " if len(res.completions) > 1 else ""
        print(f"{head}{c.text}")
    print(f"-- {cfg.method}: {st['generated_tokens']} tokens, NFE {st['nfe']}, "
          f"{st['tokens_per_forward']} tokens/forward, {st['tokens_per_second']} tokens/s", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="esdllm", description="Serve diffusion LLMs fast (ES-dLLM, Fast-dLLM).")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="decode text from a prompt")
    add_model_args(g)
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    g.add_argument("--json", action="store_true", help="print one JSON line with text, token ids and stats")
    add_decode_args(g)
    g.set_defaults(func=_generate)
    for mod in _MODULES:
        try:
            importlib.import_module(mod).register(sub)
        except ImportError as e:
            if e.name and mod.startswith(e.name):  # the module itself is not there yet
                continue
            name = mod.rsplit(".", 1)[1]
            sub.add_parser(name, help=f"unavailable: {e}").set_defaults(func=_unavailable(name, e))
    return ap


def _unavailable(name, err):
    def run(ns):
        print(f"esdllm {name}: unavailable here: {err}", file=sys.stderr)
        return 2
    return run


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return int(ns.func(ns) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"esdllm {ns.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
