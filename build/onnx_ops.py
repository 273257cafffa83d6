"""The ONNX face of the three esdllm ops: plugin-form nodes plus model-local reference functions.

A node has domain and op_type = the op name, the attribute plugin_namespace="esdllm" (so TensorRT
10.7+ picks the registered plugin `esdllm::<op>`, research/deploy.md §1.3) and the op's parameters
as attributes. A model-local FunctionProto of the same (domain, name) holds the reference
decomposition, so onnxruntime and TensorRT-RTX run the node without any plugin. The function bodies
restate plugins/ops.py in standard opset-18 ops; tests check them against it.

  token_gather(hidden, prev_hidden, confidence, bonus, keep_mask [B,k] bool) {alpha}
      -> sel [B,k] int64 (n where dropped), kept [B,k,d]
  partial_attention(q, k_cache, v_cache, key_valid) -> out [B,H,n,hd]
  cache_merge(cache, fresh, rows) {dim} -> merged cache (out of place)
"""
from __future__ import annotations

import onnx
from onnx import AttributeProto, FunctionProto, ModelProto, NodeProto, TensorProto, helper

from ..plugins.ops import NAMESPACE, OP_NAMES

DOMAIN = NAMESPACE            # ONNX domain of the op nodes and their local functions
PLUGIN_NAMESPACE = NAMESPACE  # TensorRT plugin namespace (node attribute plugin_namespace)
OPSET = 18                    # default-domain opset of graphs and function bodies
IR_VERSION = 10               # onnx 1.23 writes IR 14 by default; onnxruntime 1.31 reads at most 13

# Op signatures, one table shared by the node builder, the torch symbolics and the plugin authors.
SIGNATURES: dict[str, tuple[tuple[str, ...], tuple[str, ...], dict[str, int]]] = {
    "token_gather": (("hidden", "prev_hidden", "confidence", "bonus", "keep_mask"), ("sel", "kept"),
                     {"alpha": AttributeProto.FLOAT}),
    "partial_attention": (("q", "k_cache", "v_cache", "key_valid"), ("out",), {}),
    "cache_merge": (("cache", "fresh", "rows"), ("merged",), {"dim": AttributeProto.INT}),
}


def make_node(op: str, inputs: list[str], outputs: list[str], name: str | None = None, **attrs) -> NodeProto:
    """A plugin-form node: domain/op_type = op, plugin_namespace attribute, parameters as attributes."""
    if op not in SIGNATURES:
        raise ValueError(f"unknown esdllm op {op!r}; expected one of {OP_NAMES}")
    ins, outs, params = SIGNATURES[op]
    if len(inputs) != len(ins) or len(outputs) != len(outs):
        raise ValueError(f"{op} takes inputs {ins} and outputs {outs}, got {inputs} -> {outputs}")
    if set(attrs) != set(params):
        raise ValueError(f"{op} takes attributes {sorted(params)}, got {sorted(attrs)}")
    return helper.make_node(op, inputs, outputs, name=name, domain=DOMAIN,
                            plugin_namespace=PLUGIN_NAMESPACE, **attrs)


def _c(name: str, value, dtype=TensorProto.INT64) -> NodeProto:
    """Constant node; value a list (1-D) or a scalar (0-D)."""
    dims = [len(value)] if isinstance(value, (list, tuple)) else []
    vals = list(value) if dims else [value]
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, dims, vals))


def _attr_const(out: str, attr: str, kind: str) -> NodeProto:
    """Constant whose value is the function attribute `attr` (kind: value_float | value_int)."""
    node = helper.make_node("Constant", [], [out])
    typ = AttributeProto.FLOAT if kind == "value_float" else AttributeProto.INT
    node.attribute.append(helper.make_attribute_ref(kind, typ, ref_attr_name=attr))
    return node


def _n(op: str, ins: list[str], outs: list[str], **kw) -> NodeProto:
    return helper.make_node(op, ins, outs, **kw)


def _function(name: str, nodes: list[NodeProto], doc: str) -> FunctionProto:
    ins, outs, params = SIGNATURES[name]
    return helper.make_function(DOMAIN, name, list(ins), list(outs), nodes,
                                [helper.make_opsetid("", OPSET)], attributes=list(params), doc_string=doc)


