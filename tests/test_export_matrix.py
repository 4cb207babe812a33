"""The export matrix: every registered model (classification, detection, segmentation) x FP32/FP16/INT8 x each
simplifier (onnxsim, onnxslim), and every detector x --nms none|onnx|trt.

Each case runs the real pipeline (`edgedeploy.export.export`): the ONNX loads and runs in ONNX Runtime, the raw
and simplified graphs pass the parity proof, the FP16 ONNX agrees with the FP32 one (checked here again, on
inputs the pipeline did not see), the INT8 Q/DQ ONNX runs, and TensorRT-RTX builds every engine whose ops it
supports (all three precisions after onnxsim, the default simplifier; FP32 and FP16 after onnxslim, whose graphs
differ from onnxsim's in what the FP16 typing sees, except for the 13 models over 15 M parameters, whose
100-470 MB engine builds dominate the run). Where it cannot build, the test pins the exact reason
(in-graph NMS on TensorRT-RTX 1.7). This matrix supersedes the former tests/test_export_variants.py.

Sizes and data sets are tiny (32 px
classifiers, 64 px detectors and segmenters, 2 parity inputs, 4 calibration / 4 held-out images); MobileViT runs
at 256 px, where TensorRT-RTX 1.7 compiles its attention (docs/ENGINES.md). Whole matrix measured with
OMP_NUM_THREADS=1: see docs/EXPORT.md.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest

from edgedeploy.export import export
from edgedeploy.models import get_model_info, list_models

HAS_RTX = importlib.util.find_spec("tensorrt_rtx_bindings") is not None
BUILDER = "tensorrt-rtx" if HAS_RTX else "none"
SIMPLIFIERS = ("onnxsim", "onnxslim")
SLOW_PARAMS = 15e6  # above this a model's matrix row takes more than ~30 s of CPU
FAST = dict(parity_inputs=2, calib_images=4, eval_images=4, progress=False, builder=BUILDER)
# TensorRT-RTX 1.7.1 (measured): it parses ONNX NonMaxSuppression but cannot build it, and it has no plugins.
RTX_NMS_REASON = {"onnx": "has no runners", "trt": "Plugin not found"}


def _imgsz(name: str) -> int:
    info = get_model_info(name)
    if info.family.lower().startswith("mobilevit"):
        return 256
    return 32 if info.task == "classify" else 64


def _large(name: str) -> bool:
    return (get_model_info(name).published_params or 0) > SLOW_PARAMS


def _marks(name: str) -> list:
    return [pytest.mark.slow] if _large(name) else []


CASES = [pytest.param(n, s, marks=_marks(n), id=f"{n}-{s}") for n in list_models() for s in SIMPLIFIERS]
DETECTORS = [pytest.param(n, marks=_marks(n), id=n) for n in list_models(task="detect")]


@pytest.fixture(scope="module")
def out_root(tmp_path_factory):
    return tmp_path_factory.mktemp("matrix")


def _ort(path):
    from edgedeploy.export.parity import engine_runner, onnx_engine

    return engine_runner(onnx_engine(path, threads=1))


def _fp16_error(out, name: str, imgsz: int, n_out: int) -> float:
    """Max |FP16 - FP32| over the first `n_out` outputs on two fresh inputs, relative to the FP32 outputs' scale."""
    fp32, fp16 = _ort(out / f"{name}.onnx"), _ort(out / f"{name}.fp16.onnx")
    rng = np.random.default_rng(123)
    worst = 0.0
    for _ in range(2):
        x = rng.random((1, 3, imgsz, imgsz), dtype=np.float32)
        ref, got = fp32(x)[:n_out], fp16(x)[:n_out]
        for r, g in zip(ref, got):
            assert np.isfinite(g).all()
            r, g = np.asarray(r, np.float64), np.asarray(g, np.float64)
            worst = max(worst, float(np.abs(r - g).max() / max(np.abs(r).max(), 1e-6)))
    return worst


def _check_engines(report, out, name: str, precisions=("fp32", "fp16", "int8")) -> None:
    status = {s.name: s.status for s in report.steps}
    if not HAS_RTX:
        assert status["engines"] == "skipped"
        return
    for p in precisions:
        assert status[f"engine_{p}"] == "ok", report.step(f"engine_{p}").details
        meta = json.loads((out / f"{name}.{p}.engine.json").read_text())
        assert meta["builder"] == "tensorrt-rtx" and meta["precision"] == p
        assert (out / f"{name}.{p}.engine").stat().st_size > 10_000


def _build_engines(out, name: str, precisions) -> None:
    """TensorRT-RTX builds of this folder's ONNX files, outside the pipeline (its sidecars give the metadata)."""
    from edgedeploy.engines.common import BuildRequest
    from edgedeploy.engines.rtx_builder import build
    from edgedeploy.models.artifact import read_sidecar

    for p in precisions:
        onnx_path = out / (f"{name}.onnx" if p == "fp32" else f"{name}.{p}.onnx")
        res = build(BuildRequest(onnx_path, out / f"{name}.{p}.engine", read_sidecar(onnx_path)))
        assert res.engine_bytes > 10_000 and res.builder == "tensorrt-rtx"


