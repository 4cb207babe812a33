"""Detection losses: YOLOv5 anchor/cell matching, YOLOX SimOTA assignment, and that both actually train."""

from __future__ import annotations

import pytest
import torch

from edgedeploy.errors import InputError
from edgedeploy.models.yolov5 import YOLOv5
from edgedeploy.models.yolox import YOLOX
from edgedeploy.train.detect_losses import YOLOv5Loss, YOLOXLoss, build_detection_loss

IMGSZ = 64


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: one thread avoids OpenMP spin contention on shared CI cores (10x faster here).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _v5_preds(num_classes: int = 2, imgsz: int = IMGSZ) -> list[torch.Tensor]:
    return [torch.zeros(1, 3, imgsz // s, imgsz // s, 5 + num_classes) for s in (8, 16, 32)]


def test_yolov5_matching_anchors_and_neighbour_cells():
    model = YOLOv5(0.33, 0.125, num_classes=2)
    loss = build_detection_loss(model)
    assert isinstance(loss, YOLOv5Loss)
    # Box centred at (19.2, 35.2) px, 16 x 24 px, in a 64 px input.
    t = torch.tensor([[0, 1, 19.2 / IMGSZ, 35.2 / IMGSZ, 16 / IMGSZ, 24 / IMGSZ]])
    levels = loss.build_targets(_v5_preds(), t)

    def matches(level):
        (b, a, gj, gi), tbox, anch, c = levels[level]
        return {(int(a_), int(y), int(x)) for a_, y, x in zip(a, gj, gi)}, tbox, anch, c

    # P3 (stride 8): the box is 2 x 3 cells; all three anchors (1.25x1.6, 2x3.75, 4.1x2.9 cells) are within 4x.
    # Centre (2.4, 4.4) is in the left/top half of cell (2, 4): its left (1, 4) and upper (2, 3) neighbours join.
    p3, tbox, anch, cls = matches(0)
    assert p3 == {(a, y, x) for a in range(3) for (y, x) in [(4, 2), (4, 1), (3, 2)]}
    assert (cls == 1).all()
    own = [i for i in range(len(tbox)) if torch.allclose(tbox[i, :2], torch.tensor([0.4, 0.4]), atol=1e-5)]
    assert len(own) == 3 and torch.allclose(tbox[own[0], 2:], torch.tensor([2.0, 3.0]))
    left = [i for i in range(len(tbox)) if torch.allclose(tbox[i, :2], torch.tensor([1.4, 0.4]), atol=1e-5)]
    assert len(left) == 3  # offsets up to 1.5 cells are reachable by 2*sigmoid - 0.5
    # P4 (stride 16): box 1 x 1.5 cells; anchor 3 (3.7 x 7.4 cells) is 4.96x too tall -> rejected.
    p4, *_ = matches(1)
    assert {a for a, _, _ in p4} == {0, 1}
    # P5 (stride 32): every anchor is more than 4x larger than the box.
    p5, *_ = matches(2)
    assert p5 == set()


def test_yolov5_no_targets_only_objectness():
    model = YOLOv5(0.33, 0.125, num_classes=2)
    loss, items = build_detection_loss(model)(_v5_preds(), torch.zeros(0, 6))
    assert items["box"] == 0 and items["cls"] == 0 and items["obj"] > 0
    assert torch.isfinite(loss)


def _perfect_yolox_preds(cells_boxes: dict[tuple[int, int], tuple[float, float, float, float]], num_classes=2):
    """YOLOX raw outputs whose P3 cells (row, col) predict the given xyxy boxes; every other cell predicts a
    1-pixel box in the top-left corner (IoU ~0 with anything)."""
    preds = []
    for s in (8, 16, 32):
        n = IMGSZ // s
        p = torch.zeros(1, 5 + num_classes, n, n)
        ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        p[0, 0] = 0.5 / s - xs  # centre at pixel (0.5, 0.5)
        p[0, 1] = 0.5 / s - ys
        p[0, 2:4] = torch.log(torch.tensor(1.0 / s))
        if s == 8:
            for (r, c), (x1, y1, x2, y2) in cells_boxes.items():
                p[0, 0, r, c] = (x1 + x2) / 2 / s - c
                p[0, 1, r, c] = (y1 + y2) / 2 / s - r
                p[0, 2, r, c] = torch.log(torch.tensor((x2 - x1) / s))
                p[0, 3, r, c] = torch.log(torch.tensor((y2 - y1) / s))
        preds.append(p)
    return preds


def _assign(loss: YOLOXLoss, preds, gt_xyxy, gt_cls):
    raw, grid, stride, pred_xyxy = loss._flatten(preds)
    return loss.simota(gt_xyxy, gt_cls, pred_xyxy[0], raw[0, :, 5:], raw[0, :, 4], grid, stride)


def test_simota_assigns_best_predictions_inside_centre_region():
    loss = YOLOXLoss(num_classes=2, strides=(8, 16, 32))
    gt = torch.tensor([[16.0, 16.0, 48.0, 48.0]])  # centre (32, 32)
    # Cells (3,3) and (4,4) (centres 28 and 36 px) predict the gt exactly; (0,7) does too but is 4 px from the
    # image edge, outside the box and > 2.5 strides from its centre.
    preds = _perfect_yolox_preds({(3, 3): (16, 16, 48, 48), (4, 4): (16, 16, 48, 48), (0, 7): (16, 16, 48, 48)})
    fg, matched_gt, matched_iou = _assign(loss, preds, gt, torch.tensor([1.0]))
    # dynamic k = sum of the top-10 IoUs = 1 + 1 (+ ~0) -> 2 cells, the two perfect ones inside the prior.
    assert fg.sum() == 2
    assert set(fg.nonzero().squeeze(1).tolist()) == {3 * 8 + 3, 4 * 8 + 4}
    assert torch.allclose(matched_iou, torch.ones(2), atol=1e-5) and (matched_gt == 0).all()
    fg_cand, _ = loss.candidates(gt, *loss._flatten(preds)[1:3])
    assert not fg_cand[0 * 8 + 7]


def test_simota_conflicting_cell_goes_to_cheapest_gt():
    loss = YOLOXLoss(num_classes=2, strides=(8, 16, 32))
    a = (16.0, 16.0, 40.0, 40.0)
    b = (18.0, 18.0, 42.0, 42.0)  # overlaps a heavily; both centres near cell (3, 3)
    preds = _perfect_yolox_preds({(3, 3): b})  # the only good prediction matches b better than a
    fg, matched_gt, _ = _assign(loss, preds, torch.tensor([a, b]), torch.tensor([0.0, 1.0]))
    cell = 3 * 8 + 3
    assert fg[cell]
    order = fg.nonzero().squeeze(1).tolist()
    assert matched_gt[order.index(cell)] == 1


def test_bad_targets_raise():
    model = YOLOv5(0.33, 0.125, num_classes=2)
    with pytest.raises(InputError, match=r"\[M, 6\]"):
        build_detection_loss(model)(_v5_preds(), torch.zeros(3, 5))
    with pytest.raises(InputError, match="image_index"):
        build_detection_loss(model)(_v5_preds(), torch.tensor([[3, 0, 0.5, 0.5, 0.1, 0.1]]))
    with pytest.raises(InputError, match="YOLOv5 or YOLOX"):
        build_detection_loss(torch.nn.Conv2d(3, 3, 1))


@pytest.mark.parametrize("cls", [YOLOv5, YOLOX])
def test_loss_decreases_overfitting_one_batch(cls):
    torch.manual_seed(0)
    model = cls(0.33, 0.125, num_classes=3).train()
    loss_fn = build_detection_loss(model)
    if cls is YOLOX:
        loss_fn.use_l1 = True
    x = torch.rand(2, 3, IMGSZ, IMGSZ)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.4, 0.5], [1, 2, 0.3, 0.6, 0.25, 0.3], [1, 0, 0.7, 0.3, 0.3, 0.2]])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(25):
        loss, items = loss_fn(model(x), targets)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert sum(history[-3:]) / 3 < 0.6 * sum(history[:3]) / 3, history
    assert items["box"] > 0 and items["cls"] > 0
    if cls is YOLOX:
        assert items["l1"] > 0 and items["num_fg"] >= 3