def token_gather_function() -> FunctionProto:
    """Importance I = alpha*c + (1-alpha)*var/max(max var, 1) + bonus (plugins/ops.importance), top-k with
    k = keep_mask's width (ties to the lower index, as ONNX TopK specifies), indices re-sorted ascending
    (the second TopK's indices are each row's score rank), rows gathered, and rows whose rank the
    entry's keep_mask drops replaced by n."""
    f = TensorProto.FLOAT
    nodes = [
        _n("Cast", ["hidden"], ["hf"], to=f), _n("Cast", ["prev_hidden"], ["pf"], to=f),
        _c("last", [-1]),
        _n("Sub", ["hf", "pf"], ["diff"]), _n("Abs", ["diff"], ["adiff"]),
        _n("ReduceMean", ["adiff", "last"], ["mad"], keepdims=0),
        _n("ReduceL2", ["pf", "last"], ["pnorm"], keepdims=0),
        _n("Shape", ["hidden"], ["d_i"], start=-1), _n("Cast", ["d_i"], ["d_f"], to=f),
        _n("Sqrt", ["d_f"], ["sqrt_d"]),
        _n("Div", ["pnorm", "sqrt_d"], ["rms"]), _c("eps", 1e-6, f), _n("Add", ["rms", "eps"], ["den"]),
        _n("Div", ["mad", "den"], ["var0"]),
        _n("ReduceMax", ["var0", "last"], ["vmax"], keepdims=1), _c("one", 1.0, f),
        _n("Max", ["vmax", "one"], ["vscale"]), _n("Div", ["var0", "vscale"], ["var"]),
        _attr_const("alpha_c", "alpha", "value_float"), _n("Sub", ["one", "alpha_c"], ["beta"]),
        _n("Cast", ["confidence"], ["cf"], to=f), _n("Cast", ["bonus"], ["bf"], to=f),
        _n("Mul", ["alpha_c", "cf"], ["t1"]), _n("Mul", ["beta", "var"], ["t2"]),
        _n("Add", ["t1", "t2"], ["t12"]), _n("Add", ["t12", "bf"], ["score"]),
        _n("Shape", ["keep_mask"], ["k"], start=1, end=2),
        _n("TopK", ["score", "k"], ["top_v", "order"], axis=-1, largest=1, sorted=1),
        _n("TopK", ["order", "k"], ["top", "rank"], axis=-1, largest=0, sorted=1),
        _n("Unsqueeze", ["top", "last"], ["top3"]),
        _n("Shape", ["top"], ["top_shape"]), _n("Shape", ["hidden"], ["d_shape"], start=-1),
        _n("Concat", ["top_shape", "d_shape"], ["g_shape"], axis=0),
        _n("Expand", ["top3", "g_shape"], ["gidx"]),
        _n("GatherElements", ["hidden", "gidx"], ["kept"], axis=1),
        _n("GatherElements", ["keep_mask", "rank"], ["own"], axis=1),
        _n("Shape", ["hidden"], ["n_shape"], start=1, end=2), _n("Squeeze", ["n_shape"], ["n_rows"]),
        _n("Where", ["own", "top", "n_rows"], ["sel"]),
    ]
    return _function("token_gather", nodes, token_gather_function.__doc__)


