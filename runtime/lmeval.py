"""lm-evaluation-harness integration: the `esdllm` model class for `lm_eval` (package lm-eval).

    esdllm lm-eval --model esdllm --model_args pretrained=DIR,method=es-dllm,threshold=0.9 \\
        --tasks gsm8k --batch_size 8

`esdllm lm-eval` is lm_eval's own command line with this model registered (lm_eval 0.4 looks models
up in its registry only; from Python, `import esdllm.runtime.lmeval` registers it for
`lm_eval.simple_evaluate(model="esdllm", ...)`). model_args: pretrained (a checkpoint, default the
embedded model), executor / engine / device / dtype / ops / compile as on the esdllm command line,
chat (wrap contexts in the checkpoint's chat template), and any DecodeConfig field (method, threshold,
gen_length, block_length, steps, ...). Without gen_length a request decodes its task's max_gen_toks,
rounded up to whole blocks.

generate_until honours the task's stop sequences (the completion is cut at the first one) and its
temperature. loglikelihood tasks are refused: a diffusion LM has no left-to-right likelihood, and
LLaDA's Monte-Carlo estimate (research/models.md) is not implemented here.
"""
from __future__ import annotations

import dataclasses
import sys

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .config import DecodeConfig
from .pipeline import Pipeline

_LOAD_ARGS = ("pretrained", "executor", "engine", "device", "dtype", "ops", "compile")


def _coerce(field: dataclasses.Field, value):
    """A model_args value (lm_eval parses numbers and booleans, leaves the rest strings) as its field's type."""
    if value is None or not isinstance(value, str):
        return value
    kind = str(field.type)
    if value.lower() == "none":
        return None
    if "tuple" in kind:
        return tuple(float(v) for v in value.split(":"))
    if "bool" in kind:
        return value.lower() in ("1", "true", "yes")
    if "int" in kind:
        return int(value)
    if "float" in kind:
        return float(value)
    return value


@register_model("esdllm")
class ESDLLMHarnessModel(LM):
    def __init__(self, pretrained=None, executor="torch", engine=None, device="cpu", dtype=None, ops=None,
                 compile=None, chat=False, batch_size=8, **decode):
        super().__init__()
        fields = {f.name: f for f in dataclasses.fields(DecodeConfig)}
        unknown = sorted(set(decode) - set(fields) - {"max_batch_size"})
        if unknown:
            raise ValueError(f"esdllm: unknown model_args {unknown}; expected {list(_LOAD_ARGS)}, chat, "
                             f"batch_size or DecodeConfig fields")
        decode.pop("max_batch_size", None)
        self.decode = {k: _coerce(fields[k], v) for k, v in decode.items()}
        DecodeConfig(**self.decode)  # a bad setting fails here, naming itself, before any request
        import torch
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm_eval's command line asks for cuda unless told otherwise (--device cpu)
            print(f"esdllm: lm_eval asked for device {device!r}, which this machine lacks; using the CPU",
                  file=sys.stderr)
            device = "cpu"
        self.pipe = Pipeline.load(pretrained, executor=executor, engine_dir=engine, device=device, dtype=dtype,
                                  ops=ops, compile=compile)
        self.chat = chat if isinstance(chat, bool) else str(chat).lower() in ("1", "true", "yes")
        self.batch_size_per_call = int(batch_size) if str(batch_size).isdigit() else 8

    def config_for(self, gen_kwargs: dict) -> DecodeConfig:
        kw = dict(self.decode)
        block = kw.get("block_length", DecodeConfig.block_length)
        if "gen_length" not in kw:
            want = int(gen_kwargs.get("max_gen_toks", 256))
            kw["gen_length"] = -(-want // block) * block
            kw["block_length"] = min(block, kw["gen_length"])
        if gen_kwargs.get("do_sample") and "temperature" not in kw:
            kw["temperature"] = float(gen_kwargs.get("temperature", 1.0))
        return DecodeConfig(**kw)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm import tqdm
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            _, gen_kwargs = r.args
            key = tuple(sorted((k, str(v)) for k, v in gen_kwargs.items()))
            groups.setdefault(key, []).append(i)
        bar = tqdm(total=len(requests), desc="esdllm generate_until", disable=disable_tqdm, file=sys.stderr)
        for idxs in groups.values():
            gen_kwargs = dict(requests[idxs[0]].args[1])
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            cfg = self.config_for(gen_kwargs)
            idxs = sorted(idxs, key=lambda i: len(requests[i].args[0]))  # similar lengths share a batch
            for j in range(0, len(idxs), self.batch_size_per_call):
                batch = idxs[j: j + self.batch_size_per_call]
                res = self.pipe.generate([requests[i].args[0] for i in batch], cfg, chat=self.chat)
                for i, comp in zip(batch, res.completions):
                    text = comp.text
                    for stop in until:
                        if stop and stop in text:
                            text = text[: text.index(stop)]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return out

    def _refuse(self, kind: str):
        raise NotImplementedError(
            f"esdllm: {kind} tasks are not supported: a diffusion LM has no left-to-right likelihood and "
            f"LLaDA's Monte-Carlo estimate is not implemented here; use generate_until tasks (gsm8k, humaneval, ...)")

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._refuse("loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self._refuse("loglikelihood_rolling")


def main(argv: list[str]) -> int:
    """lm_eval's command line with the esdllm model registered (this module's import did it)."""
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0
