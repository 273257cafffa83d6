"""The Triton-free half of the `esdllm` Triton model: the served inputs (INPUTS, the one table that
config.pbtxt's input block, the request parser and the client are made from), executor choice and
Pipeline loading, one request's input tensors -> a validated `Request` (or a ValueError naming the
problem), grouping of requests that can share one diffusion batch, per-request stats and streamed
deltas.

triton_repo/esdllm/1/model.py is only the pb_utils glue around it; tests drive this with numpy.
Input names follow the TensorRT-LLM backend where one exists (text_input, max_tokens, stream,
temperature, top_p, top_k, random_seed); the dLLM knobs are esdllm's own.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import locale
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import DecodeConfig


@dataclass(frozen=True)
class Input:
    """One optional input of the served model: its name, Triton dtype, the DecodeConfig field it sets
    (None: a request option of its own) and whether it is a vector ([1, n] with the batch dim)."""

    name: str
    dtype: str              # Triton type without TYPE_: STRING, INT32, UINT64, FP32, BOOL
    field: str | None = None
    vector: bool = False

    @property
    def kinds(self) -> str:
        """numpy dtype kinds the parser accepts for it."""
        return {"STRING": "OSU", "INT32": "iu", "UINT64": "iu", "FP32": "f", "BOOL": "b"}[self.dtype]

    @property
    def client_dtype(self) -> str:
        """The tritonclient datatype name (BYTES for strings)."""
        return "BYTES" if self.dtype == "STRING" else self.dtype


INPUTS = (
    Input("text_input", "STRING"),
    Input("max_tokens", "INT32", "gen_length"),
    Input("stream", "BOOL"),
    Input("chat", "BOOL"),
    Input("temperature", "FP32", "temperature"),
    Input("top_p", "FP32", "top_p"),
    Input("top_k", "INT32", "top_k"),
    Input("random_seed", "UINT64", "seed"),
    Input("method", "STRING", "method"),
    Input("block_length", "INT32", "block_length"),
    Input("steps", "INT32", "steps"),
    Input("threshold", "FP32", "threshold"),
    Input("cache", "STRING", "cache"),
    Input("skip_proportions", "FP32", "skip_proportions", vector=True),
    Input("skip_positions", "FP32", "skip_positions", vector=True),
    Input("suffix_window", "INT32", "suffix_window"),
    Input("trailing", "BOOL", "trailing"),
    Input("dynamic_alpha", "FP32", "dynamic_alpha"),
    Input("early_exit", "BOOL", "early_exit"),
    Input("saliency_tau", "FP32", "saliency_tau"),
    Input("full_steps", "INT32", "full_steps"),
    Input("prompt_period", "INT32", "prompt_period"),
)
BY_NAME = {i.name: i for i in INPUTS}
INPUT_NAMES = tuple(BY_NAME)


def config_inputs() -> str:
    """config.pbtxt's input block (every input optional; dims without the batch dim)."""
    rows = [f'  {{ name: "{i.name}" data_type: TYPE_{i.dtype} dims: [ {"-1" if i.vector else "1"} ] optional: true }}'
            for i in INPUTS]
    return "input [\n" + ",\n".join(rows) + "\n]"


# The default prompt limit: a canvas of at most this many times the longest answer. A request's cost
# grows with its canvas (every forward of a block start runs all of it), so a prompt at the limit
# costs at most PROMPT_FACTOR + 1 times an answer-only canvas; at gen 64 that is 512 tokens.
PROMPT_FACTOR = 8


@dataclass(frozen=True)
class Limits:
    max_tokens: int     # largest gen length served (the built profile's gen_length)
    max_prompt: int     # longest prompt in tokens
    max_prompt_bytes: int = 1 << 20  # longest prompt in UTF-8 bytes, checked before tokenizing


def default_max_prompt(max_tokens: int, max_seq_len: int) -> int:
    """The served prompt limit when none is configured: PROMPT_FACTOR x the answer, within the model."""
    return max(1, min(max_seq_len - max_tokens, PROMPT_FACTOR * max_tokens))


