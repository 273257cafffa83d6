"""Open-loop load for `esdllm bench-serve --rate R` (or --rates R1,R2,...): requests arrive by a Poisson
process whatever the server's pace, as real users do, so a slow scheduler builds a queue instead of
slowing the clients down.

The mix: held-out task prompts of mixed lengths (from --families, in turn), answers of mixed
lengths (max_tokens drawn from --mix-tokens), a share streamed (--stream-frac), a share hung up on
after their first streamed response (--cancel-frac). Each distinct (prompt, max_tokens) is first
served alone, one at a time: a completed response that differs from it is a mismatch.

Per rate: requests/s and tokens/s of completed requests, latency p50/p90/p99 (arrival to final
response), time to first streamed token (p50/p90), time per output token of streamed requests,
errors, mismatches (latency, first token, per-token time and one block's time per family too, where
the mix holds several); once, the batch-1 latency of each family's first request, on a kept connection
and on a fresh one (against Pipeline.generate in-process, interleaved, with --compare-schedulers). With
--compare-schedulers bench-serve starts one server per scheduler itself (inflight and batch, same
model, same flags) and runs the same arrivals against each; beside esdllm each serves triton_repo/noop,
whose round trip (the floor no python-backend model avoids) is reported with the batch-1 latency.
"""
from __future__ import annotations

import contextlib
import random
import tempfile
import threading
import time
from pathlib import Path

from . import task
from .client import MODEL_NAME, Reply, Session, _percentile, request

FLOOR_MODEL = "noop"  # triton_repo/noop: answers at once


def _pct(xs: list[float], p: float) -> float | None:
    return round(_percentile(xs, p), 4) if xs else None


def parse_mix(text: str) -> tuple[int, ...]:
    """--mix-tokens: "32,64" (drawn from these) or "natural" (each family's own generation length,
    task.NATURAL_GEN: 64 for the short families, 512 for long), as the empty tuple."""
    if text.strip() == "natural":
        return ()
    mix = tuple(int(t) for t in text.split(","))
    if not mix or min(mix) < 1:
        raise ValueError(f"--mix-tokens needs positive token counts or 'natural', got {text!r}")
    return mix


def largest_max_tokens(mix: tuple[int, ...], families: tuple[str, ...]) -> int:
    return max(mix) if mix else max(task.NATURAL_GEN[f] for f in families)


def workload(n: int, seed: int, mix_tokens: tuple[int, ...], stream_frac: float, cancel_frac: float,
             families: tuple[str, ...] = ("maps",)) -> list[dict]:
    """n request specs: prompt, max_tokens, stream, cancel (cancelled ones are streamed).
    mix_tokens () gives each prompt its family's natural generation length."""
    rng = random.Random(seed)
    probs = task.problems(seed, n, split="heldout", family=tuple(families))
    out = []
    for p in probs:
        cancel = rng.random() < cancel_frac
        max_tokens = rng.choice(mix_tokens) if mix_tokens else task.NATURAL_GEN[p.family]
        out.append({"prompt": p.prompt, "max_tokens": max_tokens, "family": p.family,
                    "stream": cancel or rng.random() < stream_frac, "cancel": cancel})
    return out


def references(url: str, specs: list[dict], knobs: dict, model: str, timeout: float) -> dict:
    """Each distinct (prompt, max_tokens) served alone: its text."""
    ref = {}
    for s in specs:
        key = (s["prompt"], s["max_tokens"])
        if key not in ref:
            r = request(url, {"text_input": s["prompt"], "max_tokens": s["max_tokens"], **knobs}, model=model,
                        timeout=timeout)
            if r.error:
                raise RuntimeError(f"a request served alone failed: {r.error}")
            ref[key] = r.text
    return ref


