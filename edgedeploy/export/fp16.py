"""FP16 ONNX: the precision TensorRT 11 will build (strongly typed: the ONNX carries the types).

An op block list keeps numerically sensitive ops (LayerNorm variance, Softmax, reductions, Exp/Pow) and ops
without FP16 kernels (onnxconverter_common's DEFAULT_OP_BLOCK_LIST) in FP32 behind explicit Cast nodes.

The pass is our own (`cast_to_fp16`, one walk over the graph) rather than onnxconverter_common's
`convert_float_to_float16`: that converter types the Casts it puts around blocked ops from the graph's
`value_info`, which simplifiers fill for every tensor (onnxslim does), and then mis-types them
(`/ReduceMean_output_cast0` producing float where float16 is declared on shufflenetv2, a Cast before a Sigmoid on
yolox_nano, "The downstream node of the second cast node should be graph output" on lraspp_mobilenetv3_small), or
converts an Identity of a LayerNorm weight on a raw MobileViT export. Here every type comes from ONNX shape
inference of the FP32 graph, so the result is the same whichever simplifier ran. The result is then proved: it
must load in ONNX Runtime CPU (or, for a graph with a TensorRT plugin node, pass the ONNX checker's strict type
inference); a node ORT has no FP16 kernel for is kept in FP32 and the pass redone; anything else is an
ExportError naming the node and its op, before any file is written.
"""

from __future__ import annotations

import copy
import re
from collections import Counter

from edgedeploy.errors import ExportError

MAX_REPAIRS = 32


def convert_fp16(model, keep_io_types: bool, op_block_list: list[str], runs_in_onnxruntime: bool = True):
    """Return (fp16 ModelProto, info dict with the blocked op types actually present and the Cast count).

    `runs_in_onnxruntime=False` (a graph with a TensorRT plugin node) proves the result with the ONNX checker's
    strict type inference only, since ONNX Runtime cannot load it at all."""
    from onnxconverter_common import float16

    blocked = sorted(set(op_block_list) | set(float16.DEFAULT_OP_BLOCK_LIST))
    blocked_nodes: list[str] = []
    source = strip_value_info(model)
    for _ in range(MAX_REPAIRS):
        out = cast_to_fp16(source, keep_io_types, set(blocked), set(blocked_nodes))
        bad = _mixed_type_node(out, runs_in_onnxruntime, {n.name for n in source.graph.node} - set(blocked_nodes))
        if bad is None:
            break
        # A node ONNX Runtime has no FP16 kernel for, or refuses with mixed types: keep it in FP32, convert again.
        blocked_nodes.append(bad)
    else:
        raise ExportError(f"FP16 conversion left invalid nodes after {MAX_REPAIRS} repairs: {blocked_nodes}; "
                          "the FP32 ONNX is kept")
    present = Counter(n.op_type for n in model.graph.node)
    kept = {op: present[op] for op in blocked if present.get(op)}
    casts = sum(1 for n in out.graph.node if n.op_type == "Cast") - sum(1 for n in model.graph.node if n.op_type == "Cast")
    return out, {"kept_fp32_op_types": kept, "kept_fp32_nodes": blocked_nodes, "casts_inserted": casts,
                 "keep_io_types": keep_io_types, "value_info_dropped": len(model.graph.value_info)}