def partial_attention_function() -> FunctionProto:
    """Repeat KV heads for GQA (head h reads KV head h // (H / Hkv)), masked softmax attention of the
    queries over the cached canvas in float32."""
    f = TensorProto.FLOAT
    nodes = [
        _c("ax2", [2]),
        _n("Shape", ["k_cache"], ["B"], start=0, end=1), _n("Shape", ["k_cache"], ["Hkv"], start=1, end=2),
        _n("Shape", ["k_cache"], ["S"], start=2, end=3), _n("Shape", ["k_cache"], ["hd"], start=3, end=4),
        _n("Shape", ["q"], ["H"], start=1, end=2), _n("Div", ["H", "Hkv"], ["G"]),
        _n("Concat", ["B", "Hkv", "G", "S", "hd"], ["shape5"], axis=0),
        _n("Concat", ["B", "H", "S", "hd"], ["shape4"], axis=0),
        _n("Unsqueeze", ["k_cache", "ax2"], ["k5"]), _n("Expand", ["k5", "shape5"], ["k5e"]),
        _n("Reshape", ["k5e", "shape4"], ["kh"]), _n("Cast", ["kh"], ["khf"], to=f),
        _n("Unsqueeze", ["v_cache", "ax2"], ["v5"]), _n("Expand", ["v5", "shape5"], ["v5e"]),
        _n("Reshape", ["v5e", "shape4"], ["vh"]), _n("Cast", ["vh"], ["vhf"], to=f),
        _n("Cast", ["q"], ["qf"], to=f),
        _n("Cast", ["hd"], ["hd_f"], to=f), _n("Sqrt", ["hd_f"], ["sqrt_hd"]),
        _n("Transpose", ["khf"], ["kt"], perm=[0, 1, 3, 2]), _n("MatMul", ["qf", "kt"], ["qk"]),
        _n("Div", ["qk", "sqrt_hd"], ["scores"]),
        _c("ax12", [1, 2]), _n("Unsqueeze", ["key_valid", "ax12"], ["m4"]),
        _c("neg_inf", float("-inf"), f), _n("Where", ["m4", "scores", "neg_inf"], ["masked"]),
        _n("Softmax", ["masked"], ["probs"], axis=-1), _n("MatMul", ["probs", "vhf"], ["outf"]),
        _n("CastLike", ["outf", "q"], ["out"]),
    ]
    return _function("partial_attention", nodes, partial_attention_function.__doc__)


def cache_merge_function() -> FunctionProto:
    """Out-of-place scatter of fresh rows into the cache along `dim`: rows [B, n] is reshaped to 1 at
    every dim except 0 and `dim`, expanded to fresh's shape and scattered."""
    nodes = [
        _n("Shape", ["fresh"], ["fshape"]), _n("Size", ["fshape"], ["rank"]),
        _c("zero", 0), _c("step", 1), _n("Range", ["zero", "rank", "step"], ["dims"]),
        _attr_const("axis_c", "dim", "value_int"),
        _n("Equal", ["dims", "zero"], ["is0"]), _n("Equal", ["dims", "axis_c"], ["isax"]),
        _n("Or", ["is0", "isax"], ["kept_dim"]),
        # rows [B, n] -> shape with 1 at every other dim (Where + Reshape: TensorRT parses no Compress)
        _c("ones", 1), _n("Where", ["kept_dim", "fshape", "ones"], ["rshape"]),
        _n("Reshape", ["rows", "rshape"], ["ridx"]), _n("Expand", ["ridx", "fshape"], ["idx"]),
        _n("CastLike", ["fresh", "cache"], ["fresh_c"]),
        _n("ScatterElements", ["cache", "idx", "fresh_c"], ["merged"]),
    ]
    nodes[-1].attribute.append(helper.make_attribute_ref("axis", AttributeProto.INT, ref_attr_name="dim"))
    return _function("cache_merge", nodes, cache_merge_function.__doc__)


def functions() -> list[FunctionProto]:
    return [token_gather_function(), partial_attention_function(), cache_merge_function()]


def attach_functions(model: ModelProto) -> ModelProto:
    """Add the local functions used by `model`'s esdllm nodes, the esdllm opset import and IR 10."""
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    have = {(fn.domain, fn.name) for fn in model.functions}
    model.functions.extend(fn for fn in functions() if fn.name in used and (fn.domain, fn.name) not in have)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    model.ir_version = IR_VERSION
    return model


def single_op_model(op: str, inputs: list[tuple[str, int, list]], **attrs) -> ModelProto:
    """A one-node model (for tests and plugin checks), checked. inputs: (name, onnx dtype, shape
    list) per input; outputs are named after the op signature, with symbolic dims."""
    _, outs, _ = SIGNATURES[op]
    node = make_node(op, [i[0] for i in inputs], list(outs), **attrs)
    dtype, rank = inputs[0][1], len(inputs[0][2])  # the first input sets the float outputs' type
    out_types = [(TensorProto.INT64, 2), (dtype, 3)] if op == "token_gather" else [(dtype, rank)]
    graph = helper.make_graph(
        [node], f"esdllm_{op}",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(o, t, [f"{o}_{i}" for i in range(r)])
         for o, (t, r) in zip(outs, out_types)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    attach_functions(model)
    onnx.checker.check_model(model, full_check=True)
    return model
