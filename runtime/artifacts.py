"""What `esdllm build` builds, and the engine.json sidecar that records it.

BuildConfig   frozen build recipe: backend, dtype, the shape profile (max_batch, max_prompt,
              gen_length, block_length), the graph variants and the ES-dLLM graph parameters
EngineSpec    engine.json: model config, build config, variants with their files and I/O
              (names, dtypes, symbolic shapes, min/opt/max profiles), plugin set, versions
EngineError   a missing, unreadable or mismatched engine.json, or artifacts built for another model
ProfileError  a request outside the built profile (batch too large, prompt too long, ...)

Only json/dataclasses here, so executors can read engine.json without importing onnx or torch.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .config import DTYPES, DecodeConfig, ModelArgs

ENGINE_JSON = "engine.json"
FORMAT, FORMAT_VERSION = "esdllm-engine", 1
BACKENDS = ("onnx", "tensorrt", "tensorrt-rtx")
VARIANTS = ("dense", "dense_hidden", "skip", "dense_context", "saliency")
PLUGIN_MODES = ("aot", "jit", "none")
_D = DecodeConfig()


class EngineError(ValueError):
    """engine.json is missing, unreadable, from another format version, or does not fit the model."""


class ProfileError(ValueError):
    """A request lies outside the shape profile the artifacts were built for."""


@dataclass(frozen=True)
class BuildConfig:
    """One `esdllm build`. Each CLI flag maps 1:1 onto a field.

    The profile bounds every dynamic axis: batch <= max_batch, prompt <= max_prompt,
    generation <= gen_length, so a canvas holds at most max_prompt + gen_length slots (+1 trash).
    block_length only sets the "opt" point of the row axis. prune_layers None: the layers where the
    ES-dLLM schedule (skip_proportions at skip_positions) prunes, as runtime.policies computes them.
    """

    backend: str = "onnx"
    dtype: str = "float32"
    max_batch: int = 8
    max_prompt: int = 512
    gen_length: int = 256
    block_length: int = 32
    variants: tuple[str, ...] = VARIANTS
    skip_proportions: tuple[float, ...] = _D.skip_proportions
    skip_positions: tuple[float, ...] = _D.skip_positions
    prune_layers: tuple[int, ...] | None = None
    alpha: float = _D.alpha
    saliency_tau: float = _D.saliency_tau  # DyLLM's threshold, baked into the saliency graph
    plugins: str = "aot"        # TensorRT: plugin implementation (aot | jit) or none (local functions)

    def __post_init__(self):
        for name in ("variants", "skip_proportions", "skip_positions", "prune_layers"):
            v = getattr(self, name)
            if isinstance(v, list):  # from JSON
                object.__setattr__(self, name, tuple(v))
        err = _validate(self)
        if err:
            raise ValueError(err)

    @property
    def max_canvas(self) -> int:
        return self.max_prompt + self.gen_length

    def resolve_prune_layers(self, n_layers: int) -> tuple[int, ...]:
        if self.prune_layers is not None:
            bad = [l for l in self.prune_layers if not 0 <= l < n_layers]
            if bad:
                raise ValueError(f"prune layer {bad[0]} is outside the model's {n_layers} layers")
            return tuple(sorted(set(self.prune_layers)))
        from ..runtime.policies import prune_schedule
        cfg = DecodeConfig(skip_proportions=self.skip_proportions, skip_positions=self.skip_positions)
        return tuple(sorted(prune_schedule(cfg, n_layers)))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BuildConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise EngineError(f"unknown build config field {unknown[0]!r}")
        return cls(**d)


def _validate(c: BuildConfig) -> str | None:
    if c.backend not in BACKENDS:
        return f"unknown backend {c.backend!r}; expected one of {BACKENDS}"
    if c.dtype not in DTYPES:
        return f"unknown dtype {c.dtype!r}; expected one of {DTYPES}"
    for name in ("max_batch", "max_prompt", "gen_length", "block_length"):
        if getattr(c, name) <= 0:
            return f"{name} must be positive, got {getattr(c, name)}"
    if c.block_length > c.gen_length:
        return f"block_length {c.block_length} exceeds gen_length {c.gen_length}"
    if not c.variants or any(v not in VARIANTS for v in c.variants):
        return f"variants must be a non-empty subset of {VARIANTS}, got {c.variants}"
    if len(set(c.variants)) != len(c.variants):
        return f"variants repeat a name: {c.variants}"
    if len(c.skip_proportions) != len(c.skip_positions) or not c.skip_proportions:
        return "skip_proportions and skip_positions must be non-empty and of equal length"
    if c.prune_layers is not None and not c.prune_layers and "skip" in c.variants:
        return "the skip variant needs at least one prune layer"
    if not 0 <= c.alpha <= 1:
        return f"alpha must be in [0, 1], got {c.alpha}"
    if c.plugins not in PLUGIN_MODES:
        return f"unknown plugins mode {c.plugins!r}; expected one of {PLUGIN_MODES}"
    return None


@dataclass
class EngineSpec:
    """The parsed engine.json of an artifacts directory.

    variants[name] = {"file": "dense.onnx", "inputs": [{"name", "dtype", "shape"}], "outputs": [...],
                      "profile": {input: {"min", "opt", "max"}}}; shapes hold ints or axis names.
    engines: {variant: engine file} written by the TensorRT backends (empty for onnx).
    """

    root: Path
    model: ModelArgs
    build: BuildConfig
    prune_layers: tuple[int, ...]
    variants: dict[str, dict]
    plugins: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    weights: str | None = None
    hf_dir: str | None = None
    source: dict = field(default_factory=dict)
    engines: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "model": self.model.to_dict(),
                "build": self.build.to_dict(), "prune_layers": list(self.prune_layers),
                "variants": self.variants, "plugins": self.plugins, "versions": self.versions,
                "weights": self.weights, "hf_dir": self.hf_dir, "source": self.source,
                "engines": self.engines}

    def write(self, root: str | Path | None = None) -> Path:
        root = Path(root or self.root)
        path = root / ENGINE_JSON
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def read(cls, root: str | Path) -> "EngineSpec":
        root = Path(root)
        path = root / ENGINE_JSON
        if not root.is_dir():
            raise EngineError(f"artifacts directory {root} does not exist (build it with "
                              f"`esdllm build --model DIR --out {root}`)")
        if not path.is_file():
            raise EngineError(f"no {ENGINE_JSON} in {root}: not an esdllm artifacts directory "
                              f"(build it with `esdllm build --model DIR --out {root}`)")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise EngineError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise EngineError(f"{path} is not an esdllm engine description (format {d.get('format')!r} "
                              f"!= {FORMAT!r})" if isinstance(d, dict) else f"{path} is not a JSON object")
        if d.get("format_version") != FORMAT_VERSION:
            raise EngineError(f"{path} has format_version {d.get('format_version')!r}; this esdllm reads "
                              f"{FORMAT_VERSION}: rebuild the artifacts")
        for key in ("model", "build", "prune_layers", "variants"):
            if key not in d:
                raise EngineError(f"{path} has no {key!r} entry")
        try:
            model = ModelArgs.from_dict(d["model"])
            build = BuildConfig.from_dict(d["build"])
        except (TypeError, ValueError) as e:
            raise EngineError(f"{path}: bad model or build config: {e}") from None
        spec = cls(root=root, model=model, build=build, prune_layers=tuple(d["prune_layers"]),
                   variants=d["variants"], plugins=d.get("plugins", {}), versions=d.get("versions", {}),
                   weights=d.get("weights"), hf_dir=d.get("hf_dir"), source=d.get("source", {}),
                   engines=d.get("engines", {}))
        for name, v in spec.variants.items():
            if name not in VARIANTS:
                raise EngineError(f"{path} lists unknown variant {name!r}; expected one of {VARIANTS}")
            for key in ("file", "inputs", "outputs"):
                if key not in v:
                    raise EngineError(f"{path}: variant {name!r} has no {key!r}")
        return spec

    # --- checks an executor runs ---------------------------------------------------------------

    def variant_name(self, name: str) -> str:
        """`name` if the artifacts hold that graph variant, else an EngineError naming the fix."""
        if name not in self.variants:
            raise EngineError(f"the artifacts in {self.root} have no {name!r} graph (built variants: "
                              f"{', '.join(self.variants)}); rebuild with --variants including {name}")
        return name

    def variant_file(self, name: str) -> Path:
        self.variant_name(name)
        path = self.root / self.variants[name]["file"]
        if not path.is_file():
            raise EngineError(f"{ENGINE_JSON} lists variant {name!r} at {path.name}, but {path} is missing")
        return path

    def check_model(self, args: ModelArgs, source: str | Path = "the model") -> None:
        """Fail when the artifacts were built for a model other than `args`, naming each difference."""
        mine, theirs = self.model.to_dict(), args.to_dict()
        diff = [f"{k} {mine.get(k)!r} (artifacts) != {theirs.get(k)!r} ({source})"
                for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
        if diff:
            raise EngineError(f"the artifacts in {self.root} were built for another model: " + "; ".join(diff))

    def check_request(self, batch: int, prompt_len: int, gen_length: int) -> None:
        """Fail when a request (batch, longest prompt, gen_length) lies outside the built profile."""
        b = self.build
        if batch > b.max_batch:
            raise ProfileError(f"batch {batch} is larger than the built profile's max_batch {b.max_batch} "
                               f"({self.root}); rebuild with --max-batch {batch}")
        if prompt_len > b.max_prompt:
            raise ProfileError(f"prompt length {prompt_len} is longer than the built profile's max_prompt "
                               f"{b.max_prompt} ({self.root}); rebuild with --max-prompt {prompt_len}")
        if gen_length > b.gen_length:
            raise ProfileError(f"gen_length {gen_length} is longer than the built profile's gen_length "
                               f"{b.gen_length} ({self.root}); rebuild with --gen-length {gen_length}")

    def check_canvas(self, batch: int, length: int) -> None:
        """Fail when a cache of `batch` rows x `length` canvas slots does not fit the profile."""
        b = self.build
        if batch > b.max_batch:
            raise ProfileError(f"batch {batch} is larger than the built profile's max_batch {b.max_batch} "
                               f"({self.root}); rebuild with --max-batch {batch}")
        if length > b.max_canvas:
            raise ProfileError(f"canvas length {length} (prompt + gen_length) exceeds the built profile's "
                               f"max_prompt + gen_length = {b.max_prompt} + {b.gen_length} = {b.max_canvas} "
                               f"({self.root}); the prompt is too long or gen_length too large")


def profile_dims(cfg: BuildConfig, n_prune: int = 0) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of every named dynamic axis of the step graphs (runtime/contract.py): batch,
    rows, slots (a canvas has one extra, trash, slot), keys (slots attended to), out (head rows) and
    keep_i (rows kept at the i-th prune layer)."""
    canvas = cfg.max_canvas + 1
    opt_rows = min(cfg.block_length, canvas)
    opt_slots = min(canvas, cfg.max_prompt // 2 + cfg.gen_length + 1)
    dims = {"batch": (1, max(1, cfg.max_batch // 2), cfg.max_batch), "rows": (1, opt_rows, canvas),
            "slots": (2, opt_slots, canvas), "keys": (1, opt_slots, canvas), "out": (1, opt_rows, canvas)}
    for i in range(n_prune):
        dims[f"keep_{i}"] = (1, max(1, opt_rows // 2 ** (i + 1)), canvas)
    return dims
