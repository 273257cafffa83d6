"""TensorRT plugins for the three esdllm ops, registered through `tensorrt.plugin` (QDP) as esdllm::<op>.

Inside:
  *_outputs          pure shape/dtype rules of each op (no TensorRT): what `@trtp.register` returns
  as_torch           a torch view of a plugin tensor (any dtype, bf16 included) for `@trtp.impl`
  compile_ptx        OpenAI Triton -> PTX for `@trtp.aot_impl`, trimmed to the arguments TensorRT passes
  register_plugins() imports tensorrt and registers register/impl/aot_impl for all three ops (idempotent)

Op contracts are build/onnx_ops.SIGNATURES (the ONNX node the parser maps to the plugin, research/
deploy.md §1.3): the node's op_type is the plugin name, its `plugin_namespace` attribute selects
"esdllm", its other attributes become plugin attributes by name.

  token_gather(hidden [B,n,d], prev_hidden [B,n,d], confidence [B,n], bonus [B,n], keep_mask [B,K] bool)
      {alpha} -> sel [B,K] int64 (n where dropped), kept [B,K,d]; K is keep_mask's dim, a profile axis
  partial_attention(q [B,H,n,hd], k_cache, v_cache [B,Hkv,S,hd], key_valid [B,S] bool) -> out [B,H,n,hd]
  cache_merge(cache, fresh, rows [B,n]) {dim} -> merged, aliased to cache (written in place)

`impl` runs the kernel wrappers of plugins/kernels.py through torch on TensorRT's stream. `aot_impl`
compiles the same Triton code to PTX; TensorRT launches an AOT plugin as ONE kernel with (inputs,
int32 scalars, outputs) and no workspace, so only ops whose kernel is a single scratch-free launch
are AOT-ready (AOT_READY); the others raise a clear error at build time.

No `from __future__ import annotations` here: tensorrt.plugin inspects annotations as classes.
"""
import re
from typing import Tuple, Union

from .ops import NAMESPACE, OP_NAMES as OPS
FLOATS = ("float32", "float16", "bfloat16")
INDICES = ("int64", "int32")
AOT_READY = frozenset({"cache_merge"})  # single-launch, scratch-free kernels in plugins/kernels.py

Spec = Tuple[tuple, str]  # (dims, dtype name); a dim is an int or a TensorRT shape expression


# ---------------------------------------------------------------------------------------------
# Pure shape/dtype rules (the body of each @trtp.register)
# ---------------------------------------------------------------------------------------------

def _want(op: str, name: str, spec: Spec, rank: int, dtypes: tuple) -> None:
    dims, dtype = spec
    if len(dims) != rank:
        raise ValueError(f"{NAMESPACE}::{op}: input {name!r} must have rank {rank}, got rank {len(dims)}")
    if dtype not in dtypes:
        raise ValueError(f"{NAMESPACE}::{op}: input {name!r} has dtype {dtype}; expected one of {dtypes}")


def _agree(op: str, what: str, a, b) -> None:
    """Dims are compared only when both are concrete ints (symbolic ones are TensorRT's to check)."""
    if isinstance(a, int) and isinstance(b, int) and a != b:
        raise ValueError(f"{NAMESPACE}::{op}: {what} disagree ({a} vs {b})")


def token_gather_outputs(hidden: Spec, prev_hidden: Spec, confidence: Spec, bonus: Spec,
                         keep_mask: Spec) -> Tuple[Spec, Spec]:
    """-> sel ((B, K), int64), kept ((B, K, d), hidden dtype), K = keep_mask's second dim."""
    op = "token_gather"
    _want(op, "hidden", hidden, 3, FLOATS)
    _want(op, "prev_hidden", prev_hidden, 3, FLOATS)
    _want(op, "confidence", confidence, 2, ("float32",))
    _want(op, "bonus", bonus, 2, ("float32",))
    _want(op, "keep_mask", keep_mask, 2, ("bool",))
    if prev_hidden[1] != hidden[1]:
        raise ValueError(f"{NAMESPACE}::{op}: prev_hidden dtype {prev_hidden[1]} != hidden dtype {hidden[1]}")
    for name, spec in (("prev_hidden", prev_hidden), ("confidence", confidence), ("bonus", bonus)):
        for axis in range(len(spec[0])):
            _agree(op, f"hidden and {name} dim {axis}", hidden[0][axis], spec[0][axis])
    _agree(op, "hidden and keep_mask batch", hidden[0][0], keep_mask[0][0])
    B, n, d = hidden[0]
    K = keep_mask[0][1]
    if isinstance(K, int) and isinstance(n, int) and not 0 <= K <= n:
        raise ValueError(f"{NAMESPACE}::{op}: k={K} must be in [0, n={n}]")
    return ((B, K), "int64"), ((B, K, d), hidden[1])


