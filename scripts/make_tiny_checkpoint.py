"""Write a random-weight LLaDA or Dream checkpoint in the exact Hugging Face layout.

    python scripts/make_tiny_checkpoint.py --family dream --out /tmp/tiny-dream --shards 2

The directory holds config.json (the family's real keys), model.safetensors (or shards plus
model.safetensors.index.json) with the real tensor names, tokenizer.json and tokenizer_config.json;
esdllm.runtime.weights.load_model reads it exactly as it reads an 8B checkpoint.
"""
from __future__ import annotations

import argparse

from esdllm.runtime.weights import DTYPES, make_tiny_checkpoint


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", required=True, choices=("llada", "dream"))
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None, help="default: heads (llada), 2 (dream)")
    p.add_argument("--intermediate", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument("--shards", type=int, default=None, help="split the weights into this many files")
    a = p.parse_args(argv)
    out = make_tiny_checkpoint(a.family, a.out, layers=a.layers, hidden=a.hidden, heads=a.heads,
                               kv_heads=a.kv_heads, intermediate=a.intermediate, seed=a.seed,
                               dtype=a.dtype, shards=a.shards)
    print(f"wrote {a.family} checkpoint to {out}")


if __name__ == "__main__":
    main()