@dataclass
class Request:
    prompt_ids: list[int]
    cfg: DecodeConfig
    stream: bool


def choose_executor(requested: str, artifacts: str | None, device: str) -> str:
    """"auto": TensorRT when the artifacts hold engines and TensorRT + a GPU are here, else
    onnxruntime when there are artifacts and onnxruntime is installed, else torch."""
    if requested != "auto":
        return requested
    if artifacts:
        from esdllm.runtime.artifacts import EngineSpec
        spec = EngineSpec.read(artifacts)
        if spec.engines and device.startswith("cuda") and importlib.util.find_spec("tensorrt"):
            return "tensorrt"
        if importlib.util.find_spec("onnxruntime"):
            return "onnxruntime"
    return "torch"


def choose_device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def utf8_locale() -> None:
    """The stub's embedded interpreter keeps the C locale (open() would default to ASCII): take the
    environment's locale as python3 would, or C.UTF-8 as python3's C-locale coercion would."""
    for name in ("", "C.UTF-8"):
        try:
            locale.setlocale(locale.LC_CTYPE, name)
        except locale.Error:
            continue
        if locale.getpreferredencoding(False).lower().replace("-", "") == "utf8":
            return


@functools.lru_cache(maxsize=1)
def _glibc():
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)


def tune_malloc(mmap_threshold: int = 4 << 20, trim_threshold: int = 64 << 20) -> bool:
    """The model process's allocations above `mmap_threshold` get their own mmap, the rest come from
    the heap, which keeps up to `trim_threshold` of free memory at its top between forwards.

    The launcher fixes the server's mmap threshold at 256 KiB (so a burst of multi-MB requests is
    handed back to the OS). In the model process that maps and faults in most activations of a long
    canvas at every forward: 25 to 40% of a 512-token request's CPU time in-process. The model
    raises it to 4 MiB under either scheduler. A fixed threshold also stops glibc's sliding trim
    threshold (2x the mmap threshold once it has moved) and leaves the 128 KiB default: the heap was
    then cut back after every layer and faulted in again (~2,000 page faults and 5 to 20% more time
    for a 512-token request). The heap is handed back by release_memory() when the engine idles,
    so trimming between forwards buys nothing. False off glibc."""
    libc = _glibc()
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold))
                and libc.mallopt(M_TRIM_THRESHOLD, int(trim_threshold)))


