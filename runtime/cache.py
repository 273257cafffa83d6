"""The explicit state of decoding: the `Cache` a forward reads and writes, the `StepPlan` an executor
runs, and the `StepContext` a policy plans from.

Every forward, vanilla included, runs a set of canvas rows against the Cache: the rows' fresh K/V
(and, at prune layers, hidden states) are written into it by index, then the rows attend to every
valid canvas slot. Slot L (one past the canvas) is the trash slot: never a valid key, the target of
every padding entry and every row a batch entry does not need, so ragged per-row work fits one dense
shape and a row's result never depends on its batch mates.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .config import ModelArgs


_SLOT_DIM = {"k": 2, "v": 2, "dv": 2}  # the slot dimension of each cache tensor (the others: 1)


class Cache:
    """Preallocated per-layer K and V for every canvas slot, plus hidden states at prune layers.

    k[l], v[l]: [B, n_kv_heads, L + 1, head_dim]; hidden[l]: [B, L + 1, dim] for l in hidden_layers;
    positions: [B, L + 1] int64, the true RoPE position of each slot (left padding aware);
    key_valid: [B, L + 1] bool, False for left padding and the trash slot.
    With saliency (DyLLM): ctx[l] [B, L + 1, H * hd] the attention output before wo, ffn[l]
    [B, L + 1, dim] the FFN output, of every layer, and dv [B, Hkv, L + 1, hd] a zeroed scratch
    for the value deltas of one layer.
    """

    def __init__(self, args: ModelArgs, batch: int, length: int, dtype: torch.dtype, device,
                 hidden_layers: tuple[int, ...] = (), saliency: bool = False):
        self.batch, self.length = batch, length
        shape = (batch, args.n_kv_heads, length + 1, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.hidden = {l: torch.zeros(batch, length + 1, args.dim, dtype=dtype, device=device)
                       for l in hidden_layers}
        layers = range(args.n_layers) if saliency else ()
        self.ctx = {l: torch.zeros(batch, length + 1, args.n_heads * args.head_dim, dtype=dtype, device=device)
                    for l in layers}
        self.ffn = {l: torch.zeros(batch, length + 1, args.dim, dtype=dtype, device=device) for l in layers}
        self.dv = torch.zeros(shape, dtype=dtype, device=device) if saliency else None
        self.positions = torch.zeros(batch, length + 1, dtype=torch.long, device=device)
        self.key_valid = torch.zeros(batch, length + 1, dtype=torch.bool, device=device)

    @property
    def trash(self) -> int:
        return self.length

    def nbytes(self) -> int:
        """Bytes the cache holds (K/V, hidden, context and FFN caches, scratch)."""
        ts = [*self.k, *self.v, *self.hidden.values(), *self.ctx.values(), *self.ffn.values()]
        ts += [t for t in (self.dv, self.positions, self.key_valid) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)

    def narrow(self, k: int) -> "Cache":
        """The first k batch rows as a Cache of views: a forward over them writes this cache."""
        out = object.__new__(Cache)
        out.batch, out.length = k, self.length
        out.k, out.v = [t[:k] for t in self.k], [t[:k] for t in self.v]
        out.hidden = {l: t[:k] for l, t in self.hidden.items()}
        out.ctx = {l: t[:k] for l, t in self.ctx.items()}
        out.ffn = {l: t[:k] for l, t in self.ffn.items()}
        out.dv = None if self.dv is None else self.dv[:k]
        out.positions, out.key_valid = self.positions[:k], self.key_valid[:k]
        return out

    def _tensors(self) -> list[tuple[str, object, Tensor]]:
        out = [("k", i, t) for i, t in enumerate(self.k)] + [("v", i, t) for i, t in enumerate(self.v)]
        for name in ("hidden", "ctx", "ffn"):
            out += [(name, l, t) for l, t in getattr(self, name).items()]
        out += [(name, None, getattr(self, name)) for name in ("dv", "positions", "key_valid")
                if getattr(self, name) is not None]
        return out

    def take(self, rows: Tensor, upto: int | None = None) -> "Cache":
        """Batch rows `rows` [g] copied into a Cache of their own (write them back with put). upto:
        copy only slots [0, upto) and the trash slot; the copy's other slots are left unset, so a
        forward over it must neither read nor write them (the engine's rows end by then)."""
        out = object.__new__(Cache)
        out.batch, out.length = rows.numel(), self.length
        out.k, out.v, out.hidden, out.ctx, out.ffn, out.dv = [None] * len(self.k), [None] * len(self.v), {}, {}, {}, None
        part = upto is not None and upto < self.length
        for name, key, t in self._tensors():
            if part:
                sub, d = t.new_empty((rows.numel(), *t.shape[1:])), _SLOT_DIM.get(name, 1)
                for lo, n in ((0, upto), (self.length, 1)):
                    sub.narrow(d, lo, n).copy_(t.narrow(d, lo, n).index_select(0, rows))
            else:
                sub = t.index_select(0, rows)
            if key is None:
                setattr(out, name, sub)
            else:
                getattr(out, name)[key] = sub
        return out

    def put(self, rows: Tensor, sub: "Cache", upto: int | None = None) -> None:
        """Write a Cache made by take(rows, upto) back into these rows."""
        part = upto is not None and upto < self.length
        for (name, key, t), (_, _, s) in zip(self._tensors(), sub._tensors()):
            if not part:
                t.index_copy_(0, rows, s)
                continue
            d = _SLOT_DIM.get(name, 1)
            for lo, n in ((0, upto), (self.length, 1)):
                t.narrow(d, lo, n).index_copy_(0, rows, s.narrow(d, lo, n))

    def set_row(self, row: int, length: int) -> None:
        """Row `row` holds a canvas of `length` slots from slot 0 (prompt, then its generation); the
        slots after it are not keys. Its K/V and hidden caches are left as they are: a request's
        first forward writes every slot it will read."""
        ar = torch.arange(self.length + 1, device=self.positions.device)
        self.positions[row] = torch.where(ar < length, ar, 0)
        self.key_valid[row] = ar < length

    def set_layout(self, pad_lens: Tensor) -> None:
        """pad_lens: [B] int, number of left-padding slots per row."""
        ar = torch.arange(self.length, device=self.positions.device)
        pos = ar[None, :] - pad_lens.to(ar.device)[:, None]
        self.positions[:, : self.length] = pos.clamp_min(0)
        self.positions[:, self.length] = 0
        self.key_valid[:, : self.length] = pos >= 0
        self.key_valid[:, self.length] = False


@dataclass
class StepPlan:
    """What one forward does beyond running its rows against the cache.

    head: [B, m] int64, which of the rows alive after the last layer reach the LM head (None: all).
    keep: {prune layer: keep_mask [B, k] bool}: at that layer's output keep the k most important rows,
        entry b only its first keep_mask[b].sum() of them (the rest go to the trash slot). Only layers
        that really prune are listed (k below the rows alive there).
    write_hidden: store the surviving rows' hidden states at the prune layers (ES-dLLM).
    confidence, bonus: [B, L + 1] float32 importance inputs in canvas coordinates (ES-dLLM).
    top2: added at each prune layer to the two most confident rows alive there (ES-dLLM).
    key_slots: [B, nk] int64, the cache slots this forward attends to, in canvas order (the trash slot
        pads; Streaming-dLLM's pruned suffix is left out); None: every slot, or the first key_len.
    key_len: with key_slots None, attend to slots [0, key_len) only, as a view (the engine's rows
        end before the canvas does: the slots past the last end hold no key).
    write_context: store every row's attention context and FFN output (DyLLM's dense steps).
    salient: [B, n] bool, DyLLM's sparse step: the rows whose input changed since their caches were
        written (the tokens committed last step); tau: the saliency threshold; padded: static shapes.
    """

    head: Tensor | None = None
    keep: dict[int, Tensor] = field(default_factory=dict)
    write_hidden: bool = False
    confidence: Tensor | None = None
    bonus: Tensor | None = None
    alpha: float = 0.5
    top2: float = 0.0
    key_slots: Tensor | None = None
    key_len: int | None = None
    write_context: bool = False
    salient: Tensor | None = None
    tau: float = 0.99
    padded: bool = False

    def keys(self, cache: "Cache") -> Tensor:
        """[B, nk] bool: which of the key slots (key_slots, the first key_len, or all L + 1) are real keys."""
        if self.key_slots is not None:
            return cache.key_valid.gather(1, self.key_slots)
        return cache.key_valid if self.key_len is None else cache.key_valid[:, : self.key_len]

    def rows_per_layer(self, n: int, n_layers: int) -> float:
        """Rows processed per layer, averaged over layers (the dense compute of one forward of n rows)."""
        total, cur = 0, n
        for l in range(n_layers):
            total += cur
            if l in self.keep:
                cur = self.keep[l].shape[1]
        return total / n_layers


@dataclass
class StepContext:
    """One forward's rows, as a policy plans and commits them.

    x: [B, L] canvas (mask_id where undecided), written by the policy's commit; s: [B] int64 start of
    each row's current block, s_host the same on the host (shapes are decided from host values); bl:
    block length; step: [B] each row's step inside its block; phase: what kind of forward this is
    (Policy.kind of the rows' phases, the same for every row of a forward); active: [B] bool, rows that decode (the
    others idle on the trash slot); gen_start: the canvas column where generation begins, one int
    for every row or [B]; end, end_host: [B] where each row's canvas ends (None: at L). Host lists
    hold active rows' values (the idle rows repeat one of them), so they never widen a shape.
    """

    x: Tensor
    s: Tensor
    s_host: list[int]
    bl: int
    step: Tensor
    phase: object
    active: Tensor
    gen_start: int | Tensor
    end: Tensor | None = None
    end_host: list[int] | None = None
    start_host: list[int] | None = None   # gen_start on the host when it is a tensor
    phases: list | None = None             # each row's own phase, when rows of one kind differ in it

    @property
    def ends(self) -> Tensor:
        """[B] int64: each row's canvas end (generation end)."""
        if self.end is None:
            return torch.full_like(self.s, self.x.shape[1])
        return self.end

    @property
    def ends_host(self) -> list[int]:
        return self.end_host if self.end_host is not None else [self.x.shape[1]] * len(self.s_host)

    @property
    def starts_host(self) -> list[int]:
        g = self.gen_start
        return self.start_host if isinstance(g, Tensor) else [g] * len(self.s_host)

    @property
    def starts(self) -> Tensor:
        """[B] int64: each row's generation start."""
        g = self.gen_start
        return g if isinstance(g, Tensor) else torch.full_like(self.s, g)

    @property
    def cols(self) -> Tensor:
        """[B, bl] canvas columns of each row's current block."""
        return self.s[:, None] + torch.arange(self.bl, device=self.s.device)
