"""The synthetic task (generator, splits, checker) and the tiny-model trainer (loss, determinism, resume)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from esdllm.runtime import task
from esdllm.runtime.weights import load_model

ROOT = Path(__file__).resolve().parents[1]


def _trainer():
    from esdllm.scripts import train_tiny
    return train_tiny


# ---- task -------------------------------------------------------------------------------------

def test_generator_is_deterministic_and_indexable():
    a = task.problems(7, 24)
    assert a == task.problems(7, 24)
    assert task.problems(7, 10, start=14) == a[14:]
    assert a != task.problems(8, 24)
    assert [p.family for p in a[:8]] == list(task.FAMILIES) * 2
    maps = task.problems(7, 8, family="maps")
    assert [p.op for p in maps] == list(task.MAP_OPS) * 2
    assert task.problems(7, 6, family=("perm", "chain"))[1].family == "chain"


def test_splits_are_disjoint_by_construction():
    train = task.problems(0, 200, split="train")
    held = task.problems(0, 200, split="heldout")
    assert not any(task.is_held_out(p.prompt) for p in train)
    assert all(task.is_held_out(p.prompt) for p in held)
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    with pytest.raises(ValueError, match="split"):
        task.problems(0, 1, split="test")


def test_answers_are_correct_sized_and_in_the_alphabet():
    sizes = {"maps": (16, 32), "perm": (4, 12), "chain": (11, 23), "long": (4, 240)}
    seen = {f: [] for f in task.FAMILIES}
    for p in task.problems(3, 800) + task.problems(3, 200, split="heldout"):
        assert task.verify(p), p
        lo, hi = sizes[p.family]
        assert lo <= len(p.answer) <= hi, p
        assert len(p.answer) < task.NATURAL_GEN[p.family]                # room for EOS
        assert set(p.prompt + p.answer) <= set(task.ALPHABET), p
        seen[p.family].append(len(p.answer))
    assert min(seen["long"]) < 16 and max(seen["long"]) > 150            # a few to a few hundred


def test_perm_and_chain_accept_every_valid_answer_and_nothing_else():
    perm = task.Problem("perm", "perm: abcd ->", "dcba", "perm")
    for ok in ("abcd", "dcba", "badc", " cdab "):
        assert task.check(ok, perm), ok
    for bad in ("abc", "abcc", "abcde", "abce", "ab cd", "ABCD"):
        assert not task.check(bad, perm), bad
    chain = task.Problem("chain", "chain: abc ->", "cP aN bO", "chain")
    for ok in ("aN bO cP", "cP aN bO", " bO  cP aN"):
        assert task.check(ok, chain), ok
    for bad in ("aN bP cO", "aO bN cP", "aN bO", "aN bO cP dQ", "aNbOcP", "aN aN bO", "aN bO c P", "abc NOP",
                "an bo cp", "AN BO CP"):
        assert not task.check(bad, chain), bad                         # mixed pairs and cases are wrong
    assert task.solve("chain: abc ->") == "aN bO cP" and task.solve("perm: abc ->") == "abc"
    partners = task.Problem("chain", "chain: an ->", "aN nA", "chain")  # rot13 partners: distinct pairs
    assert task.check("nA aN", partners) and not task.check("aN aN", partners)
    assert task.solve("perm: aab ->") is None                          # perm letters are distinct
    assert task.grade("hello", "x") is None


def test_grading_never_raises_on_what_a_model_may_write():
    """Completions are model output: any text is graded False, never an exception (a chain pair
    starting with a capital or a digit once raised inside the rot13 check)."""
    import random
    rng = random.Random(5)
    chars = task.ALPHABET + "AZ09 ?\u00e9"
    probs = [p for fam in task.FAMILIES for p in task.problems(3, 4, split="heldout", family=fam)]
    for p in probs:
        for text in ["Aa bo", "1n", "a" * 300, ""] + ["".join(rng.choices(chars, k=rng.randint(1, 40)))
                                                      for _ in range(50)]:
            assert task.check(text, p) in (True, False)
        assert task.check(p.answer, p)


def test_perm_training_answers_vary():
    """A letter set is seen in several orders: the model must learn a distribution, not one string."""
    seen = {}
    for p in task.problems(5, 3000, family="perm"):
        seen.setdefault("".join(sorted(p.answer)), set()).add(p.answer)
    assert any(len(v) > 1 for v in seen.values())


def test_unknown_op_is_an_error():
    import random
    with pytest.raises(ValueError, match="mul"):
        task.make_problem(random.Random(0), "mul")
    with pytest.raises(ValueError, match="family"):
        task.problems(0, 1, family="nope")


# ---- trainer ----------------------------------------------------------------------------------

def _micro(tmp_path, **kw):
    T = _trainer()
    base = dict(family="llada", out=str(tmp_path), steps=6, batch=8, dim=32, n_layers=1, n_heads=2,
                intermediate=64, warmup=2, val_every=1000, ckpt_every=2, val_n=2, threads=1, gen_lengths=(64,),
                task_families=("maps", "perm"), family_weights=(1.0, 1.0))
    cfg = T.TrainConfig(**{**base, **kw})
    return T, cfg


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_a_few_steps_decrease_the_loss(tmp_path, family):
    T, cfg = _micro(tmp_path, family=family)
    from esdllm.runtime.tokenizer import build_tokenizer, load_tokenizer
    ids = build_tokenizer(family, tmp_path, alphabet=task.ALPHABET)
    tok = load_tokenizer(tmp_path)
    args = T.model_args(cfg, ids)
    torch.manual_seed(0)
    model = T.Transformer(args)
    x, am, P = T.step_batch(cfg, tok, args, 0)
    # only the response region is ever masked, and it ends in EOS padding
    assert (x[:, P:][:, -1] == args.eos_id).all()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for i in range(10):
        loss = T.diffusion_loss(model, x, am, P, torch.Generator().manual_seed(i % 3))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses


def test_training_is_deterministic_and_resumes_exactly(tmp_path):
    T, full = _micro(tmp_path / "full", steps=4)
    T.train(full, log=lambda s: None)
    _, cut = _micro(tmp_path / "resumed", steps=4)
    assert T.train(cut, log=lambda s: None, stop_after=2) is None  # an interruption after step 2
    assert (tmp_path / "resumed" / T.STATE_FILE).is_file()
    assert torch.load(tmp_path / "resumed" / T.STATE_FILE, weights_only=False)["elapsed_s"] > 0  # carried over
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    T.train(cut, log=lambda s: None)
    a = load_model(tmp_path / "full").state_dict()
    b = load_model(tmp_path / "resumed").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_resume_refuses_a_different_config(tmp_path):
    T, cfg = _micro(tmp_path, steps=2)
    T.train(cfg, log=lambda s: None)
    with pytest.raises(ValueError, match="different configuration"):
        T.train(dataclasses.replace(cfg, lr=1e-4), log=lambda s: None)


def test_resume_accepts_another_thread_count(tmp_path):
    T, cfg = _micro(tmp_path, steps=4)
    assert T.train(cfg, log=lambda s: None, stop_after=2) is None
    info = T.train(dataclasses.replace(cfg, threads=2), log=lambda s: None)
    assert info is not None and (tmp_path / "model.safetensors").is_file()


def test_batches_built_ahead_by_worker_processes_train_the_same_weights(tmp_path):
    T, inline = _micro(tmp_path / "inline", steps=8)
    T.train(inline, log=lambda s: None)
    _, ahead = _micro(tmp_path / "ahead", steps=8, workers=1)
    assert T.train(ahead, log=lambda s: None, stop_after=2) is None  # the workers end with a stopped run
    T.train(dataclasses.replace(ahead, workers=2), log=lambda s: None)  # and a resume may use another count
    a = load_model(tmp_path / "inline").state_dict()
    b = load_model(tmp_path / "ahead").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    with pytest.raises(ValueError, match="workers -1"):
        dataclasses.replace(ahead, workers=-1)


def test_a_run_moved_to_another_folder_resumes_there(tmp_path):
    T, cfg = _micro(tmp_path / "here", steps=4)
    assert T.train(cfg, log=lambda s: None, stop_after=2) is None
    (tmp_path / "here").rename(tmp_path / "there")
    info = T.train(dataclasses.replace(cfg, out=str(tmp_path / "there")), log=lambda s: None)
    assert info is not None and [h["step"] for h in info["history"]][-1] == 4
    assert (tmp_path / "there" / "model.safetensors").is_file()


def _masked_input(T, cfg, tmp_path, tail_mask, seed=0, block_state=0.0):
    """The noisy ids diffusion_loss feeds the model, and the clean batch they came from."""
    from esdllm.runtime.tokenizer import build_tokenizer, load_tokenizer
    ids = build_tokenizer(cfg.family, tmp_path, alphabet=task.ALPHABET)
    tok = load_tokenizer(tmp_path)
    args = T.model_args(cfg, ids)
    torch.manual_seed(0)
    model = T.Transformer(args)
    x, am, P = T.step_batch(cfg, tok, args, 0)
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    T.diffusion_loss(model, x, am, P, torch.Generator().manual_seed(seed), tail_mask=tail_mask,
                     block_state=block_state, block_length=8)
    return seen[0], x, P, args


def test_block_state_decides_a_prefix_and_hides_everything_after_the_current_block(tmp_path):
    T, cfg = _micro(tmp_path, task_families=("maps",), family_weights=(1.0,))
    for seed in range(4):
        noisy, x, P, args = _masked_input(T, cfg, tmp_path, tail_mask=0.0, seed=seed, block_state=1.0)
        resp, clean = noisy[:, P:] == args.mask_id, x[:, P:]
        ans = ((clean != args.eos_id) & (clean != args.eot_id)).sum(1)
        starts = set()
        for r in range(x.shape[0]):
            m = resp[r].tolist()
            # some block starting inside the answer: decided before it, hidden after it
            fits = [b for b in range(0, int(ans[r]) + 1, 8) if not any(m[:b]) and all(m[b + 8:])]
            assert fits, m
            starts.add(fits[0])
        assert len(starts) > 1                                    # the boundary varies across rows
    plain, _, _, _ = _masked_input(T, cfg, tmp_path, tail_mask=0.0, seed=0)
    assert not all((plain[r, P:] == args.mask_id)[-8:].all() for r in range(plain.shape[0]))


def test_long_tail_draws_long_answers_deterministically(tmp_path):
    T, cfg = _micro(tmp_path, task_families=("long",), family_weights=(1.0,), long_tail=1.0, batch=64,
                    long_tail_min=64)
    from esdllm.runtime.tokenizer import build_tokenizer, load_tokenizer
    args = T.model_args(cfg, build_tokenizer("llada", tmp_path, alphabet=task.ALPHABET))
    tok = load_tokenizer(tmp_path)
    x, am, P = T.step_batch(cfg, tok, args, 3)
    lengths = ((x[:, P:] != args.eos_id) & (x[:, P:] != args.eot_id)).sum(1)
    assert (lengths >= 64).all(), lengths
    assert torch.equal(x, T.step_batch(cfg, tok, args, 3)[0])    # still a pure function of (seed, step)
    x0, _, P0 = T.step_batch(dataclasses.replace(cfg, long_tail=0.0), tok, args, 3)
    assert (((x0[:, P0:] != args.eos_id) & (x0[:, P0:] != args.eot_id)).sum(1) < 64).any()


def test_tail_mask_hides_the_whole_eos_tail(tmp_path):
    T, cfg = _micro(tmp_path)
    noisy, x, P, args = _masked_input(T, cfg, tmp_path, tail_mask=1.0)
    tail = x[:, P:] == args.eos_id
    assert tail.any(1).all()
    assert (noisy[:, P:][tail] == args.mask_id).all()            # every EOS is masked in every row
    assert (noisy[:, :P] == x[:, :P]).all()                       # the prompt never is
    answer = ~tail & (x[:, P:] != args.eot_id)
    assert (noisy[:, P:][answer] != args.mask_id).any()           # answers still follow the t-process
    plain, _, _, _ = _masked_input(T, cfg, tmp_path, tail_mask=0.0)
    assert not (plain[:, P:][tail] == args.mask_id).all()


def test_init_from_starts_at_the_given_weights_and_checks_the_shape(tmp_path):
    T, first = _micro(tmp_path / "a", steps=2)
    T.train(first, log=lambda s: None)
    _, second = _micro(tmp_path / "b", steps=0, init_from=str(tmp_path / "a"))
    info = T.train(second, log=lambda s: None)
    a = load_model(tmp_path / "a").state_dict()
    b = load_model(tmp_path / "b").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert info["init_from"]["config"]["out"] == str(tmp_path / "a")   # provenance of the first stage
    _, wider = _micro(tmp_path / "c", steps=1, init_from=str(tmp_path / "a"), dim=64)
    with pytest.raises(ValueError, match="--init-from"):
        T.train(wider, log=lambda s: None)


def test_init_from_a_shallower_model_grows_it_without_changing_its_outputs(tmp_path):
    T, first = _micro(tmp_path / "a", steps=2, n_layers=2)
    T.train(first, log=lambda s: None)
    _, deeper = _micro(tmp_path / "b", steps=0, n_layers=5, init_from=str(tmp_path / "a"))
    T.train(deeper, log=lambda s: None)
    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    assert b.args.n_layers == 5
    x = torch.randint(0, a.args.mask_id, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    # the new blocks are real blocks, not removed ones: only their output projections start at zero
    zero = [i for i, l in enumerate(b.layers) if not l.attention.wo.weight.any()]
    assert len(zero) == 3 and all(b.layers[i].attention.wq.weight.any() for i in zero)
    _, shallower = _micro(tmp_path / "c", steps=0, n_layers=1, init_from=str(tmp_path / "a"))
    with pytest.raises(ValueError, match="deeper copy"):
        T.train(shallower, log=lambda s: None)


def _adapt_dream():
    import importlib.util
    spec = importlib.util.spec_from_file_location("adapt_dream", ROOT / "scripts" / "adapt_dream.py")
    A = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(A)
    return A


def test_adapting_llada_to_dream_keeps_its_predictions(tmp_path):
    """scripts/adapt_dream.py: the Dream model predicts what the LLaDA one did, one row earlier."""
    T, first = _micro(tmp_path / "a", steps=4, n_layers=2)
    T.train(first, log=lambda s: None)
    A = _adapt_dream()
    dream = A.adapt(tmp_path / "a", tmp_path / "d")
    llada = load_model(tmp_path / "a")
    assert dream.args.family == "dream" and dream.args.logits_shift == 1 and dream.args.n_layers == 3
    assert load_model(tmp_path / "d").args == dream.args  # written in the HF Dream layout
    # the same text in each tokenizer (ids differ: the special tokens are numbered per family)
    rows = A.vocab_map(tmp_path / "a", tmp_path / "d")
    to_dream = {j: i for i, j in enumerate(rows) if j is not None}
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, llada.args.bos_id, (3, 40), generator=g)
    x[:, 0] = llada.args.bos_id
    x[:, 20:][torch.rand(3, 20, generator=g) < 0.5] = llada.args.mask_id
    xd = torch.tensor([[to_dream[t] for t in r] for r in x.tolist()])
    with torch.no_grad():
        a, b = llada(x), dream(xd)
    # Dream's logits row p comes from hidden state p - 1 through the shift block; position 0 has no
    # earlier row. Head rows are permuted like the vocabulary.
    b = b[..., [rows.index(j) for j in range(llada.args.vocab_size) if j in to_dream]]
    a = a[..., [j for j in range(llada.args.vocab_size) if j in to_dream]]
    assert (a[:, 1:].argmax(-1) == b[:, 1:].argmax(-1)).float().mean() > 0.99
    torch.testing.assert_close(b[:, 1:], a[:, 1:], rtol=0, atol=0.02 * a.abs().max().item())
    # the shift block's score peaks at +1 and nowhere else
    from esdllm.runtime.model import apply_rope, rope_cos_sin
    q, k = A.shift_biases(16, 10000.0)
    pos = torch.arange(0, 600)[None]
    c, s = rope_cos_sin(pos, 16, 10000.0)
    qr = apply_rope(q.expand(1, 1, 600, 16), c, s, True)[0, 0]
    kr = apply_rope(k.expand(1, 1, 600, 16), c, s, True)[0, 0]
    scores = (qr @ kr.T) / 4
    assert (scores[:-1].argmax(1) == pos[0, :-1] + 1).all()
    assert (scores[:-1].max(1).values - scores[:-1].topk(2, 1).values[:, 1]).min() >= 0.99 * A.MARGIN
    with pytest.raises(ValueError, match="LLaDA"):
        A.adapt(tmp_path / "d", tmp_path / "e")


def test_solve_answers_task_prompts_and_rejects_others():
    assert task.solve("rot13: qwertyuiopasdfgh ->") == "djreglhvbcnfqstu"
    assert task.solve("double: abc ->") == "aabbcc"
    for bad in ("rot13: qwerty", "reverse: abc ->", "upper: ABC ->", "upper:  ->", "hello"):
        assert task.solve(bad) is None, bad


def test_export_writes_a_stopped_runs_checkpoint_as_a_model(tmp_path):
    T, cfg = _micro(tmp_path / "run", steps=4)
    with pytest.raises(ValueError, match="train_state.pt not found"):
        T.export(tmp_path / "run", tmp_path / "model")
    assert T.train(cfg, log=lambda s: None, stop_after=2) is None
    info = T.export(tmp_path / "run", tmp_path / "model")
    assert info["stopped_at"] == 2
    state = torch.load(tmp_path / "run" / T.STATE_FILE, weights_only=False)["model"]
    got = load_model(tmp_path / "model").state_dict()
    assert got.keys() == state.keys()
    for k in got:
        torch.testing.assert_close(got[k], state[k], rtol=0, atol=0, msg=k)
    T.train(cfg, log=lambda s: None)  # the run itself goes on from where it stopped
    final = load_model(tmp_path / "run").state_dict()["tok_embeddings.weight"]
    assert not torch.equal(final, got["tok_embeddings.weight"])
    # a finished run's state (kept, as --keep-state does) exports as the finished model, not a stop
    assert "stopped_at" not in T.export(tmp_path / "run", tmp_path / "final")


def test_a_resumed_stage_keeps_its_prior_when_init_from_is_overwritten(tmp_path):
    """A stage stopped, exported over its own --init-from (as stage 7 was into models/llada-tiny), then
    resumed: the final record names the stage it really started from, and the weights it resumes
    are its own, not the export's."""
    T, first = _micro(tmp_path / "a", steps=2)
    T.train(first, log=lambda s: None)
    prior = json.loads((tmp_path / "a" / "train_info.json").read_text())
    _, second = _micro(tmp_path / "b", steps=4)
    second = dataclasses.replace(second, init_from=str(tmp_path / "a"), seed=1)
    _, whole = _micro(tmp_path / "c", steps=4)
    whole = dataclasses.replace(whole, init_from=str(tmp_path / "a"), seed=1)
    ref = T.train(whole, log=lambda s: None)
    assert T.train(second, log=lambda s: None, stop_after=2) is None
    T.export(tmp_path / "b", tmp_path / "a")  # the stopped stage overwrites its own start
    info = T.train(second, log=lambda s: None)
    assert info["init_from"] == prior == ref["init_from"]
    a, b = load_model(tmp_path / "c").state_dict(), load_model(tmp_path / "b").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_export_from_the_command_line_prints_one_json_line(tmp_path, capsys):
    """--export of a finished run kept with --keep-state (scripts/train_defaults' last llada line)."""
    T, cfg = _micro(tmp_path / "run", steps=2)
    T.train(cfg, log=lambda s: None)  # the state stays, as main's --keep-state leaves it
    T.main(["--family", cfg.family, "--out", str(tmp_path / "run"), "--export", str(tmp_path / "model")])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["stopped_at"] is None and (tmp_path / "model" / "model.safetensors").is_file()


