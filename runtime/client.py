"""gRPC client of the `esdllm` Triton model, and a concurrent load test.

request        one prompt over a fresh connection and gRPC stream (the model is decoupled, so
               always a stream): text, stats, the streamed deltas, or the server's error
Session        a connection and stream kept open for requests one after another
bench_serve    N requests from C concurrent clients (a kept connection each): throughput, p50/p99 latency, errors, whether
               every response equals the same request served alone, and exact match on task prompts
register       adds `esdllm client` and `esdllm bench-serve` to the CLI
tritonclient is imported inside these functions only, so the runtime imports without it.
"""
from __future__ import annotations

import json
import queue
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from . import task
from .config import CACHES, METHODS
from .serving import INPUTS

MODEL_NAME = "esdllm"
# input -> tritonclient datatype, from the served model's one input table
INPUT_TYPES = {i.name: i.client_dtype for i in INPUTS}
_NP = {"BYTES": np.object_, "INT32": np.int32, "BOOL": np.bool_, "FP32": np.float32, "UINT64": np.uint64}


@dataclass
class Reply:
    text: str = ""
    stats: dict = field(default_factory=dict)
    chunks: list[str] = field(default_factory=list)   # text_output of every response, in order
    error: str | None = None
    seconds: float = 0.0
    first_chunk_s: float | None = None  # when the first text arrived (streamed: time to first token)


def make_inputs(values: dict):
    """{name: value} -> [InferInput] with the batch dim ([1, 1], or [1, n] for the skip vectors).
    A value may be a numpy array to send as is (wrong dtypes and shapes included)."""
    import tritonclient.grpc as grpcclient
    out = []
    for name, v in values.items():
        if isinstance(v, np.ndarray):
            arr, dt = v, grpcclient.np_to_triton_dtype(v.dtype)
        else:
            dt = INPUT_TYPES[name]
            if dt == "BYTES":
                v = v.encode("utf-8") if isinstance(v, str) else v
            arr = np.array([list(v) if isinstance(v, (list, tuple)) else [v]], dtype=_NP[dt])
        inp = grpcclient.InferInput(name, list(arr.shape), dt)
        inp.set_data_from_numpy(arr)
        out.append(inp)
    return out


def _collect(q: queue.Queue, reply: Reply, t0: float, deadline: float, on_text, cancel_after) -> bool:
    """Fill reply from the stream's responses until the final one. -> whether to cancel the stream."""
    while True:
        try:
            result, error = q.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return True  # the caller words the timeout
        if error is not None:
            reply.error = str(error)
            if "Exceeds maximum queue size" in reply.error:  # Triton's words for a full queue
                reply.error = f"server busy, try again later: {reply.error}"
            return False
        resp = result.get_response()
        names = {o.name for o in resp.outputs}
        if "text_output" in names:
            chunk = result.as_numpy("text_output").reshape(-1)[0].decode("utf-8")
            reply.chunks.append(chunk)
            if reply.first_chunk_s is None and chunk:
                reply.first_chunk_s = time.perf_counter() - t0
            if on_text is not None:
                on_text(chunk)
        if "stats" in names:
            reply.stats = json.loads(result.as_numpy("stats").reshape(-1)[0])
        if resp.parameters["triton_final_response"].bool_param:
            return False
        if cancel_after is not None and len(reply.chunks) >= cancel_after:
            reply.error = "cancelled by the client"
            return True


