"""End to end against a real tritonserver (the nvidia-pytriton wheel's, or one on PATH) on free
loopback ports, serving the tiny LLaDA checkpoint: plain and streamed gRPC, every bad request,
a client hanging up mid-stream, and 16 concurrent clients that must each get exactly the tokens
they get alone. One server per module. Plus the template and request parsing without a server."""
from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from esdllm.runtime.config import DecodeConfig
from esdllm.runtime.serve import REPO_TEMPLATE, fill_template, free_port, repo_values, write_repository


from esdllm.runtime import serving as S  # noqa: E402

GEN, BLOCK, MAX_TOKENS, MAX_PROMPT = 16, 8, 32, 48
PROMPTS = ["Hi", "The quick brown fox", "Question: what is 12 + 30? Answer:", "def add(a, b):",
           "User: hello! Assistant:", "1, 2, 3, 4,", "Diffusion language models denoise a canvas", "ab"]


# --- without a server ---------------------------------------------------------------------------

def test_fill_template_escapes_and_names_missing_values():
    out = fill_template('a: "${x}" b: ${n}', {"x": 'say "hi" \\', "n": 3})
    assert out == 'a: "say \\"hi\\" \\\\" b: 3'
    with pytest.raises(ValueError, match="needs values for n"):
        fill_template("${n}", {})


def test_written_repository_has_no_placeholder_left(tmp_path, llada_ckpt):
    values = repo_values(None, llada_ckpt, max_tokens=MAX_TOKENS, decode={"gen_length": GEN, "block_length": BLOCK})
    cfg = (write_repository(tmp_path, values) / "esdllm" / "config.pbtxt").read_text()
    assert "${" not in cfg and "decoupled: true" in cfg and "max_batch_size: 8" in cfg
    assert (tmp_path / "esdllm" / "1" / "model.py").is_file()
    with pytest.raises(ValueError, match="block_length"):
        repo_values(None, llada_ckpt, decode={"gen_length": 20, "block_length": 8})


def _served(tmp_path, *flags) -> dict:
    """The decode defaults `esdllm serve --write-repo` puts in config.pbtxt."""
    import json
    from esdllm.runtime import cli
    repo = tmp_path / f"repo{len(list(tmp_path.iterdir()))}"
    assert cli.main(["serve", "--write-repo", str(repo), *flags]) == 0
    cfg = (repo / "esdllm" / "config.pbtxt").read_text()
    raw = re.search(r'key: "decode_defaults"\s*value: \{\s*string_value: "((?:[^"\\]|\\.)*)"', cfg).group(1)
    return json.loads(raw.encode().decode("unicode_escape"))


def test_served_defaults_follow_the_checkpoints_measured_record(tmp_path, llada_ckpt):
    """The embedded LLaDA records es-dllm at 0.9 with early exit and the prompt refreshed every step;
    a checkpoint without a record gets SERVE_DEFAULTS; a flag overrides either; a bad record is named."""
    import json
    import shutil
    from esdllm.runtime.pipeline import default_model
    from esdllm.runtime.serve import SERVE_DEFAULTS, SERVE_KEY, served_defaults
    rec = json.loads((default_model() / "generation_config.json").read_text())[SERVE_KEY]
    d = _served(tmp_path)
    keys = ("method", "threshold", "early_exit", "prompt_update_freq", "delay_eos")
    assert [d[k] for k in keys] == [rec[k] for k in keys] == ["es-dllm", 0.9, True, 1, False]
    assert served_defaults(None) == {k: rec[k] for k in keys}
    assert served_defaults(llada_ckpt) == SERVE_DEFAULTS  # a checkpoint that records nothing
    d = _served(tmp_path, "--model", str(llada_ckpt))
    assert (d["method"], d["threshold"], d["early_exit"], d["prompt_update_freq"]) == ("es-dllm", 0.9, True, 64)
    d = _served(tmp_path, "--threshold", "0.95")  # a flag without a method: over the record
    assert (d["method"], d["threshold"], d["prompt_update_freq"]) == ("es-dllm", 0.95, 1)
    d = _served(tmp_path, "--method", "fast-dllm")  # a method: only what was given
    assert (d["method"], d["threshold"], d["early_exit"]) == ("fast-dllm", None, None)
    bad = tmp_path / "bad"
    shutil.copytree(llada_ckpt, bad)
    g = json.loads((bad / "generation_config.json").read_text())
    (bad / "generation_config.json").write_text(json.dumps({**g, SERVE_KEY: {"method": "es-dllm", "treshold": 0.9}}))
    with pytest.raises(ValueError, match="unknown decoding settings.*treshold"):
        served_defaults(bad)
    (bad / "generation_config.json").write_text(json.dumps({**g, SERVE_KEY: {"method": "es-dllm", "threshold": 2}}))
    with pytest.raises(ValueError, match="threshold"):
        served_defaults(bad)


