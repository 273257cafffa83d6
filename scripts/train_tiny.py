"""Train esdllm's embedded default model (LLaDA or Dream architecture) on the synthetic task.

One stage is one run (the defaults: 6 layers, every task family, 8,000 steps):

    python scripts/train_tiny.py --family llada --out DIR

--init-from DIR continues from a checkpoint of the same shape (a second stage on fresh data with
a new --seed), or grows a shallower one in depth (grow_depth: same outputs at step 0); the committed
models took several stages, see scripts/train_defaults. --export DEST writes the last checkpointed
step of a stopped run (--stop-after), or of a finished one kept with --keep-state, as a model.

Masked-diffusion SFT as LLaDA does it (research/models.md A.7): per sequence draw t ~ U(0, 1)
(stratified over the batch), mask each response token with probability p = (1 - eps) t + eps,
and take the cross-entropy on masked tokens weighted 1 / p, normalised by the response length.
The prompt is never masked. The response region is the answer, the end-of-turn token when the
prompt was chat-templated, then EOS padding to the region length, as in LLaDA's SFT data. Dream's
shifted prediction needs nothing extra: `Transformer.forward` already returns logits[:, p]
predicting token p from hidden state p - 1.

Deterministic: the batch and the noise of step s are functions of (seed, s) only, so a resumed
run (state in OUT/train_state.pt, written every --ckpt-every steps) matches an uninterrupted
one. The result is a Hugging Face checkpoint (config.json, model.safetensors, tokenizer files)
that esdllm.runtime.weights.load_model reads like an 8B one, plus train_info.json.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import multiprocessing
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from esdllm.runtime import task
from esdllm.runtime.config import ModelArgs
from esdllm.runtime.model import Transformer
from esdllm.runtime.tokenizer import SpecialIds, build_tokenizer, encode_prompt, load_tokenizer
from esdllm.runtime.weights import load_model, save_model

STATE_FILE = "train_state.pt"
# config fields a resumed run may change: speed, and where its folders are (a run moved to another
# disk, or copied back from a GPU box, resumes there; its weights and prior record come from its state)
RESUME_FREE = ("threads", "device", "workers", "out", "init_from")


@dataclass(frozen=True)
class TrainConfig:
    family: str
    out: str
    seed: int = 0
    steps: int = 8000
    batch: int = 64                        # at most this many sequences a step ...
    tokens_per_step: int = 6144            # ... and about this many tokens (short canvases: more rows)
    lr: float = 2e-3
    warmup: int = 100
    min_lr_frac: float = 0.05
    weight_decay: float = 0.01
    dim: int = 128
    n_layers: int = 6
    n_heads: int = 4
    n_kv_heads: int | None = None          # None: n_heads (LLaDA, MHA), n_heads // 2 (Dream, GQA)
    intermediate: int = 384
    # 10000, not the 8B checkpoints' 5e5 / 1e6: with head_dim 32 a huge base leaves only 2-3 rotary
    # frequencies that resolve distances under 100, and the task is all about exact positions
    rope_theta: float = 10000.0
    chat_frac: float = 0.4                 # share of batches rendered with the chat template
    # task families and their share of the batches (runtime/task.py)
    task_families: tuple[str, ...] = ("maps", "perm", "chain", "long")
    family_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    # response region of a short-answer batch, drawn uniformly: mostly the eval length, sometimes
    # long, so EOS padding generalises to long canvases (streaming / early-exit benchmarks)
    gen_lengths: tuple[int, ...] = (64, 64, 64, 64, 64, 96, 128, 256, 512)
    long_gen_lengths: tuple[int, ...] = (256, 384, 512, 512)  # the long family's (answers up to 240)
    mask_eps: float = 1e-3
    # share of sequences whose whole post-answer tail (end-of-turn + EOS padding) is masked on top
    # of the random mask: decoders that hold EOS back (ES-dLLM's delayed EOS) decode the answer
    # with the tail still masked, a state the i.i.d. mask rarely shows
    tail_mask: float = 0.5
    # share of rows put in the state semi-autoregressive decoding leaves: the answer decided up to a
    # random block boundary inside it, that block masked at the row's rate, every later position
    # masked. Without it long answers end early under block decoding (the whole-canvas decode of
    # the same model gets them right): the i.i.d. mask almost never hides a long answer's end.
    block_state: float = 0.0
    block_length: int = 32
    # share of the long family's batches drawn from answers of at least long_tail_min tokens (the
    # log-uniform lengths give them about a third of its rows)
    long_tail: float = 0.0
    long_tail_min: int = 64
    init_from: str | None = None           # start from this checkpoint's weights (a second stage)
    ckpt_every: int = 100
    val_every: int = 500
    val_n: int = 8                         # held-out problems per family at each validation
    dtype: str = "float32"                 # dtype of the saved checkpoint
    threads: int = 2
    device: str = "cpu"                    # "cuda": the same run on a GPU (the noise is still drawn on the CPU)
    workers: int = 0                       # processes building batches ahead (train_tiny: 2 on a GPU, 0 on the CPU)

    def __post_init__(self):
        if len(self.family_weights) != len(self.task_families):
            raise ValueError(f"{len(self.family_weights)} family weights {self.family_weights} for "
                             f"{len(self.task_families)} task families {self.task_families}: give one weight per family")
        if self.workers < 0:
            raise ValueError(f"workers {self.workers}: give 0 (batches built inline) or more worker processes")

    def kv_heads(self) -> int:
        if self.n_kv_heads is not None:
            return self.n_kv_heads
        return self.n_heads if self.family == "llada" else max(1, self.n_heads // 2)


def model_args(cfg: TrainConfig, ids: SpecialIds) -> ModelArgs:
    """A tiny shape with the family's own quirks (rope theta, eps, biases, logit shift, GQA)."""
    llada = cfg.family == "llada"
    return ModelArgs(
        family=cfg.family, vocab_size=64 * math.ceil(ids.n_tokens / 64), dim=cfg.dim,
        n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.kv_heads(),
        intermediate_size=cfg.intermediate, rope_theta=cfg.rope_theta,
        norm_eps=1e-5 if llada else 1e-6, qkv_bias=not llada, logits_shift=0 if llada else 1,
        mask_id=ids.mask_id, eos_id=ids.eos_id, pad_id=ids.pad_id, eot_id=ids.eot_id,
        bos_id=ids.bos_id, max_seq_len=4096, rope_full_precision=llada)


