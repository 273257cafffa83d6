"""Where committing one perm letter moves the prompt's hidden states (README, "Stale prompt rows").

For held-out perm problems: one full bidirectional forward over the prompt and an all-masked canvas,
then the same with the model's most confident answer letter committed. Per layer it prints how
often the prompt row that moved most is the row of the letter just used, and the median ratio of
that row's relative change to the other prompt letters'.

    python -m esdllm.scripts.probe_prompt_rows [--model DIR] [--n 32]
"""
from __future__ import annotations

import argparse

import torch

from esdllm.runtime import task
from esdllm.runtime.pipeline import Pipeline


def probe(pipe: Pipeline, n: int, gen: int = 64) -> tuple[list[tuple[int, int, float]], int]:
    """([(layer, hits, median ratio)], problems counted) over the first n held-out perm problems whose
    most confident letter is one of the prompt's."""
    model, a = pipe.executor.model, pipe.args
    hits, ratios, total = [0] * a.n_layers, [[] for _ in range(a.n_layers)], 0
    for p in task.problems(1234, n, split="heldout", family="perm"):
        ids = pipe.encode(p.prompt)
        letters = p.prompt.split(": ", 1)[1].rsplit(" ->", 1)[0]
        rows = [i for i, t in enumerate(ids) if pipe.tokenizer.decode([t]) in letters][-len(letters):]
        x = torch.tensor([ids + [a.mask_id] * gen])
        states: list[torch.Tensor] = []
        hooks = [l.register_forward_hook(lambda m, i, o: states.append(o[0, rows].clone())) for l in model.layers]
        try:
            probs = model(x)[0, len(ids):len(ids) + len(letters)].softmax(-1)
            conf, tok = probs.max(-1)
            j = int(conf.argmax())
            used = pipe.tokenizer.decode([int(tok[j])])
            x[0, len(ids) + j] = tok[j]
            model(x)
        finally:
            for h in hooks:
                h.remove()
        if used not in letters:
            continue
        total, k = total + 1, letters.index(used)
        for l in range(a.n_layers):
            before, after = states[l], states[a.n_layers + l]
            d = (after - before).norm(dim=-1) / before.norm(dim=-1)
            hits[l] += int(d.argmax()) == k
            ratios[l].append(float(d[k] / torch.cat([d[:k], d[k + 1:]]).mean()))
    return [(l, hits[l], sorted(r)[len(r) // 2]) for l, r in enumerate(ratios)], total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the embedded LLaDA)")
    ap.add_argument("--n", type=int, default=32, help="held-out perm problems")
    ns = ap.parse_args()
    torch.set_num_threads(1)
    with torch.inference_mode():
        table, total = probe(Pipeline.load(ns.model), ns.n)
    print(f"{total} perm problems; after each layer: how often the used letter's row moved most, "
          "and its median change over the other letters'")
    for l, h, r in table:
        print(f"layer {l}: {h}/{total}  {r:.1f}x")


if __name__ == "__main__":
    main()