# Inputs that the ONNX spec types as float32 whatever the data type (Resize scales/roi, Upsample scales).
_FP32_ONLY_INPUTS = {"Resize": {1, 2}, "Upsample": {1}}
# Ops whose output type comes from an attribute this pass does not rewrite: kept in FP32.
_ATTRIBUTE_TYPED = {"EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                    "Multinomial", "Bernoulli"}


def cast_to_fp16(model, keep_io_types: bool, blocked_ops: set[str], blocked_nodes: set[str]):
    """The FP16 graph: every float tensor of a non-blocked node becomes float16; a blocked node (and any node of
    a custom domain) keeps float32 and gets explicit Casts on the tensors that cross the boundary. Types come from
    ONNX shape inference of the FP32 graph, so no annotation left by a simplifier can mistype a Cast."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
    src = onnx.shape_inference.infer_shapes(strip_value_info(model))
    g = src.graph
    for node in g.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ExportError(f"node {node.name!r} (op {node.op_type}) has a subgraph: the FP16 pass does not "
                              "convert control flow; the FP32 ONNX is kept")
    types: dict[str, int] = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    inits = {t.name: t for t in g.initializer}
    for t in g.initializer:
        types[t.name] = t.data_type

    def is_fp16_node(node) -> bool:
        if node.op_type in blocked_ops or node.name in blocked_nodes or node.op_type in _ATTRIBUTE_TYPED:
            return False
        if node.domain not in ("", "ai.onnx"):
            return False
        if node.op_type == "Constant":  # only a `value` tensor attribute is rewritten
            return all(a.name == "value" for a in node.attribute)
        return True

    current = {n: (F16 if t == F32 and not keep_io_types else t) for n, t in types.items() if n in {i.name for i in g.input}}
    new_inits: list = []
    nodes: list = []
    converted: dict[tuple[str, int], str] = {}
    graph_inputs = {i.name for i in g.input}

    def as_type(name: str, want: int) -> str:
        """`name` in dtype `want`: the tensor itself, an FP16 copy of an initializer, or a (shared) Cast."""
        have = current.get(name, types.get(name))
        if have == want or name not in types or types[name] != F32:
            return name
        key = (name, want)
        if key not in converted:
            if name in inits and name not in graph_inputs:
                arr = numpy_helper.to_array(inits[name]).astype(np.float32)
                arr16 = np.clip(arr, -65504.0, 65504.0).astype(np.float16)
                new_inits.append(numpy_helper.from_array(arr16, name + "__fp16"))
                converted[key] = name + "__fp16"
            else:
                out = f"{name}__to_{'fp16' if want == F16 else 'fp32'}"
                nodes.append(helper.make_node("Cast", [name], [out], name=out, to=want))
                converted[key] = out
        return converted[key]

    for node in g.node:
        fp16 = is_fp16_node(node)
        new = copy.deepcopy(node)
        for i, name in enumerate(node.input):
            if name and types.get(name) == F32 and (name in inits or name in current):
                keep32 = not fp16 or i in _FP32_ONLY_INPUTS.get(node.op_type, ())
                new.input[i] = as_type(name, F32 if keep32 else F16)
        if fp16:
            for a in new.attribute:
                if node.op_type == "Cast" and a.name == "to" and a.i == F32:
                    a.i = F16
                elif node.op_type in ("Constant", "ConstantOfShape") and a.name == "value" and a.t.data_type == F32:
                    arr = numpy_helper.to_array(a.t).astype(np.float32)
                    a.t.CopyFrom(numpy_helper.from_array(np.clip(arr, -65504.0, 65504.0).astype(np.float16), a.t.name))
        for name in node.output:
            if name:
                t = types.get(name)
                current[name] = F16 if fp16 and t == F32 else t
        nodes.append(new)

    # Graph outputs in the promised IO type: the producer writes an inner name, a Cast writes the output.
    want_out = F32 if keep_io_types else F16
    for o in g.output:
        if types.get(o.name) != F32 or current.get(o.name) == want_out:
            continue
        inner = f"{o.name}__{'fp16' if current.get(o.name) == F16 else 'fp32'}"
        for n in nodes:
            n.output[:] = [inner if x == o.name else x for x in n.output]
            n.input[:] = [inner if x == o.name else x for x in n.input]
        nodes.append(helper.make_node("Cast", [inner], [o.name], name=o.name + "__cast_out", to=want_out))
    for o in g.output:
        if types.get(o.name) == F32:
            o.type.tensor_type.elem_type = want_out
    if not keep_io_types:
        for i in g.input:
            if types.get(i.name) == F32:
                i.type.tensor_type.elem_type = F16

    out = copy.deepcopy(model)
    og = out.graph
    del og.value_info[:]
    del og.node[:]
    og.node.extend(nodes)
    for field, items in ((og.output, g.output), (og.input, g.input)):
        del field[:]
        field.extend(items)
    used = {i for n in nodes for i in n.input} | {o.name for o in g.output}
    del og.initializer[:]
    og.initializer.extend([t for t in g.initializer if t.name in used] + [t for t in new_inits if t.name in used])
    return out


def strip_value_info(model):
    """A copy of `model` without intermediate-tensor type annotations (graph inputs/outputs keep theirs)."""
    out = copy.deepcopy(model)
    del out.graph.value_info[:]
    return out


def _refused(model, node_name: str, why: str) -> ExportError:
    op = next((n.op_type for n in model.graph.node if n.name == node_name), "?")
    return ExportError(f"the FP16 ONNX is not valid at node {node_name!r} (op {op}): {why}. The FP32 ONNX is kept; "
                       f"keep that op in FP32 with --fp16-keep {op}")


def _mixed_type_node(model, runs_in_onnxruntime: bool = True, repairable: set[str] = frozenset()) -> str | None:
    """The node ONNX Runtime refuses for binding FP16 and FP32 to one type parameter (or a node of the original
    graph in `repairable` whose output type it refuses), or None if the model is valid. Any other refusal raises
    ExportError naming the node and its op."""
    if not runs_in_onnxruntime:  # e.g. a TensorRT plugin node: ORT cannot load it, strict type inference can
        import onnx

        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as e:  # noqa: BLE001
            m = re.search(r"[Nn]ode \(([^)]*)\)", str(e))
            if m is not None:
                raise _refused(model, m.group(1), str(e).strip().splitlines()[-1][:300]) from e
            raise ExportError(f"the FP16 ONNX fails the ONNX checker: {str(e)[:400]}; the FP32 ONNX is kept") from e
        return None
    import onnxruntime as ort

    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return None
    except Exception as e:  # noqa: BLE001
        msg = str(e)
        m = re.search(r"bound to different types .*? in node \((.+?)\)", msg)
        if m is not None:
            return m.group(1)
        m = re.search(r"of node \((.+?)\)|in node \((.+?)\)|Node \((.+?)\)|node with name '(.+?)'", msg)
        name = next((g for g in (m.groups() if m else ()) if g), None)
        if name in repairable:  # e.g. an Identity of a weight feeding a blocked LayerNorm got converted
            return name
        if name is not None:
            raise _refused(model, name, f"ONNX Runtime CPU refuses it: {msg.strip()[:300]}") from e
        raise ExportError(f"the FP16 ONNX does not load in ONNX Runtime CPU: {msg[:400]}; the FP32 ONNX is kept") from e
