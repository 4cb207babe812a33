"""Official detector checkpoints (Megvii YOLOX, Ultralytics YOLOv5) load, keep their input convention, export,
and reproduce the original implementation's outputs. Fixtures: tests/fixtures/official/README.md."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from edgedeploy.data.preprocess import InputConvention, preset, to_input_tensor
from edgedeploy.errors import CheckpointError
from edgedeploy.models.registry import create_model

FIX = Path(__file__).parent / "fixtures" / "official"
CASES = {  # registry name: (official file, reference npz)
    "yolox_nano": ("yolox_nano.pth", "yolox_nano_ref.npz"),
    "yolov5n": ("yolov5n.pt", "yolov5n_ref.npz"),
}


def _image() -> np.ndarray:
    import cv2

    return cv2.imread(str(FIX / "image.png"))


def _reference(name: str):
    """The original's input (uint8, its own preprocessing) and its decoded output turned into our eval contract:
    (boxes xyxy, scores = obj * cls)."""
    ref = np.load(FIX / CASES[name][1])
    out = torch.from_numpy(ref["output"])
    xy, wh = out[..., :2], out[..., 2:4]
    boxes = torch.cat([xy - wh / 2, xy + wh / 2], -1).numpy()
    scores = (out[..., 4:5] * out[..., 5:]).numpy()
    return ref["input"], int(ref["imgsz"]), boxes, scores


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name", list(CASES))
def test_official_checkpoint_loads_and_reproduces_original(name):
    model = create_model(name, weights=str(FIX / CASES[name][0])).eval()
    meta = model.checkpoint_meta
    conv = InputConvention.from_dict(meta["preprocess"])
    their_input, imgsz, ref_boxes, ref_scores = _reference(name)
    # Our preprocessing of the image under the checkpoint's convention == the original's preprocessing.
    x, _, _ = to_input_tensor(_image(), imgsz, convention=conv)
    np.testing.assert_allclose(x, their_input.astype(np.float32) * np.float32(conv.scale), rtol=0, atol=1e-6)
    with torch.no_grad():
        boxes, scores = model(torch.from_numpy(x))
    assert _rel_err(boxes.numpy(), ref_boxes) <= 1e-4
    assert _rel_err(scores.numpy(), ref_scores) <= 1e-4
    # Planted error: the registry's default (RGB, /255) convention on the same weights is far off.
    x_wrong, _, _ = to_input_tensor(_image(), imgsz, convention=InputConvention(
        "bgr" if conv.channel_order == "rgb" else "rgb", conv.scale, conv.mean, conv.std, "letterbox",
        letterbox_align="center" if conv.letterbox_align == "topleft" else "topleft"))
    with torch.no_grad():
        _, wrong_scores = model(torch.from_numpy(x_wrong))
    assert _rel_err(wrong_scores.numpy(), ref_scores) > 1e-2


def test_conventions_recorded():
    yolox = create_model("yolox_nano", weights=str(FIX / "yolox_nano.pth")).checkpoint_meta
    assert yolox["source"] == "megvii-yolox" and yolox["num_classes"] == 80
    assert InputConvention.from_dict(yolox["preprocess"]) == preset("yolox")
    v5 = create_model("yolov5n", weights=str(FIX / "yolov5n.pt")).checkpoint_meta
    assert v5["source"] == "ultralytics-yolov5" and InputConvention.from_dict(v5["preprocess"]) == preset("yolov5")
    assert v5["class_names"][:2] == ["class0", "class1"]


def test_yolov5_anchors_converted_to_pixels():
    from edgedeploy.models.yolov5 import DEFAULT_ANCHORS

    model = create_model("yolov5n", weights=str(FIX / "yolov5n.pt"))
    # the generator kept Ultralytics' default anchors, stored in the file divided by the stride
    torch.testing.assert_close(model.anchors, torch.tensor(DEFAULT_ANCHORS, dtype=torch.float32))


@pytest.mark.parametrize("asked,file,really", [("yolox_s", "yolox_nano.pth", "yolox_nano"),
                                              ("yolov5s", "yolov5n.pt", "yolov5n")])
def test_other_variant_is_named(asked, file, really):
    with pytest.raises(CheckpointError, match=f"checkpoint of {really}, not {asked}: use --model {really}"):
        create_model(asked, weights=str(FIX / file))


def test_unknown_layout_lists_keys_and_formats(tmp_path):
    p = tmp_path / "other.pt"
    torch.save({"encoder.layer0.weight": torch.zeros(3), "encoder.layer1.weight": torch.zeros(3)}, p)
    with pytest.raises(CheckpointError) as e:
        create_model("yolox_nano", weights=str(p))
    msg = str(e.value)
    assert "encoder.layer0.weight" in msg and "missing keys" in msg
    assert "megvii-yolox" in msg and "ultralytics-yolov5" in msg


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": _Evil(str(marker)), "epoch": -1}, evil)
    with pytest.raises(CheckpointError, match="refused to load `(posix|os|nt).system`.*state_dict"):
        create_model("yolov5n", weights=str(evil))
    assert not marker.exists()
    # Same refusal through the Ultralytics stand-in path: a "models.*" class cannot smuggle a call either.
    evil2 = tmp_path / "evil2.pt"
    evil2.write_bytes(_pickle_with_reduce_in_module(str(marker)))
    with pytest.raises(CheckpointError):
        create_model("yolov5n", weights=str(evil2))
    assert not marker.exists()
    # The planted file is really malicious: an unrestricted load runs the command.
    torch.load(evil, weights_only=False)
    assert marker.exists()


def _pickle_with_reduce_in_module(marker: str) -> bytes:
    """A plain pickle (not torch's zip) whose model is `models.yolo.DetectionModel` with a state that calls
    os.system via a nested REDUCE."""
    cmd = f"touch {marker}".encode()
    return (b"\x80\x02}q\x00(X\x05\x00\x00\x00modelq\x01cmodels.yolo\nDetectionModel\nq\x02)\x81q\x03}q\x04"
            b"X\x01\x00\x00\x00xcposix\nsystem\nq\x05C" + bytes([len(cmd)]) + cmd + b"\x85R\x86bu.")


def test_restricted_load_admits_plain_state_dicts(tmp_path):
    from edgedeploy.models.safe_pickle import restricted_load

    p = tmp_path / "sd.pt"
    torch.save({"w": torch.arange(4.0), "meta": {"k": [1, 2.5, "x"]}}, p)
    obj = restricted_load(p)
    assert obj["w"].tolist() == [0, 1, 2, 3] and obj["meta"] == {"k": [1, 2.5, "x"]}


def test_export_cli_onnx_reproduces_original(tmp_path, capsys):
    """`deploy export --weights OFFICIAL` (model named by the file), ONNX fed by our preprocessing of the image
    following the sidecar's convention, against the original's outputs."""
    import onnxruntime as ort

    from edgedeploy.cli import main
    from edgedeploy.models.artifact import read_sidecar

    figures = {}
    for name, (file, _) in CASES.items():
        _, imgsz, ref_boxes, ref_scores = _reference(name)
        rc = main(["export", "--weights", str(FIX / file), "--imgsz", str(imgsz), "--nms", "none", "--builder",
                   "none", "--out", str(tmp_path), "--no-progress"])
        assert rc == 0, capsys.readouterr().err
        onnx = tmp_path / name / f"{name}.onnx"
        side = read_sidecar(onnx)
        assert side.source and side.preprocess
        x, _, _ = to_input_tensor(_image(), imgsz, convention=side.convention())
        sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x})))
        figures[name] = (_rel_err(outs["boxes"], ref_boxes), _rel_err(outs["scores"], ref_scores))
    print("ONNX vs original rel-err (boxes, scores):", figures)
    for name, (eb, es) in figures.items():
        assert eb <= 1e-4 and es <= 1e-4, (name, eb, es)


def test_legacy_yolox_convention_override():
    conv = preset("yolox-legacy")
    assert (conv.channel_order, conv.letterbox_align) == ("rgb", "topleft")
    assert conv.mean == pytest.approx((0.485, 0.456, 0.406))


def test_yolox_legacy_file_is_told_by_its_amp_entry(tmp_path):
    ckpt = torch.load(FIX / "yolox_nano.pth", weights_only=True)
    legacy = tmp_path / "legacy.pth"
    torch.save({"start_epoch": 300, "model": ckpt["model"], "optimizer": None, "amp": {"loss_scaler0": {}}}, legacy)
    meta = create_model("yolox_nano", weights=str(legacy)).checkpoint_meta
    assert InputConvention.from_dict(meta["preprocess"]) == preset("yolox-legacy")
    bare = tmp_path / "bare.pth"  # no trainer entries: current convention assumed, and the note says how to switch
    torch.save({"model": ckpt["model"]}, bare)
    meta = create_model("yolox_nano", weights=str(bare)).checkpoint_meta
    assert InputConvention.from_dict(meta["preprocess"]) == preset("yolox")
    assert any("--input-convention yolox-legacy" in n for n in meta["notes"])


def test_finetune_from_official_yolox_reinitialises_head_and_keeps_convention(tmp_path, capsys):
    from edgedeploy.data.synthetic_detect import synthetic_detection_dataset
    from edgedeploy.models.checkpoint import read_checkpoint
    from edgedeploy.train.config import DetectConfig
    from edgedeploy.train.detect import train_detector

    torch.set_num_threads(1)
    root = synthetic_detection_dataset(tmp_path / "syn", num_train=4, num_val=2, imgsz=64, seed=3)
    cfg = DetectConfig(model="yolox_nano", data=str(root), weights=str(FIX / "yolox_nano.pth"), epochs=1,
                       batch_size=2, imgsz=64, workers=0, max_iters=1, project=str(tmp_path / "runs"), name="ft",
                       device="cpu", seed=0, precise_bn=1, ema=False, mosaic=0.0, lr=1e-9)
    summary = train_detector(cfg)
    out = capsys.readouterr().out
    assert "80 classes in the checkpoint" in out and "re-initialised" in out and "head.cls_preds.0.weight" in out
    ckpt = read_checkpoint(summary["last"])
    assert InputConvention.from_dict(ckpt["meta"]["preprocess"]) == preset("yolox")
    assert ckpt["meta"]["weights_source"] == "megvii-yolox"
    # Loaded, not re-initialised: a backbone weight equals the official one (lr ~0, so one step leaves it there).
    official = create_model("yolox_nano", weights=str(FIX / "yolox_nano.pth")).state_dict()
    key = "backbone.dark3.1.cv1.conv.weight"
    torch.testing.assert_close(ckpt["model"][key], official[key], rtol=0, atol=1e-6)
    assert ckpt["model"]["head.cls_preds.0.weight"].shape[0] != 80


def test_old_sidecar_reads_as_rgb_unit_convention():
    from edgedeploy.models.artifact import ArtifactMeta

    old = {"model": "yolox_s", "task": "detect", "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "letterbox": True}
    conv = ArtifactMeta.from_dict(old).convention()
    assert (conv.channel_order, conv.scale, conv.resize, conv.letterbox_align) == ("rgb", 1 / 255, "letterbox", "center")
    new = ArtifactMeta(model="yolox_nano", task="detect")
    new.set_convention(preset("yolox"))
    again = ArtifactMeta.from_dict(new.to_dict())
    assert again.convention() == preset("yolox")
    assert again.std == pytest.approx([1 / 255] * 3)  # legacy fields say as much as they can (scale folded in std)


@pytest.mark.parametrize("conv_name", ["yolox", "yolov5", "yolox-legacy"])
def test_triton_preprocess_follows_the_convention(conv_name, monkeypatch, tmp_path):
    import sys
    import types

    from edgedeploy.models.artifact import ArtifactMeta
    from edgedeploy.engines.triton import PREPROCESS_MODEL_PY, preprocess_config
    from edgedeploy.runtime.engine import TensorSpec

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    ns: dict = {}
    exec(compile(PREPROCESS_MODEL_PY, "model.py", "exec"), ns)
    conv = preset(conv_name)
    meta = ArtifactMeta(model="yolox_nano", task="detect")
    meta.set_convention(conv)
    text = preprocess_config("p", meta, TensorSpec("images", (-1, 3, 96, 96), np.dtype(np.float32)), 4)
    found = __import__("re").findall(r'key: "(\w+)" value: \{ string_value: "((?:[^"\\]|\\.)*)" \}', text)
    params = {k: v.replace('\\"', '"') for k, v in found}
    model = ns["TritonPythonModel"]()
    cfg = {"parameters": {k: {"string_value": v} for k, v in params.items()},
           "output": [{"name": "images", "dims": [3, 96, 96], "data_type": "TYPE_FP32"}]}
    model.initialize({"model_config": __import__("json").dumps(cfg)})
    frame = _image()
    assert model.convention == conv
    x, sp = ns["preprocess"](frame, model.size, model.convention, model.dtype)
    ref, scale, pad = to_input_tensor(frame, 96, convention=conv)
    np.testing.assert_allclose(x, ref[0], rtol=1e-6, atol=1e-4)
    assert sp.tolist() == pytest.approx([scale, pad[0], pad[1]])


def test_runtime_detector_from_official_weights_uses_its_convention():
    from edgedeploy.runtime.pipelines import Detector

    det = Detector.from_model("yolox_nano", weights=str(FIX / "yolox_nano.pth"), imgsz=192)
    assert det.meta.convention() == preset("yolox") and det.meta.source == "megvii-yolox"
    x, _ = det.preprocess([_image()])
    their_input = np.load(FIX / "yolox_nano_ref.npz")["input"]
    np.testing.assert_array_equal(x, their_input.astype(np.float32))


def test_input_convention_dict_roundtrip_validation_and_geometry():
    from edgedeploy.errors import EdgeDeployError

    c = InputConvention("bgr", 1.0, (1, 2, 3), (4, 5, 6), "shorter_crop", "cubic", 0.875)
    assert InputConvention.from_dict(c.to_dict()) == c
    with pytest.raises(EdgeDeployError, match="channel_order"):
        InputConvention(channel_order="gbr")
    with pytest.raises(EdgeDeployError, match="unknown fields"):
        InputConvention.from_dict({"colour": "rgb"})
    img = _image()  # 320x240
    x, scale, pad = to_input_tensor(img, 64, convention=c)
    assert x.shape == (1, 3, 64, 64) and scale == pytest.approx(73 / 240) and pad == (-16, -4)  # 97x73 resized, centre 64x64
    _, s_tl, pad_tl = to_input_tensor(img, 64, convention=preset("yolox"))
    _, s_c, pad_c = to_input_tensor(img, 64, convention=preset("yolov5"))
    assert s_tl == s_c == 0.2 and pad_tl == (0, 0) and pad_c == (0, 8)