def release_memory() -> None:
    """Return the heap's free pages to the OS (glibc malloc_trim): ~10 ms after a burst, so it is
    called when the engine has been idle a while, never between a request's steps."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class IdleTrimmer:
    """For the batch-at-a-time scheduler, which has no loop of its own: a daemon thread that calls
    release_memory() once execute() has not run for `after` seconds (busy() brackets each call)."""

    def __init__(self, after: float = 0.5):
        import threading
        self.after, self.last, self.running, self.trimmed = after, 0.0, 0, True
        self.lock, self.stopped = threading.Lock(), threading.Event()
        threading.Thread(target=self._run, name="esdllm-trim", daemon=True).start()

    @contextlib.contextmanager
    def busy(self):
        with self.lock:
            self.running += 1
            self.trimmed = False
        try:
            yield
        finally:
            with self.lock:
                self.running -= 1
                self.last = time.monotonic()

    def _run(self) -> None:
        while not self.stopped.wait(self.after / 2):
            with self.lock:
                due = not self.trimmed and not self.running and time.monotonic() - self.last >= self.after
                if due:
                    self.trimmed = True
            if due:
                release_memory()

    def stop(self) -> None:
        self.stopped.set()


def load(params: dict[str, str]):
    """config.pbtxt parameters -> (pipeline, default DecodeConfig, Limits, chat default, info)."""
    utf8_locale()
    from esdllm.runtime.pipeline import Pipeline
    artifacts = params.get("artifacts_dir") or None
    device = choose_device(params.get("device") or "auto")
    executor = choose_executor(params.get("executor") or "auto", artifacts, device)
    pipe = Pipeline.load(params.get("model_dir") or None, dtype=params.get("dtype") or None, device=device,
                         executor=executor, engine_dir=artifacts)
    defaults = DecodeConfig(**_tuples(json.loads(params.get("decode_defaults") or "{}")))
    max_tokens = int(params.get("max_tokens_limit") or 0) or defaults.gen_length
    max_prompt = int(params.get("max_prompt_tokens") or 0) or default_max_prompt(max_tokens, pipe.args.max_seq_len)
    if max_prompt + max_tokens > pipe.args.max_seq_len:
        raise ValueError(f"max_prompt_tokens {max_prompt} + max_tokens_limit {max_tokens} exceeds the model's "
                         f"maximum sequence length {pipe.args.max_seq_len}")
    from .tokenizer import max_token_bytes
    # the text alone is measured (a chat template adds tokens, not text bytes); 4 KiB of slack on top
    limits = Limits(max_tokens, max_prompt, max_prompt * max_token_bytes(pipe.tokenizer) + 4096)
    chat = (params.get("chat") or "false").lower() in ("1", "true", "yes")
    # what every response's stats say about the server: no paths (the log has them)
    info = {"executor": executor, "device": device}
    return pipe, defaults, limits, chat, info


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def _scalar(name: str, arr: np.ndarray, kinds: str):
    if arr.dtype.kind not in kinds:
        raise ValueError(f"{name} has dtype {arr.dtype}, expected kind {kinds!r}")
    if arr.size != 1:
        raise ValueError(f"{name} must hold one value per request, got shape {list(arr.shape)}")
    v = arr.reshape(-1)[0]
    if kinds == "OSU":
        return _utf8(name, v)
    return bool(v) if kinds == "b" else float(v) if kinds == "f" else int(v)


def _utf8(name: str, v) -> str:
    if isinstance(v, str):
        return v
    try:
        return bytes(v).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name} is not valid UTF-8 ({e.reason} at byte {e.start})") from None


def parse_request(inputs: dict[str, np.ndarray | None], pipe, defaults: DecodeConfig, limits: Limits,
                  chat_default: bool = False) -> Request:
    """inputs: name -> array as Triton hands it over ([1, 1] with the batch dim), None when absent.
    Raises ValueError naming the offending input."""
    text = inputs.get("text_input")
    if text is None:
        raise ValueError("text_input is missing: send the prompt as a BYTES tensor of shape [1, 1]")
    if text.dtype.kind == "O" and text.size == 1:  # measure before decoding or tokenizing anything
        raw = text.reshape(-1)[0]
        n = len(raw) if isinstance(raw, (bytes, bytearray)) else len(str(raw).encode("utf-8", "replace"))
        if n > limits.max_prompt_bytes:
            raise ValueError(f"text_input is {n} bytes, more than the {limits.max_prompt_bytes} any prompt of "
                             f"at most {limits.max_prompt} tokens can have")
    prompt = _scalar("text_input", text, "OSU")
    if len(prompt.encode("utf-8")) > limits.max_prompt_bytes:
        raise ValueError(f"text_input is more than {limits.max_prompt_bytes} bytes (at most {limits.max_prompt} "
                         f"tokens are served)")
    if not prompt.strip():
        raise ValueError("text_input is empty")
    unknown = sorted(set(n for n, v in inputs.items() if v is not None) - set(BY_NAME))
    if unknown:
        raise ValueError(f"unknown input {unknown[0]!r}; the model takes {', '.join(INPUT_NAMES)}")
    vals, kw = {}, {}
    for i in INPUTS[1:]:
        arr = inputs.get(i.name)
        if arr is None:
            continue
        if i.vector:
            if arr.dtype.kind not in i.kinds:
                raise ValueError(f"{i.name} has dtype {arr.dtype}, expected float32")
            vals[i.name] = tuple(float(v) for v in arr.reshape(-1))
        else:
            vals[i.name] = _scalar(i.name, arr, i.kinds)
        if i.field:
            kw[i.field] = vals[i.name]
    gen = kw.get("gen_length", defaults.gen_length)
    if gen <= 0:
        raise ValueError(f"max_tokens must be positive, got {gen}")
    if gen > limits.max_tokens:
        raise ValueError(f"max_tokens {gen} is beyond the served range (at most {limits.max_tokens})")
    if "gen_length" in kw and "block_length" not in kw and gen < defaults.block_length:
        kw["block_length"] = gen  # a short answer is one block rather than an error
    if "gen_length" in kw and "steps" not in kw and defaults.steps is not None:
        kw["steps"] = max(1, defaults.steps * gen // defaults.gen_length)  # keep tokens per step
    cfg = _config(defaults, tuple(sorted(kw.items())))  # validates: method, block multiple, steps, ...
    try:
        ids = pipe.encode(prompt, chat=vals.get("chat", chat_default), gen_length=gen)
    except ValueError as e:
        raise ValueError(f"text_input: {e}") from None
    if len(ids) > limits.max_prompt:
        raise ValueError(f"text_input: prompt is {len(ids)} tokens, longer than the limit of {limits.max_prompt}")
    check = getattr(pipe.executor, "check_request", None)
    if check is not None:
        check(1, len(ids), gen)
    return Request(ids, cfg, bool(vals.get("stream", False)))


@functools.lru_cache(maxsize=256)
def _config(defaults: DecodeConfig, overrides: tuple) -> DecodeConfig:
    """defaults.replace(**overrides), remembered: building and validating a DecodeConfig costs about
    50 us (more on the model's cold caches between steps), and served requests mostly repeat a few
    settings (a ValueError is not kept)."""
    return defaults.replace(**dict(overrides))


def check_parameters(text: str | None) -> None:
    """Request parameters are not inputs: Triton's HTTP generate endpoint turns every JSON key it
    does not know as an input into one, where gRPC refuses unknown inputs. Name them the same way
    (Triton's own triton_* parameters pass)."""
    try:
        params = json.loads(text) if text else {}
    except ValueError:
        params = {}
    unknown = sorted(k for k in params if not k.startswith("triton_"))
    if unknown:
        raise ValueError(f"unknown input {unknown[0]!r}; the model takes {', '.join(INPUT_NAMES)}")


def group_by_config(items: list[tuple[Request, object]]) -> list[tuple[DecodeConfig, list]]:
    """Requests with equal configs share one generate() call; first-come order is kept."""
    groups: dict[DecodeConfig, list] = {}
    for item in items:
        groups.setdefault(item[0].cfg, []).append(item)
    return list(groups.items())


class StreamText:
    """Turns cumulative decoded texts into deltas. A trailing U+FFFD (a multi-byte character cut in
    half) is held back until a later event completes it."""

    def __init__(self):
        self.sent = ""

    def delta(self, text: str, final: bool = False) -> str:
        stable = text if final else text.rstrip("\ufffd")
        if not stable.startswith(self.sent):
            return ""  # the tokenizer re-merged earlier text; the final response carries the rest
        out, self.sent = stable[len(self.sent):], stable
        return out


def request_stats(stats, n_tokens: int, prompt_tokens: int, batch: list[Request], info: dict) -> dict:
    """Per-request stats: the request's own token counts plus its batch's NFE, speed and the
    kept fraction (rows forwarded per step over the canvas length, 1.0 for vanilla)."""
    canvas = max(len(r.prompt_ids) for r in batch) + batch[0].cfg.gen_length
    return {"nfe": stats.nfe, "steps": stats.steps, "output_tokens": n_tokens, "prompt_tokens": prompt_tokens,
            "batch_size": len(batch), "batch_tokens": stats.generated_tokens,
            "tokens_per_second": round(stats.tokens_per_second, 3),
            "tokens_per_forward": round(stats.tokens_per_forward, 4),
            "kept_fraction": round(stats.positions_per_forward / canvas, 4),
            "seconds": round(stats.seconds, 6), "method": batch[0].cfg.method, "scheduler": "batch", **info}