def encode_batch(tok, problems: list[task.Problem], chat: list[bool], gen_length: int, args: ModelArgs
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Left-padded [prompt | response] ids.

    Returns input_ids [B, P + gen_length], attention_mask [B, P + gen_length] (0 = left pad) and P,
    the padded prompt length. The response is answer (+ end-of-turn if chat) + EOS to gen_length.
    """
    rows, masks, P = encode_rows(tok, problems, chat, gen_length, args)
    return torch.tensor(rows), torch.tensor(masks), P


def encode_rows(tok, problems: list[task.Problem], chat: list[bool], gen_length: int, args: ModelArgs
                ) -> tuple[list[list[int]], list[list[int]], int]:
    """encode_batch's rows as lists (what a batch-building worker process sends back)."""
    prompts = [encode_prompt(tok, p.prompt, chat=c) for p, c in zip(problems, chat)]
    P = max(len(x) for x in prompts)
    rows, masks = [], []
    for p, c, ids in zip(problems, chat, prompts):
        ans = tok(p.answer, add_special_tokens=False)["input_ids"] + ([args.eot_id] if c else [])
        if len(ans) > gen_length:
            raise ValueError(f"answer of {len(ans)} tokens does not fit gen_length {gen_length}: {p.answer!r}")
        resp = ans + [args.eos_id] * (gen_length - len(ans))
        pad = P - len(ids)
        rows.append([args.pad_id] * pad + ids + resp)
        masks.append([0] * pad + [1] * (len(ids) + gen_length))
    return rows, masks, P


def diffusion_loss(model: Transformer, input_ids: torch.Tensor, attention_mask: torch.Tensor, P: int,
                   gen: torch.Generator, eps: float = 1e-3, tail_mask: float = 0.0, block_state: float = 0.0,
                   block_length: int = 32) -> torch.Tensor:
    """LLaDA SFT loss on the response region input_ids[:, P:] (see the module docstring).

    tail_mask: share of rows whose end-of-turn / EOS tail is masked entirely (TrainConfig.tail_mask).
    block_state: share of rows in a block-decoding state (TrainConfig.block_state).
    """
    B, L = input_ids.shape
    R = L - P
    t = (torch.arange(B, dtype=torch.float32) + torch.rand(B, generator=gen)) / B  # stratified in (0, 1)
    p_mask = ((1 - eps) * t + eps)[:, None].expand(B, R)
    masked = torch.rand(B, R, generator=gen) < p_mask
    weight = 1.0 / p_mask
    if tail_mask > 0:
        resp = input_ids[:, P:]
        tail = (resp == model.args.eos_id) | (resp == model.args.eot_id)
        forced = tail & (torch.rand(B, 1, generator=gen) < tail_mask) & ~masked
        masked = masked | forced
        # forced tokens were not drawn by the t-process: weight 1, or a small t would blow them up
        weight = torch.where(forced, 1.0, weight)
    if block_state > 0:  # drawn only when asked, so runs without it keep their noise
        resp = input_ids[:, P:]
        ans = ((resp != model.args.eos_id) & (resp != model.args.eot_id)).sum(1)
        pick = (torch.rand(B, generator=gen) < block_state)[:, None]
        b = (torch.rand(B, generator=gen) * (ans // block_length + 1)).long() * block_length  # current block
        pos = torch.arange(R)[None]
        later = pick & (pos >= (b + block_length)[:, None])
        forced = later & ~masked
        masked = (masked & ~(pick & (pos < b[:, None]))) | later
        weight = torch.where(forced, 1.0, weight)
    noisy = input_ids.clone()
    noisy[:, P:][masked] = model.args.mask_id
    # the mask is drawn on the CPU above, so a run's noise is the same on every device
    dev = model.device
    logits = model(noisy.to(dev), attention_mask.to(dev))[:, P:]
    masked = masked.to(dev)
    ce = F.cross_entropy(logits[masked].float(), input_ids[:, P:].to(dev)[masked], reduction="none")
    return (ce * weight.to(dev)[masked]).sum() / (B * R)


# vanilla at threshold 0.9 with early exit: no cache, so it tracks the one-token-a-step target. The dual
# cache, used before, freezes the prompt rows and read 0 on perm and chain for a model that vanilla
# decoding had right (README, stale prompt rows); early exit keeps the long canvases cheap.
VAL_DECODE = dict(method="vanilla", threshold=0.9, early_exit=True, block_length=32)


def validate(model: Transformer, tok, args: ModelArgs, seed: int, n: int,
             families: tuple[str, ...] = task.FAMILIES) -> dict[str, float]:
    """Held-out accuracy per family (n problems each, plain prompts, each at its natural generation
    length) through the runtime's one diffusion loop, decoded with VAL_DECODE; `esdllm eval` is the real
    measurement."""
    from esdllm.runtime.config import DecodeConfig
    from esdllm.runtime.generate import generate
    from esdllm.runtime.tokenizer import decode_completion, stop_ids

    model.eval()
    stops = stop_ids(tok, args)
    acc = {}
    for fam in families:
        probs = task.problems(seed, n, split="heldout", family=fam)
        cfg = DecodeConfig(gen_length=task.NATURAL_GEN[fam], **VAL_DECODE)
        out = generate(model, [encode_prompt(tok, p.prompt, chat=False) for p in probs], cfg, stop_ids=stops)
        texts = [decode_completion(tok, row, stops)[0] for row in out.tokens.tolist()]
        acc[fam] = sum(task.check(t, p) for t, p in zip(texts, probs)) / n
    model.train()
    acc["all"] = sum(acc.values()) / len(families)
    return acc


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def step_batch(cfg: TrainConfig, tok, args: ModelArgs, step: int, rows: bool = False):
    """The batch of `step`: a pure function of (seed, step). One family and one response length per
    batch (mixing them would pad every row to the longest); as many rows as fit tokens_per_step.
    rows: encode_rows' lists instead of tensors."""
    rng = random.Random(f"esdllm-train:{cfg.seed}:{step}")
    fam = rng.choices(cfg.task_families, weights=cfg.family_weights)[0]
    gen_length = rng.choice(cfg.long_gen_lengths if fam == "long" else cfg.gen_lengths)
    # one format per batch: mixing them would pad every plain prompt to the chat length
    chat = rng.random() < cfg.chat_frac
    longest_prompt = 12 + task.LENGTHS[fam][1] + (40 if chat else 0)  # op name, letters, template
    n = max(1, min(cfg.batch, cfg.tokens_per_step // (longest_prompt + gen_length)))
    if fam == "long" and cfg.long_tail > 0 and rng.random() < cfg.long_tail:
        # this step's own slice of the stream (start..start+batch), keeping only the long answers
        pool = task.problems(cfg.seed, cfg.batch, split="train", start=step * cfg.batch, family=fam)
        probs = [p for p in pool if len(p.answer) >= cfg.long_tail_min][:n] or pool[:n]
    else:
        probs = task.problems(cfg.seed, n, split="train", start=step * cfg.batch, family=fam)
    return (encode_rows if rows else encode_batch)(tok, probs, [chat] * n, gen_length, args)


_WORKER: tuple = ()  # (cfg, tok, args) of a batch-building worker process


def _worker_init(*state) -> None:
    global _WORKER
    _WORKER = state


def _worker_rows(step: int):
    cfg, tok, args = _WORKER
    return step_batch(cfg, tok, args, step, rows=True)


def batches(cfg: TrainConfig, tok, args: ModelArgs, start: int):
    """step_batch(s) for s = start .. cfg.steps - 1. With cfg.workers > 0 the rows are built 2 * workers
    steps ahead in forked worker processes: the same batches (each is a pure function of seed and step),
    without the ~16 ms of Python a batch costs sitting between a GPU's steps."""
    if cfg.workers == 0:
        yield from (step_batch(cfg, tok, args, s) for s in range(start, cfg.steps))
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # its thread pool does not survive a fork
    pool = ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_worker_init, initargs=(cfg, tok, args))
    first = range(start, min(cfg.steps, start + 2 * cfg.workers))
    ahead = collections.deque(pool.submit(_worker_rows, s) for s in first)
    try:
        for s in range(start, cfg.steps):
            rows, masks, P = ahead.popleft().result()
            if s + 2 * cfg.workers < cfg.steps:
                ahead.append(pool.submit(_worker_rows, s + 2 * cfg.workers))
            yield torch.tensor(rows), torch.tensor(masks), P
    finally:  # a stopped run (stop_after, an error) leaves without waiting for batches it will not use
        pool.shutdown(wait=True, cancel_futures=True)


def grow_depth(model: Transformer, src: Transformer) -> None:
    """Load the shallower `src` into the deeper `model` so that both compute the same function.

    src's blocks keep their order, spread evenly; each new block follows a source block and has its
    attention and FFN output projections zeroed, so on the residual stream it adds nothing until
    training moves those weights. Its other weights start as a copy of the block before it, so it
    has that block's features to build on as soon as its outputs move.
    """
    n_src, n_dst = src.args.n_layers, model.args.n_layers
    # dst block j holds source block owner[j]; every holder after the first is a new block
    owner = [j * n_src // n_dst for j in range(n_dst)]
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("layers.")}
    seen = set()
    for j, i in enumerate(owner):
        for k, v in src.layers[i].state_dict().items():
            v = v.clone()
            if i in seen and k in ("attention.wo.weight", "feed_forward.w2.weight"):
                v.zero_()
            sd[f"layers.{j}.{k}"] = v
        seen.add(i)
    model.load_state_dict(sd)


def train(cfg: TrainConfig, log=print, stop_after: int | None = None) -> dict | None:
    """Train (or resume) into cfg.out; returns train_info (also written to OUT/train_info.json).

    stop_after: leave after this step (checkpointed), as an interruption would; returns None.
    """
    torch.set_num_threads(cfg.threads)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r} asked for, but this torch sees no CUDA device (train with --device cpu)")
    out = Path(cfg.out)
    ids = build_tokenizer(cfg.family, out, alphabet=task.ALPHABET)
    tok = load_tokenizer(out)
    args = model_args(cfg, ids)
    # PyTorch's default init (N(0, 1) embeddings, Kaiming-uniform linears): a GPT-style N(0, 0.02)
    # init sat on the loss plateau of the copy tasks for hundreds of steps longer in our trials.
    torch.manual_seed(cfg.seed)
    model = Transformer(args)
    prior = None
    state_path = out / STATE_FILE
    # a resumed run takes its weights and its prior stage's record from its own state: the --init-from
    # directory may since hold something else (this run's own export, for one)
    if cfg.init_from and not state_path.is_file():
        src = load_model(cfg.init_from)
        if src.args == args:
            model.load_state_dict(src.state_dict())
        elif dataclasses.replace(src.args, n_layers=args.n_layers) == args and src.args.n_layers < args.n_layers:
            grow_depth(model, src)
        else:
            raise ValueError(f"--init-from {cfg.init_from} has shape {src.args}, this run builds {args} "
                             "(only a deeper copy of the same shape can be grown from it)")
        prior = _prior(cfg)
    model.to(cfg.device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    start, history, spent = 0, [], 0.0
    if state_path.is_file():
        st = torch.load(state_path, weights_only=False, map_location=cfg.device)
        # RESUME_FREE change speed or paths, not the recipe: a run may resume with other cores, on a GPU, or moved
        same = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_FREE}
        if {k: v for k, v in st["config"].items() if k not in RESUME_FREE} != same:
            raise ValueError(f"{state_path} was written by a different configuration; delete it to start over")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        start, history, spent = st["step"], st["history"], st.get("elapsed_s", 0.0)
        prior = st["prior"] if "prior" in st else _prior(cfg)  # states from before "prior" was kept
        log(f"resuming from step {start}")
    model.train()
    t0, ema = time.time() - spent, None  # elapsed_s counts the training time of every session
    # in a log (not a terminal) the validation lines below are the progress, not bar redraws
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"train {cfg.family}",
               file=sys.stderr, mininterval=5.0, disable=not sys.stderr.isatty())
    # closed on every way out of the loop, so its worker processes end with the run
    with closing(batches(cfg, tok, args, start)) as data:
        for step, (x, am, P) in zip(bar, data):
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step)
            noise = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            loss = diffusion_loss(model, x, am, P, noise, cfg.mask_eps, cfg.tail_mask, cfg.block_state,
                                  cfg.block_length)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
            bar.set_postfix(loss=f"{ema:.4f}", lr=f"{lr_at(cfg, step):.2e}")
            done = step + 1
            if done % cfg.val_every == 0 or done == cfg.steps:
                acc = validate(model, tok, args, cfg.seed + 1, cfg.val_n, cfg.task_families)
                history.append({"step": done, "loss": round(ema, 5), "val": {k: round(v, 4) for k, v in acc.items()},
                                "elapsed_s": round(time.time() - t0, 1)})
                log(json.dumps(history[-1]))
            if done % cfg.ckpt_every == 0 or done == cfg.steps:
                tmp = state_path.with_suffix(".tmp")
                torch.save({"config": dataclasses.asdict(cfg), "model": model.state_dict(),
                            "opt": opt.state_dict(), "step": done, "history": history,
                            "elapsed_s": time.time() - t0, "prior": prior}, tmp)
                tmp.replace(state_path)  # atomic: an interrupted save never corrupts the resume point
            if stop_after is not None and done >= stop_after and done < cfg.steps:
                if done % cfg.ckpt_every:
                    raise ValueError(f"stop_after {stop_after} is not a checkpoint step (every {cfg.ckpt_every})")
                bar.close()
                return None
    bar.close()
    return _save(model, cfg, out, history, prior)


def _save(model: Transformer, cfg: TrainConfig, dest: Path, history: list, prior: dict | None,
          stopped_at: int | None = None) -> dict:
    """The checkpoint (weights, train_info.json) of a run into dest, which holds its tokenizer."""
    model.eval().to("cpu")
    save_model(model, dest, dtype=cfg.dtype)
    info = {"config": dataclasses.asdict(cfg), "task_families": list(cfg.task_families),
            "params": sum(p.numel() for p in model.parameters()), "history": history}
    if stopped_at is not None:
        info["stopped_at"] = stopped_at  # exported from train_state.pt before cfg.steps
    if prior is not None:
        info["init_from"] = prior  # the stage this run continued
    (dest / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def export(out: str | Path, dest: str | Path) -> dict:
    """Write the checkpoint of a stopped (or running) run's last train_state.pt in `out` to `dest`:
    an intermediate step taken as the model, e.g. the one a validation or `esdllm eval` picked."""
    out, dest = Path(out), Path(dest)
    state_path = out / STATE_FILE
    if not state_path.is_file():
        raise ValueError(f"{state_path} not found: --export needs a run stopped with --stop-after or --keep-state")
    st = torch.load(state_path, weights_only=False, map_location="cpu")
    cfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in st["config"].items()})
    dest.mkdir(parents=True, exist_ok=True)
    model = Transformer(model_args(cfg, build_tokenizer(cfg.family, dest, alphabet=task.ALPHABET)))
    model.load_state_dict(st["model"])
    stopped_at = st["step"] if st["step"] < cfg.steps else None  # a finished run kept with --keep-state
    prior = st["prior"] if "prior" in st else _prior(cfg)
    return _save(model, cfg, dest, st["history"], prior, stopped_at=stopped_at)


