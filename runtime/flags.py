"""argparse helpers shared by the esdllm subcommands: the model / executor flags and the decoding
flags, each mapping 1:1 onto a DecodeConfig field (decode_config builds one from parsed flags)."""
from __future__ import annotations

import argparse

from .config import ALGS, CACHES, DTYPES, METHODS, REMASKING, SAMPLERS, DecodeConfig


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(v) for v in s.split(","))


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF checkpoint dir (default: the embedded models/llada-tiny)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="weights/activations dtype (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--executor", default="torch", choices=["torch", "onnxruntime", "tensorrt"],
                   help="what runs the forwards: torch eager, or the built graphs of --engine (default: torch)")
    p.add_argument("--engine", default=None, help="artifacts dir from `esdllm build` (onnxruntime / tensorrt)")
    p.add_argument("--ops", default=None, choices=["reference", "custom"],
                   help="torch executor's op backend: PyTorch reference or the custom ops (Triton kernels on "
                        "CUDA) (default: custom on CUDA, reference elsewhere)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--compile", dest="compile", action="store_const", const="compile", default=None,
                   help="torch executor: run each forward through torch.compile (static shapes; slow first steps)")
    g.add_argument("--cuda-graphs", dest="compile", action="store_const", const="cuda-graphs",
                   help="torch executor on CUDA: torch.compile with CUDA-graph replay per forward kind and shape")


def add_decode_args(p: argparse.ArgumentParser, **defaults) -> None:
    d = DecodeConfig()
    g = p.add_argument_group("decoding")
    g.add_argument("--method", default=d.method, choices=METHODS, help=f"decoding method (README table; default {d.method})")
    g.add_argument("--gen-length", type=int, default=d.gen_length, help=f"tokens to generate (default {d.gen_length})")
    g.add_argument("--block-length", type=int, default=d.block_length,
                   help=f"semi-autoregressive block size; divides the gen length (default {d.block_length})")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: gen length, one token a step)")
    g.add_argument("--sampler", default=None, choices=SAMPLERS, help="default: the model family's")
    g.add_argument("--temperature", type=float, default=d.temperature,
                   help=f"sampling temperature, 0 = greedy (default {d.temperature})")
    g.add_argument("--remasking", default=d.remasking, choices=REMASKING,
                   help=f"LLaDA sampler: which masks to commit first (default {d.remasking})")
    g.add_argument("--cfg-scale", type=float, default=d.cfg_scale,
                   help=f"LLaDA classifier-free guidance scale, vanilla only (default {d.cfg_scale})")
    g.add_argument("--alg", default=d.alg, choices=ALGS, help=f"Dream sampler: confidence rule (default {d.alg})")
    g.add_argument("--alg-temp", type=float, default=None, help="Dream sampler: temperature of the commit order")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: off)")
    g.add_argument("--top-k", type=int, default=None, help="top-k sampling (default: off)")
    g.add_argument("--eps", type=float, default=d.eps, help=f"Dream sampler: final timestep (default {d.eps})")
    g.add_argument("--seed", type=int, default=None, help="random seed of sampling (default 0)")
    g.add_argument("--threshold", type=float, default=None, help="parallel decoding: commit every token with confidence >= T")
    g.add_argument("--factor", type=float, default=None, help="parallel decoding: Fast-dLLM factor rule")
    g.add_argument("--cache", default=d.cache, choices=CACHES, help=f"fast-dllm KV cache (default {d.cache})")
    g.add_argument("--cache-refresh", type=int, default=d.cache_refresh,
                   help="fast-dllm: also refresh the cache every N steps inside a block (default 0: block starts only)")
    g.add_argument("--skip-proportions", type=_floats, default=d.skip_proportions,
                   help=f"es-dllm: rows kept from each prune position on (default {','.join(map(str, d.skip_proportions))})")
    g.add_argument("--skip-positions", type=_floats, default=d.skip_positions,
                   help=f"es-dllm: prune positions as fractions of depth (default {','.join(map(str, d.skip_positions))})")
    g.add_argument("--alpha", type=float, default=d.alpha,
                   help=f"es-dllm: weight of hidden-state change against confidence (default {d.alpha})")
    g.add_argument("--prompt-update-freq", type=int, default=d.prompt_update_freq,
                   help=f"es-dllm: refresh the prompt rows every N steps (default {d.prompt_update_freq})")
    g.add_argument("--block-update-freq", type=int, default=d.block_update_freq,
                   help=f"es-dllm: a step without skipping every N steps (default {d.block_update_freq})")
    g.add_argument("--prompt-skip", action="store_true",
                   help="es-dllm: prompt refreshes skip rows too, the prompt's ranked by importance with the "
                        "block's (default: off, the authors' all-update refreshes)")
    g.add_argument("--no-delay-eos", dest="delay_eos", action="store_false",
                   help="es-dllm: let EOS be committed before the answer is decided (default: delayed)")
    g.add_argument("--es-token-rows", action="store_true",
                   help="es-dllm on Dream: refresh rows in token, not predicting-row, coordinates (README)")
    g = p.add_argument_group("streaming-dllm (also es-dllm / fast-dllm; default: the method's main setting)")
    g.add_argument("--suffix-window", type=int, default=None,
                   help="suffix positions kept after the block, in tokens (streaming-dllm: 96; others: off)")
    g.add_argument("--trailing", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the generation's last position with the window (default: on)")
    g.add_argument("--dynamic-alpha", type=float, default=None,
                   help="threshold tau0 * (1 - A * (1 - masked share)) (streaming-dllm: 0.3; others: 0)")
    g.add_argument("--early-exit", action=argparse.BooleanOptionalAction, default=None,
                   help="a finished block holding EOS ends the row, any method (streaming-dllm: on; others: off)")
    g = p.add_argument_group("dyllm")
    g.add_argument("--saliency-tau", type=float, default=d.saliency_tau,
                   help=f"a row is salient when its attention context's cosine to the cache is below T (default {d.saliency_tau})")
    g.add_argument("--full-steps", type=int, default=d.full_steps, help=f"dense forwards first (default {d.full_steps})")
    g.add_argument("--prompt-period", type=int, default=d.prompt_period,
                   help=f"query the prompt rows too every P forwards (default {d.prompt_period})")
    g = p.add_argument_group("GPU execution")
    g.add_argument("--static-shapes", action="store_true",
                   help="forward shapes from host values only: no host syncs inside a step (implied by --compile)")
    p.set_defaults(**defaults)


def decode_config(ns: argparse.Namespace) -> DecodeConfig:
    names = DecodeConfig.__dataclass_fields__
    return DecodeConfig(**{k: v for k, v in vars(ns).items() if k in names})


