"""Graph variants of one executor step: torch modules that trace `Transformer.step` itself.

Every cache is explicit graph I/O: per-layer K/V (and hidden states at the prune layers) go in, the
merged caches come out. While tracing, runtime.model's op calls are routed to autograd Functions
whose `symbolic` writes the plugin-form ONNX node (build/onnx_ops.py), one node per op call.

  dense         rows [B, n] against the cache, no pruning; head rows [head_start, head_stop)
  dense_hidden  dense, plus the hidden caches at the prune layers merged (ES-dLLM refresh steps)
  skip          token_gather at every prune layer with keep counts as inputs: one graph, every k

I/O names and symbolic shapes live in `io_spec`, the one table the exporter, engine.json and the
executors share. Axis names: batch, rows (forwarded rows), slots (canvas + trash), out (head rows).
"""
from __future__ import annotations

import types
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..plugins import ops
from ..runtime.model import StepPlan, Transformer
from .onnx_ops import DOMAIN, PLUGIN_NAMESPACE

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@contextmanager
def _untraced():
    """Run the reference eagerly inside a Function being traced: its `symbolic` stands for it, and
    traced sizes (tensors under the tracer) would break the reference's Python-level shape logic."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


def _dynamic_type(v):
    """v's type with every size dynamic: traced types carry the example's sizes. (The graph
    outputs get their exact symbolic shapes from io_spec after export.)"""
    typ = v.type()
    rank = typ.dim()
    return typ if rank is None else typ.with_sizes([None] * rank)


class _TokenGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, prev_hidden, confidence, bonus, k, alpha):
        with _untraced():
            return ops.token_gather(hidden, prev_hidden, confidence, bonus, alpha, int(k.reshape(-1)[0]))

    @staticmethod
    def symbolic(g, hidden, prev_hidden, confidence, bonus, k, alpha):
        sel, kept = g.op(f"{DOMAIN}::token_gather", hidden, prev_hidden, confidence, bonus, k,
                         alpha_f=alpha, plugin_namespace_s=PLUGIN_NAMESPACE, outputs=2)
        sel.setType(hidden.type().with_dtype(torch.int64).with_sizes([None, None]))
        kept.setType(_dynamic_type(hidden))
        return sel, kept


class _PartialAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_new, v_new, rows, k_cache, v_cache, key_valid):
        with _untraced():
            return ops.partial_attention(q, k_new, v_new, rows, k_cache, v_cache, key_valid)

    @staticmethod
    def symbolic(g, q, k_new, v_new, rows, k_cache, v_cache, key_valid):
        out = g.op(f"{DOMAIN}::partial_attention", q, k_new, v_new, rows, k_cache, v_cache, key_valid,
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


def _export_ops() -> types.SimpleNamespace:
    """plugins.ops with the three ops replaced by their export faces (same signatures)."""
    ns = {name: getattr(ops, name) for name in dir(ops) if not name.startswith("__")}
    ns["token_gather"] = lambda hidden, prev, conf, bonus, alpha, k: _TokenGather.apply(
        hidden, prev, conf, bonus, k, alpha)
    ns["partial_attention"] = _PartialAttention.apply
    ns["cache_merge"] = _CacheMerge.apply
    return types.SimpleNamespace(**ns)


def _sort_symbolic(g, self, *args):
    """aten::sort and aten::sort.stable -> ONNX TopK over the whole axis. TopK puts equal values
    in index order, which is exactly a stable sort in either direction. (The stock symbolic
    misreads the `stable` overload's arguments; runtime.model ranks with a stable sort.)"""
    from torch.onnx import symbolic_helper as sh
    dim, descending = args[-2:]
    dim = sh._get_const(dim, "i", "dim")
    shape = g.op("Shape", self)
    k = g.op("Gather", shape, g.op("Constant", value_t=torch.tensor([dim])), axis_i=0)
    return g.op("TopK", self, k, axis_i=dim, largest_i=int(sh._get_const(descending, "b", "descending")),
                sorted_i=1, outputs=2)


@contextmanager
def routed_ops(opset: int):
    """While tracing: route runtime.model's op calls to the export faces and export torch.sort
    as TopK; both restored on exit."""
    from ..runtime import model as model_module
    saved = model_module.ops
    model_module.ops = _export_ops()
    torch.onnx.register_custom_op_symbolic("aten::sort", _sort_symbolic, opset)
    try:
        yield
    finally:
        model_module.ops = saved
        torch.onnx.unregister_custom_op_symbolic("aten::sort", opset)


class _GraphCache:
    """runtime.model.Cache over graph inputs. The trash slot is the last one; under tracing its
    index comes from the traced shape, so it follows the canvas length."""

    def __init__(self, k: list[Tensor], v: list[Tensor], hidden: dict[int, Tensor],
                 positions: Tensor, key_valid: Tensor):
        self.k, self.v, self.hidden, self.positions, self.key_valid = k, v, hidden, positions, key_valid

    @property
    def trash(self):
        return self.key_valid.shape[1] - 1


def io_spec(variant: str, args, prune_layers: tuple[int, ...], dtype: str) -> tuple[list[dict], list[dict]]:
    """Inputs and outputs of a variant: [{"name", "dtype", "shape"}], shapes with axis names.

    tokens, idx [batch, rows] int64; positions [batch, slots] int64; key_valid [batch, slots] bool;
    dense*: head_start, head_stop [] int64; skip: confidence, bonus [batch, slots] float32,
    keep [P] int64 (k per prune layer), keep_rows [P, batch] int64 (per-entry counts <= k);
    k_cache.l / v_cache.l [batch, Hkv, slots, hd]; hidden.l [batch, slots, dim] at prune layers.
    Outputs: logits [batch, out, vocab], pred [batch, out] int64, then the merged caches (*_out.l).
    """
    hidden = variant in ("dense_hidden", "skip")
    kv = ["batch", args.n_kv_heads, "slots", args.head_dim]
    P = len(prune_layers)

    def t(name, dt, shape):
        return {"name": name, "dtype": dt, "shape": shape}
    ins = [t("tokens", "int64", ["batch", "rows"]), t("idx", "int64", ["batch", "rows"]),
           t("positions", "int64", ["batch", "slots"]), t("key_valid", "bool", ["batch", "slots"])]
    if variant == "skip":
        ins += [t("confidence", "float32", ["batch", "slots"]), t("bonus", "float32", ["batch", "slots"]),
                t("keep", "int64", [P]), t("keep_rows", "int64", [P, "batch"])]
    else:
        ins += [t("head_start", "int64", []), t("head_stop", "int64", [])]
    caches = [(f"k_cache.{l}", kv) for l in range(args.n_layers)] + \
             [(f"v_cache.{l}", kv) for l in range(args.n_layers)]
    if hidden:
        caches += [(f"hidden.{l}", ["batch", "slots", args.dim]) for l in prune_layers]
    ins += [t(name, dtype, shape) for name, shape in caches]
    outs = [t("logits", dtype, ["batch", "out", args.vocab_size]), t("pred", "int64", ["batch", "out"])]
    outs += [t(cache_output(name), dtype, shape) for name, shape in caches]
    return ins, outs


def cache_output(name: str) -> str:
    """k_cache.3 -> k_cache_out.3 (the merged cache a graph returns for input `name`)."""
    base, layer = name.rsplit(".", 1)
    return f"{base}_out.{layer}"


class StepGraph(nn.Module):
    """One variant's forward: the graph inputs in io_spec order -> outputs in io_spec order."""

    def __init__(self, model: Transformer, variant: str, prune_layers: tuple[int, ...], alpha: float,
                 dtype: str):
        super().__init__()
        if variant == "skip" and not prune_layers:
            raise ValueError("the skip variant needs at least one prune layer")
        self.model, self.variant, self.prune_layers, self.alpha = model, variant, tuple(prune_layers), alpha
        ins, outs = io_spec(variant, model.args, self.prune_layers, dtype)
        self.input_names = [i["name"] for i in ins]
        self.output_names = [o["name"] for o in outs]

    def forward(self, *inputs: Tensor):
        x = dict(zip(self.input_names, inputs))
        n_layers = self.model.args.n_layers
        hidden = {l: x[f"hidden.{l}"] for l in self.prune_layers if f"hidden.{l}" in x}
        cache = _GraphCache([x[f"k_cache.{l}"] for l in range(n_layers)],
                            [x[f"v_cache.{l}"] for l in range(n_layers)], hidden,
                            x["positions"], x["key_valid"])
        if self.variant == "skip":
            keep = {l: x["keep"][i: i + 1] for i, l in enumerate(self.prune_layers)}
            keep_rows = {l: x["keep_rows"][i] for i, l in enumerate(self.prune_layers)}
            plan = StepPlan(keep=keep, keep_rows=keep_rows, write_hidden=True, confidence=x["confidence"],
                            bonus=x["bonus"], alpha=self.alpha)
        else:
            plan = StepPlan(head=slice(x["head_start"], x["head_stop"]), write_hidden=bool(hidden))
        logits, pred = self.model.step(x["tokens"], x["idx"], cache, plan)
        return (logits, pred, *cache.k, *cache.v, *(hidden[l] for l in sorted(hidden)))


def example_inputs(graph: StepGraph, dtype: str, batch: int = 2) -> tuple[Tensor, ...]:
    """Trace inputs that take every branch of the variant: each prune layer keeps fewer rows than
    the one before, and one forwarded entry points at the trash slot."""
    a, P = graph.model.args, len(graph.prune_layers)
    n = 2 * P + 5
    L = n + 3
    S, dt = L + 1, TORCH_DTYPES[dtype]
    g = torch.Generator().manual_seed(0)
    idx = torch.arange(L - n, L).expand(batch, n).clone()
    idx[-1, 0] = L  # trash
    val = {
        "tokens": torch.randint(0, a.vocab_size, (batch, n), generator=g), "idx": idx,
        "positions": torch.arange(S).expand(batch, S).clone(),
        "key_valid": torch.arange(S).expand(batch, S) < L,
        "head_start": torch.tensor(1), "head_stop": torch.tensor(n - 1),
        "confidence": torch.rand(batch, S, generator=g), "bonus": torch.zeros(batch, S),
        "keep": torch.tensor([n - 2 * (i + 1) for i in range(P)], dtype=torch.long),
    }
    val["keep_rows"] = val["keep"][:, None].expand(P, batch).clone()
    out = []
    for name in graph.input_names:
        if name in val:
            out.append(val[name])
        elif name.startswith(("k_cache.", "v_cache.")):
            out.append(0.1 * torch.randn(batch, a.n_kv_heads, S, a.head_dim, generator=g).to(dt))
        else:  # hidden.l
            out.append(torch.randn(batch, S, a.dim, generator=g).to(dt))
    return tuple(out)
