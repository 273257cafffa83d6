"""Graph variants of one executor step: torch modules that trace `Transformer.step` itself, with the
export op backend, whose ops write the plugin-form ONNX node (build/onnx_ops.py), one node per call.

Every cache is explicit graph I/O: per-layer K/V (and hidden states at the prune layers) go in, the
merged caches come out. Variants, I/O names and shapes are the runtime's contract (runtime/contract.py).
Everything the tracer must see differently from an eager run is here: the export backend, the graph
cache whose trash slot follows the traced canvas length, and the plan built from graph inputs.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..plugins import ops
from ..plugins.backends import OpBackend
from ..runtime import contract
from ..runtime.cache import StepPlan
from ..runtime.model import Transformer
from ..runtime.policies import top2_bonus
from ..runtime.weights import resolve_dtype
from .onnx_ops import DOMAIN, PLUGIN_NAMESPACE


def _dynamic_type(v):
    """v's type with every size dynamic: traced types carry the example's sizes. (The graph
    outputs get their exact symbolic shapes from the contract after export.)"""
    typ = v.type()
    rank = typ.dim()
    return typ if rank is None else typ.with_sizes([None] * rank)


class _TokenGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, prev_hidden, confidence, bonus, keep_mask, alpha):
        return ops.token_gather(hidden, prev_hidden, confidence, bonus, keep_mask, alpha)

    @staticmethod
    def symbolic(g, hidden, prev_hidden, confidence, bonus, keep_mask, alpha):
        sel, kept = g.op(f"{DOMAIN}::token_gather", hidden, prev_hidden, confidence, bonus, keep_mask,
                         alpha_f=alpha, plugin_namespace_s=PLUGIN_NAMESPACE, outputs=2)
        sel.setType(hidden.type().with_dtype(torch.int64).with_sizes([None, None]))
        kept.setType(_dynamic_type(hidden))
        return sel, kept


class _PartialAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_cache, v_cache, key_valid):
        return ops.partial_attention(q, k_cache, v_cache, key_valid)

    @staticmethod
    def symbolic(g, q, k_cache, v_cache, key_valid):
        out = g.op(f"{DOMAIN}::partial_attention", q, k_cache, v_cache, key_valid,
                   plugin_namespace_s=PLUGIN_NAMESPACE)
        out.setType(_dynamic_type(q))
        return out


class _CacheMerge(torch.autograd.Function):
    """In place, as ops.cache_merge (mark_dirty): the traced cache tensor becomes the node's output.
    Traced, not run under _untraced: the tracer needs the body to return the dirtied input."""

    @staticmethod
    def forward(ctx, cache, fresh, rows, dim):
        ctx.mark_dirty(cache)
        return ops.cache_merge(cache, fresh, rows, dim)

    @staticmethod
    def symbolic(g, cache, fresh, rows, dim):
        out = g.op(f"{DOMAIN}::cache_merge", cache, fresh, rows, dim_i=dim,
                   plugin_namespace_s=PLUGIN_NAMESPACE)
        out.setType(_dynamic_type(cache))
        return out


# The export backend: the same signatures as plugins/ops.py; each call records one plugin-form node.
EXPORT_OPS = OpBackend("export", _TokenGather.apply, _PartialAttention.apply, _CacheMerge.apply)


class _GraphCache:
    """runtime.model.Cache over graph inputs. The trash slot is the last one; under tracing its
    index comes from the traced shape, so it follows the canvas length."""

    def __init__(self, k: list[Tensor], v: list[Tensor], hidden: dict[int, Tensor],
                 positions: Tensor, key_valid: Tensor, ctx: dict[int, Tensor], ffn: dict[int, Tensor]):
        self.k, self.v, self.hidden, self.positions, self.key_valid = k, v, hidden, positions, key_valid
        self.ctx, self.ffn, self.dv = ctx, ffn, None  # dV scratch: made inside the graph

    @property
    def trash(self):
        return self.positions.shape[1] - 1


class StepGraph(nn.Module):
    """One variant's forward: the graph inputs in contract order -> outputs in contract order."""

    def __init__(self, model: Transformer, variant: str, prune_layers: tuple[int, ...], alpha: float,
                 dtype: str, saliency_tau: float = 0.99):
        super().__init__()
        if variant == "skip" and not prune_layers:
            raise ValueError("the skip variant needs at least one prune layer")
        self.model, self.variant, self.prune_layers, self.alpha = model, variant, tuple(prune_layers), alpha
        self.saliency_tau = saliency_tau
        ins, outs = contract.io_spec(variant, model.args, self.prune_layers, dtype)
        self.input_names = [i["name"] for i in ins]
        self.output_names = [o["name"] for o in outs]

    def forward(self, *inputs: Tensor):
        x = dict(zip(self.input_names, inputs))
        n_layers = self.model.args.n_layers
        hidden = {l: x[contract.hidden_name(l)] for l in self.prune_layers if contract.hidden_name(l) in x}
        ctx = {l: x[contract.ctx_name(l)] for l in range(n_layers) if contract.ctx_name(l) in x}
        ffn = {l: x[contract.ffn_name(l)] for l in range(n_layers) if contract.ffn_name(l) in x}
        cache = _GraphCache([x[contract.k_name(l)] for l in range(n_layers)],
                            [x[contract.v_name(l)] for l in range(n_layers)], hidden,
                            x["positions"], x["key_valid"], ctx, ffn)
        if self.variant == "skip":
            keep = {l: x[contract.keep_name(i)] for i, l in enumerate(self.prune_layers)}
            plan = StepPlan(keep=keep, write_hidden=True, confidence=x["confidence"], bonus=x["bonus"],
                            alpha=self.alpha, top2=top2_bonus(self.alpha), key_slots=x["key_slots"])
        elif self.variant == "saliency":  # every row computed, the salient ones kept: static shapes
            plan = StepPlan(head=x["head"], salient=x["salient"], tau=self.saliency_tau, padded=True,
                            key_slots=x["key_slots"])
        else:
            plan = StepPlan(head=x["head"], write_hidden=bool(hidden), write_context=bool(ctx),
                            key_slots=x["key_slots"])
        logits, pred = self.model.step(x["tokens"], x["idx"], cache, plan, ops=EXPORT_OPS)
        return (logits, pred, *cache.k, *cache.v, *(ctx[l] for l in sorted(ctx)), *(ffn[l] for l in sorted(ffn)),
                *(hidden[l] for l in sorted(hidden)))


