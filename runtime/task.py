"""The synthetic task the embedded default models are trained and evaluated on: four families of
letter-string problems with exact checkers, reported separately.

    maps    "rot13: qwertyuiopasdfgh ->"  -> "djreglhvbcnfqstu"   one fixed answer per prompt: rot13,
            atbash (a<->z), upper, double ("abc" -> "aabbcc"); 16-32 answer letters
    perm    "perm: qwert ->"              -> "rtewq"              ANY permutation of the 4-12 distinct
            letters: every answer letter is uncertain on its own, jointly constrained (no repeats)
    chain   "chain: qwert ->"             -> "rE tG eR wJ qD"     a permutation written as pairs, each
            letter followed by its rot13 in upper case: every pair's second letter is unknowable
            until its first is decided
    long    the four maps on 4 to 240 letters, answered in a 512-token canvas: answers of a few to a
            few hundred tokens, with most of a long canvas EOS after an early answer

The families are chosen so decoding methods can be told apart. In `maps` every answer token is a
fixed function of one prompt letter, so a confident model may commit a whole block at once. In `perm`
and `chain` several answers are right and mixing two of them is wrong ("New York" + "San Francisco"
-> "New Francisco"): committing two uncertain tokens in one step, each from its own marginal, can
repeat a letter or break the rot13 link, while one token a step (or a confidence threshold, which
commits uncertain tokens one at a time) conditions each choice on the last. `long` is where suffix
pruning and early exit pay: a short answer leaves hundreds of EOS positions behind it.

`chain` once wrote the whole permutation, a space, then its rot13 ("rtewq degjd"). At 0.9M
parameters that form stayed at 0.06 held-out after 6,000 steps: letter i of the second half must
find letter i of the first half n + 1 places back, which needs the count n. Interleaving keeps the
chained dependency (a later token follows from an earlier, undecided one) at a distance of one.
Its second letters were then lower case ("re tg er"), and rot13 is its own inverse: the pairs of
partner letters, "re" and "er", hold the same two letters, so which prompt letters an answer has
used cannot be read from the letters it holds. A 0.9M model got 32 of 33 held-out prompts without a
partner pair right and 18 of 31 with one (most prompts of 8 letters have one), nearly always by
writing one of the two pairs twice. In upper case the used letters are exactly the lower-case ones.

Every prompt ends in " ->": a bidirectional model sees answer letters and prompt letters alike, so
without a terminator it could not tell where the prompt stops. A problem belongs to the held-out
split iff a hash of its prompt says so, so training (which rejects held-out prompts) and evaluation
(which draws only them) never overlap. Generation is a pure function of (seed, split, family, index).
"""
from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass

MAP_OPS = ("rot13", "atbash", "upper", "double")
FAMILIES = ("maps", "perm", "chain", "long")
SHORT_FAMILIES = ("maps", "perm", "chain")  # answers that fit a 64-token canvas
FAMILY_OPS = {"maps": MAP_OPS, "perm": ("perm",), "chain": ("chain",), "long": MAP_OPS}
OPS = MAP_OPS + ("perm", "chain")
# the generation length each family is evaluated at (its answers fit with room for EOS)
NATURAL_GEN = {"maps": 64, "perm": 64, "chain": 64, "long": 512}
LETTERS = "abcdefghijklmnopqrstuvwxyz"
# Every character a prompt or an answer can hold: the tokenizer's alphabet.
ALPHABET = LETTERS + LETTERS.upper() + "0123456789" + " :->"
HELD_OUT_MOD = 16  # one prompt in 16 is held out
LENGTHS = {  # letters per prompt (min, max)
    "maps": (16, 32), "perm": (4, 12), "chain": (4, 8), "long": (4, 240)}


@dataclass(frozen=True)
class Problem:
    """One task instance: `prompt` is what the model sees; `answer` is one correct completion (for
    perm and chain one of many: `check` accepts every valid one)."""

    op: str
    prompt: str
    answer: str
    family: str = "maps"


def _map(op: str, s: str) -> str:
    if op == "rot13":
        return "".join(LETTERS[(LETTERS.index(c) + 13) % 26] for c in s)
    if op == "atbash":
        return "".join(LETTERS[25 - LETTERS.index(c)] for c in s)
    if op == "upper":
        return s.upper()
    if op == "double":
        return "".join(c + c for c in s)
    raise ValueError(f"unknown task op {op!r}; expected one of {OPS}")


def _length(rng: random.Random, family: str, op: str) -> int:
    lo, hi = LENGTHS[family]
    if family == "long":  # log-uniform: as many short answers as long ones
        n = int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1))))
        return max(lo, min(hi, n)) // (2 if op == "double" else 1) or 1
    if op == "double":
        lo, hi = lo // 2, hi // 2
    return rng.randint(lo, hi)


