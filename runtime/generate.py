"""generate(): a batch of prompts decoded by the in-flight engine (runtime/engine.py), all submitted
at once. The one diffusion loop is the engine's step(): blocks -> steps -> policy.plan ->
executor.step -> policy.commit, per request.

Works over any executor with the Transformer.step interface (torch, onnxruntime, TensorRT) and any
policy in policies.py. Each request's row holds its own canvas from slot 0 (prompt, then its
generation; the rest are not keys), RoPE uses true positions, so a row's tokens are the ones it gets
alone (greedy, float32) whatever its batch mates (README "Batch invariance").
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .config import DecodeConfig, Stats
from .engine import Engine


@dataclass
class BlockEvent:
    """After a step that decided a block of some row (block_done) or, with stream_steps, after a step
    that grew a row's decided prefix (the tokens before its first mask, which never change again)."""
    block: int
    n_blocks: int
    canvas: Tensor        # [B, gen_length] generation regions so far (mask_id where undecided)
    done: bool            # the last event of this call
    block_done: bool = True


@dataclass
class GenerateOutput:
    tokens: Tensor        # [B, gen_length] generation region
    stats: Stats


@torch.inference_mode()
def generate(executor, prompts: list[list[int]], cfg: DecodeConfig, *, stop_ids: set[int] | None = None,
             on_block: Callable[[BlockEvent], None] | None = None, stream_steps: bool = False,
             progress: bool = False) -> GenerateOutput:
    """Decode `cfg.gen_length` tokens after each prompt. prompts: token id lists (any lengths).

    on_block(event) runs after each step that decided some row's block and, with stream_steps, also
    after every step that lengthens some row's decided prefix; if it returns row indices, those
    rows stop decoding (the other rows' tokens are unaffected). Events never change what is decoded.
    """
    args, dev = executor.args, executor.device
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    B, P, G = len(prompts), max(len(p) for p in prompts), cfg.gen_length
    if hasattr(executor, "check_request"):  # compiled executors name the bound a request breaks
        executor.check_request(B, P, G)
    if P + G > args.max_seq_len:
        raise ValueError(f"prompt ({P} tokens) + gen_length ({G}) = {P + G} exceeds the model's maximum "
                         f"sequence length {args.max_seq_len}")
    stop_ids = stop_ids if stop_ids is not None else {args.eos_id}
    eng = Engine(executor, max_batch=B, max_len=P + G, max_lanes=1, seed=cfg.seed if cfg.seed is not None else 0,
                 isolate_errors=False)
    handles = [eng.submit(p, cfg, stop_ids, stream_steps=stream_steps and on_block is not None) for p in prompts]
    starts = torch.tensor([len(p) for p in prompts], device=dev)
    cols = starts[:, None] + torch.arange(G, device=dev)
    bar, t0 = _bar(progress, cfg.n_steps), time.perf_counter()
    while eng.busy():
        events = eng.step()
        if bar is not None:
            bar.update(1)
        if on_block is None or not events:
            continue
        kinds = {k for _, k in events}
        if "block" not in kinds and "prefix" not in kinds:
            continue
        blocks = [eng.result(h).blk - 1 for h, k in events if k == "block"]
        canvas = _canvas(eng, handles, cols, args.mask_id)
        stop = on_block(BlockEvent(max(blocks) if blocks else min(eng.result(h).blk for h in handles),
                                   G // cfg.block_length, canvas, not eng.busy(), bool(blocks)))
        for i in stop or ():
            eng.cancel(handles[i])
    if bar is not None:
        bar.close()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    stats = eng.stats
    stats.seconds = time.perf_counter() - t0
    out = torch.tensor([eng.result(h).tokens for h in handles], dtype=torch.long, device=dev)
    stats.generated_tokens = int(sum(_until_stop(r, stop_ids) for r in out.tolist()))
    return GenerateOutput(out, stats)


def _canvas(eng: Engine, handles: list[int], cols: Tensor, mask_id: int) -> Tensor:
    """[B, G] generation regions now: finished requests' tokens, the rest read from their rows."""
    rows = []
    for i, h in enumerate(handles):
        r = eng.result(h)
        if r.tokens is not None:
            rows.append(torch.tensor(r.tokens, dtype=torch.long, device=cols.device))
        else:
            rows.append(r.lane.x[r.row].gather(0, cols[i]))
    return torch.stack(rows)


def _until_stop(row: list[int], stop_ids: set[int]) -> int:
    for i, t in enumerate(row):
        if t in stop_ids:
            return i
    return len(row)


def _bar(progress: bool, total: int):
    if not progress:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc="denoising", unit="step", leave=False)