def open_loop(url: str, specs: list[dict], rate: float, knobs: dict, ref: dict, *, seed: int = 0,
              model: str = MODEL_NAME, timeout: float = 300.0, progress: bool = False) -> dict:
    """Send specs at Poisson arrivals of `rate` per second; wait for all; the metrics of this rate."""
    rng = random.Random(seed)
    replies: list[Reply | None] = [None] * len(specs)
    threads = []

    def one(i: int, s: dict) -> None:
        inputs = {"text_input": s["prompt"], "max_tokens": s["max_tokens"], "stream": s["stream"], **knobs}
        replies[i] = request(url, inputs, model=model, timeout=timeout, cancel_after=1 if s["cancel"] else None)

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(specs), desc=f"rate {rate:g}/s", unit="req", leave=False)
    t0 = time.perf_counter()
    due = t0
    for i, s in enumerate(specs):
        due += rng.expovariate(rate)
        time.sleep(max(0.0, due - time.perf_counter()))
        th = threading.Thread(target=one, args=(i, s), daemon=True)
        th.start()
        threads.append(th)
        if bar is not None:
            bar.update(1)
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    done = [(r, s) for r, s in zip(replies, specs) if not s["cancel"]]
    ok = [(r, s) for r, s in done if r.error is None]
    errors = [r.error for r, s in done if r.error is not None]
    errors += [r.error for r, s in zip(replies, specs) if s["cancel"] and r.error not in (None, "cancelled by the client")]
    lat = [r.seconds for r, _ in ok]
    tokens = sum(r.stats.get("output_tokens", 0) for r, _ in ok)
    return {"rate": rate, "requests": len(specs), "completed": len(ok), "cancelled": sum(s["cancel"] for s in specs),
            "errors": len(errors), "first_error": errors[0] if errors else None,
            "mismatches": sum(r.text != ref[(s["prompt"], s["max_tokens"])] for r, s in ok),
            "requests_per_second": round(len(ok) / wall, 3), "tokens_per_second": round(tokens / wall, 2),
            **_metrics(ok), "p90_latency_s": _pct(lat, 90), "p99_latency_s": _pct(lat, 99),
            "max_batch_seen": max((r.stats.get("batch_size", 0) for r, _ in ok), default=0),
            "wall_seconds": round(wall, 3),
            "by_family": _by_family(ok) if len({s["family"] for s in specs}) > 1 else None}


def _metrics(ok: list) -> dict:
    """p50 latency, time to first streamed token (p50 / p90), time per output token and the time of
    one block of the completed (reply, spec) pairs."""
    ttft = [r.first_chunk_s for r, s in ok if s["stream"] and r.first_chunk_s is not None]
    tpot = [(r.seconds - r.first_chunk_s) / max(r.stats.get("output_tokens", 1) - 1, 1)
            for r, s in ok if s["stream"] and r.first_chunk_s is not None]
    # the time of one block, where the server reports blocks (the in-flight scheduler): a request's
    # time in a row over the blocks it decoded; streamed text should arrive before a block is done
    block = [(r.stats["seconds"] - r.stats["queue_seconds"]) / r.stats["blocks"]
             for r, _ in ok if r.stats.get("blocks")]
    return {"p50_latency_s": _pct([r.seconds for r, _ in ok], 50), "p50_ttft_s": _pct(ttft, 50),
            "p90_ttft_s": _pct(ttft, 90), "p50_tpot_s": _pct(tpot, 50), "p50_block_s": _pct(block, 50)}


def _by_family(ok: list) -> dict:
    """_metrics per task family: a block's time and the first streamed token's differ by family
    (a maps block is decided in one forward, a perm block in several), so the mix hides both."""
    fams: dict[str, list] = {}
    for r, s in ok:
        fams.setdefault(s["family"], []).append((r, s))
    return {f: {"completed": len(v), **_metrics(v)} for f, v in fams.items()}


