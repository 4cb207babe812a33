"""Segmentation metrics against hand-computed values, and the evaluation loop on a real dataset."""

import math

import numpy as np
import pytest
import torch

from edgedeploy.eval.segment import (
    SegmentationMeter,
    confusion_matrix,
    evaluate_segmenter,
    predictions_at,
    scores_from_confusion,
)

# 2x4 example, 3 classes, one ignored pixel (255). Worked by hand:
#   gt0: pred0=1 pred1=1 | gt1: pred1=2 pred2=1 | gt2: pred0=1 pred2=1
#   pixel acc 4/7; class acc (1/2, 2/3, 1/2) -> 5/9; IoU (1/3, 2/4, 1/3) -> 7/18
TARGET = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
PRED = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])


def test_confusion_matrix_counts_and_ignores():
    cm = confusion_matrix(PRED, TARGET, num_classes=3, ignore_index=255)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 1]]
    assert int(cm.sum()) == 7  # the ignored pixel is not counted


def test_scores_match_hand_computation():
    s = scores_from_confusion(confusion_matrix(PRED, TARGET, 3, 255))
    assert s.pixel_acc == pytest.approx(4 / 7)
    assert s.mean_acc == pytest.approx(5 / 9)
    assert s.iou == pytest.approx([1 / 3, 1 / 2, 1 / 3])
    assert s.miou == pytest.approx(7 / 18)
    assert s.pixels == 7


def test_absent_class_is_excluded_but_false_positive_class_counts():
    # class 3 never occurs: NaN, left out of the means
    s = scores_from_confusion(confusion_matrix(PRED, TARGET, 4, 255))
    assert math.isnan(s.iou[3]) and math.isnan(s.acc[3])
    assert s.miou == pytest.approx(7 / 18)
    # predicting class 3 where the truth is 0 makes IoU(3) = 0 and lowers the mean
    pred = PRED.clone()
    pred[0, 0] = 3
    s = scores_from_confusion(confusion_matrix(pred, TARGET, 4, 255))
    assert s.iou[3] == 0.0
    assert s.iou[0] == pytest.approx(0 / 3)  # class 0 lost its only true positive: gt 2, pred 1 -> TP 0
    assert s.miou == pytest.approx((0 + 1 / 2 + 1 / 3 + 0) / 4)


def test_meter_accumulates_like_one_big_matrix():
    meter = SegmentationMeter(3, 255)
    meter.update(PRED[:1], TARGET[:1])
    meter.update(PRED[1:], TARGET[1:])
    assert meter.cm.tolist() == confusion_matrix(PRED, TARGET, 3, 255).tolist()


def test_out_of_range_prediction_is_an_error():
    with pytest.raises(ValueError, match="predicted class ids"):
        confusion_matrix(torch.tensor([0, 5]), torch.tensor([0, 1]), 3)


def test_predictions_at_resizes_logits_and_ids():
    logits = torch.zeros(3, 2, 2)
    logits[0] = 1.0  # class 0 everywhere at 1 ...
    logits[2, :, 1] = 5.0  # ... class 2 at 5 in the right column
    ids = predictions_at(logits.numpy(), (4, 6))
    # half-pixel bilinear 2 -> 6: output column x samples source (x + 0.5) / 3 - 0.5 = -1/3, 0, 1/3, 2/3, 1, 4/3;
    # class 2 wins once the right column's weight exceeds 1/5
    assert ids.tolist() == [[0, 0, 2, 2, 2, 2]] * 4
    ids2 = predictions_at(np.array([[1, 2]], np.int32), (2, 4))
    assert ids2.tolist() == [[1, 1, 2, 2], [1, 1, 2, 2]]


def test_evaluate_constant_predictor_on_synthetic_set(tmp_path):
    from edgedeploy.data.synthetic_segment import make_synthetic_segmentation
    from edgedeploy.data.voc import open_segmentation_data, read_mask

    root = make_synthetic_segmentation(tmp_path / "syn", n_train=1, n_val=4, imgsz=48, progress=False)
    ds = open_segmentation_data(root, "val", imgsz=64)

    def all_background(x: np.ndarray) -> np.ndarray:  # logits at 1/8 resolution, class 0 wins everywhere
        out = np.zeros((x.shape[0], ds.num_classes, x.shape[2] // 8, x.shape[3] // 8), np.float32)
        out[:, 0] = 1.0
        return out

    s = evaluate_segmenter(all_background, ds, batch_size=3, progress=False)
    masks = [read_mask(m) for _, m in ds.pairs]
    labelled = np.concatenate([m[m != 255] for m in masks])
    assert s.pixels == labelled.size
    assert s.pixel_acc == pytest.approx(float((labelled == 0).mean()))
    assert s.iou[0] == pytest.approx(float((labelled == 0).mean()))  # union = every labelled pixel
    present = [c for c in range(1, ds.num_classes) if (labelled == c).any()]
    assert all(s.iou[c] == 0.0 for c in present)
    assert s.miou == pytest.approx(s.iou[0] / (1 + len(present)))
