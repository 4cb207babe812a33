"""What `deploy export --weights CKPT` infers from a `deploy train` checkpoint: the model, the held-out set (the
training data's val split, labels in classes.txt order) and the calibration images (its train split); and the
task-specific flags, which are refused for a model of another task."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgedeploy.cli import main
from edgedeploy.data.imagefolder import load_imagefolder
from edgedeploy.data.synthetic_classify import make_synthetic_classification
from edgedeploy.export.calibration import read_image_dir
from edgedeploy.eval.classify import evaluate_classifier, load_classifier
from edgedeploy.train.classify import train_classifier

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    # 4 shapes: label order circle, square, triangle, star differs from sorted folder order (... star, triangle)
    data = make_synthetic_classification(tmp / "shapes", num_classes=4, train_per_class=16, val_per_class=8,
                                         imgsz=32, seed=3, progress=False)
    result = train_classifier("mobilenetv3_small", data, epochs=2, batch_size=16, imgsz=32, optimizer="adamw",
                              out_dir=tmp / "run", progress=False)
    return {"data": data, "ckpt": result.best, "tmp": tmp}


def test_export_from_checkpoint_uses_its_dataset_in_label_order(run, tmp_path):
    out = tmp_path / "exports"
    rc = main(["export", "--weights", str(run["ckpt"]), "--int8", "--builder", "none", "--out", str(out),
               "--eval-images", "32", "--calib-images", "16", "--no-progress"])
    assert rc == 0
    report = json.loads((out / "mobilenetv3_small" / "export_report.json").read_text())
    int8 = next(s for s in report["steps"] if s["name"] == "int8")["details"]
    assert int8["calibration"]["source"] == str(run["data"] / "train") and int8["calibration"]["images"] == 16
    acc = int8["accuracy"]
    assert acc["labelled"] and acc["eval_source"] == str(run["data"] / "val") and acc["eval_images"] == 32

    # the report's FP32 top-1 is the one PyTorch gets on the same split with the training label order
    model, meta = load_classifier(run["ckpt"])
    assert meta["class_names"] == ["circle", "square", "triangle", "star"]
    _, val = load_imagefolder(run["data"], 32, MEAN, STD)
    torch_top1 = evaluate_classifier(model, val, progress=False)["top1"]
    assert acc["fp32"]["top1"] == pytest.approx(torch_top1, abs=1e-9)


def test_eval_data_with_other_class_order_is_refused(run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(run["data"], other)
    (other / "classes.txt").write_text("star\ntriangle\nsquare\ncircle\n")
    rc = main(["export", "--weights", str(run["ckpt"]), "--fp16", "--builder", "none", "--out", str(tmp_path / "o"),
               "--eval-data", str(other), "--no-progress"])
    assert rc == 1
    assert "not the checkpoint's" in capsys.readouterr().err


def test_flags_of_another_task_and_missing_model_are_errors(tmp_path, capsys):
    assert main(["export", "--model", "mobilenetv3_small", "--nms", "onnx", "--out", str(tmp_path)]) == 1
    assert "--nms applies to detect models" in capsys.readouterr().err
    assert main(["export", "--model", "yolox_nano", "--argmax", "--out", str(tmp_path)]) == 1
    assert "--argmax applies to segment models" in capsys.readouterr().err
    assert main(["export", "--out", str(tmp_path)]) == 1
    assert "--model NAME" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written for a refused command


def test_calibration_images_cover_every_class(run):
    images, skipped = read_image_dir(run["data"] / "train", 8)
    assert len(images) == 8 and skipped == 0
    # 4 classes x 16 sorted files, 8 evenly spaced picks: two per class folder, not eight circles
    files = sorted((run["data"] / "train").rglob("*.jpg"))
    picked = [files[int(i * len(files) / 8)] for i in range(8)]
    assert sorted({p.parent.name for p in picked}) == ["circle", "square", "star", "triangle"]
    import cv2

    assert all(np.array_equal(a, cv2.imread(str(p))) for a, p in zip(images, picked))


def test_input_size_rules_are_per_task(tmp_path, capsys):
    # LR-ASPP exports at any size (its pooling branch is size-agnostic), with the parity proof on the argmax mask
    out = tmp_path / "seg"
    assert main(["export", "--model", "lraspp_mobilenetv3_small", "--imgsz", "200", "--argmax", "--builder", "none",
                 "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "lraspp_mobilenetv3_small" / "export_report.json").read_text())
    assert report["imgsz"] == 200
    assert {s["name"]: s["status"] for s in report["steps"]}["parity_simplified"] == "ok"
    # a YOLO head needs whole stride-32 grids, MobileViT 2x2 patches after 32x downsampling: refused before
    # anything is written
    assert main(["export", "--model", "yolox_nano", "--imgsz", "200", "--out", str(tmp_path / "d")]) == 2
    assert "must be a multiple of 32 for detect models" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    assert main(["export", "--model", "mobilevit_xxs", "--imgsz", "224", "--out", str(tmp_path / "v")]) == 2
    assert "must be a multiple of 64 for classify models" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()
    # classifiers pool adaptively: EfficientNet's published sizes (240, 300, 380 ...) are not multiples of 32
    from edgedeploy.models.artifact import describe_artifact

    assert describe_artifact(model="efficientnet_b1").imgsz == 240
    assert describe_artifact(model="mobilenetv3_small", imgsz=200).imgsz == 200


def test_fp16_keep_blocks_more_op_types(run, tmp_path):
    import onnx

    out = tmp_path / "keep"
    assert main(["export", "--weights", str(run["ckpt"]), "--fp16", "--fp16-keep", "Conv", "--builder", "none",
                 "--out", str(out), "--eval-images", "16", "--no-progress"]) == 0
    report = json.loads((out / "mobilenetv3_small" / "export_report.json").read_text())
    fp16 = next(s for s in report["steps"] if s["name"] == "fp16")["details"]
    assert "Conv" in fp16["kept_fp32_op_types"] and fp16["accuracy"]["low"]["agreement"] == 1.0
    model = onnx.load(str(out / "mobilenetv3_small" / "mobilenetv3_small.fp16.onnx"))
    weights = {i.name: i.data_type for i in model.graph.initializer}
    conv_weights = [n.input[1] for n in model.graph.node if n.op_type == "Conv"]
    assert conv_weights and all(weights[w] == onnx.TensorProto.FLOAT for w in conv_weights if w in weights)
