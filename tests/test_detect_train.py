"""COCO evaluation (pycocotools) sanity, ONNX/engine output handling, and a tiny detector training run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgedeploy.data.detect_augment import letterbox_sample
from edgedeploy.data.synthetic_detect import synthetic_detection_dataset
from edgedeploy.data.yolo_format import DetectionRecord, load_yolo_dataset
from edgedeploy.errors import CheckpointError
from edgedeploy.eval.detect import COCO_STAT_NAMES, coco_summary_text, detections_to_coco, evaluate_detector
from edgedeploy.eval.predictors import detections_from_outputs, onnx_detect_fn, torch_detect_fn

IMGSZ = 128


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """On a shared, oversubscribed CPU, OpenMP's 2-thread barriers make small convs 10-50x slower than 1 thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return synthetic_detection_dataset(tmp_path_factory.mktemp("syn") / "set", num_train=16, num_val=10, imgsz=IMGSZ, seed=5)


@pytest.fixture(scope="module")
def val_set(synthetic_root):
    return load_yolo_dataset(synthetic_root, "val")


def oracle(dataset, size, shift=0.0, drop_class=None):
    """predict_fn that answers with the ground truth, in letterboxed input pixels (optionally shifted right by
    `shift` box widths, or missing one class). Works because evaluation visits images in dataset order."""
    state = {"next": 0}

    def predict(x: np.ndarray):
        out = []
        for _ in range(x.shape[0]):
            _, cls, boxes, _, _ = letterbox_sample(dataset, state["next"], size)
            state["next"] += 1
            boxes = boxes + np.outer(boxes[:, 2] - boxes[:, 0], [shift, 0, shift, 0])
            det = np.concatenate([boxes, np.full((len(cls), 1), 0.9), cls[:, None]], 1).astype(np.float32)
            out.append(det if drop_class is None else det[det[:, 5] != drop_class])
        return out

    return predict


def test_perfect_detections_score_one_and_shifted_boxes_score_lower(val_set, tmp_path, capsys):
    perfect = evaluate_detector(oracle(val_set, IMGSZ), val_set, IMGSZ, batch_size=4, out_dir=tmp_path)
    printed = capsys.readouterr().out
    assert perfect.map == pytest.approx(1.0) and perfect.map50 == pytest.approx(1.0)
    present = {val_set.names[c] for r in val_set.records for c in r.classes.tolist()}
    assert all(perfect.per_class_ap[n] == pytest.approx(1.0) for n in present)
    assert len(perfect.summary.splitlines()) == 12 and "Average Precision  (AP) @[ IoU=0.50:0.95" in printed
    assert len(perfect.stats) == len(COCO_STAT_NAMES) == 12
    assert coco_summary_text(perfect.stats) == perfect.summary  # our empty-result printout uses COCO's format
    assert (tmp_path / "pr_curve.png").stat().st_size > 1000

    shifted = evaluate_detector(oracle(val_set, IMGSZ, shift=0.2), val_set, IMGSZ, batch_size=3, verbose=False)
    # IoU of a box with itself shifted by 20% of its width is 0.8/1.2 = 0.67: counts at .5, fails from .7 up
    assert shifted.map50 == pytest.approx(1.0)
    assert 0.1 < shifted.map < 0.5

    dropped_class = val_set.records[0].classes[0]
    partial = evaluate_detector(oracle(val_set, IMGSZ, drop_class=dropped_class), val_set, IMGSZ, verbose=False)
    assert partial.per_class_ap[val_set.names[dropped_class]] == 0.0
    assert partial.map < 1.0
    assert json.dumps(partial.as_dict())  # serialisable for metrics files


def test_detections_are_mapped_back_through_the_letterbox():
    rec = DetectionRecord(1, None, width=200, height=100, classes=np.zeros(0, np.int64), boxes=np.zeros((0, 4), np.float32))
    # 200x100 letterboxed to 128: scale 0.64, content 128x64 padded by 32 rows on top
    det = np.array([[64.0, 32.0, 128.0, 96.0, 0.8, 2.0]], np.float32)
    (res,) = detections_to_coco(det, rec, 0.64, (0, 32))
    assert res["bbox"] == pytest.approx([100.0, 0.0, 100.0, 100.0]) and res["category_id"] == 2
    # boxes reaching into the padding are clipped to the image
    (res,) = detections_to_coco(np.array([[-10, 0, 140, 128, 0.5, 0]], np.float32), rec, 0.64, (0, 32))
    assert res["bbox"] == pytest.approx([0.0, 0.0, 200.0, 100.0])