def request(url: str, inputs: dict, *, model: str = MODEL_NAME, on_text=None, timeout: float = 300.0,
            cancel_after: int | None = None, headers: dict | None = None) -> Reply:
    """Send one request over a fresh connection and gRPC stream and collect its responses until the
    final one. on_text(chunk) sees every text_output as it arrives. cancel_after=k: hang up after k
    responses. timeout bounds the whole request: at the deadline the stream is cancelled (the server
    stops decoding it) and the reply carries the error."""
    import tritonclient.grpc as grpcclient
    q: queue.Queue = queue.Queue()
    reply, t0 = Reply(), time.perf_counter()
    deadline = time.monotonic() + timeout
    client = grpcclient.InferenceServerClient(url)
    cancel = False
    try:
        client.start_stream(callback=lambda result, error: q.put((result, error)), headers=headers)
        client.async_stream_infer(model, make_inputs(inputs), enable_empty_final_response=True)
        cancel = _collect(q, reply, t0, deadline, on_text, cancel_after)
        if cancel and reply.error is None:
            reply.error = f"no final response within {timeout} s (cancelled)"
    finally:
        # a plain stop_stream() waits for every pending request: after an error or a deadline that
        # could be forever (a dead stub never answers), so those cancel
        client.stop_stream(cancel_requests=cancel or reply.error is not None)
        client.close()
    reply.text, reply.seconds = "".join(reply.chunks), time.perf_counter() - t0
    return reply


class Session:
    """One connection and gRPC stream kept open for requests sent one after another, as a client
    that sends more than one request would: no connection setup in each request's latency.

        with Session(url) as s:
            s.request({"text_input": "rot13: abc ->"}).text
    """

    def __init__(self, url: str, *, model: str = MODEL_NAME, headers: dict | None = None):
        import tritonclient.grpc as grpcclient
        self.model, self.q = model, queue.Queue()
        self.client = grpcclient.InferenceServerClient(url)
        self.client.start_stream(callback=lambda result, error: self.q.put((result, error)), headers=headers)
        self.broken = False

    def request(self, inputs: dict, *, on_text=None, timeout: float = 300.0) -> Reply:
        """One request on the open stream (the previous one has ended). A timeout closes the session."""
        if self.broken:
            raise RuntimeError("this session's stream was cancelled after a timeout; open a new Session")
        reply, t0 = Reply(), time.perf_counter()
        self.client.async_stream_infer(self.model, make_inputs(inputs), enable_empty_final_response=True)
        if _collect(self.q, reply, t0, time.monotonic() + timeout, on_text, None):
            reply.error, self.broken = f"no final response within {timeout} s (cancelled)", True
            self.close()
        reply.text, reply.seconds = "".join(reply.chunks), time.perf_counter() - t0
        return reply

    def close(self) -> None:
        self.client.stop_stream(cancel_requests=self.broken)
        self.client.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        if not self.broken:
            self.close()


# held-out problems of the synthetic task (two of each op, 8 to 32 letters each): the
# embedded default model answers them, so a load test also checks the answers
BENCH_PROMPTS = tuple(p.prompt for p in task.problems(4321, 8, split="heldout", family="maps"))


def _percentile(xs: list[float], p: float) -> float:
    return float(np.percentile(xs, p)) if xs else float("nan")


