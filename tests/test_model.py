"""Our Transformer against an independent float64 re-statement of each family's HF forward
(research/models.md A.4-A.5, B.4-B.5), computed straight from the checkpoint's HF tensors:
explicit per-head attention loops, rotate_half RoPE, RMSNorm, SwiGLU, Dream GQA + q/k/v biases and
Dream's one-position logit shift. Also Transformer.step on a subset of rows against a full pass."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from esdllm.runtime.weights import load_model

# The HF names, written out here on purpose (not taken from the loader's table).
LLADA = dict(emb="model.transformer.wte.weight", norm="model.transformer.ln_f.weight",
             head="model.transformer.ff_out.weight", layer="model.transformer.blocks.{}.",
             attn_norm="attn_norm.weight", q="q_proj", k="k_proj", v="v_proj", o="attn_out.weight",
             ffn_norm="ff_norm.weight", gate="ff_proj.weight", up="up_proj.weight", down="ff_out.weight")
DREAM = dict(emb="model.embed_tokens.weight", norm="model.norm.weight", head="lm_head.weight",
             layer="model.layers.{}.", attn_norm="input_layernorm.weight", q="self_attn.q_proj",
             k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj.weight",
             ffn_norm="post_attention_layernorm.weight", gate="mlp.gate_proj.weight",
             up="mlp.up_proj.weight", down="mlp.down_proj.weight")


def rms_norm(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def reference_logits(ckpt, ids, pads):
    """ids: [B, L] left-padded; pads: list of pad lengths. Returns float64 logits [B, L, V] with the
    HF conventions: LLaDA positions 0..L-1 and a key padding mask; Dream positions cumsum(mask) - 1
    (pads at 1), valid keys only, logits shifted right by one."""
    cfg = json.loads((ckpt / "config.json").read_text())
    W = {k: v.double() for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    dream = cfg["model_type"] == "Dream"
    N = DREAM if dream else LLADA
    if dream:
        dim, n_layers, H, Hkv = (cfg[k] for k in ("hidden_size", "num_hidden_layers",
                                                 "num_attention_heads", "num_key_value_heads"))
    else:
        dim, n_layers, H, Hkv = (cfg[k] for k in ("d_model", "n_layers", "n_heads", "n_kv_heads"))
    eps, theta, hd = cfg["rms_norm_eps"], cfg["rope_theta"], dim // H
    B, L = ids.shape
    valid = torch.arange(L)[None, :] >= torch.tensor(pads)[:, None]             # [B, L]
    if dream:
        pos = (valid.long().cumsum(1) - 1).masked_fill(~valid, 1)
    else:
        pos = torch.arange(L).expand(B, L)
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = pos.double()[..., None] * inv
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()  # [B, L, hd]

    def proj(x, name):
        y = x @ W[name + ".weight"].T
        return y + W[name + ".bias"] if dream else y

    x = W[N["emb"]][ids]
    for i in range(n_layers):
        p = N["layer"].format(i)
        h = rms_norm(x, W[p + N["attn_norm"]], eps)
        q = proj(h, p + N["q"]).view(B, L, H, hd)
        k = proj(h, p + N["k"]).view(B, L, Hkv, hd)
        v = proj(h, p + N["v"]).view(B, L, Hkv, hd)
        q = q * cos[:, :, None] + rotate_half(q) * sin[:, :, None]
        k = k * cos[:, :, None] + rotate_half(k) * sin[:, :, None]
        out = torch.zeros(B, L, H, hd, dtype=torch.float64)
        for b in range(B):
            for head in range(H):
                kv = head // (H // Hkv)
                s = q[b, :, head] @ k[b, :, kv].T / math.sqrt(hd)
                s = s.masked_fill(~valid[b][None, :], float("-inf"))
                out[b, :, head] = torch.softmax(s, -1) @ v[b, :, kv]
        x = x + out.reshape(B, L, H * hd) @ W[p + N["o"]].T
        h = rms_norm(x, W[p + N["ffn_norm"]], eps)
        g, u = h @ W[p + N["gate"]].T, h @ W[p + N["up"]].T
        x = x + (g * torch.sigmoid(g) * u) @ W[p + N["down"]].T
    logits = rms_norm(x, W[N["norm"]], eps) @ W[N["head"]].T
    if dream:
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    return logits


def _batch(model, pads, L=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.args.vocab_size, (len(pads), L), generator=g)
    for b, p in enumerate(pads):
        ids[b, :p] = model.args.pad_id
    mask = (torch.arange(L)[None, :] >= torch.tensor(pads)[:, None]).long()
    return ids, mask


def _compared_rows(pads, L, shift):
    """Rows whose logits come from a real token's hidden state (a pad row's position is a
    convention that differs between the references and us)."""
    src = torch.arange(L)[None, :] - shift
    src = src.clamp_min(0)
    return src >= torch.tensor(pads)[:, None]


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("pads", [[0, 0], [0, 5]])
def test_forward_matches_reference(family, pads, request):
    ckpt = request.getfixturevalue(f"{family}_ckpt")
    model = load_model(ckpt)
    ids, mask = _batch(model, pads)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask if any(pads) else None)
    ref = reference_logits(ckpt, ids, pads)
    rows = _compared_rows(pads, ids.shape[1], model.args.logits_shift)
    assert ours.shape == ref.shape
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours[rows].double(), ref[rows], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_padded_row_equals_unpadded_run(family, request):
    """Left padding with true positions: a prompt's logits do not depend on its batch-mates."""
    model = load_model(request.getfixturevalue(f"{family}_ckpt"))
    ids, mask = _batch(model, [0, 4], L=10, seed=1)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        alone = model(ids[1:, 4:])
    shift = model.args.logits_shift  # Dream: the first real row's logits come from a pad row
    torch.testing.assert_close(batched[1, 4 + shift:], alone[0, shift:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_step_subset_matches_full_pass(family, request):
    model = load_model(request.getfixturevalue(f"{family}_ckpt"))
    pads, L = [0, 3], 12
    ids, _ = _batch(model, pads, L=L, seed=2)
    cache = model.new_cache(len(pads), L)
    cache.set_layout(torch.tensor(pads))
    with torch.no_grad():
        full, pred = model.step(ids, torch.arange(L).expand(2, L), cache)
        # Row 1's last entry is padding aimed at the trash slot: it must not disturb the others.
        rows = torch.tensor([[2, 7, 11], [5, 9, cache.trash]])
        toks = torch.where(rows < L, ids.gather(1, rows.clamp_max(L - 1)), model.args.pad_id)
        sub, sub_pred = model.step(toks, rows, cache)
    shift = model.args.logits_shift
    assert torch.equal(pred[0], torch.arange(L) + shift)
    assert torch.equal(sub_pred, rows + shift)
    real = rows < L
    expect = full.gather(1, rows.clamp_max(L - 1)[..., None].expand(-1, -1, full.shape[-1]))
    torch.testing.assert_close(sub[real], expect[real], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # and both agree with the HF-style forward, shift included
        hf = model(ids, attention_mask=(torch.arange(L)[None] >= torch.tensor(pads)[:, None]).long())
    torch.testing.assert_close(full[:, : L - shift], hf[:, shift:], atol=1e-5, rtol=1e-5)
