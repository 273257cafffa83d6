"""OpenAI Triton kernels for the three esdllm ops, with wrappers that take plugins/ops.py's signatures.

token_gather      two launches: per-row variation (parallel over rows), then top-k selection fused with
                  the row gather and the per-row keep mask (parallel over feature slices; each program
                  re-derives the selection)
partial_attention flash-style online softmax of the rows' queries over the whole cached canvas (fresh
                  rows were merged into the cache before); GQA; key padding mask
cache_merge       in-place scatter of rows by slot along dim 1 ([B, S, d]) or dim 2 ([B, H, S, hd]);
                  _cache_merge_aot is the same body behind TensorRT's AOT launcher (trt_plugins.py)

Triton is optional: without it this module still imports and a wrapper raises ImportError. Import it
lazily, after TRITON_INTERPRET is set when the CPU interpreter is wanted: triton fixes the mode of
its own library functions (tl.sum, ...) at its first import, and the kernels here are jitted then.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels stay plain functions; every wrapper says what is missing
    triton = tl = None


def available() -> bool:
    """True when triton is installed (kernels still need CUDA tensors or TRITON_INTERPRET=1)."""
    return triton is not None


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


def _need_triton() -> None:
    if triton is None:
        raise ImportError("esdllm.plugins.kernels needs the `triton` package (pip install 'esdllm[kernels]')")


def _interpreting() -> bool:
    return triton is not None and bool(triton.knobs.runtime.interpret)


def _on(t: Tensor):
    """Context that makes t's GPU current: triton launches on the current device, not the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(x)))


# ---------------------------------------------------------------------------------------------
# token_gather
# ---------------------------------------------------------------------------------------------