def test_ready_message_names_the_refresh_knobs_that_differ_from_the_authors():
    from types import SimpleNamespace
    from esdllm.runtime.serve import ready_message, repo_values, served_defaults
    server = SimpleNamespace(grpc_url="127.0.0.1:8001", http_url=None)
    msg = ready_message(server, repo_values(None, None, decode=served_defaults(None)))
    assert "method es-dllm" in msg and "threshold 0.9" in msg and "early_exit True" in msg
    assert "prompt_update_freq 1" in msg and "delay_eos False" in msg and "prompt_skip" not in msg
    plain = ready_message(server, repo_values(None, None, decode={"method": "es-dllm"}))
    assert "prompt_update_freq" not in plain and "delay_eos" not in plain


class _Pipe:
    """Just enough Pipeline for parse_request: a whitespace 'tokenizer'."""
    executor = None

    def encode(self, text, chat=False, gen_length=0):
        return list(range(len(text.split())))


def _parse(**inputs):
    arrays = {k: v if isinstance(v, np.ndarray) else np.array([[v]]) for k, v in inputs.items()}
    return S.parse_request(arrays, _Pipe(), DecodeConfig(gen_length=GEN, block_length=BLOCK),
                           S.Limits(MAX_TOKENS, MAX_PROMPT))


def test_parse_request_maps_trtllm_names_onto_decode_config():
    r = _parse(text_input=b"a b c", max_tokens=np.array([[4]], np.int32), stream=True, method=b"es-dllm",
               threshold=np.array([[0.9]], np.float32), skip_proportions=np.array([[1.0, 0.5]], np.float32),
               skip_positions=np.array([[0.0, 0.5]], np.float32))
    assert r.prompt_ids == [0, 1, 2] and r.stream
    assert (r.cfg.gen_length, r.cfg.block_length, r.cfg.method) == (4, 4, "es-dllm")
    assert r.cfg.threshold == pytest.approx(0.9)
    assert (r.cfg.skip_proportions, r.cfg.skip_positions) == ((1.0, 0.5), (0.0, 0.5))
    with pytest.raises(ValueError, match="skip_positions must be increasing"):
        _parse(text_input=b"a", skip_proportions=np.array([[1.0, 0.5]], np.float32),
               skip_positions=np.array([[0.5, 0.0]], np.float32))
    same = [_parse(text_input=b"x"), _parse(text_input=b"y y"), _parse(text_input=b"z", method=b"es-dllm")]
    groups = S.group_by_config([(q, i) for i, q in enumerate(same)])
    assert [[i for _, i in g] for _, g in groups] == [[0, 1], [2]]


def test_stream_text_holds_back_a_cut_character():
    st = S.StreamText()
    assert st.delta("ab\ufffd") == "ab" and st.delta("abc d") == "c d" and st.delta("abc d\ufffd", final=True) == "\ufffd"


# --- against the real server --------------------------------------------------------------------

