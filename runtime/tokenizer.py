"""Tokenizers: load a checkpoint's own tokenizer files, encode prompts, cut completions, and build
small family-faithful tokenizers for tiny checkpoints.

load_tokenizer    tokenizer.json + tokenizer_config.json through `transformers` (no remote code)
encode_prompt     plain or chat-templated prompt -> ids, with length checks
stop_ids          EOS and end-of-turn ids of a model
decode_completion generated ids -> (text, ids before the first stop id)
build_tokenizer   byte-level BPE (or char-level) tokenizer with a family's special tokens and chat
                  template (research/models.md A.6, B.6); returns the ids config.json must carry
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# Token strings of each family, in the order the real vocabularies number them.
LLADA_SPECIALS = {"bos": "<|startoftext|>", "eos": "<|endoftext|>", "mask": "<|mdm_mask|>",
                  "header_start": "<|start_header_id|>", "header_end": "<|end_header_id|>",
                  "eot": "<|eot_id|>"}
DREAM_SPECIALS = {"eos": "<|endoftext|>", "im_start": "<|im_start|>", "eot": "<|im_end|>",
                  "bos": "<|beginoftext|>", "mask": "<|mask|>"}
FAMILY_SPECIALS = {"llada": LLADA_SPECIALS, "dream": DREAM_SPECIALS}

# LLaMA-3 style, no default system turn; content trimmed; BOS opens the conversation (A.6).
LLADA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen2.5 style with the default system turn; no BOS (B.6).
DREAM_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if not (message['role'] == 'system' and loop.first) %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_TEMPLATES = {"llada": LLADA_CHAT_TEMPLATE, "dream": DREAM_CHAT_TEMPLATE}
# Plain characters the templates emit: a char-level vocabulary must hold them.
_TEMPLATE_CHARS = {"llada": "userassistant\n", "dream": "systemuserassistant\nYou are a helpful assistant."}

_DEFAULT_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Diffusion language models denoise a canvas of "
    "masked tokens in parallel, one block at a time.",
    "Question: what is 12 + 30? Answer: 42. Question: what is 7 * 6? Answer: 42.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "User: hello! Assistant: Hi, how can I help you today?",
)


@dataclass(frozen=True)
class SpecialIds:
    """Special token ids of a built tokenizer (config.json must agree); n_tokens = ids in use."""

    bos_id: int
    eos_id: int
    pad_id: int
    mask_id: int
    eot_id: int
    n_tokens: int


def _check_family(family: str) -> dict:
    if family not in FAMILY_SPECIALS:
        raise ValueError(f"unknown model family {family!r}; expected one of {tuple(FAMILY_SPECIALS)}")
    return FAMILY_SPECIALS[family]


def special_ids_from_files(path: str | Path, family: str) -> dict[str, int]:
    """Ids of the family's special tokens found in `path`/tokenizer.json (no transformers import).

    Returns {role: id} for the roles of FAMILY_SPECIALS present; {} when the file is absent.
    """
    f = Path(path) / "tokenizer.json"
    if not f.is_file():
        return {}
    by_content = {t["content"]: t["id"] for t in json.loads(f.read_text(encoding="utf-8")).get("added_tokens", [])}
    return {role: by_content[s] for role, s in _check_family(family).items() if s in by_content}


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer from tokenizer.json + tokenizer_config.json (never remote code).

    trust_remote_code=False is explicit: real config.json files carry an `auto_map`, and without
    the flag AutoTokenizer asks on stdin. A tokenizer_config.json whose class is remote code
    (Dream's DreamTokenizer) loads as the generic fast tokenizer from tokenizer.json, which holds
    the same byte-level BPE.
    """
    path = Path(path)
    missing = [n for n in TOKENIZER_FILES if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"tokenizer files missing in {path}: {', '.join(missing)}")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    if "AutoTokenizer" in cfg.get("auto_map", {}):
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    with warnings.catch_warnings():
        # AutoTokenizer parses config.json only to look for a tokenizer class; Dream's (real)
        # "rope_scaling": null trips a transformers deprecation warning that is not ours to fix,
        # and model types it does not know (llada, Dream) make it log a spurious mismatch.
        warnings.filterwarnings("ignore", message=".*rope_scaling.*deprecated", category=FutureWarning)
        hf_logging.set_verbosity_error()
        try:
            return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        finally:
            hf_logging.set_verbosity(level)


_USER = "\x00esdllm-user-text-{}\x00"  # stands in for a message's content while the template renders


