"""Executors: one forward of a planned step behind the `Transformer.step` interface.

TorchExecutor  the Transformer itself (runtime/model.py)
OrtExecutor    the ONNX graph variants written by `esdllm build`, run by onnxruntime. The caches
               stay torch CPU tensors (model.Cache); they go in as graph inputs and take the merged
               caches the graph returns, so the loop sees the same in-place update as with torch.
step_feeds     the pure part of an engine step: which graph variant a StepPlan needs and its named
               inputs (shared with the TensorRT executor)
make_executor  "torch" | "onnxruntime" | "tensorrt" (runtime/trt_executor.py, imported on demand)

Every executor has .args, .device, .dtype, new_cache(batch, length, hidden_layers),
step(tokens, idx, cache, plan) -> (logits, pred) and check_request(batch, prompt_len, gen_length).
onnx, onnxruntime and tensorrt are imported only when their executor is built.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .artifacts import EngineError, EngineSpec
from .config import ModelArgs
from .model import Cache, StepPlan, Transformer

KINDS = ("torch", "onnxruntime", "tensorrt")
_ORT_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class TorchExecutor:
    """The PyTorch model as an executor (the reference every other executor must match)."""

    def __init__(self, model: Transformer):
        self.model = model

    @classmethod
    def load(cls, model_dir: str | Path, dtype=None, device: str = "cpu") -> "TorchExecutor":
        from .weights import load_model
        return cls(load_model(model_dir, dtype=dtype, device=device))

    @property
    def args(self) -> ModelArgs:
        return self.model.args

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def new_cache(self, batch: int, length: int, hidden_layers: tuple[int, ...] = ()) -> Cache:
        return self.model.new_cache(batch, length, hidden_layers)

    def step(self, tokens: Tensor, idx: Tensor, cache: Cache, plan: StepPlan | None = None):
        return self.model.step(tokens, idx, cache, plan)

    def check_request(self, batch: int, prompt_len: int, gen_length: int) -> None:
        if prompt_len + gen_length > self.args.max_seq_len:
            raise ValueError(f"prompt ({prompt_len} tokens) + gen_length ({gen_length}) exceeds the model's "
                             f"maximum sequence length {self.args.max_seq_len}")


def effective_keep(keep: dict[int, int] | None, n: int) -> dict[int, int]:
    """The prune layers where Transformer.step really prunes: k below the rows still alive there."""
    out, cur = {}, n
    for layer in sorted(keep or {}):
        if keep[layer] < cur:
            out[layer] = cur = keep[layer]
    return out


class OrtExecutor:
    """onnxruntime over the artifacts of `esdllm build` (engine.json + variant .onnx files).

    Variant per step: skip when the plan prunes somewhere, dense_hidden when it writes hidden
    states, dense otherwise. Sessions are created on first use of their variant.
    """

    def __init__(self, engine_dir: str | Path, providers: list[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError(f"the onnxruntime executor needs onnxruntime (pip install 'esdllm[onnx]'): {e}") from e
        self._ort = ort
        self.spec = EngineSpec.read(engine_dir)
        dtype = self.spec.build.dtype
        if dtype not in _ORT_DTYPES:
            raise EngineError(f"the onnxruntime executor runs float32 or float16 graphs; the artifacts in "
                              f"{self.spec.root} are {dtype} (rebuild with --dtype float32, or use the "
                              f"torch or tensorrt executor)")
        self.dtype = _ORT_DTYPES[dtype]
        self.args = self.spec.model
        self.device = torch.device("cpu")
        self.providers = providers or ["CPUExecutionProvider"]
        self.prune_layers = tuple(self.spec.prune_layers)
        self._sessions: dict[str, object] = {}
        self.calls: Counter[str] = Counter()  # steps run per variant

    def session(self, variant: str):
        if variant not in self._sessions:
            path = self.spec.variant_file(variant)
            opts = self._ort.SessionOptions()
            opts.log_severity_level = 3
            sess = self._ort.InferenceSession(str(path), opts, providers=self.providers)
            self._sessions[variant] = (sess, [o.name for o in sess.get_outputs()])
        return self._sessions[variant]

    def new_cache(self, batch: int, length: int, hidden_layers: tuple[int, ...] = ()) -> Cache:
        self.spec.check_canvas(batch, length)
        extra = sorted(set(hidden_layers) - set(self.prune_layers))
        if extra:
            raise EngineError(
                f"hidden-state cache at layer {extra[0]} requested, but the artifacts in {self.spec.root} "
                f"were built with prune layers {list(self.prune_layers)}; rebuild with matching "
                f"--skip-proportions/--skip-positions or --prune-layers")
        return Cache(self.args, batch, length, self.dtype, self.device, tuple(hidden_layers))

    def check_request(self, batch: int, prompt_len: int, gen_length: int) -> None:
        self.spec.check_request(batch, prompt_len, gen_length)

    def step(self, tokens: Tensor, idx: Tensor, cache: Cache, plan: StepPlan | None = None):
        """Same contract as Transformer.step: tokens, idx [B, n] int64 -> logits [B, m, V], pred [B, m]."""
        plan = plan or StepPlan()
        variant, feeds = step_feeds(self.spec, tokens, idx, cache, plan)
        sess, names = self.session(variant)
        out = dict(zip(names, sess.run(None, {k: _np(v) for k, v in feeds.items()})))
        self.calls[variant] += 1
        for l in range(self.args.n_layers):
            cache.k[l].copy_(torch.from_numpy(out[f"k_cache_out.{l}"]))
            cache.v[l].copy_(torch.from_numpy(out[f"v_cache_out.{l}"]))
        if plan.write_hidden and variant != "dense":
            for l, h in cache.hidden.items():
                h.copy_(torch.from_numpy(out[f"hidden_out.{l}"]))
        return torch.from_numpy(out["logits"]), torch.from_numpy(out["pred"])


def step_feeds(spec: EngineSpec, tokens: Tensor, idx: Tensor, cache: Cache, plan: StepPlan
               ) -> tuple[str, dict[str, Tensor]]:
    """The graph variant one step needs and its inputs, named as build/graphs.io_spec (shared by the
    onnxruntime and TensorRT executors): skip when the plan really prunes (effective_keep),
    dense_hidden when it writes hidden states, dense otherwise. tokens, idx: [B, n] int64.

    The cache tensors are fed as they are; an executor whose engine merges in place must copy
    what it may not change."""
    B, n = idx.shape
    if tokens.shape != idx.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and idx {tuple(idx.shape)} must have one shape")
    if B != cache.batch:
        raise ValueError(f"idx has batch {B}, the cache {cache.batch}")
    args = spec.model
    pruned = effective_keep(plan.keep, n)
    feeds = {"tokens": tokens, "idx": idx, "positions": cache.positions, "key_valid": cache.key_valid}
    if pruned:
        variant = "skip"
        feeds.update(_skip_feeds(spec, plan, pruned, cache, B, n))
    else:
        variant = "dense_hidden" if plan.write_hidden and cache.hidden else "dense"
        start, stop, stride = (plan.head or slice(None)).indices(n)
        if stride != 1:
            raise ValueError(f"plan.head must be a contiguous slice, got {plan.head}")
        feeds["head_start"], feeds["head_stop"] = torch.tensor(start), torch.tensor(max(start, stop))
    for l in range(args.n_layers):
        feeds[f"k_cache.{l}"], feeds[f"v_cache.{l}"] = cache.k[l], cache.v[l]
    if variant != "dense":
        zeros = None
        for l in spec.prune_layers:
            h = cache.hidden.get(l)
            if h is None:  # never read: this layer keeps every row (k = rows) and its output is dropped
                if zeros is None:
                    zeros = cache.k[0].new_zeros(B, cache.length + 1, args.dim)
                h = zeros
            feeds[f"hidden.{l}"] = h
    return variant, feeds


def _skip_feeds(spec: EngineSpec, plan: StepPlan, pruned: dict[int, int], cache: Cache, B: int, n: int) -> dict:
    """keep [P] / keep_rows [P, B] per built prune layer: the plan's counts where it prunes, else the
    rows alive there (token_gather with k = rows keeps every row in order: an identity)."""
    prune = tuple(spec.prune_layers)
    missing = sorted(set(pruned) - set(prune))
    if missing:
        raise EngineError(f"the plan prunes at layer {missing[0]}, but the skip graph in {spec.root} prunes at "
                          f"layers {list(prune)}; rebuild with matching --skip-proportions/--skip-positions "
                          f"or --prune-layers")
    no_hidden = sorted(set(pruned) - set(cache.hidden))
    if no_hidden:
        raise ValueError(f"the plan prunes at layer {no_hidden[0]}, which has no hidden-state cache")
    if plan.confidence is None or plan.bonus is None:
        raise ValueError("a pruning plan needs plan.confidence and plan.bonus")
    if abs(plan.alpha - spec.build.alpha) > 1e-9:
        raise ValueError(f"plan alpha {plan.alpha} differs from the alpha {spec.build.alpha} the skip graph in "
                         f"{spec.root} was built with; rebuild with --alpha {plan.alpha}")
    keep, rows, cur = [], [], n
    dev = cache.positions.device
    for l in prune:
        kr = None
        if l in pruned:
            cur = pruned[l]
            kr = plan.keep_rows.get(l) if plan.keep_rows is not None else None
        keep.append(cur)
        rows.append(kr.long().to(dev) if kr is not None else torch.full((B,), cur, dtype=torch.long, device=dev))
    return {"confidence": plan.confidence.float(), "bonus": plan.bonus.float(),
            "keep": torch.tensor(keep, dtype=torch.long), "keep_rows": torch.stack(rows)}


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


def engine_model_dir(engine_dir: str | Path) -> Path | None:
    """The checkpoint files (config, tokenizer) `esdllm build` copied into the artifacts, if any."""
    from .artifacts import EngineSpec
    spec = EngineSpec.read(engine_dir)
    return spec.root / spec.hf_dir if spec.hf_dir and (spec.root / spec.hf_dir).is_dir() else None


def make_executor(kind: str, model_dir: str | Path | None = None, engine_dir: str | Path | None = None,
                  dtype=None, device: str = "cpu"):
    """An executor of `kind`. torch loads model_dir; onnxruntime and tensorrt load engine_dir and,
    when model_dir is given too, fail if the artifacts were built for another model."""
    if kind == "torch":
        if model_dir is None:
            raise ValueError("the torch executor needs a checkpoint directory (--model DIR)")
        return TorchExecutor.load(model_dir, dtype=dtype, device=device)
    if kind not in KINDS:
        raise ValueError(f"unknown executor {kind!r}; expected one of {KINDS}")
    if engine_dir is None:
        raise ValueError(f"the {kind} executor needs an artifacts directory from `esdllm build` (--engine DIR)")
    if kind == "onnxruntime":
        ex = OrtExecutor(engine_dir, providers=_ort_providers(device))
    else:
        from .trt_executor import TrtExecutor  # TensorRT only when asked for
        ex = TrtExecutor(engine_dir, device=device)
    if dtype is not None:
        from .weights import resolve_dtype
        if resolve_dtype(dtype) != ex.dtype:
            raise ValueError(f"--dtype {dtype} requested, but the artifacts in {engine_dir} were built for "
                             f"{str(ex.dtype).removeprefix('torch.')}")
    if model_dir is not None:
        ex.spec.check_model(args_from_dir(model_dir), model_dir)
    return ex


def _ort_providers(device: str) -> list[str]:
    if str(device).startswith("cuda"):
        import onnxruntime as ort
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError(f"device {device!r} needs onnxruntime's CUDAExecutionProvider (onnxruntime-gpu); "
                             f"available: {ort.get_available_providers()}")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]