def stages(info: dict) -> list[dict]:
    """The stages that made a checkpoint, first to last, from its train_info.json: each stage's record
    holds the one it started from under "init_from" (an adapted Dream's reaches into its LLaDA source).
    Per stage: its name (the run's directory), family, layers, steps, threads, device, training seconds:
    the wall time of every session of the run, validations included (0 for an adaptation)."""
    out = []
    while info:
        c = info.get("config") or {}
        hist = info.get("history") or []
        out.append({"stage": Path(c.get("out", "?")).name, "family": c.get("family"), "layers": c.get("n_layers"),
                    "steps": info.get("stopped_at") or (c.get("steps") if "history" in info else 0),
                    "threads": c.get("threads"), "device": c.get("device", "cpu"), "seconds": hist[-1]["elapsed_s"] if hist else 0.0,
                    "adapted_from": info.get("adapted_from")})
        info = info.get("init_from")
    return out[::-1]


def summary(model_dir: str | Path) -> dict:
    """A checkpoint's training record: its stages (stages()) and their total steps and hours."""
    f = Path(model_dir) / "train_info.json"
    if not f.is_file():
        raise ValueError(f"{f} not found: --summary reads the train_info.json a training run writes")
    st = stages(json.loads(f.read_text()))
    return {"model": str(model_dir), "stages": st, "steps": sum(s["steps"] for s in st),
            "hours": round(sum(s["seconds"] for s in st) / 3600, 3)}


