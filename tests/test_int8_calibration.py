"""The INT8 calibration methods really differ: on activations with rare outliers, percentile and entropy clip
(smaller scales), and so does ema (moving-average minmax), where minmax keeps the full range, and weights are quantized the same way by all three.
(ONNX Runtime's own "entropy" in quantize_static equals minmax bit for bit: 128 histogram bins into 128.)"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgedeploy.export.int8 import quantize_qdq


def _scales(path) -> dict[str, float]:
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]].reshape(-1)[0]) for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[1] in inits}


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
    path = tmp_path_factory.mktemp("int8") / "tiny.onnx"
    torch.onnx.export(net, torch.zeros(1, 3, 64, 64), str(path), input_names=["images"], output_names=["out"],
                      opset_version=17, dynamo=False)
    return path


def test_percentile_and_entropy_clip_outliers_minmax_keeps_them(tiny_onnx, tmp_path):
    rng = np.random.default_rng(0)
    calib = []
    for i in range(16):
        x = rng.standard_normal((1, 3, 64, 64)).astype(np.float32)
        if i == 3:
            x[0, 0, 5, 5] = 40.0  # one outlier among 196,608 values (beyond the 99.999th percentile)
        calib.append(x)
    scales = {}
    for method in ("minmax", "ema", "percentile", "entropy"):
        out = tmp_path / f"{method}.onnx"
        facts = quantize_qdq(tiny_onnx, out, "images", calib, [], calib_method=method)
        assert facts["calibration_method"] == method and facts["nonzero_zero_points"] == 0
        scales[method] = _scales(out)
    mm, pc, en, ema = scales["minmax"], scales["percentile"], scales["entropy"], scales["ema"]
    assert mm["images"] == pytest.approx(40.0 / 127, rel=1e-3)  # the outlier sets the minmax range
    assert pc["images"] < 0.5 * mm["images"] and en["images"] < 0.5 * mm["images"]
    assert en["images"] != pc["images"]
    assert ema["images"] < 0.5 * mm["images"]  # a moving average: one outlier image moves the range by ~1 %
    weights = [k for k in mm if k.endswith("weight")]
    assert weights and all(mm[k] == pc[k] == en[k] == ema[k] for k in weights)


def test_auto_picks_ema_for_detectors_and_percentile_when_histograms_fit(tiny_onnx):
    from edgedeploy.export.int8 import histogram_calibration_bytes, resolve_calib_method
    from edgedeploy.export.tasks import get_task_adapter

    detect_choice = get_task_adapter("detect").auto_calib_method
    assert get_task_adapter("classify").auto_calib_method is None

    assert resolve_calib_method("auto", tiny_onnx, 16, detect_choice)[0] == "ema"
    assert resolve_calib_method("auto", tiny_onnx, 16)[0] == "percentile"
    assert resolve_calib_method("minmax", tiny_onnx, 16, detect_choice) == ("minmax", "chosen by the user")
    # tiny: input 3x64x64, conv1 out 8x64x64 (= relu in), relu out, conv2 out 4x62x62, all float32, per image
    per_image = 4 * (3 * 64 * 64 + 8 * 64 * 64 + 8 * 64 * 64 + 4 * 62 * 62)
    assert histogram_calibration_bytes(tiny_onnx, 10) == 10 * per_image
    huge = resolve_calib_method("auto", tiny_onnx, 10**7)
    assert huge[0] == "minmax" and "GiB" in huge[1]
