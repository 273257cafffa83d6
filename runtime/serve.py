"""`esdllm serve`: a real Triton Inference Server on the esdllm model repository, under the
launcher's supervisor (runtime/launcher.py).

repo_values         the ${name} values of triton_repo/esdllm/config.pbtxt, from engine.json + flags
SERVE_DEFAULTS      what is served unless a method is given or the checkpoint records its own
served_defaults     a checkpoint's served settings
ready_message       what is printed once the model is up
register            adds the `serve` subcommand to the esdllm CLI
"""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from .config import DTYPES, DecodeConfig
from .launcher import (MODEL_NAME, REPO_TEMPLATE, Supervisor, TritonServer, fill_template,  # noqa: F401
                       find_tritonserver, free_port, free_ports, write_repository)


SCHEDULERS = ("inflight", "batch")


def repo_values(artifacts: str | Path | None = None, model: str | Path | None = None, *, executor: str = "auto",
                device: str = "auto", dtype: str | None = None, max_batch: int | None = None,
                max_tokens: int | None = None, max_prompt: int | None = None, queue_delay_us: int | None = None,
                max_queue: int | None = None, chat: bool = False, decode: dict | None = None, model_name: str = MODEL_NAME,
                scheduler: str = "inflight", instances: int = 1) -> dict:
    """Values for config.pbtxt. The artifacts' build profile (engine.json) sets the batch, gen and
    prompt limits and the default block length unless a flag overrides them. queue_delay_us None:
    0 in-flight (the engine admits between steps, so holding a request back only adds latency),
    5 ms batch-at-a-time (a request waits for company to decode with)."""
    build, hf_dir = None, None
    if artifacts is not None:
        from .artifacts import EngineSpec
        spec = EngineSpec.read(artifacts)
        build = spec.build
        hf_dir = spec.root / spec.hf_dir if spec.hf_dir else None  # tokenizer + config copied by the build
    decode = dict(decode or {})
    base = DecodeConfig()
    max_batch = max_batch or (build.max_batch if build else 8)
    max_tokens = max_tokens or (build.gen_length if build else max(base.gen_length, decode.get("gen_length", 0)))
    if "block_length" not in decode and build:
        decode["block_length"] = build.block_length
    block = decode.get("block_length", base.block_length)
    decode.setdefault("gen_length", max(block, min(base.gen_length, max_tokens) // block * block))
    cfg = DecodeConfig(**decode)  # fail here, at the command line, rather than in the server
    if cfg.gen_length > max_tokens:
        raise ValueError(f"default gen length {cfg.gen_length} exceeds the served limit max_tokens {max_tokens}")
    model_dir = model or hf_dir
    from .serving import config_inputs
    max_queue = 4 * max_batch if max_queue is None else max_queue
    if max_queue < 1:
        raise ValueError(f"max_queue must be >= 1, got {max_queue}")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {SCHEDULERS}")
    if queue_delay_us is None:
        queue_delay_us = 0 if scheduler == "inflight" else 5000
    if queue_delay_us < 0:
        raise ValueError(f"queue_delay_us must be >= 0, got {queue_delay_us}")
    if instances < 1:
        raise ValueError(f"instances must be >= 1, got {instances}")
    if str(device).startswith("cuda"):  # one instance per GPU, each on its own device
        group = f"{{ kind: KIND_GPU count: 1 gpus: [ {', '.join(map(str, range(instances)))} ] }}"
    else:
        group = f"{{ kind: KIND_CPU count: {instances} }}"
    return {"model_name": model_name, "max_batch_size": max_batch, "max_queue_delay_us": queue_delay_us,
            "scheduler": scheduler, "instance_group": group,
            "max_queue_size": max_queue,
            "inputs": config_inputs(),
            "model_dir": str(Path(model_dir).resolve()) if model_dir else "",
            "artifacts_dir": str(Path(artifacts).resolve()) if artifacts else "",
            "executor": executor, "device": device, "dtype": dtype or "", "max_tokens_limit": max_tokens,
            "max_prompt_tokens": max_prompt or (build.max_prompt if build else 0),
            "chat": "true" if chat else "false", "decode_defaults": json.dumps(cfg.to_dict())}


# What `esdllm serve` decodes with unless told otherwise. A checkpoint may record its own measured pick
# under SERVE_KEY in generation_config.json (Hugging Face keeps unknown keys there as attributes): the
# embedded LLaDA does, because on it the caches and skipping lose accuracy on perm and chain (README
# "Accuracy against speed"). Without a record: ES-dLLM at threshold 0.9, ending a request at EOS, the
# papers' fastest at equal accuracy on LLaDA-8B and Dream-7B (up to 1.85x Fast-dLLM's dual cache).
# `--method vanilla` is the reference, one flag away.
SERVE_DEFAULTS = {"method": "es-dllm", "threshold": 0.9, "early_exit": True}
SERVE_KEY = "esdllm_serve"


def served_defaults(model_dir: str | Path | None) -> dict:
    """The decoding settings served for the checkpoint at model_dir (None: the embedded default):
    its generation_config.json's SERVE_KEY record ("_" keys are notes), else SERVE_DEFAULTS."""
    from .pipeline import default_model
    from .weights import GENERATION_CONFIG
    f = Path(model_dir or default_model()) / GENERATION_CONFIG
    rec = json.loads(f.read_text()).get(SERVE_KEY) if f.is_file() else None
    if rec is None:
        return dict(SERVE_DEFAULTS)
    if not isinstance(rec, dict) or "method" not in rec:
        raise ValueError(f"{f}: {SERVE_KEY} must be an object of decoding settings with a method, got {rec!r}")
    rec = {k: v for k, v in rec.items() if not k.startswith("_")}
    bad = sorted(set(rec) - set(DecodeConfig.__dataclass_fields__))
    if bad:
        raise ValueError(f"{f}: {SERVE_KEY} has unknown decoding settings {bad}")
    DecodeConfig(**rec)  # a bad record fails here, at the command line
    return rec


def _decode_overrides(ns) -> dict:
    """The decoding flags the user really gave (their parser defaults are None), over the model's
    served defaults when no method was given."""
    names = DecodeConfig.__dataclass_fields__
    given = {k: v for k, v in vars(ns).items() if k in names and v is not None}
    if "method" in given:
        return given
    model = ns.model
    if model is None and ns.artifacts is not None:
        from .artifacts import EngineSpec
        spec = EngineSpec.read(ns.artifacts)
        if not spec.hf_dir:  # no checkpoint copy to read a record from; not the embedded model's either
            return {**SERVE_DEFAULTS, **given}
        model = spec.root / spec.hf_dir
    return {**served_defaults(model), **given}


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def ready_message(server: TritonServer, values: dict) -> str:
    """What `esdllm serve` prints once the model is up: where, with which defaults, how to ask."""
    d = json.loads(values["decode_defaults"])
    base = DecodeConfig().__dict__  # es-dllm's refresh knobs are shown where they differ from the authors'
    shown = [k for k in ("method", "gen_length", "block_length", "threshold", "cache", "early_exit") if d.get(k) is not None]
    shown += [k for k in ("prompt_update_freq", "delay_eos", "prompt_skip") if k in d and d[k] != base[k]]
    knobs = ", ".join(f"{k} {d[k]}" for k in shown)
    lines = [f"esdllm serve: ready: model {values['model_name']!r} on gRPC {server.grpc_url}"
             + (f" and HTTP {server.http_url}" if server.http_url else " (HTTP off; --http-port turns it on)"),
             f"  served defaults: {knobs}; max_tokens <= {values['max_tokens_limit']}, "
             f"max_batch {values['max_batch_size']}, queue {values['max_queue_size']}, scheduler "
             f"{values['scheduler']}, instances {values['instance_group']}",
             f'  try: esdllm client --url {server.grpc_url} --stream "rot13: abcdefgh ->"']
    if server.http_url:
        lines.append(f"  or:  curl -s {server.http_url}/v2/models/{values['model_name']}/generate "
                     "-d '{\"text_input\": \"rot13: abcdefgh ->\", \"max_tokens\": 32}'")
    return "\n".join(lines + ["  Ctrl-C stops"])


def _serve(ns) -> int:
    values = repo_values(ns.artifacts, ns.model, executor=ns.executor, device=ns.device, dtype=ns.dtype,
                         max_batch=ns.max_batch, max_tokens=ns.max_tokens, max_prompt=ns.max_prompt,
                         queue_delay_us=ns.queue_delay_us, max_queue=ns.max_queue, chat=ns.chat,
                         decode=_decode_overrides(ns), scheduler=ns.scheduler, instances=ns.instances)
    if ns.write_repo:
        out = write_repository(ns.write_repo, values)
        print(f"wrote the model repository to {out} (tritonserver --model-repository={out})")
        return 0
    server = TritonServer(values, host=ns.host, grpc_port=ns.grpc_port, http_port=ns.http_port,
                          tritonserver=ns.tritonserver)
    sup = Supervisor(server, restart=not ns.no_restart, rss_growth_mib=ns.max_rss_growth_mib)
    print(f"esdllm serve: starting {server.binary}", file=sys.stderr)
    for sig in (signal.SIGINT, signal.SIGTERM):  # both stop cleanly, also when started in the background
        signal.signal(sig, _interrupt)
    ready = [False]

    def until():
        if not ready[0]:
            ready[0] = True
            print(ready_message(server, values), file=sys.stderr, flush=True)
        return False

    try:
        return sup.run(ns.timeout, until)
    except KeyboardInterrupt:
        print("esdllm serve: stopping", file=sys.stderr)
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"esdllm serve: error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        server.stop()


def register(subparsers) -> None:
    """Adds `esdllm serve`."""
    from .flags import add_decode_args
    p = subparsers.add_parser("serve", help="serve the model through Triton Inference Server (gRPC; HTTP opt-in)",
                              epilog="example: esdllm serve --artifacts artifacts/llada-tiny --method es-dllm --threshold 0.9")
    p.add_argument("--artifacts", default=None, help="artifacts dir from `esdllm build` (engine.json)")
    p.add_argument("--model", default=None, help="HF checkpoint dir (default: the artifacts' checkpoint, "
                   "else the embedded models/llada-tiny)")
    p.add_argument("--executor", default="auto", choices=["auto", "torch", "onnxruntime", "tensorrt"],
                   help="auto: TensorRT with engines and a GPU, onnxruntime with artifacts, else torch")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="default: the checkpoint's or the artifacts'")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001)")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve HTTP (and the generate endpoint) on this port; off by default: Triton "
                        "2.51's HTTP front end can be crashed by one request (README)")
    p.add_argument("--no-restart", action="store_true",
                   help="exit when tritonserver or the model's stub dies instead of restarting it")
    p.add_argument("--max-rss-growth-mib", type=int, default=1024,
                   help="restart tritonserver when it grew by more than this since ready (0: never)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="requests that may wait for a row (inflight) or behind the running batch (batch) "
                        "before new ones are refused as busy (default: 4 x --max-batch)")
    p.add_argument("--tritonserver", default=None, help="tritonserver binary (default: PATH, else nvidia-pytriton's)")
    p.add_argument("--max-batch", type=int, default=None, help="max_batch_size (default: the artifacts' or 8)")
    p.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens served (default: the "
                   "artifacts' gen length)")
    p.add_argument("--max-prompt", type=int, default=None, help="longest prompt in tokens (default: the "
                   "artifacts' or the model's max length minus --max-tokens)")
    p.add_argument("--queue-delay-us", type=int, default=None,
                   help="dynamic batcher max queue delay (default: 0 in-flight, 5000 batch-at-a-time)")
    p.add_argument("--scheduler", default="inflight", choices=SCHEDULERS,
                   help="inflight: requests join and leave between denoising steps (default); batch: a batch "
                        "of queued requests decodes to its end before the next starts")
    p.add_argument("--instances", type=int, default=1,
                   help="model instances, each its own process and engine (CPU: count; GPU: one per device 0..N-1)")
    p.add_argument("--chat", action="store_true", help="apply the chat template unless a request says otherwise")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the server to be ready")
    p.add_argument("--write-repo", default=None, metavar="DIR",
                   help="only write the filled model repository to DIR (for your own tritonserver) and exit")
    add_decode_args(p)
    p.set_defaults(**{k: None for k in DecodeConfig.__dataclass_fields__}, func=_serve)