@_jit
def _variation_kernel(H, P, VAR, N, D, sh_b, sh_n, sh_d, sp_b, sp_n, sp_d, d_f, sqrt_d,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """VAR[b, i] = mean_d |h - p| / (||p||_2 / sqrt(d) + 1e-6), unnormalised; one row block per program."""
    b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_in = rows < N
    sad = tl.zeros([BLOCK_R], dtype=tl.float32)
    ssq = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = r_in[:, None] & (cols < D)[None, :]
        # upcast right after the load: fp32 math everywhere (and bf16 math is wrong in the interpreter)
        h = tl.load(H + b * sh_b + rows[:, None] * sh_n + cols[None, :] * sh_d, mask=m, other=0).to(tl.float32)
        p = tl.load(P + b * sp_b + rows[:, None] * sp_n + cols[None, :] * sp_d, mask=m, other=0).to(tl.float32)
        sad += tl.sum(tl.abs(h - p), axis=1)
        ssq += tl.sum(p * p, axis=1)
    # IEEE-rounded sqrt/div (the GPU defaults are approximate) so scores track torch's to the last bits
    var = tl.div_rn(tl.div_rn(sad, d_f), tl.div_rn(tl.sqrt_rn(ssq), sqrt_d) + 1e-6)
    tl.store(VAR + b * N + rows, var, mask=r_in)


@_jit
def _select_gather_kernel(VAR, CONF, BONUS, MASK, H, SEL, KEPT, N, D, K, alpha, one_minus_alpha,
                          sh_b, sh_n, sh_d, sk_b, sk_n, sk_d,
                          BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """Top-k of the importance score per batch row, gathering one feature slice of the kept rows.

    rank_i = #{j : s_j > s_i} + #{j < i : s_j == s_i} is i's place in a stable descending sort, so
    keep = rank < K; the output slot of a kept row is the number of kept rows before it (ascending),
    and SEL holds N there when MASK[b, rank] is False (dropped by the entry's own keep count).
    Every program of a batch row derives the same selection (O(n^2) compares, cheap for n of a few
    hundred); the d-slice-0 program writes SEL.
    """
    b = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    c_in = cols < D
    # per-row normaliser: divide by max(max_j var_j, 1), exactly as ops.importance
    vmax = tl.full([BLOCK_J], 1.0, dtype=tl.float32)
    for j0 in range(0, N, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        vmax = tl.maximum(vmax, tl.load(VAR + b * N + j, mask=j < N, other=1.0))
    denom = tl.max(vmax, axis=0)
    base = 0
    for i0 in range(0, N, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        i_in = i < N
        # same expression order as ops.importance: (alpha*c + (1-alpha)*var) + bonus
        s_i = (alpha * tl.load(CONF + b * N + i, mask=i_in, other=0).to(tl.float32)
               + one_minus_alpha * tl.div_rn(tl.load(VAR + b * N + i, mask=i_in, other=0), denom)) \
            + tl.load(BONUS + b * N + i, mask=i_in, other=0).to(tl.float32)
        rank = tl.zeros([BLOCK_I], dtype=tl.int32)
        for j0 in range(0, N, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            j_in = j < N
            s_j = (alpha * tl.load(CONF + b * N + j, mask=j_in, other=0).to(tl.float32)
                   + one_minus_alpha * tl.div_rn(tl.load(VAR + b * N + j, mask=j_in, other=0), denom)) \
                + tl.load(BONUS + b * N + j, mask=j_in, other=0).to(tl.float32)
            beats = (s_j[None, :] > s_i[:, None]) | ((s_j[None, :] == s_i[:, None]) & (j[None, :] < i[:, None]))
            rank += tl.sum((beats & j_in[None, :]).to(tl.int32), axis=1)
        keep = (rank < K) & i_in
        keep_i = keep.to(tl.int32)
        pos = base + tl.cumsum(keep_i, axis=0) - 1
        pos = tl.where(keep, pos, 0)
        if pid_d == 0:
            own = tl.load(MASK + b * K + rank, mask=keep, other=0) != 0
            tl.store(SEL + b * K + pos, tl.where(own, i, N).to(tl.int64), mask=keep)
        m = keep[:, None] & c_in[None, :]
        rows = tl.load(H + b * sh_b + i[:, None] * sh_n + cols[None, :] * sh_d, mask=m, other=0)
        tl.store(KEPT + b * sk_b + pos[:, None] * sk_n + cols[None, :] * sk_d, rows, mask=m)
        base += tl.sum(keep_i, axis=0)


def token_gather(hidden: Tensor, prev_hidden: Tensor, confidence: Tensor, bonus: Tensor, keep_mask: Tensor,
                 alpha: float) -> tuple[Tensor, Tensor]:
    """Kernel twin of ops.token_gather: sel [B, k] int64 ascending (n where dropped), kept [B, k, d].

    hidden, prev_hidden: [B, n, d]; confidence, bonus: [B, n]; keep_mask: [B, k] bool. Scores are fp32
    as in ops.importance; they can differ from the reference in the last bit (reduction order), which
    only matters for near-ties closer than that.
    """
    _need_triton()
    if hidden.dim() != 3 or prev_hidden.shape != hidden.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and prev_hidden {tuple(prev_hidden.shape)} "
                         "must both be [B, n, d]")
    B, n, d = hidden.shape
    if confidence.shape != (B, n) or bonus.shape != (B, n):
        raise ValueError(f"confidence {tuple(confidence.shape)} and bonus {tuple(bonus.shape)} must be [{B}, {n}]")
    if keep_mask.dim() != 2 or keep_mask.shape[0] != B or keep_mask.shape[1] > n:
        raise ValueError(f"keep_mask {tuple(keep_mask.shape)} must be [{B}, k] with k <= n = {n}")
    k = keep_mask.shape[1]
    sel = torch.empty(B, k, dtype=torch.int64, device=hidden.device)
    kept = torch.empty(B, k, d, dtype=hidden.dtype, device=hidden.device)
    if B == 0 or k == 0 or d == 0:
        return sel, kept
    var = torch.empty(B, n, dtype=torch.float32, device=hidden.device)
    block_r = min(_pow2(n), 32)
    block_d = min(_pow2(d), 128)
    block = min(_pow2(n), 64)
    with _on(hidden):
        _variation_kernel[(B, triton.cdiv(n, block_r))](
            hidden, prev_hidden, var, n, d, *hidden.stride(), *prev_hidden.stride(), float(d), math.sqrt(d),
            BLOCK_R=block_r, BLOCK_D=block_d)
        # alpha and 1 - alpha both rounded from float64, as torch does with the Python scalars
        _select_gather_kernel[(B, triton.cdiv(d, block_d))](
            var, confidence.contiguous(), bonus.contiguous(), keep_mask.contiguous().to(torch.uint8), hidden,
            sel, kept, n, d, k, float(alpha), 1.0 - float(alpha), *hidden.stride(), *kept.stride(),
            BLOCK_I=block, BLOCK_J=block, BLOCK_D=block_d)
    return sel, kept


# ---------------------------------------------------------------------------------------------
# partial_attention
# ---------------------------------------------------------------------------------------------

@_jit
def _attention_kernel(Q, KC, VC, VALID, O,
                      sq_b, sq_h, sq_n, sq_d, skc_b, skc_h, skc_s, skc_d, svc_b, svc_h, svc_s, svc_d,
                      so_b, so_h, so_n, so_d, H, N, S, HD, qk_scale,
                      GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr):
    """One block of query rows of one head against all S slots; fp32 softmax statistics and accumulator."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP  # GQA: query head h reads kv head h // (H / Hkv), like SDPA's enable_gqa
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < N
    d_in = offs_d < HD
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :] * sq_d,
                mask=m_in[:, None] & d_in[None, :], other=0)
    if DOT_FP32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, S, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_in = offs_n < S
        md = n_in[:, None] & d_in[None, :]
        k = tl.load(KC + b * skc_b + hk * skc_h + offs_n[:, None] * skc_s + offs_d[None, :] * skc_d,
                    mask=md, other=0)
        v = tl.load(VC + b * svc_b + hk * svc_h + offs_n[:, None] * svc_s + offs_d[None, :] * svc_d,
                    mask=md, other=0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        valid = tl.load(VALID + b * S + offs_n, mask=n_in, other=0) != 0
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # rows whose keys so far are all masked keep m = -inf; shift by 0 instead so exp2 gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        corr = tl.exp2(m_i - m_safe)
        l_i = l_i * corr + tl.sum(p, axis=1)
        if DOT_FP32:
            acc = acc * corr[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a row with no valid key gets zeros
    tl.store(O + b * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :] * so_d, out,
             mask=m_in[:, None] & d_in[None, :])


def partial_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_valid: Tensor) -> Tensor:
    """Kernel twin of ops.partial_attention.

    q: [B, H, n, hd]; k_cache, v_cache: [B, Hkv, S, hd]; key_valid: [B, S] bool. Returns [B, H, n, hd]
    in q's dtype. Scale 1/sqrt(hd). A query row with no valid key returns zeros.
    """
    _need_triton()
    B, H, n, hd = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape != (B, Hkv, S, hd) or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} / v_cache {tuple(v_cache.shape)} must be "
                         f"[{B}, Hkv, S, {hd}] for q {tuple(q.shape)}")
    if H % Hkv:
        raise ValueError(f"query heads H={H} must be a multiple of kv heads Hkv={Hkv}")
    if key_valid.shape != (B, S):
        raise ValueError(f"key_valid {tuple(key_valid.shape)} must be [{B}, {S}]")
    # the interpreter (numpy has no bf16) truncates fp32 -> bf16 and gets bf16 dots wrong: there the
    # kernel works and writes in fp32 and torch rounds the result; compiled kernels are unaffected
    interp_bf16 = _interpreting() and q.dtype == torch.bfloat16
    out = torch.empty(B, H, n, hd, dtype=torch.float32 if interp_bf16 else q.dtype, device=q.device)
    if out.numel() == 0:
        return out.to(q.dtype)
    valid = key_valid.contiguous().to(torch.uint8)
    dot_fp32 = q.dtype == torch.float32 or interp_bf16
    block_d = _pow2(hd)
    block_m = min(_pow2(n), 64)
    block_n = 32 if (dot_fp32 and block_d > 64) else 64
    with _on(q):
        _attention_kernel[(triton.cdiv(n, block_m), B * H)](
            q, k_cache, v_cache, valid, out, *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
            H, n, S, hd, (1.0 / math.sqrt(hd)) * math.log2(math.e),
            GROUP=H // Hkv, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT_FP32=dot_fp32,
            num_warps=4)
    return out.to(q.dtype)


# ---------------------------------------------------------------------------------------------
# cache_merge
# ---------------------------------------------------------------------------------------------

@_jit
def _merge_kernel(C, F, ROWS, P, N, S, D, sc_b, sc_p, sc_s, sc_d, sf_b, sf_p, sf_n, sf_d,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """C[b, p, rows[b, j], :] = F[b, p, j, :] for a block of j and a slice of the last dim (a pure copy)."""
    bp = tl.program_id(0)
    b = bp // P
    p = bp % P
    j = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    r = tl.load(ROWS + b * N + j, mask=j < N, other=-1)
    # out-of-range slots are skipped rather than written out of bounds (no host sync to check them)
    m = ((j < N) & (r >= 0) & (r < S))[:, None] & (cols < D)[None, :]
    x = tl.load(F + b * sf_b + p * sf_p + j[:, None] * sf_n + cols[None, :] * sf_d, mask=m, other=0)
    tl.store(C + b * sc_b + p * sc_p + r[:, None] * sc_s + cols[None, :] * sc_d, x, mask=m)


def cache_merge(cache: Tensor, fresh: Tensor, rows: Tensor, dim: int) -> Tensor:
    """Kernel twin of ops.cache_merge: write fresh rows into `cache` in place; returns `cache`.

    dim = 2: cache [B, H, S, hd], fresh [B, H, n, hd]. dim = 1: cache [B, S, d], fresh [B, n, d].
    rows: [B, n] int slots in [0, S) (out-of-range slots are skipped). With duplicate slots (e.g. the
    trash slot), which row lands there is unspecified, as for torch's scatter_.
    """
    _need_triton()
    if (dim, cache.dim()) not in ((1, 3), (2, 4)):
        raise ValueError(f"dim={dim} with a {cache.dim()}-d cache: need dim=1 with [B, S, d] or dim=2 with [B, H, S, hd]")
    if fresh.dim() != cache.dim() or rows.dim() != 2 or rows.shape[1] != fresh.shape[dim] \
            or fresh.shape[:dim] != cache.shape[:dim] or fresh.shape[dim + 1:] != cache.shape[dim + 1:] \
            or rows.shape[0] != cache.shape[0]:
        raise ValueError(f"cache {tuple(cache.shape)}, fresh {tuple(fresh.shape)}, rows {tuple(rows.shape)} "
                         f"do not agree for dim={dim}")
    # a dtype change is rounded by torch, as in the reference (the interpreter's bf16 cast truncates);
    # no copy when fresh already has the cache's dtype
    fresh = fresh.to(cache.dtype)
    c4 = cache if dim == 2 else cache.unsqueeze(1)  # views: [B, P, S, D]
    f4 = fresh if dim == 2 else fresh.unsqueeze(1)
    B, P, S, D = c4.shape
    n = f4.shape[2]
    if B * P * n * D == 0:
        return cache
    block_r = min(_pow2(n), 16)
    block_d = min(_pow2(D), 256)
    with _on(cache):
        _merge_kernel[(B * P, triton.cdiv(n, block_r), triton.cdiv(D, block_d))](
            c4, f4, rows.contiguous(), P, n, S, D, *c4.stride(), *f4.stride(),
            BLOCK_R=block_r, BLOCK_D=block_d)
    return cache


@_jit
def _cache_merge_aot(C, F, ROWS, P, N, S, D, sc_b, sc_p, sc_s, sc_d, sf_b, sf_p, sf_n, sf_d, OUT,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """cache_merge through TensorRT's AOT launcher: (cache, fresh, rows, <int32 scalars>, merged), where
    TensorRT aliases `merged` to `cache` (trt_plugins.py compiles this entry to PTX)."""
    _merge_kernel(C, F, ROWS, P, N, S, D, sc_b, sc_p, sc_s, sc_d, sf_b, sf_p, sf_n, sf_d, BLOCK_R, BLOCK_D)
