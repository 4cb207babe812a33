"""Bad input for the export's optional steps: a simplifier that crashes or returns an invalid model (fall back,
record why), an FP16 graph ONNX Runtime refuses (error naming node and op, FP32 artifacts kept), the FP16 pass on
a graph annotated the way onnxslim annotates it, and an in-graph NMS the engine builder cannot build."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgedeploy.errors import ExportError
from edgedeploy.export import export, fp16, simplify

HAS_RTX = importlib.util.find_spec("tensorrt_rtx_bindings") is not None


def _tiny_model(with_value_info: bool = True):
    """x -> Conv -> ReduceMean (blocked in FP16) -> Mul(w) -> Sigmoid -> y, and Conv -> Relu -> z: two outputs,
    one produced behind a blocked op. With value_info for every tensor, as onnxslim leaves it."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "cw"),
             numpy_helper.from_array(rng.standard_normal((1, 4, 1, 1)).astype(np.float32), "w")]
    nodes = [helper.make_node("Conv", ["x", "cw"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("ReduceMean", ["c"], ["m"], name="mean", axes=[2, 3], keepdims=1),
             helper.make_node("Mul", ["m", "w"], ["p"], name="mul"),
             helper.make_node("Sigmoid", ["p"], ["y"], name="sig"),
             helper.make_node("Relu", ["c"], ["z"], name="relu")]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 1, 1]),
                           helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model) if with_value_info else model


def _run(model, x):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x.astype(np.float16) if "16" in s.get_inputs()[0].type else x})


@pytest.mark.parametrize("keep_io", [True, False])
def test_fp16_pass_types_casts_from_inference_not_annotations(keep_io):
    model = _tiny_model(with_value_info=True)
    assert len(model.graph.value_info) >= 3  # annotated like a simplified graph
    out, info = fp16.convert_fp16(model, keep_io, ["ReduceMean"])
    assert info["kept_fp32_op_types"] == {"ReduceMean": 1} and info["kept_fp32_nodes"] == []
    io_type = TensorProto.FLOAT if keep_io else TensorProto.FLOAT16
    assert [o.type.tensor_type.elem_type for o in out.graph.output] == [io_type, io_type]
    assert out.graph.input[0].type.tensor_type.elem_type == io_type
    x = np.random.default_rng(1).random((1, 3, 8, 8), dtype=np.float32)
    for ref, got in zip(_run(model, x), _run(out, x)):
        assert np.abs(ref - got.astype(np.float32)).max() <= 2e-3 * max(1.0, np.abs(ref).max())
    conv_w = next(t for t in out.graph.initializer if t.name.startswith("cw"))
    assert conv_w.data_type == TensorProto.FLOAT16  # the Conv really runs in FP16


def test_fp16_refused_graph_names_node_and_op_and_keeps_fp32(tmp_path, monkeypatch):
    real = fp16.cast_to_fp16

    def broken(*a, **k):  # plant a mis-typed Cast, the converter bug class this pass replaces
        m = real(*a, **k)
        cast = next(n for n in m.graph.node if n.name.endswith("__cast_out"))  # FP16 -> the FP32 graph output
        cast.attribute[0].i = TensorProto.FLOAT16
        return m

    monkeypatch.setattr(fp16, "cast_to_fp16", broken)
    with pytest.raises(ExportError, match=r"node '.+' \(op Cast\).*FP32 ONNX is kept"):
        fp16.convert_fp16(_tiny_model(), True, ["ReduceMean"])
    # through the pipeline: the FP32 artifacts stay, no FP16 file is written
    with pytest.raises(ExportError, match="op Cast"):
        export("mobilenetv3_small", imgsz=32, num_classes=4, fp16=True, fp16_keep=["ReduceMean"], parity_inputs=1,
               eval_images=2, builder="none", out=str(tmp_path), progress=False)
    out = tmp_path / "mobilenetv3_small"
    assert (out / "mobilenetv3_small.onnx").is_file() and (out / "mobilenetv3_small.onnx.json").is_file()
    assert not (out / "mobilenetv3_small.fp16.onnx").exists()


def test_simplifier_crash_or_invalid_model_falls_back_and_records_why(monkeypatch):
    model = _tiny_model(with_value_info=False)

    def crash(m):
        raise RuntimeError("simulated onnxsim crash")

    def invalid(m):  # a model whose node reads a tensor nothing produces
        bad = onnx.ModelProto()
        bad.CopyFrom(m)
        bad.graph.node[1].input[0] = "missing_tensor"
        return bad

    monkeypatch.setitem(simplify.TOOLS, "onnxsim", crash)
    out, res = simplify.simplify_model(model)
    assert res.tool == "onnxslim" and res.tried == ["onnxsim", "onnxslim"]
    assert "onnxsim: RuntimeError: simulated onnxsim crash" in res.error
    monkeypatch.setitem(simplify.TOOLS, "onnxslim", invalid)
    out, res = simplify.simplify_model(model)
    assert res.tool == "none" and out is model
    assert "onnxsim: RuntimeError" in res.error and "onnxslim: " in res.error and "missing_tensor" in res.error
    with pytest.raises(ExportError, match="--simplifier"):
        simplify.simplify_model(model, "onnx-simplifier")


def test_pipeline_records_simplifier_fallback(tmp_path, monkeypatch):
    monkeypatch.setitem(simplify.TOOLS, "onnxsim", lambda m: (_ for _ in ()).throw(RuntimeError("boom")))
    report = export("mobilenetv3_small", imgsz=32, num_classes=4, parity_inputs=1, builder="none",
                    out=str(tmp_path), progress=False)
    step = report.step("simplify")
    assert step.details["tool"] == "onnxslim" and "onnxsim: RuntimeError: boom" in step.details["error"]
    assert report.step("parity_simplified").status == "ok"


@pytest.mark.skipif(not HAS_RTX, reason="needs TensorRT-RTX bindings (the builder without an NMS runner)")
def test_cli_nms_default_fits_builder_and_explicit_unbuildable_exits_3(tmp_path, capsys):
    from edgedeploy.cli import main

    base = ["export", "--model", "yolox_nano", "--imgsz", "64", "--no-progress", "--builder", "tensorrt-rtx"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "nms: tensorrt-rtx cannot build the default --nms onnx" in printed and "no runners" in printed
    assert (tmp_path / "a" / "yolox_nano" / "yolox_nano.fp32.engine").is_file()
    assert main(base + ["--nms", "onnx", "--out", str(tmp_path / "b")]) == 3
    err = capsys.readouterr().err
    assert "cannot build --nms onnx" in err and "--nms none" in err
    assert (tmp_path / "b" / "yolox_nano" / "yolox_nano.onnx").is_file()
    assert not list((tmp_path / "b" / "yolox_nano").glob("*.engine"))
