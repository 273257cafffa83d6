"""Token sampling and commit rules shared by every policy.

Samplers turn logits into a proposed token x0 and a confidence per row:
  llada  ML-GSAI/LLaDA generate(): float64 Gumbel-max at temperature > 0, confidence = softmax prob
         of x0 ('low_confidence') or uniform noise ('random') (research/models.md A.7).
  dream  Dream diffusion_generate(): temperature / top-p / top-k, then the alg's confidence
         (maskgit_plus: p(x0), topk_margin: p1 - p2, entropy: sum p log p) (models.md B.7).
Commit rules pick which masked block positions take their x0 this step: a scheduled count
(top-k by confidence), Fast-dLLM's threshold or factor rule (algorithms.md §4.2), or Dream's
'origin' random transfer. `make_rule` composes the one a DecodeConfig asks for.
"""
from __future__ import annotations

import torch
from torch import Tensor

NEG = float("-inf")


def llada_quota(n_masked: Tensor, steps: int) -> Tensor:
    """Tokens to commit at each of `steps` steps: n_masked [B] split evenly, remainder first. -> [B, steps]."""
    base = n_masked // steps
    rem = n_masked % steps
    ar = torch.arange(steps, device=n_masked.device)
    return base[:, None] + (ar[None, :] < rem[:, None]).long()


def _dream_ratio(steps: int, step: Tensor, eps: float) -> Tensor:
    """[B] float32 1 - s/t at each row's step on Dream's float32 linspace(1, eps, steps + 1)."""
    ts = torch.linspace(1, eps, steps + 1, dtype=torch.float32).to(step.device)
    st = step.clamp(max=steps - 1)
    return 1 - ts[st + 1] / ts[st]


def dream_quota(n_masked: Tensor, steps: int, step: Tensor, eps: float) -> Tensor:
    """Dream's count: int(M * (1 - s/t)) on a float32 linspace(1, eps, steps + 1); all at the last step.
    n_masked, step: [B] (each row at its own step)."""
    k = (n_masked.double() * _dream_ratio(steps, step, eps).double()).long()
    return torch.where(step >= steps - 1, n_masked, k)


def _top_p_top_k(logits: Tensor, top_p: float | None, top_k: int | None) -> Tensor:
    if top_p is not None and top_p < 1:
        srt, order = torch.sort(logits, descending=True)
        cum = torch.softmax(srt, -1).cumsum(-1)
        drop = cum > top_p
        drop[..., 1:] = drop[..., :-1].clone()  # always keep the top-1
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), torch.finfo(logits.dtype).min)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)
    return logits


def sample(logits: Tensor, cfg, sampler: str, gen: torch.Generator | None, mask_id: int | None = None
           ) -> tuple[Tensor, Tensor]:
    """logits: [B, m, V] -> (x0 [B, m] int64, confidence [B, m] float64).

    mask_id: never proposed. The reference samplers may propose it (their loops run a fixed number
    of steps and leave it in the output); a committed mask would stay undecided, so a loop that
    decodes until the block is done would never end. Only the choice of x0 skips it: confidences
    come from the full distribution, so wherever the argmax is another token nothing changes.
    """
    def pick(scores: Tensor) -> Tensor:
        if mask_id is not None:
            scores = scores.index_fill(-1, torch.tensor([mask_id], device=scores.device), float("-inf"))
        return scores.argmax(-1)
    if sampler == "llada":
        if cfg.temperature > 0:
            lg = logits.double()
            u = torch.rand(lg.shape, dtype=torch.float64, generator=gen, device=lg.device)
            x0 = pick(lg.exp() / (-torch.log(u)) ** cfg.temperature)
        else:
            x0 = pick(logits)
        if cfg.remasking == "random":
            conf = torch.rand(x0.shape, dtype=torch.float64, generator=gen, device=x0.device)
        else:
            # The reference takes this softmax in the logits' own dtype (bf16 on the 8B models).
            p = torch.softmax(logits, -1)
            conf = p.gather(-1, x0[..., None])[..., 0].double()
        return x0, conf
    lg = logits.float()
    if cfg.temperature > 0:
        lg = lg / cfg.temperature
    lg = _top_p_top_k(lg, cfg.top_p, cfg.top_k)
    p = torch.softmax(lg, -1)
    if cfg.temperature > 0:
        q = p if mask_id is None else p.index_fill(-1, torch.tensor([mask_id], device=p.device), 0.0)
        x0 = torch.multinomial(q.view(-1, q.shape[-1]), 1, generator=gen).view(p.shape[:-1])
    else:
        x0 = pick(p)
    px0 = p.gather(-1, x0[..., None])[..., 0]
    if cfg.alg == "topk_margin":
        top2 = torch.topk(p, 2, dim=-1).values
        conf = top2[..., 0] - top2[..., 1]
    elif cfg.alg == "entropy":
        conf = (p * torch.log(p + 1e-10)).sum(-1)
    else:  # maskgit_plus, and origin (which ignores confidence)
        conf = px0
    return x0, conf.double()


