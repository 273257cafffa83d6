"""Adapt a trained LLaDA checkpoint into a Dream one that computes (nearly) the same function.

    python scripts/adapt_dream.py --from models/llada-tiny --out DIR [--check 64]

Dream predicts token p from hidden state p - 1 (its logits are shifted by one); LLaDA predicts it
from hidden state p. Dream-7B itself was adapted from an autoregressive model's weights (Qwen2.5)
rather than trained from scratch; a tiny Dream trained from scratch sits on a loss plateau for
thousands of steps on the shifted form (README), so the embedded dream-tiny is grown from llada-tiny
the same way, then fine-tuned in Dream's own form with scripts/train_tiny.py --init-from DIR.

The surgery, all of it in Dream's architecture (qkv biases, its norm eps, its tokenizer):
- every LLaDA block is copied as is (zero qkv biases; n_kv_heads kept, so no GQA merging);
- one block is appended that moves each row's state one position back. Its queries and keys are
  constants (zero weights, bias only), chosen so that the RoPE score q_m . k_n peaks sharply at
  n = m + 1 whatever the content; its values are the normalised residual (identity wv) and wo
  scales them by GAIN, so row p - 1 leaves the block as GAIN * norm(h_p) + h_{p-1}, whose final
  RMSNorm is norm(h_p) to within |h_{p-1}| / GAIN. Its FFN is zeroed.
- embeddings and head rows are mapped by token string (special tokens by role: BOS, EOS, mask,
  end of turn, turn start); Dream-only characters get the mean row.
--check N decodes N held-out problems per family with both models (vanilla, one token a step) and
prints the token agreement: the adapted model before any fine-tuning.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny import TrainConfig, model_args  # noqa: E402  (a sibling script)

from esdllm.runtime import task  # noqa: E402
from esdllm.runtime.model import Transformer, apply_rope, rope_cos_sin  # noqa: E402
from esdllm.runtime.tokenizer import DREAM_SPECIALS, LLADA_SPECIALS, build_tokenizer, load_tokenizer  # noqa: E402
from esdllm.runtime.weights import load_model, save_model  # noqa: E402

GAIN = 1000.0        # wo scale of the shift block: the residual it lands on is ~1/GAIN of the result
MARGIN = 40.0        # softmax logit gap between offset +1 and every other offset up to MAX_OFFSET
MAX_OFFSET = 4096    # the longest canvas the score shape is checked over
ROLE_OF = {"eos": "eos", "eot": "eot", "bos": "bos", "mask": "mask", "im_start": "header_start"}


def shift_biases(head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Constant (q, k) [head_dim] whose RoPE score q_m . k_n / sqrt(head_dim) peaks at n - m = 1.

    k puts weight on every frequency pair; q = R(1) k, so q_m . k_n = sum_j |k_j|^2 cos((n-m-1) w_j),
    maximal (|k|^2) exactly at n - m = 1. The scale makes every other offset at least MARGIN lower.
    """
    k = torch.ones(1, 1, 1, head_dim)
    cos, sin = rope_cos_sin(torch.ones(1, 1, dtype=torch.long), head_dim, theta)
    q = apply_rope(k, cos, sin, True)
    d = torch.arange(-MAX_OFFSET, MAX_OFFSET + 1)
    cd, sd = rope_cos_sin(d[None], head_dim, theta)
    scores = (q * apply_rope(k.expand(1, 1, len(d), head_dim), cd, sd, True)).sum(-1).flatten() / math.sqrt(head_dim)
    top = scores[d == 1].item()
    gap = (top - scores[d != 1]).min().item()
    if gap <= 0:
        raise ValueError(f"RoPE theta {theta} / head_dim {head_dim}: offset +1 is not the unique peak")
    s = math.sqrt(MARGIN / gap)  # scores scale with |q||k|
    return (q * s).flatten(), (k * s).flatten()


def vocab_map(src_dir: Path, dst_dir: Path) -> list[int | None]:
    """For each Dream token id: the LLaDA id of the same string (specials by role), or None."""
    src, dst = load_tokenizer(src_dir), load_tokenizer(dst_dir)
    sv, dv = src.get_vocab(), dst.get_vocab()
    by_string = {s: i for s, i in sv.items()}
    for role, s in DREAM_SPECIALS.items():
        by_string[s] = sv[LLADA_SPECIALS[ROLE_OF[role]]]
    out: list[int | None] = [None] * (max(dv.values()) + 1)
    for s, i in dv.items():
        out[i] = by_string.get(s)
    return out


