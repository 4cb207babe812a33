"""YOLOv5 / YOLOX: published size fidelity, the train/eval output contract, decoding and NMS."""

from __future__ import annotations

import math

import pytest
import torch

from edgedeploy.errors import EdgeDeployError, InputError
from edgedeploy.models import create_model, get_model_info, list_models
from edgedeploy.models.complexity import count_macs, count_macs_thop_convention, count_params, count_params_bn_folded
from edgedeploy.models.detect_common import decode_yolov5, decode_yolox
from edgedeploy.models.yolov5 import DEFAULT_ANCHORS, YOLOv5
from edgedeploy.runtime.nms import batched_detections
from edgedeploy.models.yolox import YOLOX

YOLOV5 = ["yolov5n", "yolov5s", "yolov5m", "yolov5l", "yolov5x"]
YOLOX_ALL = ["yolox_nano", "yolox_tiny", "yolox_s", "yolox_m", "yolox_l", "yolox_x"]
COUNT_SIZE = 64  # every level of a 640 (or 416) input is exactly 10x (6.5x) a 64 input's: MACs scale by area


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: one thread avoids OpenMP spin contention on shared CI cores (10x faster here).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_registry_entries():
    assert set(YOLOV5 + YOLOX_ALL) <= set(list_models(task="detect"))
    for name in YOLOV5 + YOLOX_ALL:
        info = get_model_info(name)
        assert info.task == "detect" and info.letterbox and info.default_num_classes == 80
        assert info.mean == (0.0, 0.0, 0.0) and info.std == (1.0, 1.0, 1.0)
        assert info.imgsz == (416 if name in ("yolox_nano", "yolox_tiny") else 640)
    assert get_model_info("YOLOv5-s").name == "yolov5s"
    assert get_model_info("yoloxnano").name == "yolox_nano"


@pytest.mark.parametrize("name", YOLOV5 + YOLOX_ALL)
def test_params_and_macs_match_published(name):
    # Built on the meta device: shapes only, so even the X variants count in milliseconds.
    with torch.device("meta"):
        model = create_model(name)
        info = model.model_info
        scale = (info.imgsz / COUNT_SIZE) ** 2
        if info.family == "yolov5":  # README counts the fused model; thop MACs without BN
            params, macs = count_params_bn_folded(model), count_macs(model, COUNT_SIZE) * scale
        else:  # README counts the unfused model with thop, BN ops included
            params, macs = count_params(model), count_macs_thop_convention(model, COUNT_SIZE) * scale
    assert params == pytest.approx(info.published_params, rel=0.01), f"{name}: {params:,}"
    assert macs == pytest.approx(info.published_macs, rel=0.03), f"{name}: {2 * macs / 1e9:.2f} GFLOPs"


def test_bn_folded_count_equals_actual_fusion():
    model = YOLOv5(0.33, 0.125, num_classes=3)
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    convs_without_bias = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.bias is None]
    assert len(bn) == len(convs_without_bias)
    fused = count_params(model) - sum(2 * b.num_features for b in bn) + sum(c.out_channels for c in convs_without_bias)
    assert count_params_bn_folded(model) == fused


