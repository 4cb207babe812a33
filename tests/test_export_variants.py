"""Every registered classification variant: export, parity (raw + simplified), FP16 and INT8 Q/DQ ONNX, and
TensorRT-RTX ahead-of-time builds of all three. Parametrized over the registry, so new variants are covered.

Resolution is reduced (architectures are resolution-independent) and the data sets are tiny to fit the CI
budget; the large EfficientNets are marked slow (they still run in CI). Accuracy is not judged here (weights
are re-initialised): tests/test_export_pipeline.py measures FP16/INT8 accuracy on a trained model.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from edgedeploy.export import export
from edgedeploy.models import get_model_info, list_models

HAS_RTX = importlib.util.find_spec("tensorrt_rtx_bindings") is not None
SLOW_PARAMS = 15e6  # above this a variant's full export takes more than ~30 s of CPU


def _imgsz(name: str) -> int:
    # MobileViT at its native 256 px: at 64 px TensorRT-RTX 1.7's Myelin compiler fails on its attention
    # ("kqv_gemm_split.cpp:1961: CHECK(0) failed", docs/ENGINES.md). Everything else runs at 32 px.
    return 256 if get_model_info(name).family.lower().startswith("mobilevit") else 32


def _params(name: str) -> float:
    return get_model_info(name).published_params or 0.0


VARIANTS = [
    pytest.param(n, marks=[pytest.mark.slow] if _params(n) > SLOW_PARAMS else [])
    for n in list_models(task="classify")
]


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_exports_with_parity_and_builds(name, tmp_path):
    report = export(
        name,
        imgsz=_imgsz(name),
        num_classes=10,
        fp16=True,
        int8=True,
        parity_inputs=2,
        calib_images=4,
        eval_images=4,
        out=str(tmp_path),
        builder="tensorrt-rtx" if HAS_RTX else "none",
        progress=False,
    )
    status = {s.name: s.status for s in report.steps}
    assert status["parity_raw"] == "ok" and status["parity_simplified"] == "ok"
    parity = report.step("parity_simplified").details
    assert parity["min_spread"] >= 100 * parity["atol"]  # re-initialised logits depend on the input
    assert parity["outputs"][0]["shape"][1] == 10
    assert report.step("int8").details["nonzero_zero_points"] == 0
    out = tmp_path / name
    for suffix in (".onnx", ".fp16.onnx", ".int8.onnx"):
        assert (out / f"{name}{suffix}").is_file() and (out / f"{name}{suffix}.json").is_file()
    if HAS_RTX:
        for precision in ("fp32", "fp16", "int8"):
            assert status[f"engine_{precision}"] == "ok", report.step(f"engine_{precision}").details
            meta = json.loads((out / f"{name}.{precision}.engine.json").read_text())
            assert meta["builder"] == "tensorrt-rtx" and meta["precision"] == precision
            assert (out / f"{name}.{precision}.engine").stat().st_size > 10_000