def adapt(src_dir: str | Path, out: str | Path) -> Transformer:
    """Write the adapted Dream checkpoint (weights, tokenizer, config) into out; returns the model."""
    src_dir, out = Path(src_dir), Path(out)
    src = load_model(src_dir, dtype=torch.float32)
    a = src.args
    if a.family != "llada":
        raise ValueError(f"{src_dir} is a {a.family} checkpoint; adapt_dream needs a LLaDA one")
    ids = build_tokenizer("dream", out, alphabet=task.ALPHABET)
    cfg = TrainConfig(family="dream", out=str(out), dim=a.dim, n_layers=a.n_layers + 1, n_heads=a.n_heads,
                      n_kv_heads=a.n_kv_heads, intermediate=a.intermediate_size, rope_theta=a.rope_theta)
    args = model_args(cfg, ids)
    if args.vocab_size != a.vocab_size:
        raise ValueError(f"vocabularies differ in size ({a.vocab_size} vs {args.vocab_size})")
    model = Transformer(args)
    sd = model.state_dict()
    for k, v in src.state_dict().items():
        if k.startswith("layers.") or k == "norm.weight":
            sd[k] = v.clone()
    for k in sd:
        if k.endswith(("wq.bias", "wk.bias", "wv.bias")):
            sd[k] = torch.zeros_like(sd[k])
    # embeddings and head rows by token (a Dream-only character gets the mean of the LLaDA rows)
    rows = vocab_map(src_dir, out)
    for name in ("tok_embeddings.weight", "output.weight"):
        w = src.state_dict()[name]
        new = w.mean(0, keepdim=True).expand_as(w).clone()
        for i, j in enumerate(rows):
            if j is not None:
                new[i] = w[j]
        sd[name] = new
    # the shift block
    L, hd = a.n_layers, args.head_dim
    q, k = shift_biases(hd, args.rope_theta)
    p = f"layers.{L}."
    for name in ("wq", "wk", "wv"):
        sd[p + f"attention.{name}.weight"] = torch.zeros_like(sd[p + f"attention.{name}.weight"])
    sd[p + "attention.wq.bias"] = q.repeat(args.n_heads)
    sd[p + "attention.wk.bias"] = k.repeat(args.n_kv_heads)
    sd[p + "attention.wv.bias"] = torch.zeros(args.n_kv_heads * hd)
    group = args.n_heads // args.n_kv_heads
    wv = torch.zeros(args.n_kv_heads * hd, args.dim)
    wo = torch.zeros(args.dim, args.n_heads * hd)
    for h in range(args.n_heads):  # head h reads kv head h // group: one copy of each channel slice
        if h % group == 0:
            c = slice(h // group * hd, (h // group + 1) * hd)
            wv[c, c] = torch.eye(hd)
            wo[c, h * hd:(h + 1) * hd] = GAIN * torch.eye(hd)
    if args.n_kv_heads * hd != args.dim:
        raise ValueError("the shift block needs n_kv_heads * head_dim == dim to copy the whole state")
    sd[p + "attention.wv.weight"], sd[p + "attention.wo.weight"] = wv, wo
    sd[p + "attention_norm.weight"] = torch.ones(args.dim)
    sd[p + "feed_forward.w2.weight"] = torch.zeros_like(sd[p + "feed_forward.w2.weight"])
    model.load_state_dict(sd)
    model.eval()
    save_model(model, out)
    # train_info.json, as a training stage writes it: the fine-tunes that start here keep it as their
    # prior, so the Dream checkpoint's record reaches back through the LLaDA stages it grew from
    prior = src_dir / "train_info.json"
    info = {"adapted_from": str(src_dir), "shift_block": L, "gain": GAIN, "margin": MARGIN,
            "config": dataclasses.asdict(cfg), "init_from": json.loads(prior.read_text()) if prior.is_file() else None}
    (out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return model


def agreement(src_dir: str | Path, out: str | Path, n: int) -> dict[str, float]:
    """Token agreement and exact match of the adapted model against its source (vanilla decoding)."""
    from esdllm.runtime.config import DecodeConfig
    from esdllm.runtime.generate import generate
    from esdllm.runtime.tokenizer import decode_completion, encode_prompt, stop_ids

    res = {}
    models = {d: (load_model(d, dtype=torch.float32), load_tokenizer(d)) for d in (src_dir, out)}
    for fam in ("maps", "perm", "chain"):
        probs = task.problems(1234, n, split="heldout", family=fam)
        cfg = DecodeConfig(gen_length=task.NATURAL_GEN[fam], method="vanilla", block_length=32)
        texts = {}
        for d, (m, tok) in models.items():
            o = generate(m, [encode_prompt(tok, p.prompt, chat=False) for p in probs], cfg, stop_ids=stop_ids(tok, m.args))
            texts[d] = [decode_completion(tok, r, stop_ids(tok, m.args))[0] for r in o.tokens.tolist()]
        a, b = texts[src_dir], texts[out]
        res[fam] = {"same_text": sum(x == y for x, y in zip(a, b)) / n,
                    "exact_llada": sum(task.check(t, p) for t, p in zip(a, probs)) / n,
                    "exact_dream": sum(task.check(t, p) for t, p in zip(b, probs)) / n}
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="src", required=True, help="LLaDA checkpoint directory")
    p.add_argument("--out", required=True, help="Dream checkpoint directory to write")
    p.add_argument("--check", type=int, default=0, metavar="N", help="compare N held-out problems per family")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = adapt(a.src, a.out)
    line = {"out": a.out, "params": sum(x.numel() for x in model.parameters()), "layers": model.args.n_layers}
    if a.check:
        line["check"] = agreement(a.src, a.out, a.check)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
