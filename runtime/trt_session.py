"""TensorRT sessions: the step graphs' engines as session adapters of executors.GraphExecutor.

TrtSession    one engine + execution context, shaped like TensorRT-LLM's Session: infer_shapes()
              checks every input (name, dtype, rank, profile range) and names the bad tensor, then
              run() binds addresses (set_tensor_address) and calls execute_async_v3 on torch's stream
load_sessions one TrtSession per engine listed in engine.json (build/engine.py wrote them), for
              executors.GraphExecutor

An engine output that TensorRT aliases to its cache input (the cache_merge plugin, in place) is bound
to the input's own buffer, so the merged cache is already in the Cache and nothing is copied; other
outputs get fresh buffers (runtime/contract.py copies merged caches back). Works for the `tensorrt`
backend (esdllm plugins registered on import) and for `tensorrt-rtx` engines on an RTX-class GPU.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .artifacts import EngineError, EngineSpec


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


class TrtSession:
    """One deserialized engine and its execution context (optimization profile 0) on `device`."""

    def __init__(self, trt, runtime, plan: bytes, name: str, device="cuda"):
        self.trt, self.name, self.device = trt, name, torch.device(device)
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineError(f"TensorRT could not deserialize engine {name!r} (built by another TensorRT "
                              f"version or for another GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [t for t in names if self.engine.get_tensor_mode(t) == mode]
        self.outputs = [t for t in names if self.engine.get_tensor_mode(t) != mode]
        host = [t for t in self.inputs if self.engine.is_shape_inference_io(t)]
        if host:  # the step graphs take no shape tensors (runtime/contract.py): a foreign engine
            raise EngineError(f"engine {name!r} takes shape-tensor inputs {host}; it was not built from "
                              f"esdllm's step graphs")
        self.aliases = {t: self.engine.get_aliased_input_tensor(t) for t in self.outputs}
        self.dtypes = {t: self._torch_dtype(self.engine.get_tensor_dtype(t)) for t in names}

    def _torch_dtype(self, dt):
        trt = self.trt
        table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                 trt.int64: torch.int64, trt.int32: torch.int32, trt.int8: torch.int8, trt.bool: torch.bool}
        return table.get(dt)

    def infer_shapes(self, feeds: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
        """Set every input's shape and return the output shapes."""
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
        unset = self.context.infer_shapes()
        if unset:
            raise ValueError(f"engine {self.name!r}: TensorRT could not infer shapes; underspecified: {unset}")
        return {t: tuple(self.context.get_tensor_shape(t)) for t in self.outputs}

    def run(self, feeds: dict[str, Tensor]) -> dict[str, Tensor]:
        """infer_shapes + bind + execute_async_v3 on torch's current stream; returns the outputs (an
        aliased output is its input's tensor, written in place)."""
        feeds = {t: x.to(self.device).contiguous() for t, x in feeds.items()}
        shapes = self.infer_shapes(feeds)
        outs = {}
        for t in self.outputs:
            src = self.aliases.get(t)
            outs[t] = feeds[src] if src else torch.empty(shapes[t], dtype=self.dtypes[t], device=self.device)
        for t, x in (*feeds.items(), *outs.items()):
            self.context.set_tensor_address(t, x.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"engine {self.name!r}: execute_async_v3 failed (see the TensorRT log)")
        return outs


def load_sessions(spec: EngineSpec, device: str = "cuda", backend: str | None = None) -> dict[str, TrtSession]:
    """{variant: TrtSession} over the TensorRT engines of an artifacts directory (needs a CUDA GPU)."""
    backend = backend or spec.build.backend
    if not spec.engines:
        raise EngineError(f"{spec.root} has no TensorRT engines in engine.json; build them with "
                          f"`esdllm build --backend tensorrt`")
    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT engines need a CUDA GPU; use the torch or onnxruntime executor here")
    trt = _import_trt(backend)
    runtime = trt.Runtime(trt_logger(trt))
    sessions = {name: TrtSession(trt, runtime, (spec.root / f).read_bytes(), name, device)
                for name, f in spec.engines.items()}
    for s in sessions.values():
        s.runtime = runtime  # the deserializing runtime lives as long as its engines
    return sessions
