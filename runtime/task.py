"""The synthetic task the embedded default models are trained and evaluated on.

Four list transformations on strings of letters, each with one exact answer of 16 to 32
characters (the tiny models use a character-level tokenizer, so characters are tokens):

    rot13     "rot13: qwertyuiopasdfgh ->"     -> "djreglhvbcnfqstu"      (16-32 letters)
    atbash    "atbash: qwertyuiopasdfgh ->"    -> "jdvigbfrlkzhwuts"      (16-32 letters, a<->z, b<->y)
    upper     "upper: qwertyuiopasdfgh ->"     -> "QWERTYUIOPASDFGH"      (16-32 letters)
    double    "double: qwertyuio ->"           -> "qqwweerrttyyuuiioo"    (8-16 letters)

Every prompt ends in " ->": a bidirectional model sees answer letters and prompt letters alike,
so without a terminator it could not tell where the prompt stops once part of the answer is
decoded. (Reversal, sorting and a Caesar cipher with a key in the prompt were tried first: a
0.9M-parameter model needs several times the hour of 2-core CPU training this task is sized for
to get them exactly right; the ops above all align answer item k with prompt item k through a
fixed per-letter map, a circuit the tiny model forms within the budget.)

A problem belongs to the held-out split iff a hash of its prompt says so, so training (which
rejects held-out prompts) and evaluation (which draws only them) can never overlap, whatever
their seeds. Generation is a pure function of (seed, index), so it is reproducible everywhere.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

OPS = ("rot13", "atbash", "upper", "double")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
# Every character a prompt or an answer can hold: the tokenizer's alphabet.
ALPHABET = LETTERS + LETTERS.upper() + "0123456789" + " :->"
HELD_OUT_MOD = 16  # one prompt in 16 is held out


@dataclass(frozen=True)
class Problem:
    """One task instance: `prompt` is what the model sees, `answer` the one correct completion."""

    op: str
    prompt: str
    answer: str


def _letters(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _solve(op: str, s: str) -> str:
    if op == "rot13":
        return "".join(LETTERS[(LETTERS.index(c) + 13) % 26] for c in s)
    if op == "atbash":
        return "".join(LETTERS[25 - LETTERS.index(c)] for c in s)
    if op == "upper":
        return s.upper()
    if op == "double":
        return "".join(c + c for c in s)
    raise ValueError(f"unknown task op {op!r}; expected one of {OPS}")


def make_problem(rng: random.Random, op: str | None = None) -> Problem:
    """One problem drawn with `rng` (any split); `op` None picks one of OPS uniformly."""
    op = op or rng.choice(OPS)
    if op not in OPS:
        raise ValueError(f"unknown task op {op!r}; expected one of {OPS}")
    s = _letters(rng, 8, 16) if op == "double" else _letters(rng, 16, 32)
    return Problem(op, f"{op}: {s} ->", _solve(op, s))


def is_held_out(prompt: str) -> bool:
    return zlib.crc32(prompt.encode()) % HELD_OUT_MOD == 0


def problems(seed: int, n: int, split: str = "train", start: int = 0) -> list[Problem]:
    """Problems start..start+n-1 of the stream for (seed, split); problem i depends only on (seed, split, i).

    split "train" never yields a held-out prompt; split "heldout" yields only held-out prompts.
    Ops cycle in order (problem i has op OPS[i % 4]) so every prefix of a stream is balanced.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'heldout'")
    want = split == "heldout"
    out = []
    for i in range(start, start + n):
        rng = random.Random(f"esdllm-task:{seed}:{split}:{i}")  # str seeds are stable across runs
        while True:
            p = make_problem(rng, OPS[i % len(OPS)])
            if is_held_out(p.prompt) == want:
                out.append(p)
                break
    return out


def normalize(text: str) -> str:
    """Completion text as compared: surrounding whitespace dropped, inner runs collapsed."""
    return " ".join(text.split())


def check(completion: str, problem: Problem) -> bool:
    """Exact match of the completion against the problem's answer (whitespace-normalised)."""
    return normalize(completion) == normalize(problem.answer)


def solve(prompt: str) -> str | None:
    """The answer to a prompt in the task's format ("op: letters ->"), or None if it is not one."""
    op, sep, rest = prompt.strip().partition(": ")
    s = rest[:-3] if rest.endswith(" ->") else ""
    if not sep or op not in OPS or not s or any(c not in LETTERS for c in s):
        return None
    return _solve(op, s)


def verify(problem: Problem) -> bool:
    """Recompute the answer from the prompt alone: the checker's ground truth is not trusted blindly."""
    return problem.prompt.partition(": ")[0] == problem.op and solve(problem.prompt) == problem.answer
