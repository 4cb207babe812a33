"""FP16 ONNX: the precision TensorRT 11 will build (strongly typed: the ONNX carries the types).

onnxconverter_common's converter with an op block list: numerically sensitive ops (LayerNorm variance, Softmax,
reductions, Exp/Pow) and ops without FP16 kernels stay FP32 behind Cast nodes.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections import Counter

from edgedeploy.errors import ExportError

MAX_REPAIRS = 32


def convert_fp16(model, keep_io_types: bool, op_block_list: list[str]):
    """Return (fp16 ModelProto, info dict with the blocked op types actually present and the Cast count)."""
    from onnxconverter_common import float16

    blocked = sorted(set(op_block_list) | set(float16.DEFAULT_OP_BLOCK_LIST))
    blocked_nodes: list[str] = []
    for _ in range(MAX_REPAIRS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "the model contains values out of fp16 range" per initializer
                out = float16.convert_float_to_float16(
                    copy.deepcopy(model), keep_io_types=keep_io_types, op_block_list=blocked,
                    node_block_list=blocked_nodes, disable_shape_infer=False,
                )
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"FP16 conversion failed: {type(e).__name__}: {e}") from e
        bad = _mixed_type_node(out)
        if bad is None:
            break
        # The converter sometimes leaves one input of a node FP32 next to a blocked op (e.g. a Gemm after a
        # LayerNorm in MobileViT): keep that node in FP32 too, and convert again.
        blocked_nodes.append(bad)
    else:
        raise ExportError(f"FP16 conversion left mixed-type nodes after {MAX_REPAIRS} repairs: {blocked_nodes}")
    present = Counter(n.op_type for n in model.graph.node)
    kept = {op: present[op] for op in blocked if present.get(op)}
    casts = sum(1 for n in out.graph.node if n.op_type == "Cast")
    return out, {"kept_fp32_op_types": kept, "kept_fp32_nodes": blocked_nodes, "casts_inserted": casts,
                 "keep_io_types": keep_io_types}


def _mixed_type_node(model) -> str | None:
    """The node ONNX Runtime refuses for binding FP16 and FP32 to one type parameter, or None if it loads."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return None
    except Exception as e:  # noqa: BLE001
        m = re.search(r"bound to different types .*? in node \((.+?)\)", str(e))
        if m is None:
            raise ExportError(f"the FP16 ONNX does not load in ONNX Runtime CPU: {e}") from e
        return m.group(1)