def _serve(model_dir, tmp_path_factory, extra_models=(), **values):
    """A real tritonserver over `model_dir` (torch executor, CPU) for one test module; skips without one."""
    pytest.importorskip("tritonclient.grpc")
    from esdllm.runtime.serve import TritonServer
    values = repo_values(None, model_dir, executor="torch", device="cpu", queue_delay_us=20000, **values)
    try:
        srv = TritonServer(values, grpc_port=free_port(), extra_models=extra_models,
                           log=tmp_path_factory.mktemp("triton") / "tritonserver.log")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    with srv:
        yield srv


@pytest.fixture(scope="module")
def server(llada_ckpt, tmp_path_factory):
    yield from _serve(llada_ckpt, tmp_path_factory, max_batch=16, max_tokens=MAX_TOKENS, max_prompt=MAX_PROMPT,
                      decode={"gen_length": GEN, "block_length": BLOCK})


@pytest.fixture(scope="module")
def pipe(llada_ckpt):
    from esdllm.runtime.pipeline import Pipeline
    return Pipeline.load(llada_ckpt)


def _ask(server, **inputs):
    from esdllm.runtime.client import request
    return request(server.grpc_url, inputs, timeout=120)


def _alone(pipe, prompt, **kw):
    """The completion of `prompt` decoded alone, in this process."""
    kw = {"gen_length": GEN, "block_length": BLOCK, **kw}
    return pipe.generate([prompt], DecodeConfig(**kw)).completions[0]


@pytest.mark.serve
def test_plain_request_matches_the_runtime(server, pipe):
    r = _ask(server, text_input=PROMPTS[1])
    assert r.error is None and len(r.chunks) == 1
    alone = _alone(pipe, PROMPTS[1])
    assert r.text == alone.text
    st = r.stats
    assert (st["nfe"], st["output_tokens"], st["batch_size"]) == (GEN, alone.n_tokens, 1)
    assert st["kept_fraction"] == 1.0 and st["tokens_per_second"] > 0 and st["executor"] == "torch"


@pytest.mark.serve
def test_stream_sends_decided_text_then_the_stats(server, pipe):
    plain = _ask(server, text_input=PROMPTS[2], max_tokens=MAX_TOKENS, method="es-dllm")
    r = _ask(server, text_input=PROMPTS[2], max_tokens=MAX_TOKENS, method="es-dllm", stream=True)
    assert r.error is None and plain.error is None
    assert len([c for c in r.chunks[:-1] if c]) >= 2  # text arrives before the final response
    assert r.text == plain.text == _alone(pipe, PROMPTS[2], gen_length=MAX_TOKENS, method="es-dllm").text
    assert r.stats["method"] == "es-dllm" and 0 < r.stats["kept_fraction"] < 1


@pytest.mark.serve
def test_a_session_keeps_one_stream_for_requests_one_after_another(server, pipe):
    """A kept connection answers each request as a fresh one does, a bad request in between included."""
    from esdllm.runtime.client import Session
    with Session(server.grpc_url) as s:
        a = s.request({"text_input": PROMPTS[0]}, timeout=120)
        bad = s.request({"text_input": "hi", "method": "nope"}, timeout=120)
        b = s.request({"text_input": PROMPTS[3], "stream": True}, timeout=120)
    assert bad.error is not None and "unknown method 'nope'" in bad.error and not bad.chunks
    assert a.error is None and a.text == _alone(pipe, PROMPTS[0]).text
    assert b.error is None and b.text == _alone(pipe, PROMPTS[3]).text and b.stats["output_tokens"] > 0


