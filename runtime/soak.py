"""`esdllm soak`: a hostile request mix against a real tritonserver, and what it cost the server.

HOSTILE     the request kinds (name -> how to send it and what must come back): valid requests,
            inputs of the wrong dtype or shape, unknown inputs, NaN and unbounded values, huge and
            empty prompts, special-token text, mid-stream cancels and abrupt hang-ups
soak        warm up, then send `n` requests of the mix from `concurrency` threads; returns the
            server's and the stub's memory before and after, liveness, readiness, and per kind
            what came back (a kind whose reply is not what it should be counts as a failure)
register    adds the `soak` subcommand (starts its own server on the default model)
"""
from __future__ import annotations

import json
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .serve import MODEL_NAME

GOOD = "rot13: abcdefghij ->"


def _tensor(name: str, value, dtype: str):
    import tritonclient.grpc as grpcclient
    arr = np.array(value, dtype=np.object_ if dtype == "BYTES" else None)
    if dtype != "BYTES":
        arr = arr.astype({"INT32": np.int32, "FP32": np.float32, "BOOL": np.bool_, "UINT64": np.uint64,
                          "INT64": np.int64}[dtype])
    t = grpcclient.InferInput(name, list(arr.shape), dtype)
    t.set_data_from_numpy(arr)
    return t


def _text(s) -> list:
    return [[s.encode("utf-8") if isinstance(s, str) else s]]


@dataclass(frozen=True)
class Kind:
    """inputs: (name, value, dtype) triples; expect: a substring of the error it must get (None: it
    must succeed); hangup: after sending, drop the connection without closing the stream; cancel:
    cancel the stream after the first response."""

    inputs: tuple
    expect: str | None = None
    hangup: bool = False
    cancel: bool = False


HOSTILE: dict[str, Kind] = {
    "good": Kind((("text_input", _text(GOOD), "BYTES"),)),
    "good_stream": Kind((("text_input", _text(GOOD), "BYTES"), ("stream", [[True]], "BOOL"))),
    "wrong_dtype": Kind((("text_input", _text(GOOD), "BYTES"), ("max_tokens", [[32.0]], "FP32")), "data-type"),
    "wrong_shape": Kind((("text_input", [[GOOD.encode(), GOOD.encode()]], "BYTES"),), "text_input"),
    "unknown_input": Kind((("text_input", _text(GOOD), "BYTES"), ("evil", [[1]], "INT32")), "evil"),
    "nan_temperature": Kind((("text_input", _text(GOOD), "BYTES"), ("temperature", [[float("nan")]], "FP32")),
                            "finite"),
    "inf_threshold": Kind((("text_input", _text(GOOD), "BYTES"), ("threshold", [[float("inf")]], "FP32")),
                          "finite"),
    "huge_steps": Kind((("text_input", _text(GOOD), "BYTES"), ("steps", [[2 ** 30]], "INT32")),
                       "more than gen_length"),
    "huge_max_tokens": Kind((("text_input", _text(GOOD), "BYTES"), ("max_tokens", [[2 ** 31 - 1]], "INT32")),
                            "beyond the served range"),
    "huge_prompt": Kind((("text_input", _text("a" * (4 << 20)), "BYTES"),), "bytes"),
    "empty_prompt": Kind((("text_input", _text("   "), "BYTES"),), "empty"),
    "unknown_chars": Kind((("text_input", _text("\u4e00\u4e01\u4e02"), "BYTES"),), "empty prompt"),
    "special_tokens": Kind((("text_input", _text("<|mdm_mask|><|endoftext|><|eot_id|> upper: ab ->"), "BYTES"),)),
    "bad_utf8": Kind((("text_input", _text(b"\xff\xfe\xfd"), "BYTES"),), "UTF-8"),
    "bad_method": Kind((("text_input", _text(GOOD), "BYTES"), ("method", _text("rm -rf"), "BYTES")),
                       "unknown method"),
    "cancel_mid_stream": Kind((("text_input", _text(GOOD), "BYTES"), ("stream", [[True]], "BOOL"),
                               ("max_tokens", [[64]], "INT32")), cancel=True),
    "hangup_refused": Kind((("text_input", _text(GOOD), "BYTES"), ("evil", [[1]], "INT32")), hangup=True),
    "hangup_running": Kind((("text_input", _text(GOOD), "BYTES"),), hangup=True),
}