def bench_serve(url: str, concurrency: int, n_requests: int, knobs: dict, prompts=BENCH_PROMPTS,
                model: str = MODEL_NAME, timeout: float = 300.0) -> dict:
    """Serve each distinct prompt alone first (the reference), then N requests from `concurrency`
    threads at once; a response mismatches when its text differs from its prompt's alone text."""
    prompts = list(prompts)
    alone = {p: request(url, {"text_input": p, **knobs}, model=model, timeout=timeout) for p in prompts}
    bad_ref = {p: r.error for p, r in alone.items() if r.error}
    if bad_ref:
        raise RuntimeError(f"a request served alone failed: {bad_ref}")
    jobs = [prompts[i % len(prompts)] for i in range(n_requests)]
    results: list[Reply | None] = [None] * n_requests
    lock, nxt = threading.Lock(), [0]

    def worker():  # each client keeps its connection, as a real one would
        sess = Session(url, model=model)
        try:
            while True:
                with lock:
                    i = nxt[0]
                    nxt[0] += 1
                if i >= n_requests:
                    return
                if sess.broken:
                    sess = Session(url, model=model)
                results[i] = sess.request({"text_input": jobs[i], **knobs}, timeout=timeout)
        finally:
            if not sess.broken:
                sess.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [(r, p) for r, p in zip(results, jobs) if r.error is None]
    lat = [r.seconds for r, _ in ok]
    tokens = sum(r.stats.get("output_tokens", 0) for r, _ in ok)
    graded = [(r, p) for r, p in ok if task.grade(p, "") is not None]
    return {"concurrency": concurrency, "requests": n_requests, "errors": n_requests - len(ok),
            "mismatches": sum(r.text != alone[p].text for r, p in ok),
            "identical_to_alone": len(ok) == n_requests and all(r.text == alone[p].text for r, p in ok),
            "exact_match": round(sum(task.grade(p, r.text) for r, p in graded) / len(graded), 4)
            if graded else None,
            "wall_seconds": round(wall, 4), "requests_per_second": round(len(ok) / wall, 3),
            "tokens_per_second": round(tokens / wall, 3), "p50_latency_s": round(_percentile(lat, 50), 4),
            "p99_latency_s": round(_percentile(lat, 99), 4),
            "max_batch_seen": max((r.stats.get("batch_size", 0) for r, _ in ok), default=0),
            "first_error": next((r.error for r in results if r.error), None), "knobs": knobs}


def _knobs(ns) -> dict:
    """Flags -> optional inputs; only the ones given, so the server's defaults apply otherwise."""
    names = ("max_tokens", "method", "block_length", "steps", "threshold", "temperature", "random_seed",
             "cache", "chat", "suffix_window", "dynamic_alpha", "early_exit", "saliency_tau")
    out = {n: getattr(ns, n) for n in names if getattr(ns, n, None) not in (None, False)}
    return out


def _client(ns) -> int:
    knobs = {**_knobs(ns), "stream": bool(ns.stream)}
    printed = ns.stream and not ns.json
    on_text = (lambda s: print(s, end="", flush=True)) if printed else None
    reply = request(ns.url, {"text_input": ns.text, **knobs}, model=ns.model_name, on_text=on_text,
                    timeout=ns.timeout)
    if ns.json:
        print(json.dumps({"text": reply.text, "stats": reply.stats, "error": reply.error,
                          "chunks": reply.chunks, "seconds": round(reply.seconds, 4)}))
        return 1 if reply.error else 0
    if reply.error:
        print(f"esdllm client: server error: {reply.error}", file=sys.stderr)
        return 1
    print("" if printed else reply.text)
    st = reply.stats
    print(f"-- {st.get('output_tokens')} tokens, NFE {st.get('nfe')}, batch {st.get('batch_size')}, "
          f"{st.get('tokens_per_second')} tokens/s, kept {st.get('kept_fraction')}, {reply.seconds:.3f} s",
          file=sys.stderr)
    return 0


def _bench(ns) -> int:
    if ns.rate or ns.rates:
        from .loadgen import main as open_loop_main
        return open_loop_main(ns, _knobs(ns))
    r = bench_serve(ns.url, ns.concurrency, ns.requests, {**_knobs(ns), "stream": bool(ns.stream)},
                    model=ns.model_name, timeout=ns.timeout)
    rows = [("concurrency", r["concurrency"]), ("requests", r["requests"]), ("errors", r["errors"]),
            ("mismatches vs alone", r["mismatches"]), ("identical to alone", r["identical_to_alone"]),
            ("exact match (task)", r["exact_match"]),
            ("requests/s", r["requests_per_second"]), ("tokens/s", r["tokens_per_second"]),
            ("p50 latency (s)", r["p50_latency_s"]), ("p99 latency (s)", r["p99_latency_s"]),
            ("largest batch seen", r["max_batch_seen"]), ("wall (s)", r["wall_seconds"])]
    if not ns.json:  # people get the table; the JSON line ends every run (--json: only it)
        for k, v in rows:
            print(f"{k:<22}{v}")
        if r["first_error"]:
            print(f"first error: {r['first_error']}")
    print(json.dumps(r))
    return 0 if r["errors"] == 0 and r["identical_to_alone"] else 1


