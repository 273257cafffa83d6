"""Pipeline: a checkpoint's tokenizer + an executor + the diffusion loop, text in, text out.

This is the runtime's public face, used by the CLI, the Triton model, bench and eval.
"""
from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import DecodeConfig, ModelArgs, Stats
from .generate import BlockEvent, generate

# the embedded default checkpoint, shipped as package data (models/ in a source checkout)
DEFAULT_MODEL = Path(str(importlib.resources.files("esdllm") / "models" / "llada-tiny"))


def default_model() -> Path:
    """The embedded default checkpoint shipped in models/ (trained by scripts/train_tiny.py)."""
    if not (DEFAULT_MODEL / "config.json").exists():
        raise FileNotFoundError(f"the embedded default model is missing at {DEFAULT_MODEL}; "
                                "pass --model DIR or run scripts/train_tiny.py")
    return DEFAULT_MODEL


@dataclass
class Completion:
    text: str
    token_ids: list[int]     # generated ids up to (excluding) the first stop token

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class GenerateResult:
    completions: list[Completion]
    stats: Stats


@dataclass
class StreamEvent:
    """Texts decided so far per row: each row's tokens before its first mask, which never change
    again (after every block, and with stream_steps also when a step lengthens them)."""
    block: int
    n_blocks: int
    texts: list[str]
    token_ids: list[list[int]]
    done: bool
    block_done: bool = True


class Pipeline:
    def __init__(self, executor, tokenizer, model_dir: Path):
        from .tokenizer import stop_ids
        self.executor, self.tokenizer, self.model_dir = executor, tokenizer, Path(model_dir)
        self.stop = set(stop_ids(tokenizer, executor.args))

    @property
    def args(self) -> ModelArgs:
        return self.executor.args

    @classmethod
    def load(cls, model_dir: str | Path | None = None, *, dtype=None, device: str = "cpu",
             executor: str = "torch", engine_dir: str | Path | None = None,
             compile: str | None = None, ops: str | None = None) -> "Pipeline":
        """compile: None (eager), "compile" or "cuda-graphs" (runtime/compiled.py); ops: "reference" or
        "custom" (plugins/backends.py; default the device's). Both for the torch executor."""
        from .artifacts import EngineSpec
        from .compiled import compiled
        from .executors import make_executor
        from .tokenizer import load_tokenizer
        spec = EngineSpec.read(engine_dir) if engine_dir is not None else None  # read once per load
        if model_dir is None and spec is not None and spec.hf_dir and (spec.root / spec.hf_dir).is_dir():
            model_dir = spec.root / spec.hf_dir  # artifacts carry the checkpoint's config + tokenizer
        model_dir = Path(model_dir) if model_dir else default_model()
        ex = compiled(make_executor(executor, model_dir=model_dir, dtype=dtype, device=device, spec=spec,
                                    ops=ops), compile)
        return cls(ex, load_tokenizer(model_dir), model_dir)

    def encode(self, text: str, chat: bool = False, gen_length: int = 0) -> list[int]:
        from .tokenizer import encode_prompt
        return encode_prompt(self.tokenizer, text, chat, self.args.max_seq_len - gen_length)

    def decode(self, ids: list[int]) -> tuple[str, list[int]]:
        from .tokenizer import decode_completion
        return decode_completion(self.tokenizer, ids, self.stop)

    def generate(self, prompts: list[str] | list[list[int]], cfg: DecodeConfig, *, chat: bool = False,
                 on_block: Callable[[StreamEvent], None] | None = None, stream_steps: bool = False,
                 progress: bool = False) -> GenerateResult:
        """on_block / stream_steps: see generate.generate; events carry decoded texts here."""
        ids = [p if isinstance(p, list) else self.encode(p, chat, cfg.gen_length) for p in prompts]
        hook = None
        if on_block is not None:
            mask = self.args.mask_id

            def hook(ev: BlockEvent):
                rows = [r[:r.index(mask)] if mask in r else r for r in ev.canvas.tolist()]
                dec = [self.decode(r) for r in rows]
                return on_block(StreamEvent(ev.block, ev.n_blocks, [d[0] for d in dec], [d[1] for d in dec],
                                            ev.done, ev.block_done))
        out = generate(self.executor, ids, cfg, stop_ids=self.stop, on_block=hook, stream_steps=stream_steps,
                       progress=progress)
        comps = [Completion(*self.decode(r)) for r in out.tokens.tolist()]
        return GenerateResult(comps, out.stats)
