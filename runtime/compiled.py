"""Compiled steps: `compiled(executor, mode)` wraps a torch executor.

modes    "compile"      CompiledExecutor: torch.compile (inductor) of Transformer.step, one graph per
                        forward kind, the elementwise work fused; on the CPU the weights frozen and
                        prepacked
         "cuda-graphs"  runtime/cudagraphs.GraphedExecutor: each forward kind and shape recorded
                        once as a CUDA graph and replayed (GPU only)

Both need shapes decided from host values and no host reads inside the step, so they ask generate()
for DecodeConfig.static_shapes (runtime/nosync.py proves the step has none).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .cache import Cache, StepPlan

MODES = ("compile", "cuda-graphs")


class WrappedExecutor:
    """A torch executor (or a Transformer) with another step: args, device, dtype, new_cache and
    check_request are the base's. Its steps need shapes decided on the host."""

    static_shapes = True  # generate() and the engine decode with DecodeConfig.static_shapes

    def __init__(self, base):
        self.base = base

    @property
    def args(self):
        return self.base.args

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    def new_cache(self, batch: int, length: int, hidden_layers: tuple[int, ...] = (), saliency: bool = False) -> Cache:
        return self.base.new_cache(batch, length, hidden_layers, saliency)

    def check_request(self, batch: int, prompt_len: int, gen_length: int) -> None:
        if hasattr(self.base, "check_request"):
            self.base.check_request(batch, prompt_len, gen_length)


class CompiledExecutor(WrappedExecutor):
    """The base's step through torch.compile."""

    mode = "compile"

    def __init__(self, base):
        import torch._dynamo.config as dynamo_config
        import torch._inductor.config as inductor_config
        # every forward kind (full, block, block start, prune layers listed or not) is its own graph
        dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 64)
        if base.device.type == "cpu":  # constant weights: oneDNN prepacks them for the small-M GEMMs
            inductor_config.freezing = True
        super().__init__(base)
        model = getattr(base, "model", base)  # a TorchExecutor's Transformer, or the Transformer itself
        self._step = torch.compile(model.step)

    def step(self, tokens: Tensor, idx: Tensor, cache: Cache, plan: StepPlan | None = None):
        return self._step(tokens, idx, cache, plan)


def compiled(executor, mode: str | None):
    """executor itself when mode is None, else a CompiledExecutor over it (torch executors only)."""
    if mode is None:
        return executor
    if mode not in MODES:
        raise ValueError(f"unknown compile mode {mode!r}; expected one of {MODES}")
    from .executors import TorchExecutor
    from .model import Transformer
    if not isinstance(executor, (TorchExecutor, Transformer)):
        raise ValueError(f"--{mode} applies to the torch executor; the {getattr(executor, 'kind', '?')} "
                         f"executor runs built graphs")
    if mode == "cuda-graphs":
        from .cudagraphs import GraphedExecutor
        return GraphedExecutor(executor)
    return CompiledExecutor(executor)