def send(url: str, kind: Kind, timeout: float = 120.0, model: str = MODEL_NAME) -> str | None:
    """One request of `kind`; returns None when the reply is what it should be, else what was wrong."""
    import tritonclient.grpc as grpcclient
    q: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    try:
        inputs = [_tensor(*i) for i in kind.inputs]
    except Exception as e:  # noqa: BLE001 - the client library may refuse a shape itself
        client.close()
        return None if kind.expect else f"client refused to build it: {e}"
    try:
        client.start_stream(callback=lambda result, error: q.put((result, error)))
        client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        if kind.hangup:
            client._channel.close()  # abrupt: no half-close, no cancel
            return None
        while True:
            try:
                result, error = q.get(timeout=timeout)
            except queue.Empty:
                return f"no reply within {timeout} s"
            if error is not None:
                msg = str(error)
                if kind.expect is None:
                    return f"unexpected error: {msg[:200]}"
                return None if kind.expect.lower() in msg.lower() else f"wrong error: {msg[:200]}"
            if kind.cancel:
                return None
            if result.get_response().parameters["triton_final_response"].bool_param:
                return None if kind.expect is None else f"succeeded, expected an error with {kind.expect!r}"
    finally:
        try:
            client.stop_stream(cancel_requests=True)
            client.close()
        except Exception:  # noqa: BLE001 - a channel closed on purpose
            pass


def soak(server, n: int = 1000, concurrency: int = 8, warmup: int = 50, progress: bool = True,
         kinds: dict[str, Kind] = HOSTILE) -> dict:
    """The mix against `server` (a started serve.TritonServer). Memory in KiB."""
    names = list(kinds)
    failures: dict[str, list[str]] = {k: [] for k in names}
    counts = {k: 0 for k in names}
    lock = threading.Lock()

    def run(total: int, bar: Callable | None):
        jobs = queue.Queue()
        for i in range(total):
            jobs.put(names[i % len(names)])

        def worker():
            while True:
                try:
                    k = jobs.get_nowait()
                except queue.Empty:
                    return
                why = send(server.grpc_url, kinds[k])
                with lock:
                    counts[k] += 1
                    if why:
                        failures[k].append(why)
                    if bar:
                        bar(1)

        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def settle() -> dict:
        """Memory once the server has drained what the mix left queued (a good request answers)."""
        send(server.grpc_url, kinds["good"])
        time.sleep(1.0)
        return server.rss_kib()

    run(warmup, None)
    before = settle()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, desc="soak", unit="req", file=sys.stderr)
    for k in counts:
        counts[k] = 0
        failures[k] = []
    run(n, bar.update if bar else None)
    if bar:
        bar.close()
    after = settle()
    return {"requests": n, "concurrency": concurrency, "live": server.health() is None, "ready": server.ready(),
            "rss_kib_before": before, "rss_kib_after": after,
            "growth_kib": {k: after[k] - before[k] for k in before},
            "failures": {k: len(v) for k, v in failures.items() if v},
            "examples": {k: v[0] for k, v in failures.items() if v}, "counts": counts}


def _main(ns) -> int:
    from .serve import TritonServer, free_port, repo_values
    values = repo_values(None, ns.model, executor="torch", device="cpu", max_batch=8, max_tokens=64,
                         decode={"gen_length": 32, "block_length": 32, "method": "es-dllm", "threshold": 0.9})
    import tempfile
    with tempfile.TemporaryDirectory(prefix="esdllm-soak-") as tmp, \
            TritonServer(values, grpc_port=free_port(), log=ns.log or Path(tmp) / "tritonserver.log") as srv:
        res = soak(srv, ns.requests, ns.concurrency, progress=not ns.json and sys.stderr.isatty())
    if not ns.json:
        g = res["growth_kib"]
        print(f"{res['requests']} requests from {res['concurrency']} clients: live {res['live']}, ready "
              f"{res['ready']}, tritonserver {res['rss_kib_before']['tritonserver'] / 1024:.1f} -> "
              f"{res['rss_kib_after']['tritonserver'] / 1024:.1f} MiB ({g['tritonserver'] / 1024:+.1f}, of which "
              f"shared memory {g['tritonserver_shm'] / 1024:+.1f}), stub "
              f"{res['rss_kib_before']['stubs'] / 1024:.1f} -> {res['rss_kib_after']['stubs'] / 1024:.1f} MiB "
              f"({g['stubs'] / 1024:+.1f}, of which Triton's shared memory {g['stubs_shm'] / 1024:+.1f}); "
              f"kinds answered wrongly: {res['failures'] or 'none'}")
    print(json.dumps(res))
    ok = res["live"] and res["ready"] and not res["failures"]
    return 0 if ok else 1


def register(subparsers) -> None:
    """Adds `esdllm soak`."""
    p = subparsers.add_parser("soak", help="send a hostile request mix to a fresh server; report its memory",
                              epilog="example: esdllm soak --requests 1000 --concurrency 8")
    p.add_argument("--model", default=None, help="HF checkpoint dir (default: the embedded models/llada-tiny)")
    p.add_argument("--requests", type=int, default=1000, help="requests of the mix in all (default 1000)")
    p.add_argument("--concurrency", type=int, default=8, help="client threads (default 8)")
    p.add_argument("--log", default=None, help="keep tritonserver's log in this file (default: a temporary one)")
    p.add_argument("--json", action="store_true", help="only the JSON line")
    p.set_defaults(func=_main)
