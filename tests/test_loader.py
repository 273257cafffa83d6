"""Checkpoint loading and tokenizer files: exact HF names and shapes, round trips, shards, dtypes,
every loader error, the families' special tokens and chat templates (research/models.md A.2-A.6,
B.2-B.6)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from esdllm.runtime.model import Transformer
from esdllm.runtime.tokenizer import (build_tokenizer, decode_completion, encode_prompt,
                                      load_tokenizer, stop_ids)
from esdllm.runtime.weights import (args_from_hf_config, load_model, make_tiny_checkpoint,
                                    name_table, save_model)

FAMILIES = ["llada", "dream"]


def _state_equal(a: Transformer, b: Transformer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _copy(ckpt, tmp_path):
    return shutil.copytree(ckpt, tmp_path / "ckpt")


# ---- names, shapes, round trips ------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_name_table_covers_every_parameter(family, tiny_args):
    args = tiny_args(family)
    table = name_table(args)
    assert sorted(table.values()) == sorted(Transformer(args).state_dict())
    layer0 = {k for k in table if ".0." in k}
    if family == "llada":  # A.3, written out: gate is ff_proj, block ff_out is down, no biases
        assert layer0 == {f"model.transformer.blocks.0.{n}.weight" for n in
                          ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm",
                           "ff_proj", "up_proj", "ff_out")}
        assert table["model.transformer.blocks.0.ff_proj.weight"] == "layers.0.feed_forward.w1.weight"
        assert table["model.transformer.ff_out.weight"] == "output.weight"
    else:  # B.3
        assert layer0 == {f"model.layers.0.{n}" for n in (
            "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight",
            "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
            *(f"self_attn.{p}_proj.{t}" for p in "qkv" for t in ("weight", "bias")))}
        assert table["lm_head.weight"] == "output.weight"


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_tensors_land_on_the_named_parameters(family, request):
    ckpt = request.getfixturevalue(f"{family}_ckpt")
    raw = load_file(str(ckpt / "model.safetensors"))
    model = load_model(ckpt)
    ff = model.layers[1].feed_forward
    if family == "llada":
        assert torch.equal(raw["model.transformer.blocks.1.ff_proj.weight"], ff.w1.weight)
        assert torch.equal(raw["model.transformer.blocks.1.ff_out.weight"], ff.w2.weight)
        assert torch.equal(raw["model.transformer.ff_out.weight"], model.output.weight)
    else:
        assert torch.equal(raw["model.layers.1.mlp.gate_proj.weight"], ff.w1.weight)
        assert torch.equal(raw["model.layers.1.self_attn.k_proj.bias"], model.layers[1].attention.wk.bias)
        assert raw["model.layers.1.self_attn.k_proj.weight"].shape == (2 * 16, 64)  # GQA: 2 KV heads
    assert sorted(raw) == sorted(name_table(model.args))


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, request, tmp_path):
    ckpt = request.getfixturevalue(f"{family}_ckpt")
    model = load_model(ckpt)
    save_model(model, tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ckpt / f, tmp_path / f)
    again = load_model(tmp_path)
    assert again.args == model.args
    _state_equal(model, again)
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads((ckpt / "config.json").read_text())


def test_real_8b_configs_map_to_the_published_shapes():
    llada = {"architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": 4096, "n_layers": 32,
             "n_heads": 32, "n_kv_heads": 32, "mlp_hidden_size": 12288, "vocab_size": 126464,
             "embedding_size": 126464, "max_sequence_length": 4096, "rope_theta": 500000.0,
             "rms_norm_eps": 1e-5, "include_qkv_bias": False, "weight_tying": False,
             "mask_token_id": 126336, "eos_token_id": 126081, "pad_token_id": 126081}
    a = args_from_hf_config(llada, {"eot": 126348, "bos": 126080})
    assert (a.head_dim, a.n_kv_heads, a.vocab_size, a.mask_id, a.eot_id, a.bos_id) == (128, 32, 126464, 126336, 126348, 126080)
    assert (a.logits_shift, a.qkv_bias, a.rope_full_precision) == (0, False, True)
    dream = {"architectures": ["DreamModel"], "model_type": "Dream", "hidden_size": 3584,
             "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
             "intermediate_size": 18944, "vocab_size": 152064, "rope_theta": 1000000.0,
             "rms_norm_eps": 1e-6, "max_position_embeddings": 131072, "mask_token_id": 151666,
             "eos_token_id": 151643, "pad_token_id": 151643, "tie_word_embeddings": False}
    d = args_from_hf_config(dream, {"eot": 151645})
    assert (d.head_dim, d.n_kv_heads, d.logits_shift, d.qkv_bias, d.rope_full_precision) == (128, 4, 1, True, False)
    assert (d.mask_id, d.eos_id, d.eot_id) == (151666, 151643, 151645)
    with pytest.raises(ValueError, match="has no 'd_model'"):
        args_from_hf_config({k: v for k, v in llada.items() if k != "d_model"})
    with pytest.raises(ValueError, match="weight_tying"):
        args_from_hf_config({**llada, "weight_tying": True})
    with pytest.raises(ValueError, match="LLaDAMoEModelLM"):
        args_from_hf_config({**llada, "architectures": ["LLaDAMoEModelLM"]})


def test_sharded_checkpoint_loads_like_single_file(llada_ckpt, tmp_path):
    sharded = make_tiny_checkpoint("llada", tmp_path / "sharded", shards=3)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert not (sharded / "model.safetensors").exists()
    _state_equal(load_model(sharded), load_model(llada_ckpt))
    # greedy byte-size sharding through save_model as well
    model = load_model(llada_ckpt)
    save_model(model, tmp_path / "by_size", shard_size=64 * 64 * 4)
    assert len(set(json.loads((tmp_path / "by_size" / "model.safetensors.index.json").read_text())["weight_map"].values())) > 3
    _state_equal(load_model(tmp_path / "by_size"), model)


def test_dtype_loading(dream_ckpt, tmp_path):
    ref = load_model(dream_ckpt)
    assert ref.dtype == torch.float32  # torch_dtype of the checkpoint
    bf = load_model(dream_ckpt, dtype="bfloat16")
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16}
    assert torch.equal(bf.layers[0].attention.wq.bias, ref.layers[0].attention.wq.bias.bfloat16())
    assert load_model(dream_ckpt, dtype=torch.float16).dtype == torch.float16
    save_model(ref, tmp_path, dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_model(tmp_path).dtype == torch.bfloat16  # dtype=None follows torch_dtype
    with pytest.raises(ValueError, match="int8"):
        load_model(dream_ckpt, dtype="int8")


# ---- loader errors ---------------------------------------------------------------------------

def _rewrite(ckpt, fn):
    f = ckpt / "model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f))


def test_missing_tensor_is_named(llada_ckpt, tmp_path):
    ckpt = _copy(llada_ckpt, tmp_path)
    _rewrite(ckpt, lambda t: t.pop("model.transformer.blocks.1.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.transformer\.blocks\.1\.up_proj\.weight'"):
        load_model(ckpt)


def test_unexpected_tensor_is_named(dream_ckpt, tmp_path):
    ckpt = _copy(dream_ckpt, tmp_path)
    _rewrite(ckpt, lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.o_proj\.bias'"):
        load_model(ckpt)


def test_misshaped_tensor_is_named_with_shapes(dream_ckpt, tmp_path):
    ckpt = _copy(dream_ckpt, tmp_path)
    _rewrite(ckpt, lambda t: t.update({"model.layers.1.self_attn.k_proj.weight": torch.zeros(64, 64)}))
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.self_attn\.k_proj\.weight' has shape \[64, 64\], expected \[32, 64\]"):
        load_model(ckpt)


def test_unknown_model_type(llada_ckpt, tmp_path):
    ckpt = _copy(llada_ckpt, tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"'gpt2'.*'llada', 'Dream'"):
        load_model(ckpt)


def test_missing_files_are_named(llada_ckpt, tmp_path):
    ckpt = _copy(llada_ckpt, tmp_path)
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(ckpt)
    sharded = make_tiny_checkpoint("llada", tmp_path / "sharded", shards=2)
    index_file = sharded / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.transformer.ln_f.weight"] = "model-00001-of-00002.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"'model\.transformer\.ln_f\.weight' is listed in .* absent from model-00001"):
        load_model(sharded)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_model(sharded)
    (sharded / "model.safetensors.index.json").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(sharded)
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(ckpt)


# ---- tokenizers ------------------------------------------------------------------------------

LLADA_CHAT = ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n")
DREAM_CHAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
              "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_specials_and_chat_template(family, request):
    ckpt = request.getfixturevalue(f"{family}_ckpt")
    tok, args = load_tokenizer(ckpt), load_model(ckpt).args
    ids = tok.convert_tokens_to_ids
    if family == "llada":
        assert [ids(t) for t in ("<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|eot_id|>")] == \
               [args.bos_id, args.eos_id, args.mask_id, args.eot_id]
        assert ids("<|end_header_id|>") == ids("<|start_header_id|>") + 1 == args.eot_id - 1
        expected = LLADA_CHAT
        assert tok("hi")["input_ids"][0] == args.bos_id  # plain encodes get BOS
    else:
        assert [ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>")] == \
               [args.eos_id, args.eot_id - 1, args.eot_id, args.bos_id, args.mask_id]
        assert tok.mask_token_id == args.mask_id
        expected = DREAM_CHAT
        assert args.bos_id not in tok("hi")["input_ids"]  # Dream adds no BOS
    assert args.pad_id == args.eos_id == tok.pad_token_id
    assert args.vocab_size >= len(tok) and args.vocab_size % 64 == 0
    rendered = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                       add_generation_prompt=True, tokenize=False)
    assert rendered == expected
    prompt = encode_prompt(tok, "What is 2+2?", chat=True, max_len=None)
    assert tok.decode(prompt) == expected
    assert prompt.count(args.bos_id) == (1 if family == "llada" else 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_stop_ids_and_completion_cut(family, request):
    ckpt = request.getfixturevalue(f"{family}_ckpt")
    tok, args = load_tokenizer(ckpt), load_model(ckpt).args
    stop = stop_ids(tok, args)
    assert stop == {args.eos_id, args.eot_id}
    body = tok("the answer is 42", add_special_tokens=False)["input_ids"]
    text, kept = decode_completion(tok, body + [args.eot_id] + [args.eos_id] * 3, stop)
    assert (text, kept) == ("the answer is 42", body)
    assert decode_completion(tok, body, stop) == ("the answer is 42", body)


def test_prompt_errors(llada_ckpt):
    tok = load_tokenizer(llada_ckpt)
    n = len(encode_prompt(tok, "hello there, diffusion", chat=False))
    assert encode_prompt(tok, "hello there, diffusion", chat=False, max_len=n)
    with pytest.raises(ValueError, match=rf"{n} tokens.* {n - 1}"):
        encode_prompt(tok, "hello there, diffusion", chat=False, max_len=n - 1)
    with pytest.raises(ValueError, match="empty prompt"):
        encode_prompt(tok, "  ", chat=True)


def test_remote_code_auto_maps_load_without_trust(dream_ckpt, tmp_path, capfd):
    """Real checkpoints name remote classes through auto_map (config: DreamModel; tokenizer:
    DreamTokenizer); we load the files as they are, with no remote code and no stdin prompt."""
    ckpt = _copy(dream_ckpt, tmp_path)
    model_cfg = json.loads((ckpt / "config.json").read_text())
    model_cfg["auto_map"] = {"AutoConfig": "configuration_dream.DreamConfig",
                             "AutoModel": "modeling_dream.DreamModel"}
    (ckpt / "config.json").write_text(json.dumps(model_cfg))
    assert encode_prompt(load_tokenizer(ckpt), "hi", chat=False)
    # no interactive "run the custom code? [y/N]" prompt (a log line about auto_map is fine)
    assert "[y/N]" not in "".join(capfd.readouterr())
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_class="DreamTokenizer",
               auto_map={"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]})
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(ckpt)
    assert tok.decode(encode_prompt(tok, "What is 2+2?", chat=True)) == DREAM_CHAT


def test_char_level_tokenizer(tmp_path):
    ids = build_tokenizer("dream", tmp_path, alphabet="0123456789+=")
    tok = load_tokenizer(tmp_path)
    enc = tok("12+30=42", add_special_tokens=False)["input_ids"]
    assert len(enc) == 8 and max(enc) < ids.mask_id
    assert tok.decode(enc) == "12+30=42"
    assert tok.decode(encode_prompt(tok, "1+1=", chat=True)) == DREAM_CHAT.replace("What is 2+2?", "1+1=")
    assert ids.n_tokens == len(tok)


def test_make_tiny_checkpoint_script(tmp_path):
    import runpy
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_tiny_checkpoint.py"
    argv = sys.argv
    sys.argv = [str(script), "--family", "dream", "--out", str(tmp_path), "--layers", "1", "--shards", "2"]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    model = load_model(tmp_path)
    assert (model.args.n_layers, model.args.n_kv_heads) == (1, 2)
    assert (tmp_path / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_saved_checkpoints_carry_the_family_file_set(tmp_path, family):
    """generation_config.json too: Dream's own from_pretrained reads it (research/models.md B.1)."""
    from transformers import GenerationConfig

    from esdllm.runtime.weights import FAMILY_FILES, make_tiny_checkpoint
    d = make_tiny_checkpoint(family, tmp_path / family)
    assert set(FAMILY_FILES[family]) <= {f.name for f in d.iterdir()}
    gc = GenerationConfig.from_pretrained(str(d))
    args = load_model(d).args
    assert gc.eos_token_id == args.eos_id and gc.pad_token_id == args.pad_id
    if family == "dream":
        assert gc.mask_token_id == args.mask_id and gc.alg == "origin"