def batch1_latency(url: str, s: dict, knobs: dict, model: str, timeout: float, in_process=None,
                   reps: int = 10, floor_model: str | None = None) -> dict:
    """One request alone, `reps` times on a kept connection (a client's second request onwards) and 5
    times on a fresh one: min and median seconds. With in_process(spec) -> seconds (Pipeline.generate
    on the same text in this process) each Triton request is followed by one in-process run, so both
    see the same machine at the same moments; the overhead is Triton's min over in-process's min (and
    the same for medians). What Triton adds is a few fixed milliseconds, so its share depends on the
    request's own length: a maps answer takes milliseconds, a long one tens of them.

    floor_model: a model on the same server that answers at once (triton_repo/noop), asked the same
    request after each one: its round trip is what any python-backend model pays, and
    overhead_above_floor is the overhead without it."""
    first = {"text_input": s["prompt"], "max_tokens": s["max_tokens"], **knobs}
    kept, local, floor = [], [], []
    with Session(url, model=model) as sess, contextlib.ExitStack() as stack:
        noop = stack.enter_context(Session(url, model=floor_model)) if floor_model else None
        sess.request(first, timeout=timeout)  # warm: the lane of this config is open
        if noop is not None:
            noop.request(first, timeout=timeout)
        for _ in range(reps):
            kept.append(sess.request(first, timeout=timeout).seconds)
            if in_process is not None:
                local.append(in_process(s))
            if noop is not None:
                floor.append(noop.request(first, timeout=timeout).seconds)
    fresh = [request(url, first, model=model, timeout=timeout).seconds for _ in range(5)]
    out = {"max_tokens": s["max_tokens"], "latency_s": round(min(kept), 4), "p50_latency_s": _pct(kept, 50),
           "fresh_connection_s": round(min(fresh), 4)}
    if floor:
        out.update(floor_s=round(min(floor), 4), floor_p50_s=_pct(floor, 50))
    if local:
        out.update(in_process_s=round(min(local), 4), in_process_p50_s=_pct(local, 50),
                   overhead=round(min(kept) / min(local) - 1, 3),
                   overhead_p50=round(_percentile(kept, 50) / _percentile(local, 50) - 1, 3))
        if floor:
            out["overhead_above_floor"] = round((min(kept) - min(floor)) / min(local) - 1, 3)
    return out


def first_of_each_family(specs: list[dict]) -> list[dict]:
    seen = {}
    for s in specs:
        seen.setdefault(s["family"], s)
    return list(seen.values())


def run(url: str, rates: list[float], n: int, knobs: dict, *, mix_tokens=(32, 64), stream_frac=0.5,
        cancel_frac=0.1, seed: int = 0, model: str = MODEL_NAME, timeout: float = 300.0, progress=False,
        families: tuple[str, ...] = ("maps",), in_process=None, floor_model: str | None = None) -> dict:
    specs = workload(n, seed, mix_tokens, stream_frac, cancel_frac, families)
    ref = references(url, specs, knobs, model, timeout)
    batch1 = {s["family"]: batch1_latency(url, s, knobs, model, timeout, in_process, floor_model=floor_model)
              for s in first_of_each_family(specs)}
    return {"batch1": batch1, "knobs": knobs, "mix_tokens": list(mix_tokens) or "natural", "families": list(families),
            "stream_frac": stream_frac, "cancel_frac": cancel_frac,
            "rates": [open_loop(url, specs, r, knobs, ref, seed=seed + 1, model=model, timeout=timeout,
                                progress=progress) for r in rates]}


def _servers(ns, schedulers: tuple[str, ...]):
    """One fresh server per scheduler on the same model and flags (the embedded model by default)."""
    from .serve import TritonServer, free_port, repo_values, served_defaults
    for sch in schedulers:
        values = repo_values(None, ns.serve_model, executor="torch", device="cpu", max_batch=ns.max_batch,
                             max_tokens=largest_max_tokens(parse_mix(ns.mix_tokens), _families(ns)),
                             decode={"gen_length": 64, "block_length": 32, **served_defaults(ns.serve_model)},
                             scheduler=sch)
        log = Path(tempfile.mkdtemp(prefix="esdllm-bench-serve-")) / f"tritonserver-{sch}.log"
        yield sch, TritonServer(values, grpc_port=free_port(), log=log, extra_models=(FLOOR_MODEL,))


def _families(ns) -> tuple[str, ...]:
    return tuple(f for f in ns.families.split(",") if f)


def _in_process(ns, knobs):
    """spec -> seconds of Pipeline.generate on its text in this process (tokenizing and detokenizing
    included, as a server request), with the served model's decoding settings."""
    from .config import DecodeConfig
    from .pipeline import Pipeline
    from .serve import served_defaults
    pipe = Pipeline.load(ns.serve_model)
    decode = served_defaults(ns.serve_model) if "method" not in knobs else {}
    given = {k: v for k, v in knobs.items() if k in DecodeConfig.__dataclass_fields__}

    def one(s: dict) -> float:
        cfg = DecodeConfig(**{"gen_length": s["max_tokens"], "block_length": min(32, s["max_tokens"]),
                              **decode, **given})
        t0 = time.perf_counter()
        pipe.generate([s["prompt"]], cfg)
        return time.perf_counter() - t0
    return one