def partial_attention_outputs(q: Spec, k_cache: Spec, v_cache: Spec, key_valid: Spec) -> Tuple[Spec]:
    """-> out: q's shape [B, H, n, hd] and dtype."""
    op = "partial_attention"
    for name, spec in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _want(op, name, spec, 4, FLOATS)
        if spec[1] != q[1]:
            raise ValueError(f"{NAMESPACE}::{op}: {name} dtype {spec[1]} != q dtype {q[1]}")
    _want(op, "key_valid", key_valid, 2, ("bool",))
    (B, H, n, hd), (_, Hkv, S, _) = q[0], k_cache[0]
    _agree(op, "k_cache and v_cache heads", Hkv, v_cache[0][1])
    _agree(op, "k_cache and v_cache slots", S, v_cache[0][2])
    for name, spec in (("k_cache", k_cache), ("v_cache", v_cache)):
        _agree(op, f"q and {name} head_dim", hd, spec[0][3])
    _agree(op, "k_cache and key_valid slots", S, key_valid[0][1])
    if isinstance(H, int) and isinstance(Hkv, int) and H % Hkv:
        raise ValueError(f"{NAMESPACE}::{op}: query heads {H} are not a multiple of kv heads {Hkv}")
    return (q,)


def cache_merge_outputs(cache: Spec, fresh: Spec, rows: Spec, dim: int) -> Tuple[Spec]:
    """-> merged: the cache's shape and dtype (the plugin aliases it to the cache input)."""
    op = "cache_merge"
    rank = {1: 3, 2: 4}.get(dim)
    if rank is None:
        raise ValueError(f"{NAMESPACE}::{op}: dim={dim}; expected 1 ([B, S, d] caches) or 2 ([B, H, S, hd])")
    _want(op, "cache", cache, rank, FLOATS)
    _want(op, "fresh", fresh, rank, FLOATS)
    _want(op, "rows", rows, 2, INDICES)
    for i in range(rank):
        if i != dim:
            _agree(op, f"cache and fresh dim {i}", cache[0][i], fresh[0][i])
    _agree(op, "fresh rows and rows", fresh[0][dim], rows[0][1])
    return (cache,)


# ---------------------------------------------------------------------------------------------
# Tensors and kernels
# ---------------------------------------------------------------------------------------------

# dtype name -> (torch dtype name, __cuda_array_interface__ carrier typestr, Triton pointer type)
_DTYPES = {
    "float32": ("float32", "<f4", "fp32"), "float16": ("float16", "<f2", "fp16"),
    "bfloat16": ("bfloat16", "<i2", "bf16"),  # CAI has no bf16: carry as int16, view as bf16
    "int64": ("int64", "<i8", "i64"), "int32": ("int32", "<i4", "i32"),
    "int8": ("int8", "|i1", "i8"), "bool": ("bool", "|u1", "i1"),
}


class _CudaArray:
    def __init__(self, ptr: int, shape: tuple, strides: tuple, typestr: str, itemsize: int):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (ptr, False),
                                         "strides": tuple(s * itemsize for s in strides), "version": 3,
                                         "stream": None}  # we already run on TensorRT's stream


def as_torch(ptr: int, shape: tuple, strides: tuple | None, dtype: str):
    """A CUDA torch tensor over device memory at ptr. strides in elements (None: contiguous)."""
    import torch

    if dtype not in _DTYPES:
        raise ValueError(f"no torch view for plugin dtype {dtype!r}; supported: {sorted(_DTYPES)}")
    tname, typestr, _ = _DTYPES[dtype]
    shape = tuple(int(s) for s in shape)
    if strides is None:
        strides, acc = [], 1
        for s in reversed(shape):
            strides.insert(0, acc)
            acc *= max(s, 1)
    itemsize = int(typestr[2:])
    carrier = torch.as_tensor(_CudaArray(int(ptr), shape, tuple(int(s) for s in strides), typestr, itemsize),
                              device="cuda")
    return carrier.view(getattr(torch, tname))


_ENTRY = re.compile(r"\.entry\s+(\S+)\s*\((.*?)\)", re.S)


def trim_ptx_params(ptx: str, n_params: int) -> str:
    """Drop the kernel's parameters past the first n_params, if the body never reads them.

    Triton >= 3.3 appends hidden pointer parameters (global/profile scratch) after the user's
    arguments; TensorRT's AOT launcher passes only (inputs, scalars, outputs). Unused trailing
    parameters are removed so the PTX entry matches what TensorRT passes.
    """
    m = _ENTRY.search(ptx)
    if m is None:
        raise ValueError("no .entry in the PTX")
    params = [p.strip() for p in m.group(2).split(",") if p.strip()]
    if len(params) < n_params:
        raise ValueError(f"kernel {m.group(1)} declares {len(params)} parameters, TensorRT passes {n_params}")
    for p in params[n_params:]:
        pname = p.split()[-1]
        if len(re.findall(rf"{re.escape(pname)}\b", ptx)) > 1:
            raise ValueError(f"kernel {m.group(1)} reads hidden parameter {pname} (it needs scratch memory); "
                             "TensorRT AOT plugins cannot provide it")
    body = ",\n\t".join(params[:n_params])
    return ptx[:m.start(2)] + "\n\t" + body + "\n" + ptx[m.end(2):]


