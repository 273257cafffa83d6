"""GraphedExecutor: CUDA-graph replay of the step, one graph per forward kind and shape.

A diffusion step launches hundreds of small kernels (per layer: norms, projections, RoPE, the three
esdllm ops); at batch 8 on an H200 a skipping step's launches cost as much as its math. With shapes
decided on the host (DecodeConfig.static_shapes) and no host reads inside the step (runtime/nosync.py),
the step can be recorded once and replayed: a key is the cache, the plan's structure (which fields,
which prune layers) and every input's shape and dtype. The first step with a key runs eagerly (it
warms up the libraries, and a step is not idempotent: DyLLM reads the caches it writes), the second
records a graph over static copies of the inputs and replays it, later ones copy their inputs in and
replay. Graphs share one memory pool; outputs are cloned out of it. A new cache (a new generate
call) drops the graphs of the old one; the views of one cache (the engine's first-rows spans) share
its graphs' lifetime.

`replayer` makes the recording pluggable: torch.cuda.CUDAGraph on CUDA; tests on the CPU pass
`EagerReplay`, which re-runs the step over the same static buffers, so everything but the recording
itself (keys, buffers, the plan rebuilt over them) is exercised without a GPU.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .cache import Cache, StepPlan
from .compiled import WrappedExecutor


def _flatten(tokens: Tensor, idx: Tensor, plan: StepPlan) -> tuple[list[Tensor], tuple]:
    """The step's tensor inputs in a fixed order, and the hashable rest (field names, layers, scalars)."""
    tensors, spec = [tokens, idx], []
    for f in dataclasses.fields(StepPlan):
        v = getattr(plan, f.name)
        if isinstance(v, Tensor):
            tensors.append(v)
            spec.append((f.name, "tensor"))
        elif isinstance(v, dict):
            layers = tuple(sorted(v))
            tensors.extend(v[l] for l in layers)
            spec.append((f.name, "layers", layers))
        else:
            spec.append((f.name, v))
    return tensors, tuple(spec)


def _rebuild(tensors: list[Tensor], spec: tuple) -> tuple[Tensor, Tensor, StepPlan]:
    it = iter(tensors)
    tokens, idx, kw = next(it), next(it), {}
    for entry in spec:
        name = entry[0]
        if entry[1] == "tensor":
            kw[name] = next(it)
        elif entry[1] == "layers":
            kw[name] = {l: next(it) for l in entry[2]}
        else:
            kw[name] = entry[1]
    return tokens, idx, StepPlan(**kw)


class CudaReplay:
    """torch.cuda.CUDAGraph recording of fn() (inputs already in static buffers) in a shared pool."""

    pool = None

    def __init__(self, fn):
        if CudaReplay.pool is None:
            CudaReplay.pool = torch.cuda.graph_pool_handle()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=CudaReplay.pool):
            self.outputs = fn()

    def replay(self) -> tuple[Tensor, ...]:
        self.graph.replay()
        return self.outputs


class EagerReplay:
    """The CPU stand-in for tests: recording runs nothing (as on CUDA), a replay runs fn over the
    same static buffers."""

    def __init__(self, fn):
        self.fn = fn

    def replay(self) -> tuple[Tensor, ...]:
        return self.fn()


class _Graph:
    def __init__(self, step, tensors: list[Tensor], spec: tuple, cache: Cache, replayer):
        self.inputs = [t.clone() for t in tensors]  # the static buffers every replay reads
        tokens, idx, plan = _rebuild(self.inputs, spec)
        self.replayer = replayer(lambda: step(tokens, idx, cache, plan))  # records; runs nothing

    def __call__(self, tensors: list[Tensor]) -> tuple[Tensor, ...]:
        for dst, src in zip(self.inputs, tensors):
            dst.copy_(src)
        return tuple(t.clone() for t in self.replayer.replay())


class GraphedExecutor(WrappedExecutor):
    """A torch executor (or Transformer) whose steps replay CUDA graphs; same interface."""

    mode = "cuda-graphs"

    def __init__(self, base, replayer=None):
        if replayer is None and base.device.type != "cuda":
            raise ValueError(f"--cuda-graphs needs a CUDA device; the model is on {base.device}")
        super().__init__(base)
        self.replayer = replayer or CudaReplay
        self.graphs: dict[tuple, _Graph] = {}
        self.seen: set[tuple] = set()
        self.cache_id = None
        self.stats = {"eager": 0, "recorded": 0, "replayed": 0}

    def step(self, tokens: Tensor, idx: Tensor, cache: Cache, plan: StepPlan | None = None):
        plan = plan or StepPlan()
        root = cache.k[0].untyped_storage().data_ptr()  # views of one cache (the engine's row spans) share it
        if root != self.cache_id:  # graphs hold the old cache's addresses: let them go with it
            self.graphs.clear()
            self.seen.clear()
            self.cache_id = root
        tensors, spec = _flatten(tokens, idx, plan)
        key = (id(cache), spec, tuple((tuple(t.shape), t.dtype) for t in tensors))
        graph = self.graphs.get(key)
        if graph is None:
            if key not in self.seen:  # first sight: run eagerly (warm-up, and the step's real result)
                self.seen.add(key)
                self.stats["eager"] += 1
                return self.base.step(tokens, idx, cache, plan)
            graph = self.graphs[key] = _Graph(self.base.step, tensors, spec, cache, self.replayer)
            self.stats["recorded"] += 1
        else:
            self.stats["replayed"] += 1
        return graph(tensors)
