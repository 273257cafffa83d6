"""Export a Transformer to its ONNX graph variants, weights stored once, plus engine.json.

export_variant    trace one StepGraph (build/graphs.py) with the TorchScript exporter at opset 18
                  (torch 2.13's dynamo exporter needs onnxscript, not a dependency), attach the
                  esdllm local functions, set IR 10, move the weights into the shared file
SharedWeights     one weights file for all variants: each large initializer is stored once, keyed
                  by its bytes, so variants (and constant-folded copies) point at the same offsets
export_artifacts  the ONNX half of `esdllm build`: every variant + weights.bin + hf/ + engine.json
"""
from __future__ import annotations

import hashlib
import platform
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import onnx
import torch
from onnx import TensorProto, external_data_helper, numpy_helper

from ..runtime import contract
from ..runtime.artifacts import BuildConfig, EngineSpec, profile_dims
from ..runtime.model import Transformer
from ..runtime.weights import resolve_dtype
from . import onnx_ops
from .graphs import StepGraph, example_inputs

WEIGHTS_FILE = "weights.bin"
HF_DIR = "hf"
_INLINE_BYTES = 1024      # initializers smaller than this stay inside the .onnx file
_ALIGN = 4096             # page-aligned offsets, so runtimes can mmap the weights
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")


class SharedWeights:
    """Append-only weights file; `place(tensor, src_dir)` stores a tensor's bytes once and
    rewrites the TensorProto to reference them (data_location EXTERNAL)."""

    def __init__(self, path: Path):
        self.path = path
        self.index: dict[str, tuple[int, int]] = {}
        self.path.write_bytes(b"")

    def place(self, t: TensorProto, src_dir: Path) -> None:
        if t.data_location == TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            with open(src_dir / info["location"], "rb") as f:
                f.seek(int(info.get("offset", 0)))
                data = f.read(int(info["length"])) if "length" in info else f.read()
        elif t.HasField("raw_data"):
            data = t.raw_data
        else:
            data = numpy_helper.to_array(t).tobytes()
        if len(data) < _INLINE_BYTES:
            return
        key = hashlib.sha256(data).hexdigest() + f":{t.data_type}:{list(t.dims)}"
        if key not in self.index:
            with open(self.path, "ab") as f:
                offset = f.seek(0, 2)
                pad = -offset % _ALIGN
                f.write(b"\0" * pad)
                f.write(data)
            self.index[key] = (offset + pad, len(data))
        offset, length = self.index[key]
        for name in ("float_data", "int32_data", "int64_data", "double_data"):
            t.ClearField(name)
        del t.external_data[:]
        t.data_location = TensorProto.DEFAULT
        t.raw_data = b"\0"  # set_external_data insists on a raw_data field; cleared below
        external_data_helper.set_external_data(t, self.path.name, offset, length)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL


def export_variant(model: Transformer, variant: str, cfg: BuildConfig, prune_layers: tuple[int, ...],
                   out_path: Path, weights: SharedWeights) -> dict:
    """Write one variant's .onnx next to the shared weights; returns its engine.json entry."""
    graph = StepGraph(model, variant, prune_layers, cfg.alpha, cfg.dtype, cfg.saliency_tau)
    ins, outs = contract.io_spec(variant, model.args, prune_layers, cfg.dtype)
    dynamic = {io["name"]: {i: d for i, d in enumerate(io["shape"]) if isinstance(d, str)}
               for io in ins + outs}
    example = example_inputs(graph, cfg.dtype)
    with tempfile.TemporaryDirectory(prefix="esdllm-export-") as tmp:
        raw = Path(tmp) / f"{variant}.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            # Plan-driven Python branches are fixed per variant; the tracer says so for each one.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
            # cache_merge's traced body scatters into its cache input in place; the node its symbolic
            # writes is out of place and its output is the graph's merged cache, so dropping the
            # body's mutation changes nothing
            warnings.filterwarnings("ignore", message="ONNX Preprocess - Removing mutation from node aten::scatter_")
            torch.onnx.export(graph, example, str(raw), dynamo=False, opset_version=onnx_ops.OPSET,
                              input_names=graph.input_names, output_names=graph.output_names,
                              dynamic_axes=dynamic, custom_opsets={onnx_ops.DOMAIN: 1},
                              do_constant_folding=True)
        proto = onnx.load(str(raw), load_external_data=False)
        onnx_ops.attach_functions(proto)
        _declare_outputs(proto, outs)
        for t in proto.graph.initializer:
            weights.place(t, Path(tmp))
    proto.producer_name, proto.doc_string = "esdllm", f"esdllm step graph, variant {variant}"
    onnx.save(proto, str(out_path))
    onnx.checker.check_model(str(out_path), full_check=True)
    ops_used = sorted({n.op_type for n in proto.graph.node if n.domain == onnx_ops.DOMAIN})
    dims = profile_dims(cfg, len(prune_layers))
    profile = {io["name"]: {k: [dims[d][j] if isinstance(d, str) else d for d in io["shape"]]
                            for j, k in enumerate(("min", "opt", "max"))}
               for io in ins if any(isinstance(d, str) for d in io["shape"])}
    return {"file": out_path.name, "inputs": ins, "outputs": outs, "profile": profile, "ops": ops_used}