def compile_ptx(fn, signature: dict, constexprs: dict, n_params: int, target=None, num_warps: int = 4):
    """Compile a @triton.jit kernel to PTX. -> (kernel name, PTX, threads per block, shared bytes).

    signature: {arg: Triton type ('*fp16', 'i32', 'constexpr')} in the kernel's order; n_params: the
    number of non-constexpr arguments TensorRT passes. target: triton GPUTarget (None: current GPU).
    """
    import triton

    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    options = {"num_warps": num_warps}
    k = triton.compile(src, target=target, options=options) if target is not None \
        else triton.compile(src, options=options)
    ptx = trim_ptx_params(k.asm["ptx"], n_params)
    return k.metadata.name, ptx, k.metadata.num_warps * 32, k.metadata.shared


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, 1 << max(int(x) - 1, 0).bit_length())


def cache_merge_aot_kernel():
    """The jitted AOT entry for cache_merge (plugins/kernels._cache_merge_aot)."""
    from triton.runtime.jit import JITFunction

    from . import kernels

    if not isinstance(kernels._cache_merge_aot, JITFunction):
        raise RuntimeError("AOT PTX needs triton's compiler: unset TRITON_INTERPRET (the CPU interpreter) "
                           "before triton is first imported")
    return kernels._cache_merge_aot


def cache_merge_aot_signature(dtype: str, rows_dtype: str, block_r: int, block_d: int) -> tuple[dict, dict]:
    """Triton signature/constexprs of _cache_merge_aot; 16 arguments reach the kernel."""
    t, r = "*" + _DTYPES[dtype][2], "*" + _DTYPES[rows_dtype][2]
    sig = {"C": t, "F": t, "ROWS": r}
    sig.update({a: "i32" for a in ("P", "N", "S", "D", "sc_b", "sc_p", "sc_s", "sc_d", "sf_b", "sf_p", "sf_n", "sf_d")})
    sig.update({"OUT": t, "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"})
    return sig, {"BLOCK_R": block_r, "BLOCK_D": block_d}


# ---------------------------------------------------------------------------------------------
# Registration (imports tensorrt)
# ---------------------------------------------------------------------------------------------

_registered = False


