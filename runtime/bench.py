"""`esdllm bench`: methods side by side in one process, interleaved after a warm-up.

Two sources of a model:
  --model DIR   a checkpoint (default: the embedded models/llada-tiny) on held-out task prompts,
                with EOS semantics: tokens count up to each row's first stop token
  --preset P    random weights at a given shape (speed does not depend on the weights):
                tiny (CI-sized), cpu (LLaDA-shaped, full forward >= 100 ms on 2 cores),
                llada-8b / dream-7b (the real shapes in bfloat16, GPU)
Random weights never reach the 0.9 threshold, so threshold rows equal one token a step there, and
every generated token counts. Prints a table, then one JSON line.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass

import torch

from .compiled import MODES, compiled
from .config import DECODE_PRESETS, DTYPES, DecodeConfig, ModelArgs, Stats
from .generate import GenerateOutput, generate
from .model import Transformer


@dataclass(frozen=True)
class Preset:
    args: ModelArgs
    prompt: int
    gen: int
    block: int
    batch: int = 1
    dtype: str = "float32"
    rounds: int = 2


def _llada(dim, layers, heads, ff, vocab=126464, **kw) -> ModelArgs:
    return ModelArgs(family="llada", vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=heads,
                     intermediate_size=ff, rope_theta=5e5, norm_eps=1e-5, qkv_bias=False, logits_shift=0,
                     mask_id=vocab - 1, eos_id=vocab - 2, pad_id=vocab - 2, **kw)


PRESETS = {
    "tiny": Preset(_llada(64, 4, 4, 128, vocab=256), prompt=24, gen=32, block=16, rounds=1),
    "cpu": Preset(_llada(384, 8, 6, 1024, vocab=2048), prompt=384, gen=128, block=32, rounds=1),
    # long generations: how each method's cost grows with the generation length (gen 512; --gen-length 1024)
    "cpu-long": Preset(_llada(384, 8, 6, 1024, vocab=2048), prompt=128, gen=512, block=32, rounds=1),
    "llada-8b": Preset(_llada(4096, 32, 32, 12288), prompt=1024, gen=256, block=64, batch=8, dtype="bfloat16"),
    "dream-7b": Preset(ModelArgs(family="dream", vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                                 intermediate_size=18944, rope_theta=1e6, norm_eps=1e-6, qkv_bias=True,
                                 logits_shift=1, mask_id=151666, eos_id=151643, pad_id=151643,
                                 rope_full_precision=False),
                       prompt=1024, gen=256, block=64, batch=8, dtype="bfloat16"),
}

METHODS = ("vanilla", "fast-dllm-dual", "fast-dllm-dual-t0.9", "es-dllm", "es-dllm-t0.9", "streaming-dllm",
           "dyllm", "es-dllm+streaming")  # config.DECODE_PRESETS
LONG_METHODS = ("vanilla", "fast-dllm-prefix", "streaming-dllm", "dyllm", "es-dllm", "es-dllm+streaming")
REFERENCE = "llada-reference"  # reference_generate below: the same work as vanilla, the way LLaDA's code does it
HBM_GBPS = {"H100": 3350, "H200": 4800}


def run_bench(preset: Preset, methods: list[str], device: str = "cpu", rounds: int | None = None,
              progress: bool = True, ops: str | None = None) -> dict:
    """Random weights at the preset's shape; every generated token counts (no EOS semantics).
    ops: the op backend (plugins/backends.py; default the device's)."""
    from ..plugins.backends import by_name, for_device
    torch.manual_seed(0)
    dt = getattr(torch, preset.dtype)
    with torch.device(device):
        model = Transformer(preset.args, ops=for_device(device) if ops is None else by_name(ops)).to(dt).eval()
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, preset.args.vocab_size - 8, (preset.batch, preset.prompt), generator=g).tolist()
    out = _run(model, prompts, preset.gen, preset.block, methods, device, rounds or preset.rounds, progress,
               stop_ids=set())
    out.update(prompt=preset.prompt, dtype=preset.dtype)
    return out


