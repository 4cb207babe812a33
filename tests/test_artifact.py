"""One description of an artifact (`edgedeploy.models.artifact.describe_artifact`): precedence (explicit >
checkpoint meta / sidecar > registry), the validation it does once, and the caches that make one command read a
checkpoint and a sidecar once."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from edgedeploy.errors import CheckpointError, EdgeDeployError
from edgedeploy.models import artifact
from edgedeploy.models.artifact import ArtifactMeta, describe_artifact, write_sidecar
from edgedeploy.models.checkpoint import read_checkpoint_meta
from edgedeploy.models.registry import create_model, get_model_info
from edgedeploy.options import OptionError

CLS = "mobilenetv1_025"


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "cls.pt"
    torch.save({"model": create_model(CLS, num_classes=3).state_dict(),
                "meta": {"model_name": CLS, "task": "classify", "num_classes": 3, "class_names": ["a", "b", "c"],
                         "imgsz": 64, "data": "synthetic", "train_args": {"seed": 5}}}, path)
    return path


def test_precedence_explicit_checkpoint_registry(ckpt):
    d = describe_artifact(ckpt)
    assert (d.kind, d.model, d.task, d.imgsz, d.num_classes, d.class_names) == (
        "checkpoint", CLS, "classify", 64, 3, ("a", "b", "c"))
    assert d.data["train_args"]["seed"] == 5 and d.recorded()["data"] == "synthetic"
    assert describe_artifact(ckpt, imgsz=96).imgsz == 96  # explicit beats the checkpoint
    reg = describe_artifact(model=CLS)  # no file: the registry's defaults
    info = get_model_info(CLS)
    assert (reg.kind, reg.imgsz, reg.num_classes, reg.class_names) == ("registry", info.imgsz, None, ())
    assert tuple(reg.convention.mean) == tuple(info.mean)


def test_sidecar_precedence(tmp_path):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"stand-in")
    meta = ArtifactMeta(CLS, "classify", input_shape=[4, 3, 96, 96], class_names=["x", "y"], mean=[0.5] * 3,
                        std=[0.25] * 3, data={"path": "synthetic", "synthetic": True})
    write_sidecar(onnx, meta)
    d = describe_artifact(onnx)
    assert (d.kind, d.model, d.imgsz, d.num_classes, d.batch) == ("onnx", CLS, 96, 2, 4)
    assert tuple(d.convention.mean) == (0.5, 0.5, 0.5) and tuple(d.convention.std) == (0.25, 0.25, 0.25)
    assert d.recorded()["data"] == "synthetic"
    assert describe_artifact(onnx, imgsz=128).imgsz == 128


def test_validation_errors(ckpt, tmp_path):
    with pytest.raises(OptionError, match="from 32 to"):
        describe_artifact(ckpt, imgsz=0)
    with pytest.raises(OptionError, match="multiple of 32 for detect models"):
        describe_artifact(model="yolox_nano", imgsz=100)
    with pytest.raises(OptionError, match="--num-classes"):
        describe_artifact(ckpt, num_classes=0)
    with pytest.raises(EdgeDeployError, match="3 class names .* for 5 classes: pass --num-classes 3"):
        describe_artifact(ckpt, num_classes=5)
    with pytest.raises(EdgeDeployError, match="--model yolox_nano is a detect model, but .* records a classify model"):
        describe_artifact(ckpt, model="yolox_nano")
    det = tmp_path / "v5.pt"
    torch.save({"meta": {"model_name": "yolov5n", "num_classes": 3}}, det)
    with pytest.raises(CheckpointError, match="trained as yolov5n, not yolox_nano.*--model yolov5n"):
        describe_artifact(det, model="yolox_nano")
    with pytest.raises(CheckpointError, match="not found"):
        describe_artifact(tmp_path / "nope.pt")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"x")
    write_sidecar(bad, ArtifactMeta(CLS, "classify", preprocess={"colour": "rgb"}))
    with pytest.raises(EdgeDeployError, match="input convention"):
        describe_artifact(bad)


def test_checkpoint_meta_is_read_once_and_shared_state_is_read_only(ckpt, monkeypatch):
    loads = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    a = read_checkpoint_meta(ckpt)
    b = describe_artifact(ckpt).checkpoint
    assert a is b and len(loads) == 1
    a.as_dict()["num_classes"] = 99  # a private copy
    with pytest.raises(TypeError):
        a.train_args["seed"] = 6  # type: ignore[index]
    assert read_checkpoint_meta(ckpt).num_classes == 3 and len(loads) == 1
    torch.save({"meta": {"model_name": CLS, "num_classes": 4}}, ckpt)  # a new version of the file is read again
    assert read_checkpoint_meta(ckpt).num_classes == 4 and len(loads) == 2


def test_export_reads_the_checkpoint_once(ckpt, tmp_path, monkeypatch):
    from edgedeploy.cli import main

    loads = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    assert main(["export", "--weights", str(ckpt), "--builder", "none", "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 0
    assert len(loads) == 1, loads


class _Tiny(nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


def test_a_pipeline_on_onnx_reads_the_sidecar_once(tmp_path, monkeypatch):
    from edgedeploy.runtime.pipelines import load_pipeline

    onnx = tmp_path / "tiny.onnx"
    torch.onnx.export(_Tiny(), torch.zeros(1, 3, 32, 32), onnx, input_names=["images"], output_names=["logits"],
                      dynamo=False)
    write_sidecar(onnx, ArtifactMeta("tiny_classifier", "classify", input_shape=[1, 3, 32, 32],
                                     output_names=["logits"], class_names=["r", "g", "b"]))
    reads = []
    real = artifact._load_json
    monkeypatch.setattr(artifact, "_load_json", lambda p: reads.append(p) or real(p))
    monkeypatch.setattr(artifact, "_SIDECARS", {})
    from edgedeploy.runtime import pipelines

    calls = []
    real_read = pipelines.read_sidecar
    monkeypatch.setattr(pipelines, "read_sidecar", lambda *a, **k: calls.append(a) or real_read(*a, **k))
    pipe = load_pipeline(onnx)
    assert type(pipe).__name__ == "Classifier" and pipe.names == ["r", "g", "b"]
    assert len(reads) == 1
    assert len(calls) == 1  # load_pipeline reads it and hands it to the pipeline (and the engine)


def test_deploy_eval_hands_the_nms_flags_to_the_detector(tmp_path, capsys):
    """--max-det reaches the evaluator: at most one detection per image, where the default keeps many."""
    from edgedeploy.cli import main

    path = tmp_path / "det.pt"
    torch.manual_seed(0)
    model = create_model("yolox_nano", num_classes=3)
    with torch.no_grad():  # confident everywhere: many boxes survive NMS unless --max-det cuts them
        for name, p in model.named_parameters():
            if name.startswith(("head.cls_preds", "head.obj_preds")) and name.endswith("bias"):
                p.fill_(4.0)
    torch.save({"model": model.state_dict(),
                "meta": {"model_name": "yolox_nano", "task": "detect", "num_classes": 3, "imgsz": 64,
                         "synthetic": {"num_train": 1, "num_val": 3, "seed": 0, "num_classes": 3}}}, path)

    def detections(*flags: str) -> dict:
        out = tmp_path / f"json{len(flags)}.json"
        assert main(["eval", str(path), "--data", "synthetic", "--device", "cpu", "--quiet", "--json", str(out),
                     "--out", str(tmp_path / "ev"), *flags]) == 0
        return json.loads(out.read_text())

    default, one = detections(), detections("--max-det", "1")
    assert default["num_images"] == one["num_images"] == 3
    assert default["num_detections"] > 3 and one["num_detections"] <= 3