def _prior(cfg: TrainConfig) -> dict | None:
    """The train_info of the stage this run starts from, if it has one."""
    f = Path(cfg.init_from) / "train_info.json" if cfg.init_from else None
    return json.loads(f.read_text()) if f is not None and f.is_file() else None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=("llada", "dream"), help="required, but with --summary")
    p.add_argument("--out", help="checkpoint directory (created; resumes from its train_state.pt); required, but with --summary")
    d = TrainConfig(family="llada", out="")
    for f in ("seed", "steps", "batch", "tokens_per_step", "lr", "dim", "n_layers", "n_heads", "intermediate", "rope_theta",
              "chat_frac", "warmup", "val_every", "val_n", "ckpt_every"):
        p.add_argument("--" + f.replace("_", "-"), type=type(getattr(d, f)), default=getattr(d, f))
    p.add_argument("--n-kv-heads", type=int, default=None)
    p.add_argument("--task-families", type=lambda v: tuple(v.split(",")), default=d.task_families,
                   help=f"comma list of task families to train on (default: {','.join(d.task_families)})")
    p.add_argument("--family-weights", type=lambda v: tuple(float(x) for x in v.split(",")),
                   default=None, help="their shares of the batches, one per family (default: equal)")
    p.add_argument("--gen-lengths", type=lambda v: tuple(int(x) for x in v.split(",")), default=d.gen_lengths,
                   help="response lengths of short-answer batches, drawn uniformly")
    p.add_argument("--tail-mask", type=float, default=d.tail_mask)
    p.add_argument("--block-state", type=float, default=d.block_state,
                   help="share of rows in a block-decoding state (answer decided to a block, the rest masked)")
    p.add_argument("--block-length", type=int, default=d.block_length)
    p.add_argument("--long-tail", type=float, default=d.long_tail,
                   help="share of long-family batches drawn from answers of >= --long-tail-min tokens")
    p.add_argument("--long-tail-min", type=int, default=d.long_tail_min)
    p.add_argument("--init-from", default=None,
                   help="checkpoint dir to start from (same shape, or fewer layers: grown in depth)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, or cuda for a GPU (default cpu)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes building batches ahead (default: 2 on cuda, where a step is a few ms of kernels; "
                        "0 on the CPU, where they would take cores from the step)")
    p.add_argument("--keep-state", action="store_true", help="keep train_state.pt after finishing")
    p.add_argument("--stop-after", type=int, default=None,
                   help="leave after this step (a multiple of --ckpt-every); rerun to resume")
    p.add_argument("--export", default=None, metavar="DEST",
                   help="train nothing: write --out's last checkpointed step (train_state.pt) to DEST as a model")
    p.add_argument("--summary", default=None, metavar="DIR",
                   help="train nothing: print how the checkpoint DIR was made, stage by stage (train_info.json)")
    a = vars(p.parse_args(argv))
    if a["summary"] is not None:
        rec = summary(a["summary"])
        for s in rec["stages"]:
            what = f"adapted from {s['adapted_from']}" if s["adapted_from"] else \
                f"{s['steps']:>6} steps  {s['threads']} threads  {s['device']:<4}  {s['seconds'] / 60:6.1f} min"
            print(f"{s['stage']:<24} {s['family']:<6} {s['layers']} layers  {what}", file=sys.stderr)
        print(json.dumps(rec))
        return
    if a["family"] is None or a["out"] is None:
        p.error("--family and --out are required to train or export")
    keep, stop_after, dest = a.pop("keep_state"), a.pop("stop_after"), a.pop("export")
    a.pop("summary")
    if a["family_weights"] is None:
        a["family_weights"] = (1.0,) * len(a["task_families"])
    if a["workers"] is None:
        a["workers"] = 2 if a["device"].startswith("cuda") else 0
    if dest is not None:
        info = export(a["out"], dest)
        print(json.dumps({"out": dest, "params": info["params"], "stopped_at": info.get("stopped_at")}))
        return
    cfg = TrainConfig(**a)
    info = train(cfg, log=lambda s: tqdm.write(s, file=sys.stderr), stop_after=stop_after)
    if info is None:
        print(json.dumps({"out": cfg.out, "stopped_at": stop_after}))
        return
    if not keep:
        (Path(cfg.out) / STATE_FILE).unlink(missing_ok=True)
    last = info["history"][-1] if info["history"] else {}
    print(json.dumps({"out": cfg.out, "params": info["params"], **last}))


if __name__ == "__main__":
    main()