def _pair(c: str) -> str:
    """One chain pair: "r" -> "rE"."""
    return c + _map("rot13", c).upper()


def _pairs(p: str) -> str:
    """chain's answer for the permutation p: "rtw" -> "rE tG wJ"."""
    return " ".join(_pair(c) for c in p)


def make_problem(rng: random.Random, op: str | None = None, family: str = "maps") -> Problem:
    """One problem drawn with `rng` (any split); `op` None picks one of the family's ops uniformly."""
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}; expected one of {FAMILIES}")
    op = op or rng.choice(FAMILY_OPS[family])
    if op not in FAMILY_OPS[family]:
        raise ValueError(f"unknown task op {op!r} for family {family!r}; expected one of {FAMILY_OPS[family]}")
    n = _length(rng, family, op)
    if op in ("perm", "chain"):
        s = "".join(rng.sample(LETTERS, n))
        p = "".join(rng.sample(s, n))  # one valid answer, drawn at random: training sees many
        answer = p if op == "perm" else _pairs(p)
    else:
        s = "".join(rng.choice(LETTERS) for _ in range(n))
        answer = _map(op, s)
    return Problem(op, f"{op}: {s} ->", answer, family)


def is_held_out(prompt: str) -> bool:
    return zlib.crc32(prompt.encode()) % HELD_OUT_MOD == 0


def problems(seed: int, n: int, split: str = "train", start: int = 0,
             family: str | tuple[str, ...] | None = None) -> list[Problem]:
    """Problems start..start+n-1 of the stream for (seed, split, family); problem i depends only on those.

    family: one name, a tuple of names (problem i is of family[i % len]) or None (every family in
    turn). Inside a family the ops cycle too, so every prefix of a stream is balanced. split "train"
    never yields a held-out prompt; split "heldout" yields only held-out prompts.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'heldout'")
    fams = FAMILIES if family is None else (family,) if isinstance(family, str) else tuple(family)
    bad = [f for f in fams if f not in FAMILIES]
    if bad or not fams:
        raise ValueError(f"unknown task family {bad[0] if bad else '(none)'!r}; expected one of {FAMILIES}")
    want = split == "heldout"
    out = []
    for i in range(start, start + n):
        fam = fams[i % len(fams)]
        ops = FAMILY_OPS[fam]
        op = ops[(i // len(fams)) % len(ops)]
        # str seeds are stable across runs; the maps family keeps its stream from before families
        key = f"esdllm-task:{seed}:{split}:{i}" if fams == ("maps",) else f"esdllm-task:{seed}:{split}:{fam}:{i}"
        rng = random.Random(key)
        while True:
            p = make_problem(rng, op, fam)
            if is_held_out(p.prompt) == want:
                out.append(p)
                break
    return out


def normalize(text: str) -> str:
    """Completion text as compared: surrounding whitespace dropped, inner runs collapsed."""
    return " ".join(text.split())


def _parse(prompt: str) -> tuple[str, str] | None:
    """(op, letters) of a prompt in the task's format ("op: letters ->"), else None."""
    op, sep, rest = prompt.strip().partition(": ")
    s = rest[:-3] if rest.endswith(" ->") else ""
    if not sep or op not in OPS or not s or any(c not in LETTERS for c in s):
        return None
    if op in ("perm", "chain") and len(set(s)) != len(s):
        return None
    return op, s


def _valid(op: str, s: str, text: str) -> bool:
    if op in MAP_OPS:
        return text == _map(op, s)
    if op == "perm":
        return sorted(text) == sorted(s)
    pairs = text.split(" ")
    return (all(len(q) == 2 and q[0] in LETTERS and q == _pair(q[0]) for q in pairs)
            and sorted(q[0] for q in pairs) == sorted(s))


def grade(prompt: str, completion: str) -> bool | None:
    """Whether `completion` answers a task-format prompt correctly (None: not a task prompt)."""
    parsed = _parse(prompt)
    return None if parsed is None else _valid(*parsed, normalize(completion))


def check(completion: str, problem: Problem) -> bool:
    """Whether the completion is a correct answer to the problem (whitespace-normalised; for perm and
    chain any valid answer counts, checked for validity rather than against one string)."""
    return bool(grade(problem.prompt, completion))


def solve(prompt: str) -> str | None:
    """One correct answer to a task-format prompt (perm / chain: the letters in prompt order), or None."""
    parsed = _parse(prompt)
    if parsed is None:
        return None
    op, s = parsed
    return s if op == "perm" else _pairs(s) if op == "chain" else _map(op, s)


def verify(problem: Problem) -> bool:
    """Recheck a problem from its prompt alone: the checker's ground truth is not trusted blindly."""
    parsed = _parse(problem.prompt)
    return (parsed is not None and parsed[0] == problem.op and problem.op in FAMILY_OPS[problem.family]
            and _valid(*parsed, problem.answer))