BAD = {
    "empty": ({"text_input": ""}, "text_input is empty"),
    "missing": ({"max_tokens": 8}, "text_input is missing"),
    "dtype": ({"text_input": "hi", "max_tokens": np.array([[8]], np.int64)}, "'max_tokens' data-type is 'INT64'"),
    "shape": ({"text_input": np.array([[b"a", b"b"]], object)}, "unexpected shape for input 'text_input'"),
    "two_prompts": ({"text_input": np.array([[b"a"], [b"b"]], object)}, "text_input must hold one value"),
    "max_tokens_0": ({"text_input": "hi", "max_tokens": 0}, "max_tokens must be positive"),
    "max_tokens_big": ({"text_input": "hi", "max_tokens": 64}, "beyond the served range (at most 32)"),
    "not_multiple": ({"text_input": "hi", "max_tokens": 24, "block_length": 16}, "not a multiple of block_length"),
    "method": ({"text_input": "hi", "method": "nope"}, "unknown method 'nope'"),
    "threshold_big": ({"text_input": "hi", "threshold": 1.5}, "threshold must be in (0, 1]"),
    "threshold_0": ({"text_input": "hi", "threshold": 0.0}, "threshold must be in (0, 1]"),
    "utf8": ({"text_input": b"\xff\xfehi"}, "not valid UTF-8"),
    "too_long": ({"text_input": "word " * 100}, f"longer than the limit of {MAX_PROMPT}"),
}


@pytest.mark.serve
def test_bad_requests_get_named_errors_while_good_ones_complete(server, pipe):
    """All bad requests and two good ones at once: the dynamic batcher hands them to the model
    together; each bad one gets its own error, the good ones their usual text."""
    from esdllm.runtime.client import request
    jobs = {**{k: inputs for k, (inputs, _) in BAD.items()}, "good0": {"text_input": PROMPTS[0]},
            "good1": {"text_input": PROMPTS[3]}}
    out: dict = {}
    threads = [threading.Thread(target=lambda k=k, v=v: out.__setitem__(k, request(server.grpc_url, v, timeout=120)))
               for k, v in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, (_, expect) in BAD.items():
        assert out[name].error is not None and expect in out[name].error, (name, out[name].error)
    assert out["good0"].error is None and out["good0"].text == _alone(pipe, PROMPTS[0]).text
    assert out["good1"].error is None and out["good1"].text == _alone(pipe, PROMPTS[3]).text


@pytest.mark.serve
def test_client_hanging_up_mid_stream_frees_its_slot(server, pipe):
    # vanilla: one token a step over 4 blocks, long enough that the hang-up lands mid-request (the
    # served default can finish a maps answer before the loop's next look at its client)
    r = _ask(server, text_input=PROMPTS[4], max_tokens=MAX_TOKENS, stream=True, method="vanilla")
    from esdllm.runtime.client import request
    cut = request(server.grpc_url, {"text_input": PROMPTS[4], "max_tokens": MAX_TOKENS, "stream": True,
                                    "method": "vanilla"}, cancel_after=1)
    assert cut.chunks == r.chunks[:1]
    log = Path(server.log)
    deadline = time.monotonic() + 60
    while "went away" not in log.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert re.search(r"went away; stopped (after|in) block \d+ of 4", log.read_text(errors="replace"))
    after = _ask(server, text_input=PROMPTS[5])
    assert after.error is None and after.text == _alone(pipe, PROMPTS[5]).text


@pytest.mark.serve
def test_16_concurrent_clients_get_what_they_get_alone(server, pipe):
    from esdllm.runtime.client import request
    jobs = [(PROMPTS[i % len(PROMPTS)], "vanilla" if i % 2 else "es-dllm") for i in range(16)]
    out: list = [None] * len(jobs)

    def run(i):
        p, m = jobs[i]
        out[i] = request(server.grpc_url, {"text_input": p, "method": m, "stream": i % 4 == 0}, timeout=120)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.error for r in out] == [None] * len(jobs)
    want = {(p, m): _alone(pipe, p, method=m) for p, m in set(jobs)}
    assert [r.text for r in out] == [want[j].text for j in jobs]
    assert [r.stats["output_tokens"] for r in out] == [want[j].n_tokens for j in jobs]
    assert max(r.stats["batch_size"] for r in out) > 1, "concurrent requests were never batched"


@pytest.mark.serve
def test_bench_serve_reports_no_errors_and_no_mismatches(server):
    from esdllm.runtime.client import bench_serve
    res = bench_serve(server.grpc_url, concurrency=16, n_requests=16, knobs={"method": "es-dllm"})
    assert (res["errors"], res["mismatches"], res["identical_to_alone"]) == (0, 0, True), res
    assert res["p99_latency_s"] >= res["p50_latency_s"] > 0


