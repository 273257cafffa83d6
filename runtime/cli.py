"""`esdllm` command line: the only place with argparse. Each flag maps 1:1 onto a dataclass field.

Subcommands: generate, lm-eval, bench (here); eval, build, serve, client, bench-serve, soak (registered by their
modules, imported only when the command line is built so a missing optional extra names itself).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from .flags import add_decode_args, add_model_args, decode_config

# subcommand modules with a `register(subparsers)` function
_MODULES = ("esdllm.runtime.bench", "esdllm.runtime.evaluate", "esdllm.build.cli",
            "esdllm.runtime.serve", "esdllm.runtime.client", "esdllm.runtime.soak")


def _generate(ns: argparse.Namespace) -> int:
    from .pipeline import Pipeline
    cfg = decode_config(ns)
    pipe = Pipeline.load(ns.model, dtype=ns.dtype, device=ns.device, executor=ns.executor, engine_dir=ns.engine,
                         compile=ns.compile, ops=ns.ops)
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


def _lm_eval(args: list[str]) -> int:
    try:
        from . import lmeval  # registers the "esdllm" model with lm_eval
    except ImportError as e:
        print(f"esdllm lm-eval: needs lm-eval (pip install 'esdllm[eval]'): {e}", file=sys.stderr)
        return 2
    return lmeval.main(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="esdllm", description="Serve diffusion LLMs fast (ES-dLLM, Fast-dLLM).")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="decode text from a prompt", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog='example: esdllm generate --prompt "rot13: abcdef ->" --method es-dllm --threshold 0.9')
    add_model_args(g)
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    g.add_argument("--json", action="store_true", help="print one JSON line with text, token ids and stats")
    add_decode_args(g)
    g.set_defaults(func=_generate)
    h = sub.add_parser("lm-eval", help="lm-evaluation-harness with the esdllm model (lm_eval's own arguments)",
                       epilog="example: esdllm lm-eval --model esdllm --model_args method=es-dllm,threshold=0.9 "
                              "--tasks gsm8k --batch_size 8", add_help=False)
    h.add_argument("args", nargs=argparse.REMAINDER, help="passed to lm_eval (try --help)")
    h.set_defaults(func=lambda ns: _lm_eval(ns.args))  # main() hands lm_eval its arguments untouched
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
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm-eval"]:  # lm_eval parses its own arguments (--help included)
        return _lm_eval(argv[1:])
    ns = build_parser().parse_args(argv)
    try:
        return int(ns.func(ns) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"esdllm {ns.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
