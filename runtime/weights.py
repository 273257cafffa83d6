"""Hugging Face checkpoints <-> our Transformer, by exact tensor name.

args_from_hf_config  config.json (LLaDA OLMo-style keys / Dream Qwen2 keys) -> ModelArgs
hf_config_from_args  the inverse, with the family's real key names
name_table           one explicit HF-name -> our-name table per family (research/models.md A.3, B.3)
load_model           config.json + model.safetensors (or sharded index) -> Transformer
save_model           Transformer -> config.json + safetensors in the real HF layout
make_tiny_checkpoint random-weight checkpoint in the exact HF layout, tokenizer files included
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import DTYPES, FAMILIES, ModelArgs
from .model import Transformer
from .tokenizer import build_tokenizer, special_ids_from_files

SUPPORTED_MODEL_TYPES = {"llada": "llada", "Dream": "dream"}  # config.json model_type -> family
ARCHITECTURES = {"llada": "LLaDAModelLM", "dream": "DreamModel"}
TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}  # the one name -> torch dtype map
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"

# HF name -> our name. Per-layer entries carry "{i}".
LLADA_NAMES = {
    "model.transformer.wte.weight": "tok_embeddings.weight",
    "model.transformer.blocks.{i}.attn_norm.weight": "layers.{i}.attention_norm.weight",
    "model.transformer.blocks.{i}.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.transformer.blocks.{i}.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.transformer.blocks.{i}.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.transformer.blocks.{i}.attn_out.weight": "layers.{i}.attention.wo.weight",
    "model.transformer.blocks.{i}.ff_norm.weight": "layers.{i}.ffn_norm.weight",
    "model.transformer.blocks.{i}.ff_proj.weight": "layers.{i}.feed_forward.w1.weight",  # gate (SiLU)
    "model.transformer.blocks.{i}.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
    "model.transformer.blocks.{i}.ff_out.weight": "layers.{i}.feed_forward.w2.weight",   # down
    "model.transformer.ln_f.weight": "norm.weight",
    "model.transformer.ff_out.weight": "output.weight",                                  # LM head
}
DREAM_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "layers.{i}.attention.wq.bias",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.k_proj.bias": "layers.{i}.attention.wk.bias",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.v_proj.bias": "layers.{i}.attention.wv.bias",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
FAMILY_NAMES = {"llada": LLADA_NAMES, "dream": DREAM_NAMES}


def resolve_dtype(dtype) -> torch.dtype:
    """"float32" | "bfloat16" | "float16" | torch.dtype -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in TORCH_DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; expected one of {DTYPES}")
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in TORCH_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {DTYPES}")
    return TORCH_DTYPES[name]


def _family(cfg: dict) -> str:
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {mt!r}; supported: {tuple(SUPPORTED_MODEL_TYPES)}")
    family = SUPPORTED_MODEL_TYPES[mt]
    arch = (cfg.get("architectures") or [ARCHITECTURES[family]])[0]
    if arch != ARCHITECTURES[family]:  # e.g. LLaDAMoEModelLM also says model_type "llada"
        raise ValueError(f"unsupported architecture {arch!r} for model_type {mt!r}; "
                         f"supported: {ARCHITECTURES[family]!r}")
    return family


def _require(cfg: dict, bad: dict) -> None:
    """Fail on config values this Transformer does not implement: {key: unsupported predicate}."""
    for key, is_bad in bad.items():
        if key in cfg and is_bad(cfg[key]):
            raise ValueError(f"unsupported config value {key}={cfg[key]!r}")


def _special_ids(cfg: dict, tk: dict[str, int]) -> dict:
    """mask/eos/pad/bos/eot ids: config.json first, the tokenizer's special tokens for the rest.
    An eos_token_id list (generation-config style) is [EOS, EoT, ...]."""
    for key in ("mask_token_id", "eos_token_id"):
        if cfg.get(key) is None:
            raise ValueError(f"config.json has no {key}")
    eos = cfg["eos_token_id"] if isinstance(cfg["eos_token_id"], list) else [cfg["eos_token_id"]]
    eot = tk.get("eot", eos[1] if len(eos) > 1 else None)
    bos = cfg.get("bos_token_id")
    pad = cfg.get("pad_token_id")
    return {"mask_id": cfg["mask_token_id"], "eos_id": eos[0], "pad_id": eos[0] if pad is None else pad,
            "eot_id": eot, "bos_id": tk.get("bos") if bos is None else bos}