@pytest.mark.parametrize("name,simplifier", CASES)
def test_every_model_every_precision_every_simplifier(name, simplifier, out_root):
    info = get_model_info(name)
    imgsz = _imgsz(name)
    kw = dict(FAST, num_classes=10 if info.task == "classify" else None)
    if info.task == "detect":
        kw["task_options"] = {"nms": "none"}  # what TensorRT-RTX builds; the NMS modes: test below
    if simplifier != "onnxsim":  # the default simplifier builds all three engines; here FP32 and FP16 (below),
        kw["builder"] = "none"  # for the models over 15 M parameters none (engine builds of 100-470 MB dominate)
    report = export(name, imgsz=imgsz, fp16=True, int8=True, simplifier=simplifier, out=str(out_root / simplifier), **kw)
    out = out_root / simplifier / name
    status = {s.name: s.status for s in report.steps}
    assert status["parity_raw"] == "ok" and status["parity_simplified"] == "ok"
    parity = report.step("parity_simplified").details
    if info.task == "classify":
        # re-initialised weights give logits that move with the input: spread >= 100 x atol (the proof's check)
        assert parity["outputs"][0]["spread"] >= 100 * parity["atol"]
        assert parity["outputs"][0]["shape"][1] == 10
    simp = report.step("simplify").details
    assert simp["tool"] == simplifier, simp["error"]  # this simplifier really ran (no silent fallback)
    for suffix in (".onnx", ".fp16.onnx", ".int8.onnx"):
        assert (out / f"{name}{suffix}").is_file() and (out / f"{name}{suffix}.json").is_file()
    assert report.step("int8").details["nonzero_zero_points"] == 0
    n_out = 1 if info.task != "detect" else 2
    err = _fp16_error(out, name, imgsz, n_out)
    # FP16 has 11 significant bits. With the proof's re-initialised weights (BatchNorm-calibrated random layers
    # whose output layer is scaled to std 0.1) rounding grows through the network: measured up to 6.9e-2 of the
    # output range (MobileNetV1/V2, ShuffleNet classifiers; the others 1e-4..1e-2). A broken conversion (a
    # mis-typed Cast, a dropped node) is off by the whole range: bound 0.1. Trained models: docs/EXPORT.md.
    assert err < 0.1, f"FP16 max error {err:.2e} of the output range"
    x = np.random.default_rng(7).random((1, 3, imgsz, imgsz), dtype=np.float32)
    assert all(np.isfinite(o).all() for o in _ort(out / f"{name}.int8.onnx")(x))
    if simplifier == "onnxsim":
        _check_engines(report, out, name)
    elif HAS_RTX and not _large(name):
        _build_engines(out, name, ("fp32", "fp16"))
    print(f"MATRIX {name} {simplifier} fp16_rel_err={err:.2e} nodes={simp['nodes_after']}")
    shutil.rmtree(out)  # engines of the large models are 100-470 MB each: the matrix would hold tens of GB


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_nms_modes(name, out_root):
    """--nms none builds everywhere (above); explicit in-graph NMS the builder cannot build keeps the ONNX and
    exits 3 with the fix named; the default NMS follows the builder."""
    imgsz = _imgsz(name)
    for mode in ("onnx", "trt"):
        out_dir = out_root / f"nms_{mode}"
        int8 = mode == "onnx" and not _large(name)  # INT8 needs ORT calibration: not with the plugin node
        report = export(name, imgsz=imgsz, fp16=True, int8=int8, out=str(out_dir),
                        task_options={"nms": mode}, **FAST)
        out = out_dir / name
        status = {s.name: s.status for s in report.steps}
        for suffix in (".onnx", ".fp16.onnx") + ((".int8.onnx",) if int8 else ()):
            assert (out / f"{name}{suffix}").is_file()
        if mode == "onnx":
            assert status["parity_simplified"] == "ok"
            assert report.step("fp16").details["accuracy"]["low"]["agreement"] >= 0.9
            x = np.random.default_rng(3).random((1, 3, imgsz, imgsz), dtype=np.float32)
            num, boxes, scores, classes = _ort(out / f"{name}.{'int8' if int8 else 'fp16'}.onnx")(x)
            assert boxes.shape == (1, 100, 4) and num.dtype == np.int32
        else:  # the EfficientNMS_TRT plugin node: ORT cannot run it, the proof says so
            assert status["parity_simplified"] == "skipped"
        if HAS_RTX:
            assert report.exit_code == 3 and status["engines"] == "skipped"
            assert RTX_NMS_REASON[mode] in report.engine_skip_reason and "--nms none" in report.engine_skip_reason
    # Defaulted NMS: what the builder can build, recorded in the report and the sidecars.
    report = export(name, imgsz=imgsz, out=str(out_root / "nms_default"), **FAST)
    meta = json.loads((out_root / "nms_default" / name / f"{name}.onnx.json").read_text())
    if HAS_RTX:
        assert report.exit_code == 0 and report.options["task_options"]["nms"] == "none"
        assert report.step("nms_choice").details["builder_reason"]
        assert meta["postprocess"]["nms"] == "none" and "nms_choice" in meta["postprocess"]
        _check_engines(report, out_root / "nms_default" / name, name, ("fp32",))
    else:
        assert meta["postprocess"]["nms"] == "onnx"
    for sub in ("nms_onnx", "nms_trt", "nms_default"):
        shutil.rmtree(out_root / sub / name, ignore_errors=True)