def main(ns, knobs: dict) -> int:
    import json
    import sys
    rates = [float(r) for r in ns.rates.split(",")] if ns.rates else [ns.rate]
    mix = parse_mix(ns.mix_tokens)
    fams = _families(ns)
    kw = dict(mix_tokens=mix, families=fams, stream_frac=ns.stream_frac, cancel_frac=ns.cancel_frac, seed=ns.seed,
              model=ns.model_name, timeout=ns.timeout, progress=sys.stderr.isatty() and not ns.json)
    if not ns.compare_schedulers:
        out = {"url": ns.url, **run(ns.url, rates, ns.requests, knobs, **kw)}
    else:
        out = {"schedulers": {}}
        local = _in_process(ns, knobs)
        for sch, server in _servers(ns, ("inflight", "batch")):
            with server:
                out["schedulers"][sch] = run(server.grpc_url, rates, ns.requests, knobs, in_process=local,
                                             floor_model=FLOOR_MODEL, **kw)
        a, b = out["schedulers"]["inflight"], out["schedulers"]["batch"]
        out["inflight_over_batch"] = [
            {"rate": x["rate"], "throughput": round(x["tokens_per_second"] / max(y["tokens_per_second"], 1e-9), 3),
             "p99_latency": round(x["p99_latency_s"] / y["p99_latency_s"], 3) if x["p99_latency_s"] and y["p99_latency_s"] else None}
            for x, y in zip(a["rates"], b["rates"])]
    if not ns.json:
        print(_table(out))
    print(json.dumps(out))
    bad = [r for res in (out.get("schedulers") or {"": out}).values() for r in res["rates"]
           if r["errors"] or r["mismatches"]]
    return 1 if bad else 0


def _table(out: dict) -> str:
    runs = out.get("schedulers") or {"server": out}
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    head = (f"{'scheduler':<10}{'rate/s':>8}{'done':>6}{'err':>5}{'mism':>6}{'req/s':>8}{'tok/s':>9}"
            f"{'p50 s':>8}{'p90 s':>8}{'p99 s':>8}{'ttft50':>8}{'tpot50':>8}{'block50':>8}{'batch':>6}")
    lines = [head]
    for sch, res in runs.items():
        for r in res["rates"]:
            lines.append(f"{sch:<10}{r['rate']:>8g}{r['completed']:>6}{r['errors']:>5}{r['mismatches']:>6}"
                         f"{r['requests_per_second']:>8.2f}{r['tokens_per_second']:>9.1f}{f(r['p50_latency_s']):>8}"
                         f"{f(r['p90_latency_s']):>8}{f(r['p99_latency_s']):>8}{f(r['p50_ttft_s']):>8}"
                         f"{f(r['p50_tpot_s']):>8}{f(r.get('p50_block_s')):>8}{r['max_batch_seen']:>6}")
    for sch, res in runs.items():
        for r in res["rates"]:
            for fam, m in (r.get("by_family") or {}).items():
                lines.append(f"{sch} {r['rate']:g}/s {fam}: {m['completed']} done, p50 latency {f(m['p50_latency_s'])} s, "
                             f"first streamed token {f(m['p50_ttft_s'])} s, one block {f(m['p50_block_s'])} s")
    for x in out.get("inflight_over_batch", []):
        lines.append(f"rate {x['rate']:g}/s: inflight/batch throughput {x['throughput']:.2f}x, p99 latency "
                     f"{x['p99_latency'] if x['p99_latency'] is None else round(x['p99_latency'], 2)}x")
    for sch, res in runs.items():
        for fam, b in res["batch1"].items():
            vs = (f" vs in-process {b['in_process_s']:.4f} / {b['in_process_p50_s']:.4f}: overhead "
                  f"{100 * b['overhead']:+.1f}% / {100 * b['overhead_p50']:+.1f}%" if "overhead" in b else "")
            lines.append(f"{sch} batch-1 {fam} ({b['max_tokens']} tokens), min / median s: {b['latency_s']:.4f} / "
                         f"{b['p50_latency_s']:.4f} on a kept connection ({b['fresh_connection_s']:.4f} fresh){vs}")
    return "\n".join(lines)
