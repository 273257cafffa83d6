"""Executors: one forward of a planned step behind the `Transformer.step` interface.

TorchExecutor  the Transformer itself (runtime/model.py)
GraphExecutor  the step graphs `esdllm build` wrote (runtime/contract.py), run by session adapters:
               OrtSession here (onnxruntime, CPU or CUDA) or runtime/trt_session.TrtSession (TensorRT)
make_executor  "torch" | "onnxruntime" | "tensorrt", from a checkpoint or an artifacts directory

Every executor has .args, .device, .dtype, new_cache(batch, length, hidden_layers),
step(tokens, idx, cache, plan) -> (logits, pred) and check_request(batch, prompt_len, gen_length).
A session adapter has run(feeds: {name: Tensor}) -> {output name: Tensor}. onnx, onnxruntime and
tensorrt are imported only when their executor is built.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import contract
from .artifacts import EngineError, EngineSpec
from .cache import Cache, StepPlan
from .config import ModelArgs
from .model import Transformer
from .policies import top2_bonus

KINDS = ("torch", "onnxruntime", "tensorrt")


class TorchExecutor:
    """The PyTorch model as an executor (the reference every other executor must match)."""

    def __init__(self, model: Transformer):
        self.model = model

    @classmethod
    def load(cls, model_dir: str | Path, dtype=None, device: str = "cpu", ops: str | None = None) -> "TorchExecutor":
        from .weights import load_model
        return cls(load_model(model_dir, dtype=dtype, device=device, ops=ops))

    @property
    def args(self) -> ModelArgs:
        return self.model.args

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def new_cache(self, batch: int, length: int, hidden_layers: tuple[int, ...] = (), saliency: bool = False) -> Cache:
        return self.model.new_cache(batch, length, hidden_layers, saliency)

    def step(self, tokens: Tensor, idx: Tensor, cache: Cache, plan: StepPlan | None = None):
        return self.model.step(tokens, idx, cache, plan)

    def check_request(self, batch: int, prompt_len: int, gen_length: int) -> None:
        if prompt_len + gen_length > self.args.max_seq_len:
            raise ValueError(f"prompt ({prompt_len} tokens) + gen_length ({gen_length}) exceeds the model's "
                             f"maximum sequence length {self.args.max_seq_len}")


class GraphExecutor:
    """Runs the step graphs of an artifacts directory through session adapters, one per variant.

    sessions: {variant: adapter}, or a callable variant -> adapter (created on first use). The
    Cache lives on `device`; a step feeds its tensors by name (contract.step_feeds) and the merged
    caches come back into them (contract.apply_outputs).
    """

    def __init__(self, spec: EngineSpec, sessions, device="cpu", kind: str = "graph"):
        self.spec, self.kind = spec, kind
        self.args = spec.model
        self.device = torch.device(device)
        from .weights import resolve_dtype
        self.dtype = resolve_dtype(spec.build.dtype)
        self.prune_layers = tuple(spec.prune_layers)
        self._sessions = sessions if callable(sessions) else dict(sessions).__getitem__
        self._open: dict[str, object] = {}
        self.calls: Counter[str] = Counter()  # steps run per variant

    def session(self, variant: str):
        if variant not in self._open:
            try:
                self._open[variant] = self._sessions(self.spec.variant_name(variant))
            except KeyError:
                raise EngineError(f"the artifacts in {self.spec.root} have no {self.kind} session for the "
                                  f"{variant!r} graph; rebuild them") from None
        return self._open[variant]

    def new_cache(self, batch: int, length: int, hidden_layers: tuple[int, ...] = (), saliency: bool = False) -> Cache:
        self.spec.check_canvas(batch, length)
        extra = sorted(set(hidden_layers) - set(self.prune_layers))
        if extra:
            raise EngineError(
                f"hidden-state cache at layer {extra[0]} requested, but the artifacts in {self.spec.root} "
                f"were built with prune layers {list(self.prune_layers)}; rebuild with matching "
                f"--skip-proportions/--skip-positions or --prune-layers")
        return Cache(self.args, batch, length, self.dtype, self.device, tuple(hidden_layers), saliency)

    def check_request(self, batch: int, prompt_len: int, gen_length: int) -> None:
        self.spec.check_request(batch, prompt_len, gen_length)

    def step(self, tokens: Tensor, idx: Tensor, cache: Cache, plan: StepPlan | None = None):
        """Same contract as Transformer.step: tokens, idx [B, n] int64 -> logits [B, m, V], pred [B, m]."""
        plan = plan or StepPlan()
        if plan.keep and abs(plan.alpha - self.spec.build.alpha) > 1e-9:
            raise ValueError(f"plan alpha {plan.alpha} differs from the alpha {self.spec.build.alpha} the skip "
                             f"graph in {self.spec.root} was built with; rebuild with --alpha {plan.alpha}")
        if plan.salient is not None and abs(plan.tau - self.spec.build.saliency_tau) > 1e-9:
            raise ValueError(f"plan saliency tau {plan.tau} differs from the tau {self.spec.build.saliency_tau} the "
                             f"saliency graph in {self.spec.root} was built with; rebuild with --saliency-tau {plan.tau}")
        if plan.keep and plan.top2 != top2_bonus(self.spec.build.alpha):
            raise ValueError(f"plan top-2 bonus {plan.top2} differs from the skip graph's "
                             f"{top2_bonus(self.spec.build.alpha)} ({self.spec.root})")
        variant, feeds = contract.step_feeds(self.args, self.prune_layers, tokens, idx, cache, plan)
        outs = self.session(variant).run(feeds)
        self.calls[variant] += 1
        return contract.apply_outputs(cache, variant, outs, self.prune_layers)


class OrtSession:
    """One onnxruntime InferenceSession as a session adapter (torch tensors in and out)."""

    def __init__(self, path: Path, providers: list[str]):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.sess = ort.InferenceSession(str(path), opts, providers=providers)
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def run(self, feeds: dict[str, Tensor]) -> dict[str, Tensor]:
        outs = self.sess.run(None, {k: _np(v) for k, v in feeds.items()})
        return {name: torch.from_numpy(a) for name, a in zip(self.outputs, outs)}


ORT_DTYPES = ("float32", "float16")  # onnxruntime's CPU kernels have no bfloat16 for these graphs


def ort_executor(spec: EngineSpec, device: str = "cpu") -> GraphExecutor:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ImportError(f"the onnxruntime executor needs onnxruntime (pip install 'esdllm[onnx]'): {e}") from e
    if spec.build.dtype not in ORT_DTYPES:
        raise EngineError(f"the onnxruntime executor runs float32 or float16 graphs; the artifacts in "
                          f"{spec.root} are {spec.build.dtype} (rebuild with --dtype float32, or use the "
                          f"torch or tensorrt executor)")
    providers = _ort_providers(device)
    # the caches stay torch CPU tensors: onnxruntime takes and returns host memory
    return GraphExecutor(spec, lambda v: OrtSession(spec.variant_file(v), providers), "cpu", "onnxruntime")


def _np(t: Tensor) -> np.ndarray:
    """A CPU numpy view (copy only when the tensor lives elsewhere or is strided)."""
    return t.detach().to("cpu").contiguous().numpy()


def args_from_dir(model_dir: str | Path) -> ModelArgs:
    """ModelArgs of a checkpoint from its config.json and tokenizer.json (no weights read)."""
    from .tokenizer import special_ids_from_files
    from .weights import SUPPORTED_MODEL_TYPES, args_from_hf_config
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    family = SUPPORTED_MODEL_TYPES.get(cfg.get("model_type"))
    return args_from_hf_config(cfg, special_ids_from_files(model_dir, family) if family else None)


def make_executor(kind: str, model_dir: str | Path | None = None, engine_dir: str | Path | None = None,
                  dtype=None, device: str = "cpu", spec: EngineSpec | None = None, ops: str | None = None):
    """An executor of `kind`. torch loads model_dir (ops: its op backend, default the device's);
    onnxruntime and tensorrt load the artifacts (engine_dir, or an already read `spec`) and, when
    model_dir is given too, fail if they were built for another model."""
    if kind == "torch":
        if model_dir is None:
            raise ValueError("the torch executor needs a checkpoint directory (--model DIR)")
        return TorchExecutor.load(model_dir, dtype=dtype, device=device, ops=ops)
    if ops is not None:
        raise ValueError(f"--ops applies to the torch executor; the {kind} executor's ops are in its graphs")
    if kind not in KINDS:
        raise ValueError(f"unknown executor {kind!r}; expected one of {KINDS}")
    if spec is None:
        if engine_dir is None:
            raise ValueError(f"the {kind} executor needs an artifacts directory from `esdllm build` (--engine DIR)")
        spec = EngineSpec.read(engine_dir)
    if kind == "onnxruntime":
        ex = ort_executor(spec, device)
    else:
        from .trt_session import load_sessions  # TensorRT only when asked for
        ex = GraphExecutor(spec, load_sessions(spec, device), device, "tensorrt")
    if dtype is not None:
        from .weights import resolve_dtype
        if resolve_dtype(dtype) != ex.dtype:
            raise ValueError(f"--dtype {dtype} requested, but the artifacts in {spec.root} were built for "
                             f"{spec.build.dtype}")
    if model_dir is not None:
        spec.check_model(args_from_dir(model_dir), model_dir)
    return ex


def _ort_providers(device: str) -> list[str]:
    if str(device).startswith("cuda"):
        import onnxruntime as ort
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError(f"device {device!r} needs onnxruntime's CUDAExecutionProvider (onnxruntime-gpu); "
                             f"available: {ort.get_available_providers()}")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]
