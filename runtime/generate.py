"""The one diffusion loop: blocks -> steps -> policy.plan -> executor.step -> sample -> commit.

Works over any executor with the Transformer.step interface (torch, onnxruntime, TensorRT) and
any policy in policies.py. Batches mix prompt lengths by left padding: the generation region
starts at the same canvas position for every row, RoPE uses true positions, and pads are masked
keys, so a row's tokens do not depend on its batch mates (greedy, float32).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .config import DecodeConfig, Stats
from .policies import StepContext, make_policy
from . import sampling as S


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


def _step_rows(plan, n: int, n_layers: int) -> float:
    """Rows processed per layer, averaged over layers (the dense compute of one forward)."""
    if not plan.keep:
        return float(n)
    total, cur = 0, n
    for l in range(n_layers):
        total += cur
        if l in plan.keep:
            cur = min(cur, plan.keep[l])
    return total / n_layers


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
    args = executor.args
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    dev = executor.device
    B, P, G, bl = len(prompts), max(len(p) for p in prompts), cfg.gen_length, cfg.block_length
    L = P + G
    if hasattr(executor, "check_request"):  # compiled executors name the bound a request breaks
        executor.check_request(B, P, G)
    if L > args.max_seq_len:
        raise ValueError(f"prompt ({P} tokens) + gen_length ({G}) = {L} exceeds the model's maximum "
                         f"sequence length {args.max_seq_len}")
    n_blocks, spb = G // bl, cfg.n_steps // (G // bl)
    sampler = cfg.sampler or ("llada" if args.family == "llada" else "dream")
    stop_ids = stop_ids if stop_ids is not None else {args.eos_id}
    pads = torch.tensor([P - len(p) for p in prompts], device=dev)
    x = torch.full((B, L), args.mask_id, dtype=torch.long, device=dev)
    for b, p in enumerate(prompts):
        x[b, : P - len(p)] = args.pad_id
        x[b, P - len(p): P] = torch.tensor(p, dtype=torch.long)
    prompt_pos = torch.arange(L, device=dev)[None, :] < P

    cfg_pair = cfg.cfg_scale > 0
    policy = make_policy(cfg, args, L, trash=L)
    cache = executor.new_cache(B * (2 if cfg_pair else 1), L, policy.hidden_layers)
    assert cache.trash == L, "executor caches must put the trash slot at index L"
    cache.set_layout(pads.repeat(2) if cfg_pair else pads)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed if cfg.seed is not None else 0)
    stats, t0 = Stats(), time.perf_counter()
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    pad_col = torch.full((B, 1), args.mask_id, dtype=torch.long, device=dev)
    bar = _bar(progress, n_blocks * spb)
    step_cnt = 0
    streamed = torch.zeros(B, dtype=torch.long, device=dev)  # decided-prefix lengths at the last event

    def emit(blk: int, last: bool, block_done: bool) -> None:
        # the hook may return rows to stop (a client went away): they idle from now on
        stop = on_block(BlockEvent(blk, n_blocks, x[:, P:].clone(), last, block_done))
        if stop:
            done[list(stop)] = True
    for blk in range(n_blocks):
        s, e = P + blk * bl, P + (blk + 1) * bl
        quota = S.llada_quota((x[:, s:e] == args.mask_id).sum(1), spb)
        step = 0
        while True:
            masked = x[:, s:e] == args.mask_id
            active = masked.any(1) & ~done
            if not bool(active.any()):
                break
            c = StepContext(x, blk, s, e, step, step_cnt, active)
            idx, plan = policy.plan(c)
            tokens = torch.cat([x, pad_col], 1).gather(1, idx)
            tf = time.perf_counter()
            if cfg_pair:  # LLaDA CFG: second copy with the prompt masked, one batched forward
                un = torch.cat([torch.where(prompt_pos, args.mask_id, x), pad_col], 1).gather(1, idx)
                logits, pred = executor.step(torch.cat([tokens, un]), torch.cat([idx, idx]), cache, plan)
                cond, unc = logits.chunk(2)
                logits, pred = unc + (cfg.cfg_scale + 1) * (cond - unc), pred[:B]
            else:
                logits, pred = executor.step(tokens, idx, cache, plan)
            stats.forward_seconds += time.perf_counter() - tf
            stats.nfe += 1
            stats.positions_computed += _step_rows(plan, idx.shape[1], args.n_layers)
            x0, conf = S.sample(logits, cfg, sampler, gen)
            # Scatter row predictions into canvas coordinates; rows outside [0, L) fall off the end.
            C = torch.full((B, L + 2), S.NEG, dtype=torch.float64, device=dev).scatter_(1, pred, conf)[:, s:e]
            X0 = torch.zeros((B, L + 2), dtype=torch.long, device=dev).scatter_(1, pred, x0)[:, s:e]
            cand = masked & torch.isfinite(C) & active[:, None]
            if cfg.method == "es-dllm" and cfg.delay_eos:
                C = _delay_eos(C, X0, x, s, P, args.eos_id, args.mask_id)
            C = torch.where(cand, C, S.NEG)
            chosen = _choose(cfg, sampler, C, cand, quota, step, spb, masked, gen)
            x[:, s:e] = torch.where(chosen, X0, x[:, s:e])
            policy.update(c, pred, conf, chosen)
            step += 1
            step_cnt += 1
            stats.steps += 1
            if bar is not None:
                bar.update(1)
            if stream_steps and on_block is not None:
                prefix = _decided_prefix(x[:, P:], args.mask_id)
                # a step that finishes the block leaves its growth to the block's own event
                if bool((prefix > streamed).any()) and bool(((x[:, s:e] == args.mask_id).any(1) & ~done).any()):
                    streamed = prefix
                    emit(blk, last=False, block_done=False)
        # ES-dLLM keeps refresh periods aligned to blocks when a block ends early (§1.4).
        step_cnt = (blk + 1) * spb
        if cfg.stop_at_eos:
            hit = _has_stop(x[:, P:e], stop_ids)
            newly = hit & ~done
            if bool(newly.any()):
                x[newly, e:] = args.eos_id
                done |= newly
        if on_block is not None:
            if stream_steps:
                streamed = _decided_prefix(x[:, P:], args.mask_id)
            emit(blk, last=bool(done.all()) or blk == n_blocks - 1, block_done=True)
        if bool(done.all()):
            break
    if bar is not None:
        bar.close()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    stats.seconds = time.perf_counter() - t0
    out = x[:, P:]
    stats.generated_tokens = int(sum(_until_stop(r, stop_ids) for r in out.tolist()))
    return GenerateOutput(out, stats)


def _decided_prefix(region: Tensor, mask_id: int) -> Tensor:
    """[B, G] generation region -> [B] number of tokens before each row's first mask."""
    m = region == mask_id
    return torch.where(m.any(1), m.int().argmax(1), region.shape[1])