def test_outputs_of_every_nms_variant_are_read():
    rng = np.random.default_rng(0)
    boxes = np.array([[[10, 10, 50, 50], [12, 11, 51, 52], [80, 80, 120, 120]]], np.float32)
    scores = np.array([[[0.9, 0.0], [0.8, 0.1], [0.0, 0.7]]], np.float32)
    (raw,) = detections_from_outputs({"boxes": boxes, "scores": scores}, conf_thres=0.25, iou_thres=0.5)
    np.testing.assert_allclose(raw, [[10, 10, 50, 50, 0.9, 0], [80, 80, 120, 120, 0.7, 1]])  # NMS removed the overlap
    packed = np.concatenate([raw, np.zeros((3, 6), np.float32)])[None]  # padded with zero-score rows
    (p,) = detections_from_outputs({"detections": packed})
    np.testing.assert_allclose(p, raw)
    efficient = {
        "num_dets": np.array([[2]], np.int32),
        "det_boxes": np.concatenate([raw[:, :4], rng.random((2, 4))]).astype(np.float32)[None],
        "det_scores": np.array([[0.9, 0.7, 0.0, 0.0]], np.float32),
        "det_classes": np.array([[0, 1, 0, 0]], np.int32),
    }
    (e,) = detections_from_outputs(efficient)
    np.testing.assert_allclose(e, raw)
    ours = {"num_dets": efficient["num_dets"], "boxes": efficient["det_boxes"], "scores": efficient["det_scores"],
            "classes": efficient["det_classes"]}  # edgedeploy's own `--nms onnx` output names
    np.testing.assert_allclose(detections_from_outputs(ours)[0], raw)
    # a 4-class model without NMS: scores [B,N,4] look like boxes by shape; the names decide
    four = np.zeros((1, 3, 4), np.float32)
    four[0, :, 0] = [0.9, 0.8, 0.0]
    four[0, 2, 3] = 0.7
    (named,) = detections_from_outputs({"scores": four, "boxes": boxes}, conf_thres=0.25, iou_thres=0.5)
    np.testing.assert_allclose(named, [[10, 10, 50, 50, 0.9, 0], [80, 80, 120, 120, 0.7, 3]])
    with pytest.raises(Exception, match="cannot read detections"):
        detections_from_outputs({"logits": np.zeros((1, 10), np.float32)})


def test_fixed_batch_fp16_engine_gets_padded_cast_batches_in_order():
    from edgedeploy.runtime.engine import TensorSpec
    from edgedeploy.eval.predictors import engine_detect_fn

    class FixedBatchEngine:  # stands in for a TensorRT engine built for batch 2 with an FP16 input
        input = TensorSpec("images", (2, 3, 4, 4), np.dtype(np.float16))
        calls = []

        def infer(self, x):
            assert x.shape == (2, 3, 4, 4) and x.dtype == np.float16
            self.calls.append(len(x))
            marker = x[:, 0, 0, 0].astype(np.float32)  # each image's box encodes which image it came from
            boxes = np.stack([marker, marker, marker + 5, marker + 5], 1)[:, None].astype(np.float32)
            return {"boxes": boxes, "scores": np.full((2, 1, 1), 0.9, np.float32)}

    engine = FixedBatchEngine()
    x = np.arange(5, dtype=np.float32)[:, None, None, None] * 10 * np.ones((5, 3, 4, 4), np.float32)
    dets = engine_detect_fn(engine)(x)
    assert len(dets) == 5 and len(engine.calls) == 3  # 2 + 2 + (1 padded to 2)
    assert [float(d[0, 0]) for d in dets] == [0.0, 10.0, 20.0, 30.0, 40.0]  # every image its own result


def _lively_yolox(num_classes: int) -> torch.nn.Module:
    """yolox_nano with neutral head biases so untrained outputs score ~0.25 (not ~1e-4) and NMS has work."""
    from edgedeploy.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("yolox_nano", num_classes=num_classes)
    for conv in list(model.head.cls_preds) + list(model.head.obj_preds):
        torch.nn.init.zeros_(conv.bias)
    return model.eval()


def test_onnx_file_and_pytorch_model_score_the_same(val_set, tmp_path):
    model = _lively_yolox(val_set.num_classes)
    path = tmp_path / "yolox.onnx"
    torch.onnx.export(
        model, torch.zeros(1, 3, IMGSZ, IMGSZ), str(path), input_names=["images"], output_names=["boxes", "scores"],
        dynamic_axes={"images": {0: "batch"}, "boxes": {0: "batch"}, "scores": {0: "batch"}}, opset_version=17, dynamo=False,
    )
    x = np.random.default_rng(0).random((2, 3, IMGSZ, IMGSZ), dtype=np.float32)
    ref = torch_detect_fn(model, conf_thres=0.2)(x)
    got = onnx_detect_fn(path, conf_thres=0.2)(x)
    assert sum(len(d) for d in ref) > 10  # real detections to compare, not two empty lists
    for r, g in zip(ref, got):
        assert r.shape == g.shape
        np.testing.assert_allclose(g, r.numpy(), atol=2e-3)
    a = evaluate_detector(torch_detect_fn(model), val_set, IMGSZ, batch_size=4, verbose=False)
    b = evaluate_detector(onnx_detect_fn(path), val_set, IMGSZ, batch_size=4, verbose=False)
    assert a.num_detections == b.num_detections > 0
    assert b.map == pytest.approx(a.map, abs=1e-3) and b.map50 == pytest.approx(a.map50, abs=1e-3)


