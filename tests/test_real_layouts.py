"""Datasets in the layouts users have, written by the tests themselves, through `deploy train` -> `deploy export
--int8` -> `deploy eval` on the exported ONNX, each command from another working directory:

- an ImageFolder with a .gif in a class folder (counted and named, not silently dropped),
- an Ultralytics set: a data YAML elsewhere (`path: ../tiny`), `images/train2017` <-> `labels/train2017`, dict names,
- CamVid-style `train/ trainannot/ val/ valannot/` with the void label 11 (`--ignore-index 11` at training only).

Every synthetic-data generator and renderer is made to raise for the whole module: calibration, parity inputs and
evaluation must all come from the real images. The reports must say where those images came from and how many of
how many; bad input (missing folders, labels, classes, mask values) must stop with an error that names the file
and the fix, writing nothing.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from edgedeploy.cli import main

PALETTE = [(0, 0, 220), (0, 200, 0), (220, 0, 0), (0, 200, 220)]  # BGR class colours


def _no_synthetic(*_a, **_k):
    raise AssertionError("synthetic data used in a real-data run")


@pytest.fixture(scope="module")
def no_synthetic():
    """Every way to make synthetic images raises (module-wide: the trained fixtures are shared)."""
    import edgedeploy.data.synthetic_classify as sc
    import edgedeploy.data.synthetic_detect as sd
    import edgedeploy.data.synthetic_segment as ss
    from edgedeploy.export.tasks import base, classify, detect, segment

    mp = pytest.MonkeyPatch()
    for mod, names in ((sc, ("make_synthetic_classification", "render_shape_image")),
                       (sd, ("synthetic_detection_dataset", "render_image")),
                       (ss, ("make_synthetic_segmentation", "render_sample"))):
        for name in names:
            mp.setattr(mod, name, _no_synthetic)
    for cls in (base.TaskAdapter, classify.ClassifyAdapter, detect.DetectAdapter, segment.SegmentAdapter):
        mp.setattr(cls, "synthetic_images", _no_synthetic)
    yield
    mp.undo()


def _cli(cwd: Path, monkeypatch, *argv: str) -> int:
    cwd.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(cwd)
    return main([*argv])


def _report(out: Path, model: str) -> dict:
    report = json.loads((out / model / "export_report.json").read_text())
    return {s["name"]: s for s in report["steps"]}


def _assert_real(steps: dict, data_root: Path, eval_total: int) -> dict:
    """The int8 step calibrated on the dataset's train split and was scored on its whole val split."""
    int8 = steps["int8"]["details"]
    calib = int8["calibration"]
    assert calib["synthetic"] is False and str(data_root.resolve()) in calib["where"]
    assert 0 < calib["images"] <= calib["available"]
    acc = int8["accuracy"]
    assert acc["labelled"] and not acc["eval_synthetic"] and str(data_root.resolve()) in acc["eval_source"]
    assert acc["eval_images"] == acc["eval_available"] == eval_total  # the whole val split, not a subset
    return int8


# ------------------------------------------------------------------------------------------- ImageFolder