def _choose(cfg, sampler, C, cand, quota, step, spb, masked, gen) -> Tensor:
    if cfg.threshold is not None:
        return S.select_threshold(C, cfg.threshold)
    if cfg.factor is not None:
        return S.select_factor(C, cfg.factor)
    # The count schedule follows the sampler for every method, so a cache refreshed every step
    # reproduces vanilla exactly. (Dream's schedule commits 0 at a block's first step and 2 at its last.)
    if sampler == "dream":
        if cfg.alg == "origin":
            return S.select_origin(cand, step, spb, cfg.eps, gen)
        k = S.dream_quota(masked.sum(1), spb, step, cfg.eps)
        if cfg.alg_temp:
            return S.select_sampled(C, k, cfg.alg_temp, gen)
        return S.select_topk(C, k)
    # Past the schedule (possible when skipping hid a candidate), commit whatever is left.
    k = quota[:, step] if step < spb else masked.sum(1)
    return S.select_topk(C, k)


def _delay_eos(C: Tensor, X0: Tensor, x: Tensor, s: int, P: int, eos: int, mask: int) -> Tensor:
    """ES-dLLM delayed EOS: EOS at p gets confidence 0 while p - 1 is masked and no EOS was generated yet."""
    prev_masked = x[:, s - 1: s - 1 + C.shape[1]] == mask
    no_eos = ~(x[:, P:] == eos).any(1, keepdim=True)
    block = (X0 == eos) & prev_masked & no_eos & torch.isfinite(C)
    return torch.where(block, 0.0, C)


def _has_stop(region: Tensor, stop_ids: set[int]) -> Tensor:
    hit = torch.zeros(region.shape[0], dtype=torch.bool, device=region.device)
    for t in stop_ids:
        hit |= (region == t).any(1)
    return hit


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