@pytest.mark.parametrize("cls,kwargs", [(YOLOv5, {}), (YOLOX, {"depthwise": False}), (YOLOX, {"depthwise": True})])
def test_train_and_eval_contract(cls, kwargs):
    torch.manual_seed(0)
    model = cls(0.33, 0.125, num_classes=4, **kwargs)
    x = torch.rand(2, 3, 64, 96)
    model.train()
    raw = model(x)
    assert len(raw) == 3 and model.strides == (8, 16, 32)
    cells = [(64 // s) * (96 // s) for s in model.strides]
    if cls is YOLOv5:
        assert [tuple(r.shape) for r in raw] == [(2, 3, 64 // s, 96 // s, 9) for s in model.strides]
        assert tuple(model.anchors.shape) == (3, 3, 2)
        assert torch.equal(model.anchors, torch.tensor(DEFAULT_ANCHORS, dtype=torch.float32))
        n = 3 * sum(cells)
    else:
        assert [tuple(r.shape) for r in raw] == [(2, 9, 64 // s, 96 // s) for s in model.strides]
        n = sum(cells)
    model.eval()
    with torch.no_grad():
        boxes, scores = model(x)
    assert boxes.shape == (2, n, 4) and scores.shape == (2, n, 4)
    assert (scores >= 0).all() and (scores <= 1).all()
    assert (boxes[..., 2:] >= boxes[..., :2]).all()
    # Batch items are independent (no cross-talk through the decode).
    with torch.no_grad():
        b1, s1 = model(x[1:])
    torch.testing.assert_close(b1[0], boxes[1], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(s1[0], scores[1], rtol=1e-4, atol=1e-5)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_decode_yolov5_known_values():
    anchors = torch.tensor([[10.0, 13.0], [16.0, 30.0]])
    raw = torch.zeros(1, 2, 2, 3, 5 + 2)  # B, A, H, W, 5 + C
    # anchor 1, cell (x=2, y=1): sigmoid 0.75 on xy -> offset 2*0.75-0.5 = 1.0; sigmoid 0.75 on wh -> (1.5)^2
    raw[0, 1, 1, 2, :4] = _logit(0.75)
    raw[0, 1, 1, 2, 4] = _logit(0.8)
    raw[0, 1, 1, 2, 5:] = torch.tensor([_logit(0.5), _logit(0.25)])
    boxes, scores = decode_yolov5(raw, anchors, stride=16)
    assert boxes.shape == (1, 12, 4)
    i = 1 * 6 + 1 * 3 + 2  # anchor-major, then row, column
    cx, cy, w, h = (2 + 1.0) * 16, (1 + 1.0) * 16, 2.25 * 16, 2.25 * 30
    torch.testing.assert_close(boxes[0, i], torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]))
    torch.testing.assert_close(scores[0, i], torch.tensor([0.8 * 0.5, 0.8 * 0.25]))
    # All-zero logits: centre of the cell, exactly the anchor's size.
    cx, cy = (0 + 0.5) * 16, (1 + 0.5) * 16
    torch.testing.assert_close(boxes[0, 3], torch.tensor([cx - 5, cy - 6.5, cx + 5, cy + 6.5]))


def test_decode_yolox_known_values():
    raw = torch.zeros(1, 5 + 1, 2, 2)  # B, 4 + obj + C, H, W
    raw[0, :, 1, 0] = torch.tensor([0.25, -0.5, math.log(2.0), 0.0, _logit(0.9), _logit(0.5)])
    boxes, scores = decode_yolox(raw, stride=32)
    i = 1 * 2 + 0  # row 1, column 0
    cx, cy, w, h = (0.25 + 0) * 32, (-0.5 + 1) * 32, 64.0, 32.0
    torch.testing.assert_close(boxes[0, i], torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]))
    torch.testing.assert_close(scores[0, i], torch.tensor([0.45]))


def test_postprocess_nms_classes_thresholds():
    boxes = torch.tensor([[[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60], [70, 70, 80, 80]]],
                         dtype=torch.float32)
    scores = torch.zeros(1, 5, 3)
    scores[0, 0, 0] = 0.9  # kept
    scores[0, 1, 0] = 0.8  # IoU 0.68 with box 0, same class -> suppressed
    scores[0, 2, 1] = 0.7  # same place, other class -> kept (unless agnostic)
    scores[0, 3, 2] = 0.6  # kept
    scores[0, 4, 2] = 0.2  # below conf
    det = batched_detections(boxes, scores, conf_thres=0.25, iou_thres=0.5)[0]
    assert det[:, 4].tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert det[:, 5].tolist() == [0, 1, 2]
    torch.testing.assert_close(det[1, :4], boxes[0, 2])
    agn = batched_detections(boxes, scores, conf_thres=0.25, iou_thres=0.5, agnostic=True)[0]
    assert agn[:, 4].tolist() == pytest.approx([0.9, 0.6])
    top1 = batched_detections(boxes, scores, conf_thres=0.1, iou_thres=0.5, max_det=1)[0]
    assert top1.shape == (1, 6) and top1[0, 4].item() == pytest.approx(0.9)
    empty = batched_detections(boxes, scores, conf_thres=0.95)[0]
    assert empty.shape == (0, 6)


def test_bad_inputs_raise_actionable_errors():
    with pytest.raises(InputError, match="boxes \\[B,N,4\\]"):
        batched_detections(torch.zeros(5, 4), torch.zeros(5, 3))
    with pytest.raises(EdgeDeployError, match="num_classes"):
        create_model("yolox_nano", num_classes=0)