def test_the_command_line_weights_the_families_it_is_given_equally(tmp_path):
    """scripts/train_defaults' first llada stage names one family and no weights: it trains on maps
    alone (it once died on the four default weights); weights that do not match are an error."""
    T = _trainer()
    T.main(["--family", "llada", "--out", str(tmp_path / "run"), "--task-families", "maps", "--steps", "1",
            "--batch", "2", "--dim", "32", "--n-layers", "1", "--n-heads", "2", "--intermediate", "64",
            "--gen-lengths", "64", "--val-n", "1", "--threads", "1"])
    info = json.loads((tmp_path / "run" / "train_info.json").read_text())
    assert (info["config"]["task_families"], info["config"]["family_weights"]) == (["maps"], [1.0])
    with pytest.raises(ValueError, match=r"2 family weights .* for 1 task families"):
        T.TrainConfig(family="llada", out=str(tmp_path), task_families=("maps",), family_weights=(1.0, 2.0))


def test_summary_follows_a_dream_checkpoint_back_through_its_llada_stages(tmp_path, capsys):
    """train_tiny --summary: every stage that made a checkpoint, the adaptation included, and the total
    (the 3-hour training budget of the README is read off it)."""
    T, first = _micro(tmp_path / "llada-a", steps=4, n_layers=2)
    T.train(first, log=lambda s: None)
    _adapt_dream().adapt(tmp_path / "llada-a", tmp_path / "adapted")
    _, tune = _micro(tmp_path / "dream-b", steps=2, family="dream", n_layers=3, n_kv_heads=2,
                     init_from=str(tmp_path / "adapted"))
    T.train(tune, log=lambda s: None)
    T.main(["--summary", str(tmp_path / "dream-b")])
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(s["stage"], s["family"], s["layers"], s["steps"]) for s in rec["stages"]] == \
        [("llada-a", "llada", 2, 4), ("adapted", "dream", 3, 0), ("dream-b", "dream", 3, 2)]
    assert rec["stages"][1]["adapted_from"] == str(tmp_path / "llada-a") and rec["steps"] == 6
    assert rec["stages"][0]["seconds"] > 0 and rec["stages"][2]["seconds"] > 0
    assert rec["hours"] == round(sum(s["seconds"] for s in rec["stages"]) / 3600, 3)
    with pytest.raises(ValueError, match="train_info.json"):
        T.summary(tmp_path)


def test_a_run_may_resume_on_another_device_but_asks_for_cuda_only_where_there_is_one(tmp_path):
    """--device cuda (scripts/train_defaults' DEVICE, gpu-check's train stage): the device, like the thread
    count, may change between sessions of one run; where torch sees no GPU the error says so."""
    T, cfg = _micro(tmp_path / "run", steps=4)
    assert T.train(cfg, log=lambda s: None, stop_after=2) is None
    state = torch.load(tmp_path / "run" / T.STATE_FILE, weights_only=False)
    assert state["config"]["device"] == "cpu" and state["step"] == 2
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            T.train(dataclasses.replace(cfg, device="cuda"), log=lambda s: None)
    # a state written by the same run on another device resumes here
    state["config"]["device"] = "cuda"
    torch.save(state, tmp_path / "run" / T.STATE_FILE)
    logs = []
    info = T.train(cfg, log=logs.append)
    assert logs[0] == "resuming from step 2" and info["config"]["device"] == "cpu"
    _, whole = _micro(tmp_path / "whole", steps=4)
    T.train(whole, log=lambda s: None)  # the same run without the interruption
    a, b = load_model(tmp_path / "whole").state_dict(), load_model(tmp_path / "run").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
