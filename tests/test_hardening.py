"""Serving hardening against the real tritonserver (loopback only, bounded loops): what is exposed,
the admin key, shared memory, disclosure, unbounded work, load shedding, a dead stub or server
replaced, shutdown after hang-ups, the client's deadline and a hostile soak."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from esdllm.runtime import serving as S
from esdllm.runtime import task
from esdllm.runtime.config import DecodeConfig
from esdllm.runtime.serve import TritonServer, Supervisor, free_ports, repo_values

pytestmark = pytest.mark.serve
GOOD = "rot13: abcdefghij ->"


def _values(**kw):
    kw = {"max_batch": 4, "max_tokens": 64, "decode": {"gen_length": 32, "block_length": 32}, **kw}
    return repo_values(None, None, executor="torch", device="cpu", queue_delay_us=2000, **kw)


def _server(tmp_path, **kw):
    pytest.importorskip("tritonclient.grpc")
    http = kw.pop("http", False)
    try:
        grpc, port = free_ports(2)
        return TritonServer(_values(**kw), grpc_port=grpc, http_port=port if http else None,
                            log=tmp_path / "tritonserver.log")
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = _server(tmp_path_factory.mktemp("hardening"), max_tokens=512)  # room for a request of seconds
    with srv:
        yield srv


def _ask(srv, timeout=120, **inputs):
    from esdllm.runtime.client import request
    return request(srv.grpc_url, {"text_input": GOOD, **inputs}, timeout=timeout)


def _listening(pid: int) -> set[int]:
    """TCP ports the process listens on (its socket inodes matched against /proc/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # LISTEN
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


# --- what is exposed ------------------------------------------------------------------------------

def test_only_grpc_listens_by_default(server):
    assert _listening(server.proc.pid) == {server.grpc_port}


def test_admin_protocols_need_the_launchers_key(server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException
    c = grpcclient.InferenceServerClient(server.grpc_url)
    refused = {
        "shared memory": lambda h: c.register_system_shared_memory("x", "/triton_python_backend_shm_region_x", 64,
                                                                   headers=h),
        "logging": lambda h: c.update_log_settings({"log_info": False}, headers=h),
        "repository": lambda h: c.get_model_repository_index(headers=h),
        "model config": lambda h: c.get_model_config("esdllm", headers=h),
        "statistics": lambda h: c.get_inference_statistics("esdllm", headers=h),
    }
    for name, call in refused.items():
        with pytest.raises(InferenceServerException, match="restricted"):
            call(None)
        with pytest.raises(InferenceServerException, match="restricted"):
            call({"triton-grpc-protocol-esdllm-admin-key": "guess"})
    assert c.get_model_repository_index(headers=server.admin_headers).models[0].name == "esdllm"
    assert c.is_model_ready("esdllm")  # health and inference stay open
    assert _ask(server).error is None


def test_shared_memory_is_private(server):
    regions = server.shm_regions()
    assert regions, "the python backend's region carries the server's prefix"
    assert all(r.stat().st_mode & 0o777 == 0o600 for r in regions)


# --- what a response gives away, what a prompt can do -------------------------------------------

def test_stats_carry_no_paths(server):
    r = _ask(server)
    assert r.error is None
    assert "model_dir" not in r.stats and not any("/" in str(v) for v in r.stats.values()), r.stats


def test_special_token_text_is_text_and_unknown_text_is_empty():
    from esdllm.runtime.pipeline import Pipeline
    pipe = Pipeline.load()
    ids = pipe.encode("<|mdm_mask|> <|endoftext|> upper: ab ->")
    specials = {pipe.args.mask_id, pipe.args.eos_id, pipe.args.eot_id}
    assert not specials & set(ids)
    plain, marked = pipe.encode("upper: ab ->", chat=True), pipe.encode("<|eot_id|> upper: ab ->", chat=True)
    assert [t for t in marked if t in specials] == [t for t in plain if t in specials]  # only the template's
    with pytest.raises(ValueError, match="empty prompt"):
        pipe.encode("\u4e00\u4e01")


# --- unbounded work -------------------------------------------------------------------------------

def test_steps_are_bounded_by_the_generation():
    with pytest.raises(ValueError, match="more than gen_length"):
        DecodeConfig(gen_length=32, steps=2 ** 26)


def test_prompt_bytes_are_checked_before_tokenizing():
    class Pipe:  # tokenizing would fail the test: the byte check must come first
        def encode(self, *a, **k):
            raise AssertionError("tokenized a prompt that cannot fit")
    limits = S.Limits(64, 100, 400)
    big = np.array([[b"a" * 401]], dtype=np.object_)
    with pytest.raises(ValueError, match="401 bytes"):
        S.parse_request({"text_input": big}, Pipe(), DecodeConfig(gen_length=32), limits)


def test_default_prompt_limit_follows_the_answer_length():
    assert S.default_max_prompt(64, 4096) == 8 * 64
    assert S.default_max_prompt(3968, 4096) == 128
    values = _values()
    assert values["max_prompt_tokens"] == 0 and values["max_queue_size"] == 16  # 4 x max_batch


def test_full_queue_sheds_load_with_a_named_error(tmp_path):
    """max_batch 1, one waiting request: of 8 at once some are refused as busy, the rest complete."""
    from esdllm.runtime.client import request
    with _server(tmp_path, max_batch=1, max_queue=1) as srv:
        out = [None] * 8
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(
            i, request(srv.grpc_url, {"text_input": GOOD, "max_tokens": 64, "method": "vanilla"}, timeout=120)))
            for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        busy = [r for r in out if r.error and r.error.startswith("server busy")]
        done = [r for r in out if r.error is None]
        assert busy and done and len(busy) + len(done) == 8, [r.error for r in out]
        assert srv.ready() and _ask(srv).error is None


# --- a dead backend -------------------------------------------------------------------------------

def _supervise(srv):
    stop = threading.Event()
    lines: list[str] = []
    sup = Supervisor(srv, log=lines.append)
    t = threading.Thread(target=sup.run, args=(120, stop.is_set), daemon=True)
    t.start()
    assert sup.up.wait(120), "the supervised server did not start"
    return sup, stop, t, lines


def _until(cond, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_a_killed_stub_is_noticed_and_the_model_comes_back(tmp_path):
    srv = _server(tmp_path, max_tokens=512)
    sup, stop, t, lines = _supervise(srv)
    try:
        assert srv.ready()
        from esdllm.runtime.client import request
        inflight = {}
        th = threading.Thread(target=lambda: inflight.update(r=request(  # 512 forwards: seconds
            srv.grpc_url, {"text_input": GOOD, "max_tokens": 512, "method": "vanilla"}, timeout=100)))
        th.start()
        time.sleep(1.0)
        assert th.is_alive(), "the request to be cut finished before the stub was killed"
        stub = srv.stubs()[0]
        os.kill(stub, signal.SIGKILL)
        assert _until(lambda: not srv.ready(), 15), "readiness stayed true after the stub died"
        th.join(60)
        assert not th.is_alive() and inflight["r"].error, "the in-flight client hung"
        assert inflight["r"].seconds < 60
        assert _until(lambda: sup.restarts == 1 and sup.up.is_set() and srv.ready(), 120), lines
        assert _ask(srv).error is None
        assert any("stub" in ln and "restarting" in ln for ln in lines), lines
        assert stub not in srv.stubs()
    finally:
        stop.set()
        t.join(30)
        srv.stop()


def test_a_crashed_tritonserver_is_restarted_and_http_is_opt_in(tmp_path):
    """With --http-port, one generate request nested 50,000 deep kills tritonserver 2.51 (its JSON
    parser recurses): the supervisor brings it back."""
    import urllib.error
    import urllib.request
    srv = _server(tmp_path, http=True)
    sup, stop, t, lines = _supervise(srv)
    try:
        assert _until(lambda: srv.http_port in _listening(srv.proc.pid), 15)
        # over HTTP an unknown key would be a request parameter: it gets gRPC's named error
        bogus = urllib.request.Request(f"{srv.http_url}/v2/models/esdllm/generate",
                                       data=b'{"text_input": "rot13: ab ->", "bogus": 1}',
                                       headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(bogus, timeout=60)
        assert "unknown input 'bogus'" in e.value.read().decode()
        depth = 50_000
        body = b'{"text_input": ' + b"[" * depth + b'"x"' + b"]" * depth + b"}"
        req = urllib.request.Request(f"{srv.http_url}/v2/models/esdllm/generate", data=body,
                                     headers={"Content-Type": "application/json"})
        pid = srv.proc.pid
        try:
            urllib.request.urlopen(req, timeout=30).read()
        except Exception:  # noqa: BLE001 - the connection dies with the server (or a 4xx on a fixed Triton)
            pass
        if not _until(lambda: srv.proc.pid != pid or srv.proc.poll() is not None, 15):
            pytest.skip("this tritonserver survives nested JSON (fixed upstream in 2.58)")
        assert _until(lambda: sup.restarts == 1 and sup.up.is_set() and srv.ready(), 120), lines
        assert _ask(srv).error is None
        assert any("exited" in ln for ln in lines), lines
    finally:
        stop.set()
        t.join(30)
        srv.stop()


# --- shutdown and deadlines -----------------------------------------------------------------------

_HANG_UP = """
import sys, time, numpy as np, tritonclient.grpc as g
c = g.InferenceServerClient(sys.argv[1])
c.start_stream(callback=lambda r, e: None)
for _ in range(3):
    t = g.InferInput("text_input", [1, 1], "BYTES"); t.set_data_from_numpy(np.array([[b"rot13: abcdefghij ->"]], dtype=object))
    m = g.InferInput("max_tokens", [1, 1], "INT32"); m.set_data_from_numpy(np.array([[64]], dtype=np.int32))
    s = g.InferInput("method", [1, 1], "BYTES"); s.set_data_from_numpy(np.array([[b"vanilla"]], dtype=object))
    c.async_stream_infer("esdllm", [t, m, s])
print("sent", flush=True)
time.sleep(60)
"""


def test_stop_is_quick_and_clean_after_clients_hang_up(tmp_path):
    srv = _server(tmp_path)
    srv.start()
    pids = [srv.proc.pid, *srv.stubs()]
    regions = srv.shm_regions()
    clients = [subprocess.Popen([sys.executable, "-c", _HANG_UP, srv.grpc_url], stdout=subprocess.PIPE, text=True)
               for _ in range(2)]
    for c in clients:
        assert c.stdout.readline().strip() == "sent"
        c.kill()  # gone without half-closing its stream
    t0 = time.monotonic()
    srv.stop()
    took = time.monotonic() - t0
    assert took < srv.exit_timeout + 8, took
    assert all(not Path(f"/proc/{p}").exists() or "Z" in Path(f"/proc/{p}/stat").read_text().split()[2]
               for p in pids)
    assert regions and not any(r.exists() for r in regions)


def test_client_timeout_is_a_real_bound(server):
    r = _ask(server, timeout=0.5, max_tokens=512, method="vanilla")  # 512 forwards: seconds
    assert r.error and "cancelled" in r.error and r.seconds < 5, (r.error, r.seconds)
    assert _ask(server).error is None  # the server went on


# --- a hostile mix --------------------------------------------------------------------------------

def test_hostile_mix_leaves_the_server_live_ready_and_flat(server):
    from esdllm.runtime.soak import soak
    # the warm-up sends the same mix once, so the measured window starts near the high-water mark of
    # the engine's lane caches: with a warm-up of 60, lanes first opened inside the window once added
    # 20 MiB to the 6-layer default's model process (a trainer on the other core changed the timing)
    res = soak(server, n=150, concurrency=4, warmup=150, progress=False)
    assert res["live"] and res["ready"] and not res["failures"], res
    # the model process (our code) stays within 16 MiB, Triton's shared-memory pool aside (the stub
    # maps it in 4 MiB regions as large messages need them and keeps them). Its private memory grew
    # 0 to 12 MiB in this window: a live 4 MiB buffer (one mmap at the heap's threshold) and a
    # thread arena's high-water, not a leak (1,000 requests of the mix grew it 0.7 MiB; README). The
    # mix holds 7 or 8 prompts of 4 MiB in 150 requests, so leaking theirs would pass 28 MiB.
    # tritonserver's own RSS drifts about 1 MiB per 150 of these requests on a fresh server, but
    # jumped 12-21 MiB in some runs of this module, after the tests above; a leak of a request's
    # buffers would pass 32 MiB in 150 requests
    g = res["growth_kib"]
    assert g["stubs"] - g["stubs_shm"] < 16 * 1024 and g["tritonserver"] < 32 * 1024, res


def test_soak_command_json_is_one_line(capsys):
    import json
    from esdllm.runtime import cli
    rc = cli.main(["soak", "--requests", "18", "--concurrency", "2", "--json"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, "--json prints exactly one line"
    res = json.loads(lines[0])
    assert rc == 0 and res["live"] and res["ready"] and not res["failures"], res


# --- scale-out and the batch scheduler -------------------------------------------------------------

def test_two_instances_each_serve_and_the_batch_scheduler_still_serves(tmp_path):
    """--instances 2: two model processes (two stubs), requests spread over them, each answer what it is
    alone; the batch-at-a-time scheduler (kept for comparison) gives the same answers."""
    from esdllm.runtime.client import request
    prompts = [p.prompt for p in task.problems(17, 6, split="heldout", family="maps")]
    answers = {}
    for scheduler, instances in (("inflight", 2), ("batch", 1)):
        (tmp_path / scheduler).mkdir()
        with _server(tmp_path / scheduler, instances=instances, scheduler=scheduler) as srv:
            assert len(srv.stubs()) == instances
            out = [None] * len(prompts)
            threads = [threading.Thread(target=lambda i=i: out.__setitem__(
                i, request(srv.grpc_url, {"text_input": prompts[i], "max_tokens": 32}, timeout=120)))
                for i in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert all(r.error is None for r in out), [r.error for r in out]
            answers[scheduler] = [r.text for r in out]
            assert all(r.stats.get("scheduler", "batch") == scheduler for r in out)
    assert answers["inflight"] == answers["batch"]
    assert sum(task.grade(p, a) for p, a in zip(prompts, answers["inflight"])) >= len(prompts) - 1