def _text_ids(tok, text: str) -> list[int]:
    """User text as text: special-token strings in it ("<|mdm_mask|>", "<|endoftext|>", chat markers)
    are split into ordinary tokens, never parsed as control tokens."""
    return list(tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _n_added(tok) -> int:
    """How many ids the post-processor adds to any text (LLaDA's BOS: 1, Dream: 0)."""
    n = getattr(tok, "_esdllm_n_added", None)
    if n is None:
        n = len(tok("", split_special_tokens=True)["input_ids"])
        tok._esdllm_n_added = n
    return n


def encode_prompt(tok, text, chat: bool, max_len: int | None = None) -> list[int]:
    """Prompt ids. text: a string, or (chat only) a list of {"role", "content"} messages.

    chat=True renders the checkpoint's chat template with the generation prompt; its markers are
    control tokens, the messages' contents are encoded as text (LLaDA's template already holds BOS).
    chat=False encodes the text as text, with the special tokens the tokenizer's post-processor adds
    (LLaDA prepends BOS, Dream adds nothing). Text of which the tokenizer knows no character is an
    empty prompt.
    """
    if isinstance(text, str):
        if not text.strip():
            raise ValueError("empty prompt")
        messages = [{"role": "user", "content": text}]
    else:
        messages = list(text)
        if not chat:
            raise ValueError("a list of messages needs chat=True")
        if not messages or not all(str(m.get("content", "")).strip() for m in messages):
            raise ValueError("empty prompt: no messages, or a message with empty content")
    none_known = ValueError("empty prompt: the tokenizer knows none of its characters")
    if chat:
        user = [_text_ids(tok, str(m["content"])) for m in messages]
        if not any(user):
            raise none_known
        if not getattr(tok, "chat_template", None):
            raise ValueError("this tokenizer has no chat template; encode with chat=False")
        marked = [{**m, "content": _USER.format(i)} for i, m in enumerate(messages)]
        rendered = tok.apply_chat_template(marked, add_generation_prompt=True, tokenize=False)
        ids = []
        for i, part in enumerate(re.split("\x00esdllm-user-text-(\\d+)\x00", rendered)):
            if i % 2:
                ids += user[int(part)]
            elif part:
                ids += tok(part, add_special_tokens=False)["input_ids"]
    else:
        ids = tok(text, split_special_tokens=True)["input_ids"]  # the post-processor's BOS, the text as text
        if len(ids) <= _n_added(tok):  # only what the post-processor adds: one pass, not a second
            raise none_known
    if max_len is not None and len(ids) > max_len:
        raise ValueError(f"prompt is {len(ids)} tokens, longer than the limit of {max_len}")
    return list(ids)


def max_token_bytes(tok) -> int:
    """The longest ordinary token's text in UTF-8 bytes: a prompt of more than max_tokens times this
    many bytes cannot fit max_tokens, so it can be refused before tokenizing."""
    special = set(tok.all_special_tokens) | {t.content for t in getattr(tok, "added_tokens_decoder", {}).values()
                                              if getattr(t, "special", False)}
    return max((len(t.encode("utf-8")) for t in tok.get_vocab() if t not in special), default=1)


def stop_ids(tok, args) -> set[int]:
    """EOS, plus the end-of-turn token (LLaDA <|eot_id|>, Dream <|im_end|>) where the model has one."""
    out = {args.eos_id}
    if args.eot_id is not None:
        out.add(args.eot_id)
    if tok is not None and tok.eos_token_id is not None:
        out.add(tok.eos_token_id)
    return out


def decode_completion(tok, ids, stop: set[int]) -> tuple[str, list[int]]:
    """Cut generated ids before the first stop id; decode without special tokens."""
    ids = [int(i) for i in ids]
    cut = next((i for i, t in enumerate(ids) if t in stop), len(ids))
    kept = ids[:cut]
    return tok.decode(kept, skip_special_tokens=True), kept


def build_tokenizer(family: str, out_dir: str | Path, corpus: Iterable[str] | None = None,
                    vocab_size: int = 512, alphabet: str | None = None) -> SpecialIds:
    """Write tokenizer.json + tokenizer_config.json for a small tokenizer of `family` into out_dir.

    Default: byte-level BPE trained on `corpus` (a built-in snippet when None) up to `vocab_size`
    ordinary tokens. With `alphabet`: one token per character (no merges), for synthetic tasks;
    the template's own characters are added, and characters outside the vocabulary are dropped
    by the tokenizer. The family's special tokens follow the ordinary ones, in real-vocab order.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = _check_family(family)
    if alphabet is not None:
        chars = sorted(set(alphabet) | set(_TEMPLATE_CHARS[family]))
        tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
        tok.decoder = decoders.Fuse()  # tokens are characters: join them back verbatim
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(list(corpus) if corpus is not None else _DEFAULT_CORPUS, trainer=trainer)
    tok.add_special_tokens(list(specials.values()))
    ids = {role: tok.token_to_id(s) for role, s in specials.items()}
    if family == "llada":
        # LLaDA's tokenizer prepends BOS to plain encodes (add_bos_token); Dream's adds nothing.
        bos = specials["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ids["bos"])])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": specials["bos"],
        "eos_token": specials["eos"],
        "pad_token": specials["eos"],
        "chat_template": CHAT_TEMPLATES[family],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "added_tokens_decoder": {str(ids[r]): {"content": s, "special": True, "lstrip": False,
                                               "rstrip": False, "normalized": False, "single_word": False}
                                 for r, s in specials.items()},
    }
    if family == "dream":
        cfg["mask_token"] = specials["mask"]  # Dream registers it; LLaDA's <|mdm_mask|> is unregistered
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return SpecialIds(bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["eos"], mask_id=ids["mask"],
                      eot_id=ids["eot"], n_tokens=tok.get_vocab_size(with_added_tokens=True))