def test_precise_bn_replaces_lagging_running_statistics():
    from edgedeploy.train.detect import recalibrate_batchnorm

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, momentum=0.03))
    batches = [(torch.randn(2, 3, 8, 8) * 3 + 2, None) for _ in range(3)]
    net.train()
    net(batches[0][0])  # one momentum update: running stats still mostly the 0/1 init
    assert recalibrate_batchnorm(net, batches, "cpu", batches=2) == 2
    bn = net[1]
    with torch.no_grad():
        feats = [net[0](x) for x, _ in batches[:2]]
    expected_mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    expected_var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, expected_var, rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.03 and net.training  # settings restored


@pytest.fixture(scope="module")
def smoke_run(synthetic_root, tmp_path_factory):
    from edgedeploy.train.config import DetectConfig
    from edgedeploy.train.detect import train_detector

    out = tmp_path_factory.mktemp("runs")
    cfg = DetectConfig(
        model="yolox_nano", data=str(synthetic_root), epochs=3, batch_size=4, imgsz=IMGSZ, workers=0, optimizer="adamw",
        lr=0.002, mosaic=1.0, close_mosaic=1, max_iters=3, project=str(out), name="smoke", device="cpu", seed=0, precise_bn=2,
    )  # fmt: skip
    return cfg, train_detector(cfg)


@pytest.mark.slow
def test_training_smoke_loss_falls_and_artifacts_exist(smoke_run):
    from edgedeploy.models.checkpoint import read_checkpoint

    cfg, summary = smoke_run
    run = summary["run_dir"]
    rows = json.loads(open(f"{run}/metrics.json").read())
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    # epochs 1-2 run with the same mosaic recipe; epoch 3 adds the L1 term, so compare the first two
    assert rows[1]["train/loss"] < rows[0]["train/loss"]
    assert all("val/mAP50-95" in r for r in rows) and "train/l1" in rows[0]
    for name in ("last.pt", "best.pt", "metrics.csv", "results.png", "pr_curve.png", "val_metrics.json"):
        assert (Path(run) / name).is_file() and (Path(run) / name).stat().st_size > 0, name
    ckpt = read_checkpoint(f"{run}/last.pt")
    assert ckpt["epoch"] == 2 and ckpt["meta"]["model_name"] == "yolox_nano" and ckpt["meta"]["imgsz"] == IMGSZ
    assert ckpt["meta"]["class_names"][:2] == ["circle", "rectangle"]


@pytest.mark.slow
def test_resume_continues_the_run(smoke_run):
    from dataclasses import replace

    from edgedeploy.train.detect import train_detector

    cfg, summary = smoke_run
    resumed = train_detector(replace(cfg, epochs=4, resume=summary["run_dir"]))
    assert resumed["run_dir"] == summary["run_dir"]
    rows = json.loads(open(f"{summary['run_dir']}/metrics.json").read())
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]


def test_checkpoint_of_the_other_yolo_family_is_refused(tmp_path):
    from edgedeploy.models.registry import create_model
    from edgedeploy.train.common import save_checkpoint
    from edgedeploy.eval.detect import load_detector

    v5 = create_model("yolov5n", num_classes=3)
    path = tmp_path / "v5.pt"
    save_checkpoint(path, v5, None, None, None, 0, None, {"model_name": "yolov5n", "num_classes": 3})
    with pytest.raises(CheckpointError, match=r"trained as yolov5n, not yolox_nano.*yolov5 checkpoint.*--model yolov5n"):
        load_detector(path, "yolox_nano")
    assert load_detector(path).num_classes == 3  # the meta is enough to rebuild it


@pytest.mark.slow
def test_eval_cli_on_the_trained_checkpoint(smoke_run, synthetic_root, tmp_path, capsys):
    from edgedeploy.eval.detect import evaluate_artifact
    from edgedeploy.eval.request import EvalRequest
    from edgedeploy.models.artifact import describe_artifact

    _, summary = smoke_run
    request = EvalRequest(describe_artifact(summary["best"]), data=str(synthetic_root), split="val", out=str(tmp_path),
                          batch=4)
    assert evaluate_artifact(request) == 0
    out = capsys.readouterr().out
    assert "Average Precision" in out and "mAP@.5" in out
    saved = json.loads((tmp_path / "eval_best.json").read_text())
    assert saved["num_images"] == 10 and len(saved["stats"]) == 12
