"""The contract between `esdllm build` and the graph executors: the step graph variants, their
inputs and outputs (names, dtypes, symbolic shapes), which cache tensor each output updates, and
how one planned step becomes a variant's named inputs. build/ exports to it; every graph executor
(onnxruntime, TensorRT) runs by it; no graph I/O name is spelled anywhere else.

  dense         rows [B, n] against the cache, no pruning; `head` picks the rows that reach the LM head
  dense_hidden  dense, plus the hidden caches at the prune layers merged (ES-dLLM refresh steps)
  skip          token_gather at every built prune layer, keep counts as rank masks: one graph, every k
  dense_context dense, plus every layer's attention context and FFN output stored (DyLLM's dense steps)
  saliency      DyLLM's sparse step: `salient` marks the rows whose input changed; each layer's salient
                rows are decided in the graph (tau baked in), computed over all rows, masked (static shapes)

Axis names: batch, rows (forwarded rows), slots (canvas + trash), keys (the slots attended to), out
(rows at the LM head), keep_i (rows kept at the i-th prune layer). Cache semantics, one for every executor: a graph returns each
merged cache as `<input>_out`; after a step the Cache's own tensors hold them (an engine that wrote a
cache in place, aliasing output to input, leaves nothing to copy).
"""
from __future__ import annotations

from torch import Tensor

from .artifacts import VARIANTS
from .cache import Cache, StepPlan
from .config import ModelArgs

__all__ = ["VARIANTS", "io_spec", "step_feeds", "apply_outputs"]


def k_name(layer: int) -> str:
    return f"k_cache.{layer}"


def v_name(layer: int) -> str:
    return f"v_cache.{layer}"


def hidden_name(layer: int) -> str:
    return f"hidden.{layer}"


def ctx_name(layer: int) -> str:
    return f"ctx_cache.{layer}"


def ffn_name(layer: int) -> str:
    return f"ffn_cache.{layer}"


def keep_name(i: int) -> str:
    """The keep mask of the i-th built prune layer (by position in prune_layers, not layer number)."""
    return f"keep_mask.{i}"


def output_name(cache_input: str) -> str:
    """k_cache.3 -> k_cache_out.3: the merged cache a graph returns for a cache input."""
    base, layer = cache_input.rsplit(".", 1)
    return f"{base}_out.{layer}"


def has_hidden(variant: str) -> bool:
    return variant in ("dense_hidden", "skip")


def has_context(variant: str) -> bool:
    return variant in ("dense_context", "saliency")


def cache_inputs(variant: str, n_layers: int, prune_layers: tuple[int, ...]) -> list[str]:
    """The cache tensors a variant takes (and returns merged), in graph order."""
    names = [k_name(l) for l in range(n_layers)] + [v_name(l) for l in range(n_layers)]
    if has_context(variant):
        names += [ctx_name(l) for l in range(n_layers)] + [ffn_name(l) for l in range(n_layers)]
    return names + ([hidden_name(l) for l in prune_layers] if has_hidden(variant) else [])


def io_spec(variant: str, args: ModelArgs, prune_layers: tuple[int, ...], dtype: str
            ) -> tuple[list[dict], list[dict]]:
    """Inputs and outputs of a variant: [{"name", "dtype", "shape"}], shapes with axis names.

    tokens, idx [batch, rows] int64; positions [batch, slots] int64; key_valid [batch, slots] bool;
    key_slots [batch, keys] int64 (the slots attended to, in order: every slot but a suffix window's);
    dense*: head [batch, out] int64; skip: confidence, bonus [batch, slots] float32 and keep_mask.i
    [batch, keep_i] bool per built prune layer; k_cache.l / v_cache.l [batch, Hkv, slots, hd];
    hidden.l [batch, slots, dim] at the prune layers. Outputs: logits [batch, out, vocab], pred
    [batch, out] int64, then every cache input merged (<name>_out).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown graph variant {variant!r}; expected one of {VARIANTS}")

    def t(name, dt, shape):
        return {"name": name, "dtype": dt, "shape": shape}
    ins = [t("tokens", "int64", ["batch", "rows"]), t("idx", "int64", ["batch", "rows"]),
           t("positions", "int64", ["batch", "slots"]), t("key_valid", "bool", ["batch", "slots"]),
           t("key_slots", "int64", ["batch", "keys"])]
    if variant == "skip":
        ins += [t("confidence", "float32", ["batch", "slots"]), t("bonus", "float32", ["batch", "slots"])]
        ins += [t(keep_name(i), "bool", ["batch", f"keep_{i}"]) for i in range(len(prune_layers))]
    else:
        ins.append(t("head", "int64", ["batch", "out"]))
    if variant == "saliency":
        ins.append(t("salient", "bool", ["batch", "rows"]))
    shapes = {"k_cache": ["batch", args.n_kv_heads, "slots", args.head_dim], "v_cache": None,
              "hidden": ["batch", "slots", args.dim], "ffn_cache": None,
              "ctx_cache": ["batch", "slots", args.n_heads * args.head_dim]}
    shapes["v_cache"], shapes["ffn_cache"] = shapes["k_cache"], shapes["hidden"]
    caches = [(name, shapes[name.rsplit(".", 1)[0]]) for name in cache_inputs(variant, args.n_layers, prune_layers)]
    ins += [t(name, dtype, shape) for name, shape in caches]
    outs = [t("logits", dtype, ["batch", "out", args.vocab_size]), t("pred", "int64", ["batch", "out"])]
    outs += [t(output_name(name), dtype, shape) for name, shape in caches]
    return ins, outs


def variant_of(plan: StepPlan, cache: Cache) -> str:
    """saliency / dense_context for DyLLM's sparse / dense steps, skip when the plan prunes,
    dense_hidden when it writes hidden states, dense otherwise."""
    if plan.salient is not None:
        return "saliency"
    if plan.write_context:
        return "dense_context"
    if plan.keep:
        return "skip"
    return "dense_hidden" if plan.write_hidden and cache.hidden else "dense"


def cache_tensor(cache: Cache, name: str) -> Tensor | None:
    """The Cache's tensor behind a cache input name (None: a hidden layer this cache does not hold)."""
    kind, layer = name.rsplit(".", 1)
    layer = int(layer)
    if kind == "k_cache":
        return cache.k[layer]
    if kind == "v_cache":
        return cache.v[layer]
    if kind == "ctx_cache":
        return cache.ctx[layer]
    if kind == "ffn_cache":
        return cache.ffn[layer]
    return cache.hidden.get(layer)