def _shape(label: int, rng: np.random.Generator, size: int = 40) -> np.ndarray:
    img = np.full((size, size, 3), int(rng.integers(90, 160)), np.uint8)
    c = size // 2 + int(rng.integers(-4, 5))
    colour = PALETTE[label]
    if label == 0:
        cv2.circle(img, (c, c), size // 4, colour, -1)
    else:
        cv2.rectangle(img, (c - size // 4, c - size // 4), (c + size // 4, c + size // 4), colour, -1)
    return img


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory, no_synthetic):
    tmp = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    data = tmp / "flowers"
    for split, per in (("train", 12), ("val", 6)):
        for label, name in enumerate(("circle", "square")):
            folder = data / split / name
            folder.mkdir(parents=True)
            for i in range(per):
                cv2.imwrite(str(folder / f"{i}.png"), _shape(label, rng))
    Image.fromarray(_shape(0, rng)[:, :, ::-1]).save(data / "train" / "circle" / "animated.gif")
    return tmp, data


def test_imagefolder_train_export_int8_eval_from_elsewhere(imagefolder, monkeypatch, capsys, caplog):
    tmp, data = imagefolder
    caplog.set_level(logging.WARNING)
    # trained from tmp/a with the path typed relative to it
    assert _cli(tmp / "a", monkeypatch, "train", "--model", "mobilenetv3_small", "--data", "../flowers", "--epochs",
                "1", "--imgsz", "32", "--batch", "8", "--workers", "0", "--out", "run", "--quiet") == 0
    out = capsys.readouterr().out
    assert "ImageFolder" in out and "1 file(s) skipped" in out
    assert "animated.gif" in caplog.text and "skipped 1 file(s)" in caplog.text  # named, not dropped silently
    ckpt = tmp / "a" / "run" / "best.pt"
    from edgedeploy.models.checkpoint import read_checkpoint

    meta = read_checkpoint(ckpt)["meta"]
    assert meta["data"] == str(data.resolve()) and meta["data_as_typed"] == "../flowers"

    # exported from tmp/b: the recorded absolute path is found
    assert _cli(tmp / "b", monkeypatch, "export", "--weights", str(ckpt), "--int8", "--builder", "none",
                "--calib-images", "8", "--out", "exp", "--no-progress") == 0
    screen = capsys.readouterr().out
    assert f"calibration: 8 of 24 images from {data.resolve() / 'train'}" in screen  # the .gif is not an input
    assert "evaluation: 12 of 12 images from" in screen
    int8 = _assert_real(_report(tmp / "b" / "exp", "mobilenetv3_small"), data, 12)
    with capsys.disabled():  # the figures quoted in the docs
        print("\nimagefolder int8:", json.dumps(int8["accuracy"]))

    # evaluated from tmp/c without --data: the sidecar says where the training data is
    onnx = tmp / "b" / "exp" / "mobilenetv3_small" / "mobilenetv3_small.int8.onnx"
    assert _cli(tmp / "c", monkeypatch, "eval", str(onnx), "--quiet", "--json", "scores.json") == 0
    screen = capsys.readouterr().out
    assert f"data: {data.resolve()} (ImageFolder" in screen and "(recorded at training)" in screen
    scores = json.loads((tmp / "c" / "scores.json").read_text())
    assert scores["n"] == 12 and scores["top1"] == pytest.approx(int8["accuracy"]["low"]["top1"], abs=1e-9)


def test_recorded_data_gone_is_an_error_naming_path_and_flag(imagefolder, monkeypatch, capsys):
    tmp, data = imagefolder
    ckpt = tmp / "a" / "run" / "best.pt"
    onnx = tmp / "b" / "exp" / "mobilenetv3_small" / "mobilenetv3_small.onnx"
    if not ckpt.is_file() or not onnx.is_file():
        pytest.skip("needs the checkpoint and export of the test above")
    moved = tmp / "moved"
    data.rename(moved)
    try:
        assert _cli(tmp / "d", monkeypatch, "export", "--weights", str(ckpt), "--int8", "--builder", "none",
                    "--out", "exp", "--no-progress") == 1
        err = capsys.readouterr().err
        assert str(data.resolve()) in err and "--calib DIR" in err and "--eval-data DIR" in err
        assert not (tmp / "d" / "exp").exists()  # nothing written
        assert _cli(tmp / "d", monkeypatch, "eval", str(onnx), "--quiet") == 1
        err = capsys.readouterr().err
        assert str(data.resolve()) in err and "--data DIR" in err
        # the flags named in the message work
        assert _cli(tmp / "d", monkeypatch, "eval", str(onnx), "--data", str(moved), "--quiet") == 0
    finally:
        moved.rename(data)


# --------------------------------------------------------------------------------------- Ultralytics YAML


def _detect_image(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, list[str]]:
    img = np.full((size, size, 3), int(rng.integers(60, 120)), np.uint8)
    lines = []
    for _ in range(2):
        cls = int(rng.integers(0, 2))
        w = int(rng.integers(14, 24))
        x0, y0 = (int(v) for v in rng.integers(2, size - w - 2, 2))
        if cls == 0:
            cv2.rectangle(img, (x0, y0), (x0 + w, y0 + w), PALETTE[0], -1)
        else:
            cv2.circle(img, (x0 + w // 2, y0 + w // 2), w // 2, PALETTE[1], -1)
        lines.append(f"{cls} {(x0 + w / 2) / size:.5f} {(y0 + w / 2) / size:.5f} {w / size:.5f} {w / size:.5f}")
    return img, lines


@pytest.fixture(scope="module")
def ultralytics(tmp_path_factory, no_synthetic):
    tmp = tmp_path_factory.mktemp("ultra")
    rng = np.random.default_rng(1)
    root = tmp / "tiny"
    for split, n in (("train2017", 16), ("val2017", 6)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            img, lines = _detect_image(rng)
            cv2.imwrite(str(root / "images" / split / f"{i:06d}.jpg"), img)
            (root / "labels" / split / f"{i:06d}.txt").write_text("\n".join(lines) + "\n")
    (tmp / "cfg").mkdir()
    yaml_file = tmp / "cfg" / "tiny.yaml"
    yaml_file.write_text("path: ../tiny\ntrain: images/train2017\nval: images/val2017\ntest:\n"
                         "names:\n  0: square\n  1: disc\n")
    return tmp, root, yaml_file


def test_ultralytics_yaml_train_export_int8_eval_from_elsewhere(ultralytics, monkeypatch, capsys):
    tmp, root, yaml_file = ultralytics
    assert _cli(tmp / "a", monkeypatch, "train", "--model", "yolox_nano", "--data", "../cfg/tiny.yaml", "--epochs",
                "1", "--imgsz", "64", "--batch", "8", "--workers", "0", "--out", "run", "--quiet",
                "--precise-bn", "0") == 0
    screen = capsys.readouterr().out
    assert "Ultralytics data YAML tiny.yaml" in screen
    ckpt = tmp / "a" / "run" / "best.pt"
    if not ckpt.is_file():
        ckpt = tmp / "a" / "run" / "last.pt"
    assert _cli(tmp / "b", monkeypatch, "export", "--weights", str(ckpt), "--int8", "--builder", "none",
                "--calib-images", "8", "--conf-thres", "0.01", "--out", "exp", "--no-progress") == 0
    screen = capsys.readouterr().out
    assert f"calibration: 8 of 16 images from {root.resolve() / 'images' / 'train2017'}" in screen
    steps = _report(tmp / "b" / "exp", "yolox_nano")
    int8 = steps["int8"]["details"]
    assert int8["calibration"]["synthetic"] is False and "train2017" in int8["calibration"]["where"]
    acc = int8["accuracy"]
    assert acc["labelled"] and not acc["eval_synthetic"] and str(root.resolve()) in acc["eval_source"]
    assert acc["eval_images"] == acc["eval_available"] == 6 and "map50_95" in acc["low"]
    with capsys.disabled():
        print("\nultralytics int8:", json.dumps(acc))

    onnx = tmp / "b" / "exp" / "yolox_nano" / "yolox_nano.int8.onnx"
    assert _cli(tmp / "c", monkeypatch, "eval", str(onnx), "--quiet", "--json", "scores.json") == 0
    screen = capsys.readouterr().out
    assert f"data: {yaml_file.resolve()} (Ultralytics data YAML tiny.yaml)" in screen
    scores = json.loads((tmp / "c" / "scores.json").read_text())
    assert scores["num_images"] == 6 and scores["data"] == str(root.resolve()) and 0 <= scores["map50"] <= 1


def test_ultralytics_bad_input_names_file_and_fix(ultralytics, tmp_path, monkeypatch, capsys):
    tmp, root, _ = ultralytics
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"path: {root}\ntrain: images/train2017\nval: images/val2018\nnames: [square, disc]\n")
    assert _cli(tmp_path / "w", monkeypatch, "train", "--model", "yolox_nano", "--data", str(bad), "--epochs", "1",
                "--imgsz", "64", "--out", "run", "--quiet") == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "`val: images/val2018`" in err and "does not exist" in err
    assert not (tmp_path / "w" / "run").exists()
    # images but no labels at all
    nolabels = tmp_path / "nolabels"
    shutil.copytree(root / "images", nolabels / "images")
    (nolabels / "labels" / "train2017").mkdir(parents=True)
    (nolabels / "data.yaml").write_text("train: images/train2017\nval: images/val2017\nnames: [square, disc]\n")
    assert _cli(tmp_path / "w", monkeypatch, "train", "--model", "yolox_nano", "--data", str(nolabels), "--epochs",
                "1", "--imgsz", "64", "--out", "run", "--quiet") == 1
    err = capsys.readouterr().err
    assert "no label files in" in err and str(nolabels / "labels" / "train2017") in err
    assert not (tmp_path / "w" / "run").exists()


# ------------------------------------------------------------------------------------------------- CamVid

VOID = 11


def CAMVID_COLOURS(k: int) -> tuple[int, int, int]:  # noqa: N802
    return (k * 23 % 256, k * 61 % 256, k * 97 % 256)


@pytest.fixture(scope="module")
def camvid(tmp_path_factory, no_synthetic):
    """11 classes + void 11: class k is a horizontal band of grey level 20k, with void pixels along its border."""
    tmp = tmp_path_factory.mktemp("camvid")
    rng = np.random.default_rng(2)
    root = tmp / "CamVid"
    for split, n in (("train", 8), ("val", 4), ("test", 2)):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir(parents=True)
        for i in range(n):
            mask = np.zeros((48, 64), np.uint8)
            order = rng.permutation(11)
            for band, k in enumerate(order[:4]):
                mask[band * 12:(band + 1) * 12] = k
            mask[::12] = VOID  # void borders
            m = mask.astype(np.int64)
            img = np.stack([m * 20, 255 - m * 20, (m * 37) % 256], -1)
            img = np.clip(img + rng.integers(-10, 11, img.shape), 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / split / f"f{i:03d}.png"), img)
            annot = Image.fromarray(mask, mode="L").convert("P")  # index masks with a colour per class
            annot.putpalette([c for k in range(256) for c in CAMVID_COLOURS(k)])
            annot.save(root / f"{split}annot" / f"f{i:03d}.png")
    return tmp, root


def test_camvid_void_11_train_export_int8_eval_from_elsewhere(camvid, monkeypatch, capsys):
    tmp, root = camvid
    assert _cli(tmp / "a", monkeypatch, "train", "--model", "lraspp_mobilenetv3_small", "--data", "../CamVid",
                "--num-classes", "11", "--ignore-index", str(VOID), "--epochs", "1", "--imgsz", "64", "--batch", "4",
                "--workers", "0", "--out", "run", "--quiet") == 0
    screen = capsys.readouterr().out
    assert "CamVid" in screen and f"ignore index {VOID}" in screen
    ckpt = tmp / "a" / "run" / "best.pt"
    # no --ignore-index here nor at eval: it travels in the checkpoint and the sidecar
    assert _cli(tmp / "b", monkeypatch, "export", "--weights", str(ckpt), "--int8", "--builder", "none",
                "--calib-images", "4", "--out", "exp", "--no-progress") == 0
    screen = capsys.readouterr().out
    assert f"calibration: 4 of 8 images from {root.resolve() / 'train'}" in screen
    model = "lraspp_mobilenetv3_small"
    int8 = _assert_real(_report(tmp / "b" / "exp", model), root, 4)
    assert "miou" in int8["accuracy"]["low"]
    with capsys.disabled():
        print("\ncamvid int8:", json.dumps(int8["accuracy"]))
    onnx = tmp / "b" / "exp" / model / f"{model}.int8.onnx"
    side = json.loads(Path(str(onnx) + ".json").read_text())
    assert side["postprocess"]["ignore_index"] == VOID and side["data"]["path"] == str(root.resolve())
    assert side["postprocess"]["palette"] == [list(CAMVID_COLOURS(k)) for k in range(11)]  # class colours travel

    assert _cli(tmp / "c", monkeypatch, "eval", str(onnx), "--quiet", "--json", "scores.json") == 0
    screen = capsys.readouterr().out
    assert f"ignore index {VOID}" in screen and "CamVid" in screen
    scores = json.loads((tmp / "c" / "scores.json").read_text())
    assert scores["miou"] == pytest.approx(int8["accuracy"]["low"]["miou"], abs=1e-6)


def test_camvid_wrong_ignore_index_or_classes_refused_writing_nothing(camvid, tmp_path, monkeypatch, capsys):
    tmp, root = camvid
    ckpt = tmp / "a" / "run" / "best.pt"
    if not ckpt.is_file():
        pytest.skip("needs the checkpoint of the test above")
    # the void label declared as 255: the masks' 11s are neither a class nor ignored -> named mask file, the flag
    assert _cli(tmp_path / "w", monkeypatch, "export", "--weights", str(ckpt), "--int8", "--builder", "none",
                "--ignore-index", "255", "--out", "exp", "--no-progress") == 1
    err = capsys.readouterr().err
    assert "holds value(s) [11]" in err and "annot" in err and "--ignore-index" in err
    assert not (tmp_path / "w" / "exp").exists()
    # a dataset whose class list is not the checkpoint's
    other = tmp_path / "other"
    shutil.copytree(root, other)
    (other / "classes.txt").write_text("\n".join(f"thing{i}" for i in range(11)) + "\n")
    assert _cli(tmp_path / "w", monkeypatch, "export", "--weights", str(ckpt), "--fp16", "--builder", "none",
                "--eval-data", str(other), "--out", "exp", "--no-progress") == 1
    assert "not the checkpoint's" in capsys.readouterr().err
    assert not (tmp_path / "w" / "exp").exists()
    onnx = tmp / "b" / "exp" / "lraspp_mobilenetv3_small" / "lraspp_mobilenetv3_small.onnx"
    assert _cli(tmp_path / "w", monkeypatch, "eval", str(onnx), "--data", str(other), "--quiet") == 1
    assert "labels would not line up" in capsys.readouterr().err


def test_agreement_is_printed_with_the_digits_that_show_a_difference():
    from edgedeploy.export.pipeline import _fraction

    assert _fraction(0.9995, "agreement") == "0.9995"  # was "1.000"
    assert _fraction(0.99999, "agreement") == "0.99999"
    assert _fraction(1.0, "agreement") == "1.0000" and _fraction(0.765, "top1") == "0.765"
    assert _fraction(0.99996, "top1") == "0.99996"


def test_yolo_split_tolerates_and_names_other_formats(ultralytics, tmp_path):
    from edgedeploy.data.sources import open_detection_dataset

    _, root, yaml_file = ultralytics
    copy = tmp_path / "tiny"
    shutil.copytree(root, copy)
    (tmp_path / "tiny.yaml").write_text(yaml_file.read_text().replace("path: ../tiny", "path: tiny"))
    Image.new("RGB", (8, 8)).save(copy / "images" / "val2017" / "clip.gif")
    ds = open_detection_dataset(tmp_path / "tiny.yaml", "val")
    assert len(ds) == 6 and ds.skipped_images == 1 and ds.names == ["square", "disc"]
    assert any("clip.gif" in str(i) for i in ds.issues) and "1 unreadable images skipped" in ds.summary()