@pytest.fixture(scope="module")
def trained_server(tmp_path_factory):
    """The committed default model behind a real tritonserver: parallel decoding fires on it (and
    bench-serve's noop model beside it)."""
    from esdllm.runtime.pipeline import DEFAULT_MODEL
    if not (DEFAULT_MODEL / "config.json").is_file():
        pytest.skip(f"no committed default model at {DEFAULT_MODEL}")
    yield from _serve(DEFAULT_MODEL, tmp_path_factory, max_batch=8, max_tokens=64, max_prompt=96,
                      decode={"gen_length": 64, "block_length": 32}, extra_models=("noop",))


@pytest.mark.serve
@pytest.mark.parametrize("method", ["es-dllm", "fast-dllm"])
def test_served_default_model_answers_under_load(trained_server, method):
    """Threshold decoding commits many tokens a step here (never on random weights): batched
    requests must still equal their alone answers, and those answers must be right."""
    from esdllm.runtime.client import bench_serve
    res = bench_serve(trained_server.grpc_url, concurrency=8, n_requests=16,
                      knobs={"method": method, "threshold": 0.9})
    assert (res["errors"], res["mismatches"]) == (0, 0), res
    assert res["exact_match"] >= 0.75, res
    assert res["max_batch_seen"] > 1, "concurrent requests were never batched"


@pytest.mark.serve
def test_client_and_bench_serve_json_print_one_line(server, capsys):
    from esdllm.runtime import cli
    import json
    rc = cli.main(["client", "--url", server.grpc_url, "--json", PROMPTS[0]])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 1 and json.loads(lines[0])["error"] is None
    rc = cli.main(["bench-serve", "--url", server.grpc_url, "--concurrency", "2", "--requests", "2", "--json"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 1 and json.loads(lines[0])["errors"] == 0


@pytest.mark.serve
def test_open_loop_load_over_two_families_completes_what_it_does_not_cancel(trained_server):
    """Poisson arrivals of maps and perm prompts with mixed max_tokens, some streamed, some hung up
    on: every request that is not cancelled completes and equals its alone answer."""
    from esdllm.runtime import loadgen
    res = loadgen.run(trained_server.grpc_url, [20.0], 24, {"method": "es-dllm", "threshold": 0.9},
                      mix_tokens=(32, 64), families=("maps", "perm"), cancel_frac=0.25, seed=3,
                      floor_model=loadgen.FLOOR_MODEL)
    r = res["rates"][0]
    assert res["families"] == ["maps", "perm"] and r["cancelled"] > 0
    assert (r["errors"], r["mismatches"], r["first_error"]) == (0, 0, None), r
    assert r["completed"] == r["requests"] - r["cancelled"]
    assert r["p99_latency_s"] >= r["p50_latency_s"] > 0 and r["tokens_per_second"] > 0
    assert 0 < r["p50_block_s"] <= r["p50_latency_s"]  # a request decodes at least one block
    fam = r["by_family"]  # the same metrics per family, over the same completed requests
    assert set(fam) == {"maps", "perm"} and sum(m["completed"] for m in fam.values()) == r["completed"], fam
    assert all(0 < m["p50_block_s"] <= m["p50_latency_s"] for m in fam.values()), fam
    assert set(res["batch1"]) == {"maps", "perm"}  # each family's first request, alone
    assert all(0 < b["latency_s"] and 0 < b["fresh_connection_s"] for b in res["batch1"].values())
    # the noop model's round trip is under every request that runs a forward
    assert all(0 < b["floor_s"] < b["latency_s"] for b in res["batch1"].values()), res["batch1"]
    with pytest.raises(ValueError, match="unknown task family 'nope'"):
        loadgen.workload(4, 0, (32,), 0.5, 0.1, families=("nope",))