def args_from_hf_config(cfg: dict, tokenizer_ids: dict[str, int] | None = None) -> ModelArgs:
    """ModelArgs from a checkpoint's config.json. tokenizer_ids ({"bos", "eot", ...} as from
    tokenizer.special_ids_from_files) fill the ids config.json does not carry."""
    family = _family(cfg)
    try:
        return _args(family, cfg, tokenizer_ids or {})
    except KeyError as e:
        raise ValueError(f"config.json of this {family} checkpoint has no {e.args[0]!r}") from None


def _args(family: str, cfg: dict, tk: dict[str, int]) -> ModelArgs:
    if family == "llada":
        _require(cfg, {"weight_tying": bool, "alibi": bool, "include_bias": bool, "rope": lambda v: not v,
                       "attention_layer_norm": bool, "block_type": lambda v: v != "llama",
                       "include_qkv_bias": bool, "activation_type": lambda v: v != "silu"})
        return ModelArgs(
            family="llada", vocab_size=cfg.get("embedding_size") or cfg["vocab_size"],
            dim=cfg["d_model"], n_layers=cfg["n_layers"], n_heads=cfg["n_heads"],
            n_kv_heads=cfg.get("n_kv_heads") or cfg["n_heads"],
            intermediate_size=cfg.get("mlp_hidden_size") or int(cfg["mlp_ratio"] * cfg["d_model"]),
            rope_theta=float(cfg.get("rope_theta", 10000.0)), norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            qkv_bias=False, logits_shift=0, **_special_ids(cfg, tk),
            max_seq_len=cfg.get("max_sequence_length", 4096),
            rope_full_precision=bool(cfg.get("rope_full_precision", True)))
    _require(cfg, {"tie_word_embeddings": bool, "rope_scaling": lambda v: v is not None,
                   "hidden_act": lambda v: v != "silu", "use_sliding_window": bool})
    dim, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("head_dim", dim // heads) != dim // heads:
        raise ValueError(f"unsupported config value head_dim={cfg['head_dim']!r} (hidden_size/heads = {dim // heads})")
    return ModelArgs(
        family="dream", vocab_size=cfg["vocab_size"], dim=dim, n_layers=cfg["num_hidden_layers"],
        n_heads=heads, n_kv_heads=cfg.get("num_key_value_heads", heads),
        intermediate_size=cfg["intermediate_size"], rope_theta=float(cfg.get("rope_theta", 10000.0)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), qkv_bias=True, logits_shift=1,
        **_special_ids(cfg, tk), max_seq_len=cfg.get("max_position_embeddings", 4096), rope_full_precision=False)


def hf_config_from_args(a: ModelArgs, dtype: torch.dtype) -> dict:
    """config.json for `a` with the family's real key names (inverse of args_from_hf_config)."""
    ids = {"mask_token_id": a.mask_id, "eos_token_id": a.eos_id, "pad_token_id": a.pad_id}
    if a.bos_id is not None:
        ids["bos_token_id"] = a.bos_id
    dt = str(dtype).removeprefix("torch.")
    if a.family == "llada":
        return {"architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": a.dim,
                "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
                "mlp_hidden_size": a.intermediate_size, "vocab_size": a.vocab_size,
                "embedding_size": a.vocab_size, "max_sequence_length": a.max_seq_len, "rope": True,
                "rope_theta": a.rope_theta, "rope_full_precision": a.rope_full_precision, "rms_norm_eps": a.norm_eps,
                "layer_norm_type": "rms", "activation_type": "silu", "block_type": "llama",
                "include_bias": False, "include_qkv_bias": False, "weight_tying": False,
                "alibi": False, "attention_layer_norm": False, "use_cache": False, "torch_dtype": dt, **ids}
    return {"architectures": ["DreamModel"], "model_type": "Dream", "hidden_size": a.dim,
            "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads,
            "num_key_value_heads": a.n_kv_heads, "intermediate_size": a.intermediate_size,
            "vocab_size": a.vocab_size, "max_position_embeddings": a.max_seq_len,
            "rope_theta": a.rope_theta, "rope_scaling": None, "rms_norm_eps": a.norm_eps,
            "hidden_act": "silu", "tie_word_embeddings": False, "use_sliding_window": False,
            "use_cache": False, "torch_dtype": dt, **ids}


GENERATION_CONFIG = "generation_config.json"
# Every file a checkpoint of the family needs beside its weights (Dream's own from_pretrained reads
# generation_config.json; LLaDA's save_pretrained writes one too)
FAMILY_FILES = {f: ("config.json", GENERATION_CONFIG, "tokenizer.json", "tokenizer_config.json") for f in FAMILIES}


def generation_config_from_args(a: ModelArgs) -> dict:
    """generation_config.json: the special ids, plus for Dream its DreamGenerationConfig defaults
    (diffusion_generate's own: origin remasking, 512 steps, eps 1e-3, greedy)."""
    ids = {"eos_token_id": a.eos_id, "pad_token_id": a.pad_id}
    if a.bos_id is not None:
        ids["bos_token_id"] = a.bos_id
    if a.family == "llada":
        return {"_from_model_config": True, **ids}
    return {"temperature": 0.0, "top_p": None, "top_k": None, "max_length": 20, "max_new_tokens": None,
            "eps": 1e-3, "steps": 512, "alg": "origin", "alg_temp": None, "mask_token_id": a.mask_id, **ids}


def name_table(args: ModelArgs) -> dict[str, str]:
    """HF tensor name -> our parameter name, for every tensor of a checkpoint of this shape."""
    if args.family == "llada" and args.qkv_bias:
        raise ValueError("LLaDA checkpoints carry no q/k/v biases (include_qkv_bias is unsupported)")
    names = FAMILY_NAMES[args.family]
    if not args.qkv_bias:
        names = {hf: ours for hf, ours in names.items() if not ours.endswith(".bias")}
    glob = [(hf, ours) for hf, ours in names.items() if "{i}" not in hf]
    per_layer = [(hf, ours) for hf, ours in names.items() if "{i}" in hf]
    # HF order: embedding, layer 0 .. n-1, final norm, head (shards then split like the originals)
    out = dict(glob[:1])
    for i in range(args.n_layers):
        out.update((hf.format(i=i), ours.format(i=i)) for hf, ours in per_layer)
    out.update(glob[1:])
    return out


def _read_json(f: Path, what: str) -> dict:
    if not f.is_file():
        raise FileNotFoundError(f"{what} not found: {f}")
    return json.loads(f.read_text(encoding="utf-8"))


def _tensor_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (single file or sharded index)."""
    if (path / INDEX_FILE).is_file():
        weight_map = _read_json(path / INDEX_FILE, "index")["weight_map"]
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).is_file():
                raise FileNotFoundError(f"shard {shard} named in {INDEX_FILE} is missing from {path}")
        return {name: path / shard for name, shard in weight_map.items()}
    if (path / SINGLE_FILE).is_file():
        with safe_open(str(path / SINGLE_FILE), framework="pt") as f:
            return {name: path / SINGLE_FILE for name in f.keys()}
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")


def load_model(path, dtype=None, device="cpu", ops: str | None = None) -> Transformer:
    """Load a Hugging Face LLaDA / Dream checkpoint directory into our Transformer (eval mode).

    dtype None: the checkpoint's torch_dtype (float32 when absent). Every tensor is matched by its
    exact HF name; a missing, unexpected or mis-shaped tensor is an error naming it. ops: the op
    backend, "reference" or "custom" (None: the device's default, plugins/backends.for_device).
    """
    from ..plugins.backends import by_name, for_device
    backend = for_device(device) if ops is None else by_name(ops)
    path = Path(path)
    cfg = _read_json(path / "config.json", "config.json")
    family = _family(cfg)
    args = args_from_hf_config(cfg, special_ids_from_files(path, family))
    dtype = resolve_dtype(dtype if dtype is not None else cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    table = name_table(args)
    files = _tensor_files(path)
    # Rotary inv_freq buffers appear in some old Qwen2-style exports; they are recomputed, not loaded.
    present = {n for n in files if not n.endswith("rotary_emb.inv_freq")}
    missing = [n for n in table if n not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"checkpoint {path} is missing tensor {missing[0]!r}{more}")
    unexpected = sorted(present - table.keys())
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ValueError(f"checkpoint {path} has unexpected tensor {unexpected[0]!r}{more}")
    with torch.device("meta"):  # no allocation: real tensors are assigned below
        model = Transformer(args, ops=backend)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    by_file = {f: [n for n in table if files[n] == f] for f in sorted(set(files.values()))}
    for file, names in by_file.items():  # headers only: fail before reading gigabytes
        with safe_open(str(file), framework="pt") as f:
            held = set(f.keys())
            for hf in names:
                if hf not in held:  # an index can name a shard that does not hold the tensor
                    raise ValueError(f"tensor {hf!r} is listed in {INDEX_FILE} but absent from {file.name}")
                got, want = list(f.get_slice(hf).get_shape()), list(expected[table[hf]])
                if got != want:
                    raise ValueError(f"tensor {hf!r} has shape {got}, expected {want}")
    state = {}
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for hf in names:
                state[table[hf]] = f.get_tensor(hf).to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _plan_shards(sizes: list[int], shard_size: int | None, num_shards: int | None) -> list[int]:
    """Shard index per tensor, in order. shard_size: greedy, a new shard when adding a tensor would
    pass it. num_shards: contiguous runs of about equal bytes (fewer when one tensor dominates)."""
    if num_shards is not None:
        total, cum, raw = sum(sizes), 0, []
        for s in sizes:  # a tensor goes to the shard holding its middle byte
            raw.append(min(num_shards - 1, (2 * cum + s) * num_shards // (2 * total)))
            cum += s
        renum = {r: i for i, r in enumerate(sorted(set(raw)))}  # drop empty shards
        return [renum[r] for r in raw]
    out, cur, used = [], 0, 0
    for s in sizes:
        if used and used + s > shard_size:
            cur, used = cur + 1, 0
        out.append(cur)
        used += s
    return out


def save_model(model: Transformer, path, dtype=None, shard_size: int | None = None,
               num_shards: int | None = None) -> Path:
    """Write `model` as a Hugging Face checkpoint: config.json + safetensors with the HF names.

    dtype None keeps the model's dtype. shard_size (bytes, greedy) or num_shards (balanced) splits
    the weights into model-0000k-of-0000n.safetensors plus model.safetensors.index.json. Tokenizer files are not
    written here (see tokenizer.build_tokenizer). Returns the directory.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = resolve_dtype(dtype) if dtype is not None else model.dtype
    sd = model.state_dict()
    table = name_table(model.args)
    tensors = {hf: sd[ours].detach().to("cpu", dtype).contiguous() for hf, ours in table.items()}
    (path / "config.json").write_text(json.dumps(hf_config_from_args(model.args, dtype), indent=2) + "\n", encoding="utf-8")
    (path / GENERATION_CONFIG).write_text(json.dumps(generation_config_from_args(model.args), indent=2) + "\n",
                                          encoding="utf-8")
    for stale in [path / SINGLE_FILE, path / INDEX_FILE, *path.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)  # a re-save must not leave the other layout behind
    meta = {"format": "pt"}
    if shard_size is not None and num_shards is not None:
        raise ValueError("give shard_size or num_shards, not both")
    if (shard_size is not None and shard_size <= 0) or (num_shards is not None and num_shards <= 0):
        raise ValueError(f"shard_size and num_shards must be positive, got {shard_size}, {num_shards}")
    if shard_size is None and num_shards is None:
        save_file(tensors, str(path / SINGLE_FILE), metadata=meta)
        return path
    names = list(tensors)
    sizes = [tensors[n].numel() * tensors[n].element_size() for n in names]
    plan = _plan_shards(sizes, shard_size, num_shards)
    n_shards = plan[-1] + 1
    weight_map = {}
    for s in range(n_shards):
        fname = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n] for n, p in zip(names, plan) if p == s}
        save_file(part, str(path / fname), metadata=meta)
        weight_map.update({n: fname for n in part})
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return path


