"""The in-flight serving loop (runtime/inflight.py) with plain senders instead of Triton's: answers,
streaming, hang-ups, a full queue, a failing forward, a dying loop, shutdown."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from esdllm.runtime import task
from esdllm.runtime.config import DecodeConfig
from esdllm.runtime.inflight import BUSY, InflightLoop
from esdllm.runtime.pipeline import Pipeline
from esdllm.runtime.serving import Request, _glibc

MODEL = Path(__file__).parents[1] / "models" / "llada-tiny"
CFG = DecodeConfig(gen_length=64, block_length=32, method="es-dllm", threshold=0.9)


class Sender:
    def __init__(self, hang_up_after: int | None = None):
        self.responses, self.final, self.hang_up_after = [], threading.Event(), hang_up_after

    def gone(self) -> bool:
        return self.hang_up_after is not None and len(self.responses) >= self.hang_up_after


def send(sender, text=None, stats=None, error=None, final=False) -> bool:
    if sender.gone() and not final:
        return False
    sender.responses.append((text, stats, error))
    if final:
        sender.final.set()
    return True


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(MODEL)


def _loop(pipe, **kw):
    kw = {"max_batch": 4, "max_len": 256, "max_queue": 16, **kw}
    return InflightLoop(pipe, kw.pop("max_batch"), kw.pop("max_len"), kw.pop("max_queue"), send,
                        lambda s: s.gone(), {"executor": "torch"}, log=lambda m: None, note=lambda m: None, **kw)


def _prompts(pipe, n):
    return [p.prompt for p in task.problems(21, n, split="heldout", family="maps")]


def _wait(senders, timeout=120):
    for s in senders:
        assert s.final.wait(timeout), "a client was left waiting"


def test_requests_are_answered_with_their_alone_text_streamed_or_not(pipe):
    loop = _loop(pipe).start()
    texts = _prompts(pipe, 6)
    senders = [Sender() for _ in texts]
    for i, (t, s) in enumerate(zip(texts, senders)):
        assert loop.submit(Request(pipe.encode(t, gen_length=64), CFG, stream=i % 2 == 1), s) is None
        time.sleep(0.01 * i)  # staggered arrivals
    _wait(senders)
    loop.stop()
    for i, (t, s) in enumerate(zip(texts, senders)):
        alone = pipe.generate([t], CFG).completions[0].text
        assert "".join(r[0] for r in s.responses if r[0]) == alone
        assert all(r[2] is None for r in s.responses) and s.responses[-1][1]["output_tokens"] >= 1
        if i % 2:  # streamed: a non-empty answer arrives in more than the final response
            assert (len(s.responses) > 1) == bool(alone)


def test_a_client_that_hangs_up_frees_its_row_and_the_others_finish(pipe):
    loop = _loop(pipe, max_batch=1).start()
    long_cfg = DecodeConfig(gen_length=128, block_length=32, method="vanilla")
    gone, after = Sender(hang_up_after=1), Sender()
    loop.submit(Request(pipe.encode(_prompts(pipe, 1)[0], gen_length=128), long_cfg, stream=True), gone)
    loop.submit(Request(pipe.encode(_prompts(pipe, 2)[1], gen_length=64), CFG, stream=False), after)
    _wait([gone, after])  # the second only gets the single row once the first is gone
    loop.stop()
    assert gone.responses[-1] == (None, None, None) and after.responses[-1][0]
    assert not loop.engine.busy()


def test_a_client_that_left_while_queued_gets_its_final_response(pipe):
    loop = _loop(pipe, max_batch=1).start()
    first, left = Sender(), Sender(hang_up_after=0)
    loop.submit(Request(pipe.encode(_prompts(pipe, 1)[0], gen_length=128),
                        DecodeConfig(gen_length=128, block_length=32, method="vanilla"), stream=False), first)
    loop.submit(Request(pipe.encode(_prompts(pipe, 2)[1], gen_length=64), CFG, stream=False), left)
    _wait([first, left])
    loop.stop()
    assert left.responses == [(None, None, None)] and first.responses[-1][0]
    assert not loop.engine.busy() and not loop.jobs


def test_a_full_queue_refuses_by_name(pipe):
    loop = _loop(pipe, max_queue=2)  # not started: nothing leaves the queue
    ids = pipe.encode(_prompts(pipe, 1)[0], gen_length=64)
    assert loop.submit(Request(ids, CFG, False), Sender()) is None
    assert loop.submit(Request(ids, CFG, False), Sender()) is None
    assert loop.submit(Request(ids, CFG, False), Sender()) == BUSY
    loop.stop()


def test_a_failing_forward_fails_its_request_alone(pipe):
    ex = pipe.executor
    real = ex.step
    poison = pipe.encode("3")[-1]  # only the rot13 prompt holds a digit

    def step(tokens, idx, cache, plan=None):  # any forward holding the bad request breaks
        if bool((tokens == poison).any()):
            raise RuntimeError("device lost")
        return real(tokens, idx, cache, plan)
    ex.step = step
    try:
        loop = _loop(pipe).start()
        bad, good = Sender(), Sender()
        rng = __import__("random").Random(0)
        t_bad, t_good = task.make_problem(rng, "rot13").prompt, task.make_problem(rng, "upper").prompt
        loop.submit(Request(pipe.encode(t_bad, gen_length=64), DecodeConfig(gen_length=64, method="vanilla"), False), bad)
        loop.submit(Request(pipe.encode(t_good, gen_length=64), CFG.replace(method="fast-dllm", cache="dual"), False), good)
        _wait([bad, good])
        loop.stop()
    finally:
        ex.step = real
    assert "device lost" in bad.responses[-1][2]
    assert good.responses[-1][2] is None and good.responses[-1][0]


def test_a_dying_loop_answers_everyone_and_says_so(pipe):
    fatal = []
    loop = _loop(pipe, on_fatal=fatal.append)
    loop.engine.step = lambda: (_ for _ in ()).throw(RuntimeError("bug"))
    senders = [Sender() for _ in range(3)]
    ids = pipe.encode(_prompts(pipe, 1)[0], gen_length=64)
    for s in senders:
        loop.submit(Request(ids, CFG, False), s)
    loop.start()
    _wait(senders, timeout=30)
    assert all("the engine stopped: RuntimeError: bug" in s.responses[-1][2] for s in senders)
    assert fatal and "bug" in fatal[0]
    assert "engine stopped" in loop.submit(Request(ids, CFG, False), Sender())


def test_shutdown_answers_what_was_waiting(pipe):
    loop = _loop(pipe)  # never started: everything is still in the inbox
    s = Sender()
    loop.submit(Request(pipe.encode(_prompts(pipe, 1)[0], gen_length=64), CFG, False), s)
    loop.stop(timeout=1)
    assert s.final.is_set() and "shutting down" in s.responses[-1][2]


def test_the_heap_is_handed_back_once_per_idle_spell_never_mid_request(pipe, monkeypatch):
    from esdllm.runtime import inflight
    trims = []  # (time, requests still in the engine)
    loop = _loop(pipe, trim_after=0.2)
    monkeypatch.setattr(inflight, "release_memory", lambda: trims.append((time.perf_counter(), loop.engine.busy())))
    loop.start()
    for burst in range(2):
        senders = [Sender() for _ in range(3)]
        for t, s in zip(_prompts(pipe, 3), senders):
            loop.submit(Request(pipe.encode(t, gen_length=64), CFG, False), s)
        _wait(senders)
        done = time.perf_counter()
        time.sleep(0.6)  # idle for three trim_afters: one trim, not three
        assert len(trims) == burst + 1 and trims[-1][0] - done >= 0.15, trims
    loop.stop()
    assert not any(busy for _, busy in trims)


def test_the_batch_schedulers_trimmer_waits_for_idle_and_trims_once(monkeypatch):
    from esdllm.runtime import serving
    trims = []
    monkeypatch.setattr(serving, "release_memory", lambda: trims.append(time.monotonic()))
    t = serving.IdleTrimmer(after=0.1)
    try:
        time.sleep(0.3)
        assert trims == []  # nothing ran yet: nothing to hand back
        with t.busy():
            time.sleep(0.3)  # a long execute(): never trimmed under it
            assert trims == []
        done = time.monotonic()
        time.sleep(0.4)
        assert len(trims) == 1 and trims[0] - done >= 0.1, trims
    finally:
        t.stop()


_FAULTS = """
import resource, sys, threading, torch
from esdllm.runtime import serving
if sys.argv[1] == "tuned":
    assert serving.tune_malloc()
keep = torch.ones(64, 1024)  # the heap's top is in use
out = []
def forwards():  # the engine thread's: 50 forwards of three 3 MiB activations each, freed at the end
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        acts = [torch.ones(768, 1024) for _ in range(3)]
        del acts
    out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
t = threading.Thread(target=forwards)
t.start(); t.join()
print(out[0])
"""


@pytest.mark.skipif(_glibc() is None, reason="glibc's mallopt is not available")
def test_tuned_malloc_keeps_a_forwards_activations_off_fresh_pages(tmp_path):
    # Under the launcher's 256 KiB threshold every activation above it is a fresh mmap, faulted in
    # page by page at every forward (~115,000 faults here); tune_malloc takes them from a heap that
    # is not cut back between forwards
    import subprocess
    import sys
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(256 << 10)}
    faults = {m: int(subprocess.run([sys.executable, "-c", _FAULTS, m], env=env, capture_output=True, text=True,
                                    check=True).stdout) for m in ("plain", "tuned")}
    assert faults["plain"] > 50 * 3 * 768 * 0.5, faults  # every forward faults its activations in
    assert faults["tuned"] < faults["plain"] / 4, faults