def run_bench_checkpoint(model_dir, methods: list[str], device: str = "cpu", dtype: str | None = None,
                         batch: int = 8, gen: int = 64, block: int = 32, rounds: int = 2, seed: int = 1234,
                         progress: bool = True, ops: str | None = None) -> dict:
    """A checkpoint on `batch` held-out task prompts; tokens count up to each row's first stop token."""
    from . import task
    from .pipeline import Pipeline
    pipe = Pipeline.load(model_dir, dtype=getattr(torch, dtype) if dtype else None, device=device, ops=ops)
    prompts = [pipe.encode(p.prompt, gen_length=gen) for p in task.problems(seed, batch, split="heldout", family=task.SHORT_FAMILIES)]
    out = _run(pipe.executor.model, prompts, gen, block, methods, device, rounds, progress, stop_ids=pipe.stop)
    out.update(model=str(pipe.model_dir), prompt=max(len(p) for p in prompts),
               dtype=str(pipe.executor.dtype).removeprefix("torch."))
    return out


@torch.inference_mode()
def reference_generate(model: Transformer, prompts: list[list[int]], cfg: DecodeConfig,
                       stop_ids: set[int] = frozenset()) -> GenerateOutput:
    """LLaDA's generate() (ML-GSAI/LLaDA generate.py, research/models.md A.7: greedy, low-confidence
    remasking, no CFG), restated over Transformer.forward: every step a full forward of the whole
    left-padded batch with its attention mask, logits for every position, a top-k per row. The
    baseline vanilla decoding must not be slower than (esdllm bench "vanilla/llada-reference")."""
    from .sampling import llada_quota
    args, dev = model.args, model.device
    B, P, G, bl = len(prompts), max(len(p) for p in prompts), cfg.gen_length, cfg.block_length
    x = torch.full((B, P + G), args.mask_id, dtype=torch.long, device=dev)
    am = torch.ones_like(x)
    for b, p in enumerate(prompts):
        x[b, : P - len(p)], am[b, : P - len(p)] = args.pad_id, 0
        x[b, P - len(p): P] = torch.tensor(p)
    stats, t0, spb = Stats(), time.perf_counter(), cfg.n_steps // (G // bl)
    for blk in range(G // bl):
        s, e = P + blk * bl, P + (blk + 1) * bl
        quota = llada_quota((x[:, s:e] == args.mask_id).sum(1), spb)
        for i in range(spb):
            mask_index = x == args.mask_id
            logits = model(x, am)
            stats.nfe, stats.positions_computed = stats.nfe + 1, stats.positions_computed + x.shape[1]
            x0 = logits.argmax(-1)
            p = torch.softmax(logits, -1).gather(-1, x0[..., None])[..., 0]
            p[:, e:] = -float("inf")
            conf = torch.where(mask_index, p, -float("inf"))
            transfer = torch.zeros_like(mask_index)
            for j in range(B):  # one top-k per row, as the reference does
                transfer[j, torch.topk(conf[j], k=int(quota[j, i])).indices] = True
            x[transfer] = x0[transfer]
    stats.steps, stats.seconds = stats.nfe, time.perf_counter() - t0
    stats.generated_tokens = sum(next((i for i, t in enumerate(r) if t in stop_ids), len(r)) for r in x[:, P:].tolist())
    return GenerateOutput(x[:, P:], stats)


def _run(model: Transformer, prompts: list[list[int]], gen: int, block: int, methods: list[str], device: str,
         rounds: int, progress: bool, stop_ids: set[int]) -> dict:
    base = DecodeConfig(gen_length=gen, block_length=block, prompt_update_freq=max(64, block), block_update_freq=16)
    cfgs, runners = {}, {}
    for m in methods:  # <preset>[@static|@compile|@cuda-graphs]
        name, _, mode = m.partition("@")
        cfgs[m] = base.replace(**DECODE_PRESETS.get(name, DECODE_PRESETS["vanilla"]), static_shapes=bool(mode))
        runners[m] = _runner(model, name, mode or None, runners)
    res = {m: dict(seconds=0.0, tokens=0, nfe=0, positions=0.0, steps=0, cache_bytes=0) for m in methods}
    total = len(methods) * (rounds + 1)
    bar = _bar(progress, total)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    peak = {}
    for r in range(rounds + 1):  # round 0 warms up every method
        for m in methods:
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            # warm-up: one block; compiled steps the whole run, so that every shape is compiled before timing
            compiled = m.endswith(("@compile", "@cuda-graphs"))
            cfg = cfgs[m] if r > 0 or compiled else cfgs[m].replace(gen_length=block)
            run, ex = runners[m]
            out = run(ex, prompts, cfg, stop_ids=stop_ids)
            if device.startswith("cuda"):
                peak[m] = torch.cuda.max_memory_allocated() / 2**30
            if r > 0:
                s = out.stats
                for k, v in (("seconds", s.seconds), ("tokens", s.generated_tokens), ("nfe", s.nfe),
                             ("positions", s.positions_computed), ("steps", s.steps)):
                    res[m][k] += v
                res[m]["cache_bytes"] = max(res[m]["cache_bytes"], s.extra.get("cache_bytes", 0))
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    table = {}
    for m, v in res.items():
        table[m] = {"tps": round(v["tokens"] / v["seconds"], 3), "nfe": v["nfe"] // rounds,
                    "tokens_per_forward": round(v["tokens"] / max(v["nfe"], 1), 3),
                    "positions_per_forward": round(v["positions"] / max(v["nfe"], 1), 2),
                    "seconds": round(v["seconds"] / rounds, 4),
                    "ms_per_forward": round(1000 * v["seconds"] / max(v["nfe"], 1), 3),
                    "cache_mib": round(v["cache_bytes"] / 2**20, 3)}
        if m in peak:
            table[m]["peak_gib"] = round(peak[m], 3)
    out = {"preset": None, "batch": len(prompts), "gen": gen, "block": block, "device": _device_name(device),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "methods": table, "speedup": {}}
    if REFERENCE in table and "vanilla" in table:
        out["speedup"][f"vanilla/{REFERENCE}"] = round(table["vanilla"]["tps"] / table[REFERENCE]["tps"], 3)
    for m in (m for m in table if "@" in m and m.split("@")[0] in table):
        out["speedup"][f"{m}/{m.split('@')[0]}"] = round(table[m]["tps"] / table[m.split("@")[0]]["tps"], 3)
    for m, ref in (("streaming-dllm", "fast-dllm-prefix"), ("dyllm", "vanilla"), ("es-dllm+streaming", "es-dllm"),
                   ("streaming-dllm", "vanilla")):
        if m in table and ref in table:
            out["speedup"][f"{m}/{ref}"] = round(table[m]["tps"] / table[ref]["tps"], 3)
    for m in (m for m in table if m.startswith("es-dllm") and m in DECODE_PRESETS and "+" not in m):
        # against vanilla, and against the dual cache with the same decoding rule (one token a step
        # or the same threshold)
        for ref in ("vanilla", "fast-dllm-dual" + m.removeprefix("es-dllm")):
            if ref in table:
                out["speedup"][f"{m}/{ref}"] = round(table[m]["tps"] / table[ref]["tps"], 3)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    out["weights_gib"] = round(weights / 2**30, 3)
    for gpu, bw in HBM_GBPS.items():
        if gpu in out["device"]:
            out["bandwidth_floor_ms_per_forward"] = round(1000 * weights / (bw * 1e9), 3)
    return out


def _runner(model: Transformer, name: str, mode: str | None, made: dict):
    """(generate function, executor) of one bench row; compiled executors are shared between rows of a mode."""
    if name == REFERENCE:
        if mode:
            raise ValueError(f"{REFERENCE} runs as its authors wrote it; @{mode} does not apply")
        return reference_generate, model
    if mode not in (None, "static", *MODES):
        raise ValueError(f"unknown bench mode @{mode}; expected @static, @compile or @cuda-graphs")
    if mode in MODES:
        shared = next((ex for run, ex in made.values() if getattr(ex, "mode", None) == mode), None)
        return generate, shared or compiled(model, mode)
    return generate, model


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({torch.get_num_threads()} threads)"


def _bar(progress, total):
    if not progress:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc="bench", unit="run", file=sys.stderr)