def example_inputs(graph: StepGraph, dtype: str, batch: int = 2) -> tuple[Tensor, ...]:
    """Trace inputs that take every branch of the variant: each prune layer keeps fewer rows than
    the one before, one entry keeps fewer than the others, and one forwarded entry points at the
    trash slot."""
    a, P = graph.model.args, len(graph.prune_layers)
    n = 2 * P + 5
    L = n + 3
    S, dt = L + 1, resolve_dtype(dtype)
    g = torch.Generator().manual_seed(0)
    idx = torch.arange(L - n, L).expand(batch, n).clone()
    idx[-1, 0] = L  # trash
    val = {
        "tokens": torch.randint(0, a.vocab_size, (batch, n), generator=g), "idx": idx,
        "positions": torch.arange(S).expand(batch, S).clone(),
        "key_valid": torch.arange(S).expand(batch, S) < L,
        "key_slots": torch.cat([torch.arange(L - 2), torch.tensor([L - 1, L])]).expand(batch, L).clone(),
        "head": torch.arange(1, n - 1).expand(batch, n - 2).clone(),
        "confidence": torch.rand(batch, S, generator=g), "bonus": torch.zeros(batch, S),
        "salient": torch.arange(n).expand(batch, n) % 3 == 0,
    }
    for i in range(P):
        k = n - 2 * (i + 1)
        mask = torch.ones(batch, k, dtype=torch.bool)
        mask[-1, k - 1:] = False
        val[contract.keep_name(i)] = mask
    out = []
    for name in graph.input_names:
        if name in val:
            out.append(val[name])
        elif name.startswith(("k_cache.", "v_cache.")):
            out.append(0.1 * torch.randn(batch, a.n_kv_heads, S, a.head_dim, generator=g).to(dt))
        elif name.startswith("ctx_cache."):
            out.append(torch.randn(batch, S, a.n_heads * a.head_dim, generator=g).to(dt))
        else:  # hidden.l, ffn_cache.l
            out.append(torch.randn(batch, S, a.dim, generator=g).to(dt))
    return tuple(out)