def step_feeds(args: ModelArgs, prune_layers: tuple[int, ...], tokens: Tensor, idx: Tensor, cache: Cache,
               plan: StepPlan) -> tuple[str, dict[str, Tensor]]:
    """The graph variant one step needs and its inputs by name. tokens, idx: [B, n] int64.

    The skip graph prunes at every built prune layer: where the plan does not prune, its keep mask
    is all rows alive there (token_gather then keeps every row in order: an identity).
    """
    B, n = idx.shape
    if tokens.shape != idx.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and idx {tuple(idx.shape)} must have one shape")
    if B != cache.batch:
        raise ValueError(f"idx has batch {B}, the cache {cache.batch}")
    variant = variant_of(plan, cache)
    n_keys = cache.length + 1 if plan.key_len is None else plan.key_len
    slots = plan.key_slots if plan.key_slots is not None else idx.new_tensor(range(n_keys)).expand(B, n_keys)
    feeds = {"tokens": tokens, "idx": idx, "positions": cache.positions, "key_valid": cache.key_valid,
             "key_slots": slots}
    if variant == "skip":
        missing = sorted(set(plan.keep) - set(prune_layers))
        if missing:
            raise ValueError(f"the plan prunes at layer {missing[0]}, but the skip graph prunes at layers "
                             f"{list(prune_layers)}; rebuild with matching --skip-proportions/--skip-positions "
                             f"or --prune-layers")
        no_hidden = sorted(set(plan.keep) - set(cache.hidden))
        if no_hidden:
            raise ValueError(f"the plan prunes at layer {no_hidden[0]}, which has no hidden-state cache")
        if plan.confidence is None or plan.bonus is None or not plan.write_hidden:
            raise ValueError("a pruning plan needs confidence, bonus and write_hidden")
        feeds["confidence"], feeds["bonus"] = plan.confidence.float(), plan.bonus.float()
        alive = n
        for i, l in enumerate(prune_layers):
            mask = plan.keep.get(l)
            if mask is None:
                mask = idx.new_ones(B, alive, dtype=bool)
            feeds[keep_name(i)] = mask
            alive = mask.shape[1]
    else:
        feeds["head"] = plan.head if plan.head is not None else \
            idx.new_tensor(range(n)).expand(B, n)
    if variant == "saliency":
        feeds["salient"] = plan.salient
    if has_context(variant) and not cache.ctx:
        raise ValueError("a DyLLM step needs a cache with context and FFN caches (new_cache(saliency=True))")
    zeros = None
    for name in cache_inputs(variant, args.n_layers, prune_layers):
        t = cache_tensor(cache, name)
        if t is None:  # never read: this layer keeps every row and its hidden output is dropped
            if zeros is None:
                zeros = cache.k[0].new_zeros(B, cache.length + 1, args.dim)
            t = zeros
        feeds[name] = t
    return variant, feeds


def apply_outputs(cache: Cache, variant: str, outs: dict[str, Tensor], prune_layers: tuple[int, ...]
                  ) -> tuple[Tensor, Tensor]:
    """Write a step's merged caches into the Cache (in place) and return (logits [B, m, V], pred [B, m])."""
    for name in cache_inputs(variant, len(cache.k), prune_layers):
        dst = cache_tensor(cache, name)
        if dst is None:
            continue
        src = outs[output_name(name)]
        if src.data_ptr() != dst.data_ptr():  # an engine that merged in place aliased it: nothing to copy
            dst.copy_(src)
    return outs["logits"], outs["pred"]
