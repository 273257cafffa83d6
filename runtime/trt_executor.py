"""TensorRT executor: runs the step graphs' engines with the Transformer.step interface.

TrtExecutor  args, device, new_cache(batch, length, hidden_layers), step(tokens, idx, cache, plan)
             -> (logits [B, m, V], pred [B, m]); engines listed in engine.json (build/engine.py)
Session      one engine + execution context, shaped like TensorRT-LLM's Session: infer_shapes()
             checks every input (name, dtype, rank, profile range) and names the bad tensor, then
             run() binds addresses (set_tensor_address) and calls execute_async_v3 on torch's stream
The graph variant of a step and its named inputs come from executors.step_feeds, as for onnxruntime.

The cache stays in the runtime's Cache object on the GPU. An engine output that TensorRT aliases to
its cache input (the cache_merge plugin, in place) is bound to the same buffer; otherwise the merged
cache is a fresh tensor that replaces the Cache's entry after the step. Works for the `tensorrt`
backend (esdllm plugins registered on import) and for `tensorrt-rtx` engines on an RTX-class GPU.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
from torch import Tensor

from .artifacts import EngineError, EngineSpec
from .executors import step_feeds
from .model import Cache, StepPlan

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@functools.cache
def trt_logger(trt):
    """The TensorRT ILogger of module `trt` (one per process, as TensorRT wants) -> `logging`
    (logger esdllm.trt)."""
    import logging
    log = logging.getLogger("esdllm.trt")
    S = trt.ILogger.Severity
    levels = {S.INTERNAL_ERROR: logging.ERROR, S.ERROR: logging.ERROR, S.WARNING: logging.WARNING}

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            log.log(levels.get(severity, logging.DEBUG), "%s", msg)

    return Logger()


def _allocator(trt, device):
    """An IOutputAllocator for one data-dependent output (token_gather's row count K with plugins)."""

    class OutputAllocator(trt.IOutputAllocator):
        def __init__(self):
            trt.IOutputAllocator.__init__(self)
            self.buffer, self.shape = None, None

        def reallocate_output(self, tensor_name, memory, size, alignment):
            if self.buffer is None or self.buffer.numel() < size:
                self.buffer = torch.empty(max(int(size), 1), dtype=torch.uint8, device=device)
            return self.buffer.data_ptr()

        def reallocate_output_async(self, tensor_name, memory, size, alignment, stream):
            return self.reallocate_output(tensor_name, memory, size, alignment)

        def notify_shape(self, tensor_name, shape):
            self.shape = tuple(shape)

    return OutputAllocator()


def _import_trt(backend: str):
    if backend == "tensorrt":
        import tensorrt as trt
        from ..plugins.trt_plugins import register_plugins
        register_plugins()  # the engines' JIT plugins look their creators up while deserializing
        return trt
    if backend == "tensorrt-rtx":
        import tensorrt_rtx as trt
        return trt
    raise EngineError(f"engine backend {backend!r} is not a TensorRT backend (tensorrt, tensorrt-rtx)")


class Session:
    """One deserialized engine and its execution context (optimization profile 0)."""

    def __init__(self, trt, runtime, plan: bytes, name: str):
        self.trt, self.name = trt, name
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineError(f"TensorRT could not deserialize engine {name!r} (built by another TensorRT "
                              f"version or for another GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [t for t in names if self.engine.get_tensor_mode(t) == mode]
        self.outputs = [t for t in names if self.engine.get_tensor_mode(t) != mode]
        self.host = {t for t in self.inputs if self.engine.is_shape_inference_io(t)}
        self.aliases = {t: self.engine.get_aliased_input_tensor(t) for t in self.outputs}
        self.dtypes = {t: self._torch_dtype(self.engine.get_tensor_dtype(t)) for t in names}
        self._allocators = {}

    def _torch_dtype(self, dt):
        trt = self.trt
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                 trt.int64: torch.int64, trt.int32: torch.int32, trt.int8: torch.int8, trt.bool: torch.bool}
        return table.get(dt)

    def infer_shapes(self, feeds: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
        """Set every input's shape (host values for shape tensors) and return the output shapes."""
        missing, extra = sorted(set(self.inputs) - set(feeds)), sorted(set(feeds) - set(self.inputs))
        if missing or extra:
            raise ValueError(f"engine {self.name!r}: missing inputs {missing}, unexpected inputs {extra}")
        for t in self.inputs:
            x = feeds[t]
            if x.dtype != self.dtypes[t]:
                raise ValueError(f"engine {self.name!r}: input {t!r} has dtype {x.dtype}, the engine takes "
                                 f"{self.dtypes[t]}")
            want = tuple(self.engine.get_tensor_shape(t))
            if len(want) != x.dim():
                raise ValueError(f"engine {self.name!r}: input {t!r} has shape {tuple(x.shape)}, the engine "
                                 f"takes rank {len(want)} {want}")
            if -1 in want:
                lo, _, hi = (tuple(s) for s in self.engine.get_tensor_profile_shape(t, 0))
                if any(not a <= d <= b for a, d, b in zip(lo, x.shape, hi)):
                    raise ValueError(f"engine {self.name!r}: input {t!r} shape {tuple(x.shape)} is outside "
                                     f"the built profile [{lo} .. {hi}]")
                self.context.set_input_shape(t, tuple(x.shape))
            if t in self.host:  # a shape tensor: TensorRT reads its values on the host
                if x.device.type != "cpu" or not x.is_contiguous():
                    raise ValueError(f"engine {self.name!r}: shape input {t!r} must be a contiguous CPU tensor")
                lo, _, hi = self.engine.get_tensor_profile_values(0, t)  # (profile, name) positionally
                vals = x.reshape(-1).tolist()
                if any(not a <= v <= b for a, v, b in zip(lo, vals, hi)):
                    raise ValueError(f"engine {self.name!r}: input {t!r} values {vals} are outside the built "
                                     f"range [{list(lo)} .. {list(hi)}]")
                self.context.set_tensor_address(t, x.data_ptr())
        unset = self.context.infer_shapes()
        if unset:
            raise ValueError(f"engine {self.name!r}: TensorRT could not infer shapes; underspecified: {unset}")
        return {t: tuple(self.context.get_tensor_shape(t)) for t in self.outputs}

    def run(self, feeds: dict[str, Tensor], device) -> dict[str, Tensor]:
        """infer_shapes + bind + execute_async_v3 on torch's current stream. feeds must stay alive
        (and host shape tensors contiguous) until the step's work is done; outputs are returned."""
        feeds = {t: (x.cpu().contiguous() if t in self.host else x.to(device).contiguous())
                 for t, x in feeds.items()}
        shapes = self.infer_shapes(feeds)
        outs, dynamic = {}, {}
        for t in self.outputs:
            src = self.aliases.get(t)
            if src:
                outs[t] = feeds[src]  # written in place by the engine
            elif -1 in shapes[t]:  # size known only after the run (plugin size tensor)
                dynamic[t] = self._allocators.setdefault(t, _allocator(self.trt, device))
                self.context.set_output_allocator(t, dynamic[t])
            else:
                outs[t] = torch.empty(shapes[t], dtype=self.dtypes[t], device=device)
        for t, x in (*feeds.items(), *outs.items()):
            self.context.set_tensor_address(t, x.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(device).cuda_stream):
            raise RuntimeError(f"engine {self.name!r}: execute_async_v3 failed (see the TensorRT log)")
        for t, a in dynamic.items():
            n = math.prod(a.shape) * torch.empty((), dtype=self.dtypes[t]).element_size()
            outs[t] = a.buffer[:n].view(self.dtypes[t]).view(a.shape)
        return outs


class TrtExecutor:
    """Executor over the TensorRT engines of an artifacts directory (needs a CUDA GPU).

    Same interface as executors.OrtExecutor: args, device, dtype, spec, new_cache, step, check_request.
    """

    def __init__(self, root: str | Path, device: str = "cuda", backend: str | None = None):
        self.spec = EngineSpec.read(root)
        backend = backend or self.spec.build.backend
        if not self.spec.engines:
            raise EngineError(f"{self.spec.root} has no TensorRT engines in engine.json; build them with "
                              f"`esdllm build --backend tensorrt`")
        if not torch.cuda.is_available():
            raise RuntimeError("TensorRT engines need a CUDA GPU; use the torch or onnxruntime executor here")
        trt = _import_trt(backend)
        self._runtime = trt.Runtime(trt_logger(trt))
        sessions = {name: Session(trt, self._runtime, (self.spec.root / f).read_bytes(), name)
                    for name, f in self.spec.engines.items()}
        self._setup(self.spec, sessions, device)

    @classmethod
    def with_sessions(cls, spec: EngineSpec, sessions: dict, device: str = "cuda") -> "TrtExecutor":
        """An executor over given sessions: any objects with run(feeds, device) -> {output: Tensor}
        (tests drive the step logic with onnxruntime sessions on the CPU this way)."""
        ex = cls.__new__(cls)
        ex._setup(spec, sessions, device)
        return ex

    def _setup(self, spec: EngineSpec, sessions: dict, device) -> None:
        self.spec, self.sessions = spec, sessions
        self.device = torch.device(device)
        self.args = spec.model
        self.dtype = TORCH_DTYPES[spec.build.dtype]
        self.prune_layers = tuple(spec.prune_layers)

    def new_cache(self, batch: int, length: int, hidden_layers: tuple[int, ...] = ()) -> Cache:
        self.spec.check_canvas(batch, length)
        extra = sorted(set(hidden_layers) - set(self.prune_layers))
        if extra:
            raise EngineError(f"hidden-state cache at layer {extra[0]} requested, but the engines in "
                              f"{self.spec.root} were built with prune layers {list(self.prune_layers)}")
        return Cache(self.args, batch, length, self.dtype, self.device, tuple(hidden_layers))

    def check_request(self, batch: int, prompt_len: int, gen_length: int) -> None:
        self.spec.check_request(batch, prompt_len, gen_length)

    def step(self, tokens: Tensor, idx: Tensor, cache: Cache, plan: StepPlan | None = None
             ) -> tuple[Tensor, Tensor]:
        """Same contract as Transformer.step: tokens, idx [B, n] int64 -> logits [B, m, V], pred [B, m]."""
        plan = plan or StepPlan()
        variant, feeds = step_feeds(self.spec, tokens, idx, cache, plan)
        if not plan.write_hidden:  # the engine may merge hidden states in place; keep the cache as it is
            for l in cache.hidden:
                if f"hidden.{l}" in feeds:
                    feeds[f"hidden.{l}"] = feeds[f"hidden.{l}"].clone()
        if variant not in self.sessions:
            raise EngineError(f"this step needs the {variant!r} engine, but {self.spec.root} has engines for "
                              f"{sorted(self.sessions)}; rebuild with --variants including {variant}")
        outs = self.sessions[variant].run(feeds, self.device)
        # merged caches replace the Cache's tensors (the same tensors where the engine merged in place)
        for l in range(self.args.n_layers):
            cache.k[l], cache.v[l] = outs[f"k_cache_out.{l}"], outs[f"v_cache_out.{l}"]
        if plan.write_hidden and variant != "dense":
            for l in cache.hidden:
                cache.hidden[l] = outs[f"hidden_out.{l}"]
        return outs["logits"], outs["pred"]