def print_table(out: dict) -> None:
    src = f"model {out['model']}" if out.get("model") else f"preset {out['preset']}"
    print(f"{src}: batch {out['batch']}, prompt {out['prompt']}, gen {out['gen']}, "
          f"block {out['block']}, {out['dtype']}, {out['device']}, torch {out['torch']}")
    w = max(22, 2 + max(map(len, out["methods"])))
    print(f"{'method':<{w}}{'tok/s':>10}{'NFE':>6}{'tok/fwd':>9}{'rows/fwd':>10}{'ms/fwd':>9}{'s':>9}{'cache MiB':>10}")
    for m, v in out["methods"].items():
        print(f"{m:<{w}}{v['tps']:>10.2f}{v['nfe']:>6}{v['tokens_per_forward']:>9.2f}"
              f"{v['positions_per_forward']:>10.1f}{v['ms_per_forward']:>9.2f}{v['seconds']:>9.3f}{v['cache_mib']:>10.2f}")
    for k, v in out["speedup"].items():
        print(f"speedup {k}: {v:.2f}x")


def _cmd(ns) -> int:
    if ns.threads:
        torch.set_num_threads(ns.threads)
    methods = (ns.methods or ",".join(LONG_METHODS if ns.preset == "cpu-long" else METHODS)).split(",")
    methods += [f"{m}@{ns.compile}" for m in methods if ns.compile and m != REFERENCE and "@" not in m]
    unknown = [m for m in methods if m.split("@")[0] not in DECODE_PRESETS and m != REFERENCE]
    if unknown:
        raise ValueError(f"unknown bench method(s) {unknown}; expected some of {[*DECODE_PRESETS, REFERENCE]}")
    if ns.preset and ns.model:
        raise ValueError("pass --preset (random weights at a shape) or --model (a checkpoint), not both")
    if ns.preset:
        if ns.dtype:
            raise ValueError("--dtype applies to --model runs; a preset fixes its dtype")
        preset = PRESETS[ns.preset]
        preset = dataclasses.replace(preset, batch=ns.batch or preset.batch, prompt=ns.prompt_length or preset.prompt,
                                     gen=ns.gen_length or preset.gen, block=ns.block_length or preset.block)
        out = run_bench(preset, methods, ns.device, ns.rounds, progress=sys.stderr.isatty(), ops=ns.ops)
        out["preset"] = ns.preset
    else:
        if ns.prompt_length:
            raise ValueError("--prompt-length applies to --preset runs; a checkpoint is fed task prompts")
        from .pipeline import default_model
        out = run_bench_checkpoint(ns.model or default_model(), methods, ns.device, ns.dtype, batch=ns.batch or 8,
                                   gen=ns.gen_length or 64, block=ns.block_length or 32, rounds=ns.rounds or 2,
                                   progress=sys.stderr.isatty(), ops=ns.ops)
    if not ns.json:  # people get the table; the JSON line ends every run (--json: only it)
        print_table(out)
    print(json.dumps(out))
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="methods side by side on a checkpoint or a preset shape (table + JSON line)",
                       epilog="example: esdllm bench --preset cpu-long --threads 1")
    p.add_argument("--model", default=None, help="HF checkpoint dir (default: the embedded models/llada-tiny)")
    p.add_argument("--preset", default=None, choices=list(PRESETS), help="random weights at this shape instead")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="with --model")
    p.add_argument("--methods", default=None, help="comma list of decode presets (config.DECODE_PRESETS, each "
                   "optionally @static, @compile or @cuda-graphs) or "
                   f"{REFERENCE} (default: {','.join(METHODS)}; cpu-long: {','.join(LONG_METHODS)})")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--ops", default=None, choices=["reference", "custom"],
                   help="the op backend (default: custom, the Triton kernels, on CUDA; reference elsewhere)")
    p.add_argument("--json", action="store_true", help="print only the JSON line (no table)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds after the warm-up (default: the preset's, 2 with --model)")
    p.add_argument("--batch", type=int, default=None, help="prompts per generate call (default: the preset's, 8 with --model)")
    p.add_argument("--prompt-length", type=int, default=None, help="with --preset")
    p.add_argument("--gen-length", type=int, default=None, help="tokens to generate (default: the preset's, 64 with --model)")
    p.add_argument("--block-length", type=int, default=None, help="block size (default: the preset's, 32 with --model)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--compile", dest="compile", action="store_const", const="compile", default=None,
                   help="also run every method through torch.compile (rows <method>@compile; "
                        "<method>@static in --methods: eager with static shapes)")
    g.add_argument("--cuda-graphs", dest="compile", action="store_const", const="cuda-graphs",
                   help="also run every method compiled with CUDA-graph replay (rows <method>@cuda-graphs; GPU)")
    p.set_defaults(func=_cmd)
