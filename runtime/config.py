"""Frozen configuration dataclasses: the model's shape (`ModelArgs`) and the decoding recipe
(`DecodeConfig`). Argparse lives only at the edge (cli.py); everything inside takes these."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

FAMILIES = ("llada", "dream")
METHODS = ("vanilla", "fast-dllm", "es-dllm", "streaming-dllm", "dyllm")
# Streaming-dLLM's main setting (paper Table 11, LLaDA GSM8K; τ0 0.9, block 32): the defaults of its knobs
STREAMING_DEFAULTS = dict(threshold=0.9, suffix_window=96, dynamic_alpha=0.3, early_exit=True)
WINDOW_METHODS = ("fast-dllm", "es-dllm", "streaming-dllm")   # where suffix pruning means something
CACHES = ("prefix", "dual", "none")
DTYPES = ("float32", "float16", "bfloat16")   # runtime/weights.py maps them to torch dtypes
SAMPLERS = ("llada", "dream")
REMASKING = ("low_confidence", "random")
ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")

# Named decoding settings, one table for bench, eval and the docs: <method>[-<cache>][-t<threshold>].
DECODE_PRESETS: dict[str, dict] = {
    "vanilla": dict(method="vanilla"),
    "fast-dllm-dual": dict(method="fast-dllm", cache="dual"),
    "fast-dllm-dual-t0.9": dict(method="fast-dllm", cache="dual", threshold=0.9),
    "fast-dllm-prefix": dict(method="fast-dllm", cache="prefix"),
    "fast-dllm-prefix-t0.9": dict(method="fast-dllm", cache="prefix", threshold=0.9),
    "es-dllm": dict(method="es-dllm"),
    "es-dllm-t0.9": dict(method="es-dllm", threshold=0.9),
    "streaming-dllm": dict(method="streaming-dllm"),
    "dyllm": dict(method="dyllm"),
    "dyllm-t0.9": dict(method="dyllm", threshold=0.9),
    "es-dllm+streaming": dict(method="es-dllm", suffix_window=96, trailing=True, dynamic_alpha=0.3,
                              early_exit=True, threshold=0.9),
    "es-dllm-t0.9-dyn-exit": dict(method="es-dllm", threshold=0.9, dynamic_alpha=0.3, early_exit=True),
    "fast-dllm-prefix-t0.9-exit": dict(method="fast-dllm", cache="prefix", threshold=0.9, early_exit=True),
    "vanilla-t0.9-exit": dict(method="vanilla", threshold=0.9, early_exit=True),
    # exactly one token every step on either family: Dream's own schedule commits none at a block's
    # first step and two at its last (README, dream-tiny)
    "vanilla-llada-sampler": dict(method="vanilla", sampler="llada"),
    "es-dllm-t0.9-exit": dict(method="es-dllm", threshold=0.9, early_exit=True),
    # p1: the prompt rows refreshed every step (so no step skips: refreshes are all-update steps)
    # and EOS not delayed; what is left is ES-dLLM's suffix cache. See README, "stale prompt rows".
    "es-dllm-p1-t0.9-exit": dict(method="es-dllm", threshold=0.9, early_exit=True, prompt_update_freq=1,
                                 delay_eos=False),
    # ... and those refreshes skip rows, the prompt's ranked with the block's by importance
    "es-dllm-p1s-t0.9-exit": dict(method="es-dllm", threshold=0.9, early_exit=True, prompt_update_freq=1,
                                  delay_eos=False, prompt_skip=True),
}


@dataclass(frozen=True)
class ModelArgs:
    """One Transformer shape for LLaDA and Dream. Family quirks are fields, never branches in samplers."""

    family: str                 # "llada" | "dream"
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    rope_theta: float
    norm_eps: float
    qkv_bias: bool              # Dream: q/k/v carry biases
    logits_shift: int           # Dream: logits at row p predict token p + 1
    mask_id: int
    eos_id: int
    pad_id: int
    eot_id: int | None = None   # LLaDA <|eot_id|>, Dream <|im_end|>
    bos_id: int | None = None
    max_seq_len: int = 4096
    rope_full_precision: bool = True  # LLaDA rotates q/k in fp32; Dream rotates in the activation dtype

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class DecodeConfig:
    """How to decode. Defaults follow the reference samplers (research/models.md A.7, B.7) and the
    ES-dLLM / Fast-dLLM papers (research/algorithms.md §1, §4)."""

    method: str = "vanilla"            # vanilla | fast-dllm | es-dllm | streaming-dllm | dyllm
    gen_length: int = 128
    block_length: int = 32
    steps: int | None = None           # None: gen_length (one token a step)
    # sampling (family default when None: "llada" for LLaDA, "dream" for Dream)
    sampler: str | None = None         # "llada" (generate()) | "dream" (diffusion_generate)
    temperature: float = 0.0
    remasking: str = "low_confidence"  # llada sampler: low_confidence | random
    cfg_scale: float = 0.0             # llada sampler, vanilla only
    alg: str = "maskgit_plus"          # dream sampler: origin | maskgit_plus | topk_margin | entropy
    alg_temp: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    eps: float = 1e-3
    seed: int | None = None
    # parallel decoding (Fast-dLLM §4.2): at most one of them
    threshold: float | None = None
    factor: float | None = None
    # cache (fast-dllm): prefix | dual | none
    cache: str = "dual"
    cache_refresh: int = 0             # fast-dllm: also run a full forward every N steps of a block (0: never)
    # ES-dLLM (§1): keep proportion per schedule segment, segment starts as fractions of depth
    skip_proportions: tuple[float, ...] = (1.0, 0.5, 0.25)
    skip_positions: tuple[float, ...] = (0.0, 0.125, 0.25)
    alpha: float = 0.5
    prompt_update_freq: int = 64
    block_update_freq: int = 16
    delay_eos: bool = True
    # esdllm's extension: prompt refreshes skip too, the prompt rows competing with the block's for
    # the keep budget by importance (off: the authors' all-update refreshes). README, "stale prompt rows"
    prompt_skip: bool = False
    # Dream only: ES-dLLM's refresh rows in token coordinates (the just-committed bonus on the token's
    # own row, the block-start forward from it, the block's last row forwarded) instead of the
    # authors' predicting-row coordinates; README "ES-dLLM as its authors wrote it"
    es_token_rows: bool = False
    # Streaming-dLLM (algorithms.md §3; None: its main setting for streaming-dllm, off elsewhere)
    suffix_window: int | None = None   # keep this many suffix positions after the block (tokens)
    trailing: bool = True              # ... and the generation's last position (its length, via RoPE)
    dynamic_alpha: float | None = None  # threshold tau(t) = tau0 (1 - alpha (1 - masked share))
    # early exit, any method: a finished block holding EOS ends the row (None: on for streaming-dllm)
    early_exit: bool | None = None
    # DyLLM (algorithms.md §2): dense steps, then only salient rows (cosine of the attention context
    # against its cache below tau) recompute K/V and FFN; the prompt rows are queried every P steps
    saliency_tau: float = 0.99
    full_steps: int = 4
    prompt_period: int = 4
    # shapes of every forward from host values only (batch, block, schedule), so a step never reads
    # the device (GPU: no stalls, capturable). Same tokens; costs wider ES-dLLM keeps under threshold
    # decoding (last step may have committed a whole block) and DyLLM computing every row
    static_shapes: bool = False

    def __post_init__(self):
        err = _validate(self)
        if err:
            raise ValueError(err)

    @property
    def n_steps(self) -> int:
        return self.steps if self.steps is not None else self.gen_length

    def resolved(self, name: str):
        """A Streaming-dLLM knob (threshold, suffix_window, dynamic_alpha, early_exit) as the step uses
        it: what was given, else the streaming-dllm default for that method, else off."""
        v = getattr(self, name)
        if v is not None:
            return v
        if self.method == "streaming-dllm":
            return STREAMING_DEFAULTS[name]
        return {"dynamic_alpha": 0.0, "early_exit": False}.get(name)

    def replace(self, **kw) -> "DecodeConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _validate(c: DecodeConfig) -> str | None:
    for f in dataclasses.fields(c):  # NaN and infinities are refused everywhere, whatever the field
        v = getattr(c, f.name)
        for x in (v if isinstance(v, tuple) else (v,)):
            if isinstance(x, float) and not math.isfinite(x):
                return f"{f.name} must be a finite number, got {x}"
    if c.method not in METHODS:
        return f"unknown method {c.method!r}; expected one of {METHODS}"
    if c.gen_length <= 0:
        return f"gen_length must be positive, got {c.gen_length}"
    if c.block_length <= 0 or c.gen_length % c.block_length:
        return f"gen_length {c.gen_length} is not a multiple of block_length {c.block_length}"
    n_blocks = c.gen_length // c.block_length
    if c.n_steps <= 0 or c.n_steps % n_blocks:
        return f"steps {c.n_steps} is not a positive multiple of the number of blocks {n_blocks}"
    if c.n_steps > c.gen_length:  # a step beyond one token a step commits nothing and costs a forward
        return f"steps {c.n_steps} is more than gen_length {c.gen_length} (at most one step per token)"
    if c.sampler not in (None, *SAMPLERS):
        return f"unknown sampler {c.sampler!r}; expected one of {SAMPLERS}"
    if c.temperature < 0:
        return f"temperature must be >= 0, got {c.temperature}"
    if c.remasking not in REMASKING:
        return f"unknown remasking {c.remasking!r}; expected one of {REMASKING}"
    if c.alg not in ALGS:
        return f"unknown alg {c.alg!r}; expected one of {ALGS}"
    if c.alg_temp is not None and c.alg_temp < 0:
        return f"alg_temp must be >= 0, got {c.alg_temp}"
    if not 0 < c.eps < 1:
        return f"eps must be in (0, 1), got {c.eps}"
    if c.top_p is not None and not 0 < c.top_p <= 1:
        return f"top_p must be in (0, 1], got {c.top_p}"
    if c.top_k is not None and c.top_k <= 0:
        return f"top_k must be positive, got {c.top_k}"
    if c.method == "streaming-dllm" and c.factor is not None:
        return "streaming-dllm decodes by its dynamic threshold; factor does not apply"
    if c.suffix_window is not None:
        if c.method not in WINDOW_METHODS:
            return (f"suffix_window applies to {', '.join(WINDOW_METHODS)} (it prunes the suffix those forward "
                    f"or attend to); {c.method} runs the whole canvas")
        if c.suffix_window < 0:
            return f"suffix_window must be >= 0, got {c.suffix_window}"
        if c.method == "fast-dllm" and c.cache == "none":
            return "suffix_window needs a cache (prefix or dual): without one every step is a full forward"
    if c.dynamic_alpha is not None:
        if not 0 <= c.dynamic_alpha < 1:
            return f"dynamic_alpha must be in [0, 1), got {c.dynamic_alpha}"
        if c.resolved("threshold") is None and c.dynamic_alpha > 0:
            return "dynamic_alpha scales a confidence threshold: give --threshold too"
    if not 0 < c.saliency_tau <= 1:
        return f"saliency_tau must be in (0, 1], got {c.saliency_tau}"
    if c.full_steps < 1 or c.prompt_period < 1:
        return f"full_steps and prompt_period must be >= 1, got {c.full_steps}, {c.prompt_period}"
    if c.threshold is not None and c.factor is not None:
        return "threshold and factor are exclusive parallel-decoding rules; give one"
    if c.threshold is not None and not 0 < c.threshold <= 1:
        return f"threshold must be in (0, 1], got {c.threshold}"
    if c.factor is not None and not c.factor > 0:
        return f"factor must be > 0, got {c.factor}"
    if c.cache not in CACHES:
        return f"unknown cache {c.cache!r}; expected one of {CACHES}"
    if c.cache_refresh < 0:
        return f"cache_refresh must be >= 0, got {c.cache_refresh}"
    if c.cfg_scale < 0:
        return f"cfg_scale must be >= 0, got {c.cfg_scale}"
    if c.cfg_scale > 0 and c.method != "vanilla":
        return "cfg_scale > 0 is supported by the vanilla method only"
    if len(c.skip_proportions) != len(c.skip_positions) or not c.skip_proportions:
        return "skip_proportions and skip_positions must be non-empty and of equal length"
    if any(not 0 < p <= 1 for p in c.skip_proportions):
        return f"skip_proportions must lie in (0, 1], got {c.skip_proportions}"
    if list(c.skip_positions) != sorted(c.skip_positions) or any(not 0 <= p < 1 for p in c.skip_positions):
        return f"skip_positions must be increasing fractions in [0, 1), got {c.skip_positions}"
    if not 0 <= c.alpha <= 1:
        return f"alpha must be in [0, 1], got {c.alpha}"
    if c.prompt_update_freq <= 0 or c.block_update_freq <= 0:
        return "prompt_update_freq and block_update_freq must be positive"
    return None


@dataclass
class Stats:
    """Counters of one generate() call."""

    nfe: int = 0                    # forward passes (a CFG pair counts once)
    steps: int = 0
    generated_tokens: int = 0       # per batch, up to (excluding) the first EOS of each row
    positions_computed: int = 0     # query rows summed over layers / n_layers, summed over forwards
    seconds: float = 0.0
    forward_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_forward(self) -> float:
        return self.generated_tokens / max(self.nfe, 1)

    @property
    def positions_per_forward(self) -> float:
        return self.positions_computed / max(self.nfe, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {"nfe": self.nfe, "steps": self.steps, "generated_tokens": self.generated_tokens,
                "tokens_per_forward": round(self.tokens_per_forward, 4),
                "positions_per_forward": round(self.positions_per_forward, 2),
                "seconds": round(self.seconds, 6), "forward_seconds": round(self.forward_seconds, 6),
                "tokens_per_second": round(self.tokens_per_second, 3), **self.extra}


def dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True)
