"""ONNX graphs -> TensorRT engines: `build_engines` for the `tensorrt` and `tensorrt-rtx` backends.

tensorrt      full TensorRT (>= 10.9) with the esdllm plugins (plugins/trt_plugins.py): each esdllm
              node carries plugin_namespace="esdllm", so the parser maps it to the registered plugin.
              Needs a GPU (TensorRT times kernels while building).
tensorrt-rtx  TensorRT-RTX (package tensorrt-rtx-cu12) takes no Python plugins, so the model-local
              functions are inlined first and the esdllm nodes become plain ONNX ops. It builds on the
              CPU ("CPU-only AOT"); loading the engine needs an RTX-class GPU (not Hopper).

Both: a strongly typed network (the ONNX dtypes are the engine's dtypes), the ONNX parser, and one
optimization profile: each input dim named after a profile axis (batch, rows, slots, out, keep_i)
takes that axis's (min, opt, max) from runtime.artifacts.profile_dims. The step graphs take no shape
tensors: every size (the keep counts included) is the dim of an input. TensorRT is imported lazily; a missing package raises
ImportError with the install line. The graph prepared for a backend is written next to the ONNX
file (external weights resolve by relative path) and removed after the build.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import onnx

from ..runtime.trt_session import trt_logger
from . import onnx_ops

log = logging.getLogger(__name__)

BACKENDS = ("tensorrt", "tensorrt-rtx")
ENGINE_SUFFIX = {"tensorrt": ".plan", "tensorrt-rtx": ".rtx.plan"}

# one profile: {input name: (min shape, opt shape, max shape)}
Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def import_backend(backend: str):
    """The TensorRT module for `backend` (plugins registered for "tensorrt")."""
    if backend == "tensorrt":
        try:
            import tensorrt as trt
        except ImportError as e:
            raise ImportError(f"--backend tensorrt needs TensorRT >= 10.9 with a CUDA GPU "
                              f"(pip install tensorrt; NVIDIA's libraries are not on PyPI): {e}") from e
        from ..plugins.trt_plugins import register_plugins
        register_plugins()
        return trt
    if backend == "tensorrt-rtx":
        try:
            import tensorrt_rtx as trt
        except ImportError as e:
            raise ImportError(f"--backend tensorrt-rtx needs pip install 'esdllm[tensorrt-rtx]': {e}") from e
        return trt
    raise ValueError(f"unknown engine backend {backend!r}; expected one of {BACKENDS}")


# ---------------------------------------------------------------------------------------------
# ONNX preparation (pure onnx, testable without TensorRT)
# ---------------------------------------------------------------------------------------------

def esdllm_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == onnx_ops.DOMAIN and n.op_type in onnx_ops.OP_NAMES]


def inline_for_rtx(model: onnx.ModelProto) -> onnx.ModelProto:
    """Expand the model-local functions: every esdllm node becomes its reference decomposition."""
    from onnx import inliner

    out = inliner.inline_local_functions(model)
    left = esdllm_nodes(out)
    if left:
        raise ValueError(f"esdllm nodes without a local function cannot run on TensorRT-RTX: "
                         f"{sorted({n.op_type for n in left})}")
    del out.functions[:]
    return out


def set_plugin_modes(model: onnx.ModelProto, plugins: str) -> dict[str, str]:
    """Set the parser's `aot` attribute on every esdllm node, in place; return {op: "aot" | "jit"}.

    plugins="aot": AOT where the op has an AOT kernel (trt_plugins.AOT_READY), JIT elsewhere, with a
    warning: an engine with any JIT plugin needs Python and the plugin module to load, so it cannot
    run in Triton's tensorrt_plan backend. plugins="jit": JIT everywhere.
    """
    from ..plugins.trt_plugins import AOT_READY

    if plugins not in ("aot", "jit"):
        raise ValueError(f"plugin mode {plugins!r}; expected 'aot' or 'jit'")
    modes = {}
    for node in esdllm_nodes(model):
        aot = plugins == "aot" and node.op_type in AOT_READY
        modes[node.op_type] = "aot" if aot else "jit"
        keep = [a for a in node.attribute if a.name != "aot"]
        del node.attribute[:]
        node.attribute.extend(keep)
        node.attribute.append(onnx.helper.make_attribute("aot", int(aot)))
    jit = sorted(op for op, m in modes.items() if m == "jit")
    if plugins == "aot" and jit:
        log.warning("no AOT kernel for esdllm::%s: JIT plugins, so the engine needs Python + "
                    "esdllm.plugins.trt_plugins to load (not Triton's tensorrt_plan backend)", ", ".join(jit))
    return modes


def prepare_onnx(path: Path, backend: str, plugins: str = "jit") -> Path:
    """Write the backend's variant of the graph next to `path` and return its path (external
    weights stay where they are, referenced by relative path).

    tensorrt-rtx, or plugins="none": local functions inlined. tensorrt with plugins "aot" | "jit":
    each node's `aot` attribute set.
    """
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    if backend not in BACKENDS:
        raise ValueError(f"unknown engine backend {backend!r}; expected one of {BACKENDS}")
    if backend == "tensorrt-rtx" or plugins == "none":
        model, suffix = inline_for_rtx(model), f".{backend}.inlined.onnx"
    else:
        set_plugin_modes(model, plugins)
        suffix = f".{backend}.{plugins}.onnx"
    out = path.with_name(path.name.removesuffix(".onnx") + suffix)
    onnx.save(model, str(out))
    return out


def profile_from_onnx(model: onnx.ModelProto, axes: dict[str, tuple[int, int, int]]) -> Profile:
    """One optimization profile from the graph inputs' shapes: a dim_param names an axis of
    `axes` (runtime.artifacts.profile_dims), a dim_value is static."""
    prof: Profile = {}
    init = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in init:
            continue
        dims = []
        for i, d in enumerate(inp.type.tensor_type.shape.dim):
            if d.HasField("dim_value"):
                v = (d.dim_value,) * 3
            elif d.dim_param in axes:
                v = axes[d.dim_param]
            else:
                raise ValueError(f"input {inp.name!r} dim {i} is {d.dim_param or 'unnamed'!r}, not a profile "
                                 f"axis ({sorted(axes)})")
            dims.append(v)
        prof[inp.name] = tuple(tuple(v[j] for v in dims) for j in range(3))
    return prof


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------

def check_profiles(inputs: dict[str, tuple[int, ...]], profiles: list[Profile], graph: str) -> None:
    """inputs: network input name -> shape with -1 for dynamic dims. Raise ValueError naming the
    input whose profile is missing, has the wrong rank, pins a static dim, or is not min <= opt <= max."""
    if not profiles:
        raise ValueError(f"graph {graph!r}: no optimization profile")
    for i, prof in enumerate(profiles):
        extra = sorted(set(prof) - set(inputs))
        if extra:
            raise ValueError(f"graph {graph!r} profile {i}: {extra} are not inputs of the graph ({sorted(inputs)})")
        for name, shape in inputs.items():
            if name not in prof:
                if -1 in shape:
                    raise ValueError(f"graph {graph!r} profile {i}: dynamic input {name!r} {shape} has no shapes")
                continue
            lo, opt, hi = prof[name]
            for what, s in (("min", lo), ("opt", opt), ("max", hi)):
                if len(s) != len(shape):
                    raise ValueError(f"graph {graph!r} profile {i}: {what} shape {tuple(s)} of {name!r} has "
                                     f"rank {len(s)}, the input has rank {len(shape)} {shape}")
                for d, (want, got) in enumerate(zip(shape, s)):
                    if want != -1 and want != got:
                        raise ValueError(f"graph {graph!r} profile {i}: {what} shape of {name!r} sets static "
                                         f"dim {d} ({want}) to {got}")
            if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                raise ValueError(f"graph {graph!r} profile {i}: {name!r} needs min <= opt <= max, "
                                 f"got {tuple(lo)}, {tuple(opt)}, {tuple(hi)}")


def build_engine(trt, onnx_path: Path, profiles: list[Profile], backend: str, graph: str = "",
                 aot: bool = False) -> bytes:
    """Parse one prepared ONNX file into a strongly typed network and build a serialized engine."""
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if backend == "tensorrt":
        prefer = "PREFER_AOT_PYTHON_PLUGINS" if aot else "PREFER_JIT_PYTHON_PLUGINS"
        if hasattr(trt.NetworkDefinitionCreationFlag, prefer):
            flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, prefer))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if backend == "tensorrt" and hasattr(trt.OnnxParserFlag, "ENABLE_PLUGIN_OVERRIDE"):
        parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"{backend} could not parse {onnx_path}:\n  " + "\n  ".join(errors))
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    check_profiles(inputs, profiles, graph or Path(onnx_path).stem)

    config = builder.create_builder_config()
    if backend == "tensorrt" and hasattr(trt.PreviewFeature, "ALIASED_PLUGIN_IO_10_03"):
        config.set_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)  # cache_merge in place
    shape_inputs = [t.name for t in (network.get_input(i) for i in range(network.num_inputs)) if t.is_shape_tensor]
    if shape_inputs:  # the contract's sizes are all input dims (runtime/contract.py)
        raise ValueError(f"graph {graph!r}: inputs {shape_inputs} are shape tensors; the step graphs take none")
    for prof in profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof.items():
            p.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
        config.add_optimization_profile(p)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"{backend} failed to build an engine from {onnx_path} (see the [TRT] log lines)")
    return bytes(plan)


def build_engines(onnx_paths: dict[str, Path], cfg, backend: str, out_dir: Path, n_prune: int,
                  progress: bool = True) -> dict[str, Path]:
    """Build one engine per graph. onnx_paths: graph name -> ONNX file; cfg: runtime.artifacts.BuildConfig
    (profile axes from profile_dims(cfg, n_prune), plugin mode cfg.plugins). Returns graph name ->
    engine file out_dir/<graph><ENGINE_SUFFIX>."""
    from ..runtime.artifacts import profile_dims

    if backend not in BACKENDS:
        raise ValueError(f"unknown engine backend {backend!r}; expected one of {BACKENDS}")
    trt = import_backend(backend)
    axes = profile_dims(cfg, n_prune)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(onnx_paths), desc=f"{backend} engines", unit="engine")
    engines = {}
    try:
        for name, path in onnx_paths.items():
            if bar is not None:
                bar.set_postfix_str(name)
            t0 = time.perf_counter()
            prepared = prepare_onnx(Path(path), backend, cfg.plugins)
            try:
                profile = profile_from_onnx(onnx.load(str(prepared), load_external_data=False), axes)
                plan = build_engine(trt, prepared, [profile], backend, graph=name, aot=cfg.plugins == "aot")
            finally:
                prepared.unlink(missing_ok=True)
            engines[name] = out_dir / f"{name}{ENGINE_SUFFIX[backend]}"
            engines[name].write_bytes(plan)
            log.info("built %s (%d bytes) in %.1f s", engines[name], len(plan), time.perf_counter() - t0)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return engines