def register_plugins() -> None:
    """Register esdllm::{token_gather, partial_attention, cache_merge} with TensorRT (once per process).

    Raises ImportError when TensorRT (with tensorrt.plugin, >= 10.6) is not installed. aot_impl is
    registered only where tensorrt.plugin has it (>= 10.9).
    """
    global _registered
    if _registered:
        return
    import tensorrt as trt
    import tensorrt.plugin as trtp

    names = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16", trt.int64: "int64",
             trt.int32: "int32", trt.int8: "int8", trt.bool: "bool"}
    types = {v: k for k, v in names.items()}

    def spec(d) -> Spec:
        if d.dtype not in names:
            raise ValueError(f"esdllm plugins do not take TensorRT dtype {d.dtype}")
        return tuple(d.shape_expr), names[d.dtype]

    def desc(s: Spec):
        return trtp.from_shape_expr(s[0], dtype=types[s[1]])

    def view(t, shape=None):
        return as_torch(t.data_ptr, tuple(t.shape) if shape is None else shape,
                        tuple(t.strides) if shape is None else None, names[t.dtype])

    def on_stream(stream: int):
        import torch
        return torch.cuda.stream(torch.cuda.ExternalStream(stream))

    def no_aot(op: str):
        raise NotImplementedError(
            f"{NAMESPACE}::{op} has no AOT kernel yet: a TensorRT AOT plugin is one launch with no "
            "workspace, and plugins/kernels.py's wrapper for it needs scratch memory (token_gather: the "
            "variation buffer; partial_attention: the key mask as uint8). Build with JIT plugins")

    ptx_ret = Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs] \
        if hasattr(trtp, "aot_impl") else None

    # --- token_gather ---------------------------------------------------------------------
    @trtp.register("esdllm::token_gather")
    def _tg(hidden: trtp.TensorDesc, prev_hidden: trtp.TensorDesc, confidence: trtp.TensorDesc,
            bonus: trtp.TensorDesc, keep_mask: trtp.TensorDesc, alpha: float
            ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        sel, kept = token_gather_outputs(spec(hidden), spec(prev_hidden), spec(confidence), spec(bonus),
                                         spec(keep_mask))
        return desc(sel), desc(kept)

    @trtp.impl("esdllm::token_gather")
    def _tg_impl(hidden: trtp.Tensor, prev_hidden: trtp.Tensor, confidence: trtp.Tensor, bonus: trtp.Tensor,
                 keep_mask: trtp.Tensor, alpha: float, outputs: Tuple[trtp.Tensor, trtp.Tensor],
                 stream: int) -> None:
        from . import kernels
        with on_stream(stream):
            sel, kept = kernels.token_gather(view(hidden), view(prev_hidden), view(confidence), view(bonus),
                                             view(keep_mask), alpha)
            view(outputs[0]).copy_(sel)
            view(outputs[1]).copy_(kept)

    # --- partial_attention ----------------------------------------------------------------
    @trtp.register("esdllm::partial_attention")
    def _pa(q: trtp.TensorDesc, k_cache: trtp.TensorDesc, v_cache: trtp.TensorDesc,
            key_valid: trtp.TensorDesc) -> trtp.TensorDesc:
        partial_attention_outputs(*(spec(d) for d in (q, k_cache, v_cache, key_valid)))
        return q.like()

    @trtp.impl("esdllm::partial_attention")
    def _pa_impl(q: trtp.Tensor, k_cache: trtp.Tensor, v_cache: trtp.Tensor, key_valid: trtp.Tensor,
                 outputs: Tuple[trtp.Tensor], stream: int) -> None:
        from . import kernels
        with on_stream(stream):
            view(outputs[0]).copy_(kernels.partial_attention(*(view(t) for t in (q, k_cache, v_cache, key_valid))))

    # --- cache_merge ----------------------------------------------------------------------
    @trtp.register("esdllm::cache_merge")
    def _cm(cache: trtp.TensorDesc, fresh: trtp.TensorDesc, rows: trtp.TensorDesc, dim: int) -> trtp.TensorDesc:
        cache_merge_outputs(spec(cache), spec(fresh), spec(rows), dim)
        return cache.aliased()  # in place; TensorRT copies first where the old cache is still read

    @trtp.impl("esdllm::cache_merge")
    def _cm_impl(cache: trtp.Tensor, fresh: trtp.Tensor, rows: trtp.Tensor, dim: int,
                 outputs: Tuple[trtp.Tensor], stream: int) -> None:
        from . import kernels
        with on_stream(stream):
            kernels.cache_merge(view(outputs[0]), view(fresh), view(rows), dim)

    if ptx_ret is None:
        _registered = True
        return

    # --- aot_impl ---------------------------------------------------------------------------
    @trtp.aot_impl("esdllm::token_gather")
    def _tg_aot(hidden: trtp.TensorDesc, prev_hidden: trtp.TensorDesc, confidence: trtp.TensorDesc,
                bonus: trtp.TensorDesc, keep_mask: trtp.TensorDesc, alpha: float,
                outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc], tactic: int) -> ptx_ret:
        no_aot("token_gather")

    @trtp.aot_impl("esdllm::partial_attention")
    def _pa_aot(q: trtp.TensorDesc, k_cache: trtp.TensorDesc, v_cache: trtp.TensorDesc,
                key_valid: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc], tactic: int) -> ptx_ret:
        no_aot("partial_attention")

    @trtp.aot_impl("esdllm::cache_merge")
    def _cm_aot(cache: trtp.TensorDesc, fresh: trtp.TensorDesc, rows: trtp.TensorDesc, dim: int,
                outputs: Tuple[trtp.TensorDesc], tactic: int) -> ptx_ret:
        c, f = cache.shape_expr, fresh.shape_expr
        if dim == 2:
            (B, P, S, D), n = tuple(c), f[2]
        else:
            (B, S, D), n, P = tuple(c), f[1], 1
        d_const = D.constant_value() if D.is_constant else 256
        block_r, block_d = 16, min(_pow2(d_const), 256)
        sig, consts = cache_merge_aot_signature(names[cache.dtype], names[rows.dtype], block_r, block_d)
        name, ptx, threads, shared = compile_ptx(cache_merge_aot_kernel(), sig, consts, n_params=16)
        # contiguous strides, ShapeExprs on the left of every product
        sc = (S * D * P, S * D, D, 1)
        sf = (n * D * P, n * D, D, 1)
        launch = trtp.KernelLaunchParams()
        launch.grid_x = B * P if dim == 2 else B
        launch.grid_y = trtp.cdiv(n, block_r)
        launch.grid_z = trtp.cdiv(D, block_d)
        launch.block_x = threads
        launch.shared_mem = shared
        scalars = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in (P, n, S, D, *sc, *sf)])
        return name.encode(), ptx.encode(), launch, scalars

    _registered = True
