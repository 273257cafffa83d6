"""The one diffusion loop: blocks -> steps -> policy.plan -> executor.step -> policy.commit.

Works over any executor with the Transformer.step interface (torch, onnxruntime, TensorRT) and
any policy in policies.py. Batches mix prompt lengths by left padding: the generation region
starts at the same canvas position for every row, RoPE uses true positions, and pads are masked
keys, so a row's tokens do not depend on its batch mates (greedy, float32).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .cache import StepContext
from .config import DecodeConfig, Stats
from .policies import make_policy


@dataclass
class BlockEvent:
    """After a block (block_done) or, with stream_steps, after a step that grew a row's decided prefix."""
    block: int
    n_blocks: int
    canvas: Tensor        # [B, gen_length] generation region so far (mask_id where undecided)
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

    on_block(event) runs after each block and, with stream_steps, also after every step that
    lengthens some row's decided prefix (the tokens before its first mask, which never change
    again) without finishing the block; if it returns row indices, those rows stop decoding
    (their slots go to the trash row; the other rows' tokens are unaffected). Events never change
    what is decoded.
    """
    args, dev = executor.args, executor.device
    if getattr(executor, "static_shapes", False) and not cfg.static_shapes:
        cfg = cfg.replace(static_shapes=True)  # a compiled step needs shapes decided on the host
    x, P = _canvas(executor, prompts, cfg)
    B, L, bl = x.shape[0], x.shape[1], cfg.block_length
    n_blocks = cfg.gen_length // bl
    stop_ids = stop_ids if stop_ids is not None else {args.eos_id}
    gen = torch.Generator(device=dev).manual_seed(cfg.seed if cfg.seed is not None else 0)
    policy = make_policy(cfg, args, L, trash=L, gen=gen)
    cache = executor.new_cache(B * (2 if cfg.cfg_scale > 0 else 1), L, policy.hidden_layers,
                               **({"saliency": True} if policy.saliency else {}))
    cache.set_layout(_pads(prompts, P, dev).repeat(2 if cfg.cfg_scale > 0 else 1))
    stats, t0, done = Stats(), time.perf_counter(), torch.zeros(B, dtype=torch.bool, device=dev)
    events = _Events(on_block, stream_steps, x, P, n_blocks, done, args.mask_id)
    bar, step_cnt, spb = _bar(progress, cfg.n_steps), 0, policy.steps
    for blk in range(n_blocks):
        s = torch.full((B,), P + blk * bl, dtype=torch.long, device=dev)
        c = StepContext(x, s, [P + blk * bl] * B, bl, torch.zeros_like(s), None, ~done, P)
        policy.begin_block(c, ~done)
        for step in itertools.count():
            active = (x.gather(1, c.cols) == args.mask_id).any(1) & ~done
            if not bool(active.any()):
                break
            if step > spb + bl:  # past its schedule every step commits a token: this cannot happen
                raise RuntimeError(f"block {blk} is still undecided after {step} steps (schedule {spb})")
            c = StepContext(x, s, c.s_host, bl, torch.full_like(s, step), policy.phase(step, step_cnt), active, P)
            idx, plan = policy.plan(c)
            logits, pred = _forward(executor, cfg, x, P, idx, cache, plan, stats)
            policy.commit(c, logits, pred)
            step_cnt, stats.steps = step_cnt + 1, stats.steps + 1
            if bar is not None:
                bar.update(1)
            events.step(blk, (x.gather(1, c.cols) == args.mask_id).any(1) & ~done)
        step_cnt = (blk + 1) * spb  # refresh periods stay aligned to blocks when a block ends early (§1.4)
        # a finished block holding EOS ends its row (Streaming-dLLM; only where EOS stops a row: random-
        # weight benchmarks pass no stop ids and count every token, so they must decode every token)
        if cfg.resolved("early_exit") and args.eos_id in stop_ids:
            newly = (x[:, P + blk * bl:P + (blk + 1) * bl] == args.eos_id).any(1) & ~done
            x[newly, P + (blk + 1) * bl:] = args.eos_id
            done |= newly
        events.block(blk, last=bool(done.all()) or blk == n_blocks - 1)
        if bool(done.all()):
            break
    if bar is not None:
        bar.close()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    stats.seconds = time.perf_counter() - t0
    stats.extra["cache_bytes"] = cache.nbytes()
    out = x[:, P:]
    stats.generated_tokens = int(sum(_until_stop(r, stop_ids) for r in out.tolist()))
    return GenerateOutput(out, stats)


def _canvas(executor, prompts: list[list[int]], cfg: DecodeConfig) -> tuple[Tensor, int]:
    """[B, P + gen_length] canvas: left-padded prompts, then masks; P = the longest prompt."""
    args = executor.args
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    B, P, G = len(prompts), max(len(p) for p in prompts), cfg.gen_length
    if hasattr(executor, "check_request"):  # compiled executors name the bound a request breaks
        executor.check_request(B, P, G)
    if P + G > args.max_seq_len:
        raise ValueError(f"prompt ({P} tokens) + gen_length ({G}) = {P + G} exceeds the model's maximum "
                         f"sequence length {args.max_seq_len}")
    x = torch.full((B, P + G), args.mask_id, dtype=torch.long, device=executor.device)
    for b, p in enumerate(prompts):
        x[b, : P - len(p)] = args.pad_id
        x[b, P - len(p): P] = torch.tensor(p, dtype=torch.long)
    return x, P


def _pads(prompts: list[list[int]], P: int, device) -> Tensor:
    return torch.tensor([P - len(p) for p in prompts], device=device)


def _forward(executor, cfg: DecodeConfig, x: Tensor, P: int, idx: Tensor, cache, plan, stats: Stats):
    """One forward of rows idx [B, n] (timed and counted). LLaDA's classifier-free guidance runs a
    second copy with the prompt masked in the same batch: logits = un + (scale + 1) * (cond - un)."""
    pad_col = torch.full_like(x[:, :1], executor.args.mask_id)
    tokens = torch.cat([x, pad_col], 1).gather(1, idx)
    tf = time.perf_counter()
    if cfg.cfg_scale > 0:
        un = torch.cat([x[:, :P].new_full((x.shape[0], P), executor.args.mask_id), x[:, P:], pad_col], 1)
        logits, pred = executor.step(torch.cat([tokens, un.gather(1, idx)]), torch.cat([idx, idx]), cache, plan)
        cond, unc = logits.chunk(2)
        logits, pred = unc + (cfg.cfg_scale + 1) * (cond - unc), pred[: x.shape[0]]
    else:
        logits, pred = executor.step(tokens, idx, cache, plan)
    stats.forward_seconds += time.perf_counter() - tf
    stats.nfe += 1
    stats.positions_computed += plan.rows_per_layer(idx.shape[1], executor.args.n_layers)
    return logits, pred


class _Events:
    """on_block events: after every block, and with stream_steps after a step that grew some row's
    decided prefix without finishing its block. The hook may return rows to stop (a client went away):
    they idle from then on."""

    def __init__(self, hook, stream_steps: bool, x: Tensor, P: int, n_blocks: int, done: Tensor, mask_id: int):
        self.hook, self.stream_steps, self.x, self.P, self.n_blocks, self.done = hook, stream_steps, x, P, n_blocks, done
        self.mask_id = mask_id
        self.streamed = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # prefixes at the last event

    def _emit(self, blk: int, last: bool, block_done: bool) -> None:
        stop = self.hook(BlockEvent(blk, self.n_blocks, self.x[:, self.P:].clone(), last, block_done))
        if stop:
            self.done[list(stop)] = True

    def step(self, blk: int, unfinished: Tensor) -> None:
        if self.hook is None or not self.stream_steps:
            return
        prefix = _decided_prefix(self.x[:, self.P:], self.mask_id)
        # a step that finishes the block leaves its growth to the block's own event
        if bool((prefix > self.streamed).any()) and bool(unfinished.any()):
            self.streamed = prefix
            self._emit(blk, last=False, block_done=False)

    def block(self, blk: int, last: bool) -> None:
        if self.hook is None:
            return
        if self.stream_steps:
            self.streamed = _decided_prefix(self.x[:, self.P:], self.mask_id)
        self._emit(blk, last, block_done=True)


def _decided_prefix(region: Tensor, mask_id: int) -> Tensor:
    """[B, G] generation region -> [B] number of tokens before each row's first mask."""
    m = region == mask_id
    return torch.where(m.any(1), m.int().argmax(1), region.shape[1])


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