def _common(p) -> None:
    p.add_argument("--url", default="127.0.0.1:8001", help="gRPC address of the server")
    p.add_argument("--model-name", default=MODEL_NAME, help=f"served model name (default {MODEL_NAME})")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a request may take in all; at the deadline it is cancelled")
    p.add_argument("--stream", action="store_true", help="stream: one response each time the decided prefix grows")
    p.add_argument("--max-tokens", type=int, default=None, help="gen length (default: the server's)")
    p.add_argument("--method", default=None, choices=METHODS, help="decoding method (default: the server's)")
    p.add_argument("--block-length", type=int, default=None, help="block size (default: the server's)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the server's)")
    p.add_argument("--threshold", type=float, default=None, help="parallel-decoding confidence threshold (default: the server's)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the server's)")
    p.add_argument("--random-seed", type=int, default=None, help="sampling seed (default: the server's)")
    p.add_argument("--cache", default=None, choices=CACHES, help="fast-dllm cache (default: the server's)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--suffix-window", type=int, default=None, help="streaming: suffix positions kept (default: the server's)")
    p.add_argument("--dynamic-alpha", type=float, default=None, help="streaming: dynamic threshold alpha")
    p.add_argument("--early-exit", action="store_true", default=None, help="end the row at a finished block holding EOS")
    p.add_argument("--saliency-tau", type=float, default=None, help="dyllm: saliency threshold")


def register(subparsers) -> None:
    """Adds `esdllm client` and `esdllm bench-serve`."""
    c = subparsers.add_parser("client", help="query a running `esdllm serve` over gRPC",
                              epilog='example: esdllm client --stream --method es-dllm --threshold 0.9 "rot13: abcdef ->"')
    c.add_argument("text", help="the prompt")
    c.add_argument("--json", action="store_true", help="print one JSON line with text, stats and chunks")
    _common(c)
    c.set_defaults(func=_client)
    b = subparsers.add_parser("bench-serve", help="load-test a running server; checks results against alone",
                              epilog="example: esdllm bench-serve --concurrency 8 --requests 64 --threshold 0.9   "
                                     "(open loop: esdllm bench-serve --compare-schedulers --rates 2,4,8 --requests 200)")
    b.add_argument("--concurrency", type=int, default=16, help="client threads (default 16)")
    b.add_argument("--requests", type=int, default=64, help="requests in all (default 64)")
    b.add_argument("--json", action="store_true", help="print only the JSON line (no table)")
    g = b.add_argument_group("open-loop load (runtime/loadgen.py)")
    g.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second (instead of --concurrency)")
    g.add_argument("--rates", default=None, help="comma list of rates: a sweep, each on the same requests")
    g.add_argument("--mix-tokens", default="32,64", help="max_tokens drawn from these (default 32,64), or 'natural': each family's own gen length")
    g.add_argument("--families", default="maps",
                   help="task families the prompts come from, in turn (default maps; e.g. maps,perm,chain)")
    g.add_argument("--stream-frac", type=float, default=0.5, help="share of requests streamed (default 0.5)")
    g.add_argument("--cancel-frac", type=float, default=0.1,
                   help="share hung up on after their first streamed response (default 0.1)")
    g.add_argument("--seed", type=int, default=0, help="arrivals and request mix")
    g.add_argument("--compare-schedulers", action="store_true",
                   help="start one server per scheduler (inflight, batch) on --serve-model and load each the same way")
    g.add_argument("--serve-model", default=None, help="with --compare-schedulers: checkpoint (default: the embedded model)")
    g.add_argument("--max-batch", type=int, default=8, help="with --compare-schedulers: the servers' max batch (default 8)")
    _common(b)
    b.set_defaults(func=_bench)
