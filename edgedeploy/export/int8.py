"""INT8 by explicit quantization: a Q/DQ ONNX from calibration images, shaped the way TensorRT wants it.

Follows docs/EXPORT.md / tensorrt-facts: onnxruntime `quantize_static` in QDQ format, symmetric INT8 activations
(zero point 0) and symmetric per-channel weights (Conv axis 0, ConvTranspose axis 1), biases not quantized
(TensorRT cannot import an INT32 bias DQ), outputs of quantized ops not quantized (Q/DQ sit on op inputs), Q/DQ
only on ops TensorRT runs in INT8 (Conv, Gemm, MatMul, Add, Mul, pools), and for a residual Add fed by a Conv
the Conv-side Q/DQ pair is removed so TensorRT fuses Conv+Add.
"""

from __future__ import annotations

import contextlib
import io
import os

import logging
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from edgedeploy import options as opt
from edgedeploy.errors import ExportError

# Where TensorRT places and fuses Q/DQ (ModelOpt's heuristics); Relu/Clip/Sigmoid/Concat/Reshape stay unquantized.
QUANTIZED_OP_TYPES = ["Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "AveragePool", "GlobalAveragePool", "MaxPool"]

TRT_EXTRA_OPTIONS = {
    "ActivationSymmetric": True,
    "WeightSymmetric": True,
    "QuantizeBias": False,
    "AddQDQPairToWeight": True,
    "DedicatedQDQPair": False,
    "QDQOpTypePerChannelSupportToAxis": {"Conv": 0, "ConvTranspose": 1},
    "ForceQuantizeNoInputCheck": True,
    "OpTypesToExcludeOutputQuantization": QUANTIZED_OP_TYPES,
}


CALIB_METHODS = {"minmax": "MinMax", "ema": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
# "ema": MinMax over a moving average of each calibration image's range (constant 0.01), the PyTorch
# MovingAverageMinMaxObserver idea: memory-bounded like minmax, but one outlier image cannot set the range.
EMA_OPTIONS = {"CalibMovingAverage": True, "CalibMovingAverageConstant": 0.01}


def _producers(graph) -> dict[str, object]:
    return {o: n for n in graph.node for o in n.output}


def _consumers(graph) -> dict[str, list]:
    out: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def fuse_residual_adds(model) -> list[str]:
    """Drop the Q/DQ pair between a Conv and the residual Add it feeds, when the Add's other input stays
    quantized, so TensorRT can fuse Conv+Add (its INT8 kernel adds the residual in the epilogue).
    Returns the names of the Adds rewritten."""
    graph = model.graph
    prod, cons = _producers(graph), _consumers(graph)
    removed, rewritten = set(), []
    for add in graph.node:
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        sides = []
        for idx, t in enumerate(add.input):
            dq = prod.get(t)
            q = prod.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            src = prod.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
            sides.append((idx, dq, q, src))
        if not all(s[1] is not None and s[1].op_type == "DequantizeLinear" and s[2] is not None for s in sides):
            continue  # both inputs must be quantized for the rewrite to keep one side INT8
        for idx, dq, q, src in sides:
            if src is None or src.op_type != "Conv":
                continue
            if len(cons.get(q.output[0], [])) != 1 or len(cons.get(dq.output[0], [])) != 1:
                continue  # the pair is shared with another consumer
            add.input[idx] = q.input[0]
            removed.update((id(q), id(dq)))
            rewritten.append(add.name)
            break  # keep the other side's Q/DQ
    if removed:
        keep = [n for n in graph.node if id(n) not in removed]
        del graph.node[:]
        graph.node.extend(keep)
        used = {i for n in graph.node for i in n.input}
        live = [i for i in graph.initializer if i.name in used]  # the removed pairs' scales and zero points
        del graph.initializer[:]
        graph.initializer.extend(live)
    return rewritten


HISTOGRAM_MEMORY_BUDGET = 8 << 30  # bytes; also capped at a quarter of this machine's RAM


def histogram_calibration_bytes(model_path: str | Path, n_images: int) -> int:
    """Memory ONNX Runtime's histogram calibrators (percentile, entropy) hold: they keep every calibrated
    activation (inputs and outputs of the quantized ops) of every calibration image until the end."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
    graph = model.graph
    shapes = {v.name: v.type.tensor_type.shape for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    inits = {i.name for i in graph.initializer}
    tensors = {t for n in graph.node if n.op_type in QUANTIZED_OP_TYPES for t in (*n.input, *n.output)}
    elements = 0
    for t in tensors - inits:
        shape = shapes.get(t)
        if shape is not None:
            elements += int(np.prod([d.dim_value if d.dim_value > 0 else 1 for d in shape.dim]))
    return 4 * elements * n_images


def resolve_calib_method(method: str, model_path: str | Path, n_images: int,
                         task_choice: tuple[str, str] | None = None) -> tuple[str, str]:
    """`auto` -> the task's own choice when it has one (`TaskAdapter.auto_calib_method`: detectors take `ema`).
    Otherwise percentile when its histograms fit in memory (measured -0.7 vs -1.0 point top-1 on
    mobilenetv3_small, -1.0 vs -2.1 points mIoU on LR-ASPP, where ema was worse: -3.1 and -1.7), else minmax.
    Returns (method, why)."""
    if method != opt.CalibMethod.AUTO:
        return method, "chosen by the user"
    if task_choice is not None:
        return task_choice
    need = histogram_calibration_bytes(model_path, n_images)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 4 * HISTOGRAM_MEMORY_BUDGET
    budget = min(HISTOGRAM_MEMORY_BUDGET, ram // 4)
    gib = lambda b: f"{b / (1 << 30):.2f} GiB"  # noqa: E731
    if need <= budget:
        return "percentile", f"auto: histograms need {gib(need)} <= {gib(budget)}"
    return "minmax", f"auto: percentile histograms would need {gib(need)} > {gib(budget)}; minmax is memory-bounded"


def quantize_qdq(
    fp32_path: str | Path,
    out_path: str | Path,
    input_name: str,
    calib_inputs: list[np.ndarray],
    nodes_to_exclude: list[str],
    progress: Callable[[], None] | None = None,
    calib_method: str = "minmax",
) -> dict:
    """Write a TensorRT-friendly Q/DQ model to `out_path` (atomically); returns facts for the report.

    `calib_method`: "minmax" (default: memory bounded, any model size), "percentile" (99.999th percentile of
    |x|: clips rare outliers; measured -0.7 vs -1.0 point top-1 on trained mobilenetv3_small, but ONNX Runtime
    keeps every calibration activation in memory, which large models at large sizes cannot afford) or
    "entropy" (KL divergence over a 2048-bin histogram into 128 quantized bins, TensorRT's classic calibrator).
    ONNX Runtime's quantize_static cannot set the histogram size and its entropy default is 128 bins into 128,
    which leaves the KL search a single candidate (the full range): its "entropy" equals minmax bit for bit. So
    the entropy ranges are computed here with TensorRT's bin counts and handed to quantize_static as a cache."""
    if calib_method not in CALIB_METHODS:
        raise ExportError(f"--calib-method {calib_method!r}: choose one of {', '.join(CALIB_METHODS)}")
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from edgedeploy.export.calibration import CalibrationReader
    from edgedeploy.io import atomic_write_bytes

    if not calib_inputs:
        raise ExportError("INT8 needs calibration images: pass --calib DIR or --calib synthetic")
    reader = CalibrationReader(input_name, calib_inputs, progress)
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="edgedeploy-int8-") as tmp:
        # No quant_pre_process: the input is already simplified and shape-inferred by onnxsim, and ORT's
        # pre-processing costs minutes on the largest models for no change in the Q/DQ placement.
        src = Path(fp32_path)
        raw = Path(tmp) / "qdq.onnx"
        cache = None
        try:
            if calib_method == "entropy":
                cache = _entropy_ranges(src, reader, Path(tmp))
            quantize_static(
                str(src),
                str(raw),
                None if cache else reader,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=QUANTIZED_OP_TYPES,
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=nodes_to_exclude,
                calibrate_method=getattr(CalibrationMethod, CALIB_METHODS[calib_method]),
                extra_options={**TRT_EXTRA_OPTIONS, **(EMA_OPTIONS if calib_method == "ema" else {})},
                **({"calibration_cache_path": str(cache)} if cache else {}),
            )
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"INT8 quantization failed: {type(e).__name__}: {e}") from e
        model = onnx.load(str(raw))
    fused = fuse_residual_adds(model)
    onnx.checker.check_model(model)
    facts = qdq_facts(model)
    facts["calibration_method"] = calib_method
    facts["residual_adds_fused"] = len(fused)
    atomic_write_bytes(out_path, model.SerializeToString())
    return facts


def _entropy_ranges(src: Path, reader, tmp: Path) -> Path:
    """KL-divergence activation ranges with TensorRT's histogram (2048 bins -> 128), saved as ORT's cache."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator, save_tensors_data

    calibrator = create_calibrator(
        str(src), QUANTIZED_OP_TYPES, augmented_model_path=str(tmp / "augmented.onnx"),
        calibrate_method=CalibrationMethod.Entropy,
        extra_options={"symmetric": True, "num_bins": 2048, "num_quantized_bins": 128},
    )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):  # ORT prints its histogram progress
        calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
    cache = tmp / "entropy_ranges.json"
    save_tensors_data(ranges, cache)
    return cache


def qdq_facts(model) -> dict:
    """Counts that prove the Q/DQ graph is TensorRT-shaped: zero points all 0, no INT32 bias DQ."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    nonzero_zp = 0
    int32_dq = 0
    for n in q + dq:
        if len(n.input) > 2 and n.input[2] in inits:
            zp = numpy_helper.to_array(inits[n.input[2]])
            nonzero_zp += int(np.any(zp != 0))
            int32_dq += int(n.op_type == "DequantizeLinear" and zp.dtype == np.int32)
    return {"quantize_nodes": len(q), "dequantize_nodes": len(dq), "nonzero_zero_points": nonzero_zp,
            "int32_dequantize": int32_dq}


def final_classifier_nodes(model, output_names: list[str]) -> list[str]:
    """The Gemm/MatMul nodes that produce the model outputs (walking back through Flatten/Reshape/Add)."""
    prod = _producers(model.graph)
    found = []
    for name in output_names:
        node = prod.get(name)
        hops = 0
        while node is not None and hops < 4:
            if node.op_type in ("Gemm", "MatMul"):
                found.append(node.name)
                break
            node = prod.get(node.input[0]) if node.input else None
            hops += 1
    return found