def make_tiny_checkpoint(family: str, out, layers: int = 2, hidden: int = 64, heads: int = 4,
                         kv_heads: int | None = None, intermediate: int = 128, seed: int = 0,
                         dtype="float32", shards: int | None = None, vocab_size: int = 512,
                         alphabet: str | None = None) -> Path:
    """Random-weight checkpoint of `family` in the exact HF layout: tokenizer files, config.json,
    model.safetensors (or `shards` shards + index). kv_heads default: heads (LLaDA), 2 (Dream).

    Embedding rows are the tokenizer's ids rounded up to a multiple of 64, like the real padded
    vocabularies. Norm weights and biases are random too, so a swapped name cannot pass unseen.
    """
    out = Path(out)
    ids = build_tokenizer(family, out, vocab_size=vocab_size, alphabet=alphabet)
    if kv_heads is None:
        kv_heads = heads if family == "llada" else min(2, heads)
    args = ModelArgs(
        family=family, vocab_size=64 * math.ceil(ids.n_tokens / 64), dim=hidden, n_layers=layers,
        n_heads=heads, n_kv_heads=kv_heads, intermediate_size=intermediate,
        rope_theta=500000.0 if family == "llada" else 1000000.0,
        norm_eps=1e-5 if family == "llada" else 1e-6, qkv_bias=family == "dream",
        logits_shift=0 if family == "llada" else 1, mask_id=ids.mask_id, eos_id=ids.eos_id,
        pad_id=ids.pad_id, eot_id=ids.eot_id, bos_id=ids.bos_id, max_seq_len=4096,
        rope_full_precision=family == "llada")
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return save_model(model, out, dtype=dtype, num_shards=shards if shards and shards > 1 else None)