def _declare_outputs(proto: onnx.ModelProto, outs: list[dict]) -> None:
    """Give every graph output its io_spec shape (axis names or sizes), whatever the tracer inferred."""
    by_name = {o["name"]: o["shape"] for o in outs}
    for vi in proto.graph.output:
        shape = vi.type.tensor_type.shape
        shape.ClearField("dim")
        for d in by_name[vi.name]:
            dim = shape.dim.add()
            if isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = d


def copy_hf_files(model_dir: Path, dest: Path) -> None:
    """Copy a checkpoint's small files (config, tokenizer, chat template), not its weights."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(model_dir).iterdir()):
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(f, dest / f.name)


def versions() -> dict:
    import esdllm
    out = {"esdllm": esdllm.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
           "python": platform.python_version(), "opset": onnx_ops.OPSET, "ir_version": onnx_ops.IR_VERSION}
    try:
        import onnxruntime
        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return out


def plugin_table() -> dict:
    """The plugin set, as TensorRT and the plugin authors see it (names, I/O order, attributes)."""
    ops_ = {op: {"inputs": list(i), "outputs": list(o), "attributes": sorted(a)}
            for op, (i, o, a) in onnx_ops.SIGNATURES.items()}
    return {"namespace": onnx_ops.PLUGIN_NAMESPACE, "domain": onnx_ops.DOMAIN, "version": "1",
            "local_functions": True, "ops": ops_}


def export_artifacts(model: Transformer, cfg: BuildConfig, out_dir: str | Path,
                     model_dir: str | Path | None = None,
                     progress: Callable[[str], None] | None = None) -> EngineSpec:
    """Export every variant of cfg into out_dir with one weights file and write engine.json.

    progress(stage) is called once per finished stage (a variant, the hf files, engine.json).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args = model.args
    prune = cfg.resolve_prune_layers(args.n_layers)
    if "skip" in cfg.variants and not prune:
        raise ValueError(f"the ES-dLLM schedule {cfg.skip_proportions} at {cfg.skip_positions} prunes at no "
                         f"layer of this {args.n_layers}-layer model; pass --prune-layers or drop the skip variant")
    model = model.to(resolve_dtype(cfg.dtype)).eval()
    weights = SharedWeights(out / WEIGHTS_FILE)
    variants = {}
    for name in cfg.variants:
        variants[name] = export_variant(model, name, cfg, prune, out / f"{name}.onnx", weights)
        if progress:
            progress(f"exported {name}")
    source, hf = {}, None
    if model_dir is not None:
        model_dir = Path(model_dir).resolve()
        copy_hf_files(model_dir, out / HF_DIR)
        hf = HF_DIR
        cfg_file = model_dir / "config.json"
        source = {"model_dir": str(model_dir)}
        if cfg_file.is_file():
            source["config_sha256"] = hashlib.sha256(cfg_file.read_bytes()).hexdigest()
        if progress:
            progress("copied tokenizer and config")
    spec = EngineSpec(root=out, model=args, build=cfg, prune_layers=prune, variants=variants,
                      plugins=plugin_table(), versions=versions(), weights=WEIGHTS_FILE, hf_dir=hf,
                      source=source)
    spec.write()
    if progress:
        progress("wrote engine.json")
    return spec


def build_artifacts(model_dir: str | Path, out_dir: str | Path, cfg: BuildConfig,
                    progress: bool = True) -> EngineSpec:
    """`esdllm build`: load the checkpoint, export the ONNX variants and engine.json, then (for the
    tensorrt backends) build one engine per variant with build/engine.py's build_engines."""
    from tqdm import tqdm

    from ..runtime.weights import load_model
    out = Path(out_dir)
    bar = tqdm(total=len(cfg.variants) + 3, desc="esdllm build", unit="stage", disable=not progress)
    try:
        bar.set_postfix_str("loading checkpoint")
        model = load_model(model_dir, dtype=cfg.dtype)
        bar.update(1)

        def step(stage: str) -> None:
            bar.set_postfix_str(stage)
            bar.update(1)
        spec = export_artifacts(model, cfg, out, model_dir=model_dir, progress=step)
        del model
    finally:
        bar.close()
    if cfg.backend != "onnx":
        from .engine import build_engines  # TensorRT only when asked for
        onnx_paths = {name: out / v["file"] for name, v in spec.variants.items()}
        engines = build_engines(onnx_paths, cfg, cfg.backend, out, len(spec.prune_layers), progress=progress)
        spec.engines = {name: Path(p).name for name, p in engines.items()}
        spec.write()
    return spec