def select_topk(conf: Tensor, quota: Tensor) -> Tensor:
    """conf: [B, N] (-inf where not a candidate); quota: [B] -> bool [B, N], top-quota per row."""
    order = torch.sort(conf, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(conf.shape[1], device=conf.device).expand_as(order))
    n_cand = torch.isfinite(conf).sum(1)
    return (ranks < torch.minimum(quota, n_cand)[:, None]) & torch.isfinite(conf)


def select_sampled(conf: Tensor, quota: Tensor, alg_temp: float, gen) -> Tensor:
    """Dream alg_temp > 0: sample quota positions without replacement from softmax(conf / alg_temp)."""
    g = -torch.log(-torch.log(torch.rand(conf.shape, dtype=torch.float64, generator=gen, device=conf.device)))
    return select_topk(torch.where(torch.isfinite(conf), conf / alg_temp + g, conf), quota)


def select_threshold(conf: Tensor, tau: float) -> Tensor:
    """Every candidate with confidence >= tau, and always the single most confident one."""
    best = select_topk(conf, torch.ones(conf.shape[0], dtype=torch.long, device=conf.device))
    return best | ((conf >= tau) & torch.isfinite(conf))


def select_factor(conf: Tensor, factor: float) -> Tensor:
    """Largest n with c_(k) >= 1 - f / (k + 1) for every k <= n (k from 1, descending); at least one."""
    srt, order = torch.sort(conf, dim=-1, descending=True, stable=True)
    k = torch.arange(1, conf.shape[1] + 1, device=conf.device, dtype=torch.float64)
    ok = (srt >= 1 - factor / (k + 1)) & torch.isfinite(srt)
    ok[:, 0] = torch.isfinite(srt[:, 0])
    n = ok.long().cumprod(1).sum(1)
    chosen = torch.arange(conf.shape[1], device=conf.device)[None, :] < n[:, None]
    return torch.zeros_like(chosen).scatter_(1, order, chosen)


def select_origin(cand: Tensor, step: Tensor, steps: int, eps: float, gen) -> Tensor:
    """Dream 'origin': each candidate flips independently with probability 1 - s/t (1 at the last
    step). step: [B]. Draws one uniform per position while some row is before its last step."""
    last = step >= steps - 1
    if bool(last.all()):
        return cand.clone()
    u = torch.rand(cand.shape, generator=gen, device=cand.device)
    return cand & ((u < _dream_ratio(steps, step, eps)[:, None]) | last[:, None])


def make_rule(cfg, sampler: str, gen):
    """The commit rule of a DecodeConfig: rule(conf [B, N] (-inf off candidates), cand [B, N],
    masked [B, N], step [B], quota [B, steps]) -> chosen [B, N] bool.

    threshold / factor (Fast-dLLM), else the sampler's count schedule, which every method shares so
    that a cache refreshed every step reproduces vanilla exactly: Dream's commits 0 at a block's first
    step and all that is left at its last; LLaDA's splits the block's masks evenly over its steps
    (past the schedule, possible when skipping hid a candidate, whatever is left).
    """
    steps = cfg.n_steps // (cfg.gen_length // cfg.block_length)
    if cfg.threshold is not None:
        return lambda C, cand, masked, step, quota: select_threshold(C, cfg.threshold)
    if cfg.factor is not None:
        return lambda C, cand, masked, step, quota: select_factor(C, cfg.factor)
    if sampler == "dream":
        if cfg.alg == "origin":
            return lambda C, cand, masked, step, quota: select_origin(cand, step, steps, cfg.eps, gen)
        if cfg.alg_temp:
            return lambda C, cand, masked, step, quota: select_sampled(
                C, dream_quota(masked.sum(1), steps, step, cfg.eps), cfg.alg_temp, gen)
        return lambda C, cand, masked, step, quota: select_topk(C, dream_quota(masked.sum(1), steps, step, cfg.eps))

    def llada(C, cand, masked, step, quota):
        k = quota.gather(1, step.clamp(max=steps - 1)[:, None])[:, 0]
        return select_topk(C, torch.where(step < steps, k, masked.sum(1)))
    return llada
