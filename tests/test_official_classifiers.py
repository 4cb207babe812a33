"""Official classifier checkpoints (timm, ml-cvnets, Megvii ShuffleNet-Series) load and reproduce the original.

Fixtures (tests/fixtures/official/, made as README_classifiers.md describes): each original implementation built
from its published source with random FP16-representable weights, saved in its official file layout, with an input
and the original's FP32 output on it. Each test reads the file, converts it, builds our model with the converter's
options, loads strictly and compares outputs on the same input tensor.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from edgedeploy.errors import CheckpointError
from edgedeploy.models import create_model
from edgedeploy.models.official import Converted, convert_official, known_formats
from edgedeploy.models.weights_file import read_weights_file

FIX = Path(__file__).parent / "fixtures" / "official"
TOL = 1e-4


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _load(file: str, name: str, **override) -> tuple[torch.nn.Module, Converted]:
    """What `create_model(name, weights=file)` does for an official checkpoint."""
    conv = convert_official(read_weights_file(FIX / file), name)
    assert conv is not None, f"{file} not recognised"
    head = [k for k in conv.state_dict if k.startswith("classifier") and k.endswith("weight")][-1]
    assert conv.model_kwargs["num_classes"] == conv.state_dict[head].shape[0]  # the class count comes from the head
    model = create_model(name, **{**conv.model_kwargs, **override})
    model.load_state_dict(conv.state_dict, strict=True)
    return model.eval(), conv


def _io(stem: str) -> tuple[torch.Tensor, torch.Tensor]:
    io = torch.load(FIX / f"{stem}.io.pt", weights_only=True)
    x = io["input"].float() * io["scale"]  # pixels in the original's channel order, scaled as the original does
    if "mean" in io:
        x = (x - io["mean"]) / io["std"]
    return x, io["output"]


CASES = [
    # file, registry name, io stem, source, expected model options, channel order
    ("timm_mobilevit_xxs.safetensors", "mobilevit_xxs", "timm_mobilevit_xxs", "timm", {}, "rgb"),
    ("timm_mobilenetv1_025.pth", "mobilenetv1_025", "timm_mobilenetv1_025", "timm", {"act": "relu6"}, "rgb"),
    ("timm_mobilenetv1_025.safetensors", "mobilenetv1_025", "timm_mobilenetv1_025", "timm", {"act": "relu6"}, "rgb"),
    ("cvnets_mobilevit_xxs.pt", "mobilevit_xxs", "cvnets_mobilevit_xxs", "ml-cvnets", {}, "bgr"),
    ("megvii_shufflenetv1_g3_x1_0.pth.tar", "shufflenetv1_g3_x1_0", "megvii_shufflenetv1_g3_x1_0",
     "megvii-shufflenet-series", {"shuffle": "after_dw_inverse", "classifier_bias": False}, "bgr"),
    ("megvii_shufflenetv1_g8_x1_0.pth.tar", "shufflenetv1_g8_x1_0", "megvii_shufflenetv1_g8_x1_0",
     "megvii-shufflenet-series", {"shuffle": "after_dw_inverse", "classifier_bias": False}, "bgr"),
]  # fmt: skip


@pytest.mark.parametrize("file,name,stem,source,kwargs,order", CASES, ids=[c[0] for c in CASES])
def test_official_checkpoint_reproduces_original(file, name, stem, source, kwargs, order):
    model, conv = _load(file, name)
    assert (conv.source, conv.variant, conv.model_kwargs) == (source, name, {**kwargs, "num_classes": 10})
    assert conv.preprocess["channel_order"] == order
    x, expected = _io(stem)
    with torch.no_grad():
        err = _rel_err(model(x), expected)
        swapped = _rel_err(model(x.flip(1)), expected)  # the other channel order: the comparison must notice
    assert err <= TOL, err
    assert swapped > 100 * TOL, swapped


def test_values_are_renamed_not_changed():
    raw = read_weights_file(FIX / "megvii_shufflenetv1_g8_x1_0.pth.tar")["state_dict"]
    conv = convert_official({"state_dict": raw}, "shufflenetv1_g8_x1_0")
    assert conv is not None
    ours = sorted(v.float().flatten()[:5].tolist() for k, v in conv.state_dict.items() if k.endswith("weight"))
    theirs = sorted(v.float().flatten()[:5].tolist() for k, v in raw.items() if k.endswith("weight"))
    assert ours == theirs
    assert torch.equal(conv.state_dict["classifier.weight"], raw["module.classifier.0.weight"].float())


def test_input_conventions():
    pre = {f: convert_official(read_weights_file(FIX / f), n).preprocess for f, n, *_ in CASES}
    timm_vit = pre["timm_mobilevit_xxs.safetensors"]
    assert (timm_vit["interpolation"], timm_vit["crop_pct"], timm_vit["mean"]) == ("cubic_pil", 0.9, (0.0, 0.0, 0.0))
    assert pre["timm_mobilenetv1_025.pth"]["mean"] == (0.5, 0.5, 0.5)
    cv = pre["cvnets_mobilevit_xxs.pt"]  # CVNets v0.1: cv2.imread (BGR), /255, shorter side 288 bilinear, crop 256
    assert (cv["channel_order"], cv["scale"], cv["interpolation"]) == ("bgr", 1 / 255, "linear")
    assert round(256 / cv["crop_pct"]) == 288
    megvii = pre["megvii_shufflenetv1_g3_x1_0.pth.tar"]  # OpencvResize(256), CenterCrop(224), ToBGRTensor (0-255)
    assert (megvii["channel_order"], megvii["scale"], round(224 / megvii["crop_pct"])) == ("bgr", 1.0, 256)


# --- the comparison catches what the options fix (planted errors) ---------------------------------------------


@pytest.mark.parametrize(
    "file,name,stem,override",
    [
        ("megvii_shufflenetv1_g3_x1_0.pth.tar", "shufflenetv1_g3_x1_0", "megvii_shufflenetv1_g3_x1_0",
         {"shuffle": "before_dw"}),
        ("megvii_shufflenetv1_g8_x1_0.pth.tar", "shufflenetv1_g8_x1_0", "megvii_shufflenetv1_g8_x1_0",
         {"shuffle": "before_dw"}),
        ("timm_mobilenetv1_025.pth", "mobilenetv1_025", "timm_mobilenetv1_025", {"act": "relu"}),
    ],
)  # fmt: skip
def test_without_the_option_outputs_differ(file, name, stem, override):
    model, _ = _load(file, name, **override)
    x, expected = _io(stem)
    with torch.no_grad():
        assert _rel_err(model(x), expected) > 1e-2


# --- variants, unknown layouts, unsafe files ----------------------------------------------------------------


@pytest.mark.parametrize(
    "file,asked,actual",
    [
        ("megvii_shufflenetv1_g8_x1_0.pth.tar", "shufflenetv1_g3_x1_0", "shufflenetv1_g8_x1_0"),
        ("megvii_shufflenetv1_g3_x1_0.pth.tar", "shufflenetv1_g8_x1_0", "shufflenetv1_g3_x1_0"),
        ("timm_mobilevit_xxs.safetensors", "mobilevit", "mobilevit_xxs"),
        ("cvnets_mobilevit_xxs.pt", "mobilevit_xs", "mobilevit_xxs"),
        ("timm_mobilenetv1_025.pth", "mobilenetv1_100", "mobilenetv1_025"),
    ],
)
def test_wrong_variant_names_the_right_one(file, asked, actual):
    with pytest.raises(CheckpointError, match=f"this is a {actual} checkpoint .*--model {actual}"):
        convert_official(read_weights_file(FIX / file), asked)


@pytest.mark.parametrize(
    "manifest,name,kwargs",
    [
        ("timm_mobilenetv1_100.shapes.json", "mobilenetv1", {"act": "relu6"}),  # alias of mobilenetv1_100
        ("timm_mobilevit_xs.shapes.json", "mobilevit_xs", {}),
        ("cvnets_mobilevit_s.shapes.json", "mobilevit_s", {}),
    ],
)
def test_full_size_layouts_load(manifest, name, kwargs):
    """Key names and shapes of the full-size originals (zeros for values): the right variant, strict load."""
    shapes = json.loads((FIX / manifest).read_text())
    sd = {k: torch.zeros(s, dtype=torch.long if k.endswith("num_batches_tracked") else torch.float16)
          for k, s in shapes.items()}  # fmt: skip
    conv = convert_official(sd, name)
    assert conv is not None and conv.model_kwargs == {**kwargs, "num_classes": 1000}
    model = create_model(conv.variant, **conv.model_kwargs)
    model.load_state_dict(conv.state_dict, strict=True)
    assert conv.variant == model.model_info.name  # type: ignore[attr-defined]


def test_missing_num_batches_tracked_is_filled():
    raw = read_weights_file(FIX / "timm_mobilevit_xxs.safetensors")
    raw = {k: v for k, v in raw.items() if not k.endswith("num_batches_tracked")}
    assert convert_official(raw, "mobilevit_xxs") is not None


def test_shapes_of_no_variant_list_differences():
    raw = read_weights_file(FIX / "timm_mobilevit_xxs.safetensors")
    raw["stages.4.1.conv_proj.conv.weight"] = torch.zeros(81, 96, 1, 1)
    with pytest.raises(CheckpointError, match=r"(?s)timm MobileViT.*match no registered mobilevit.*layer5\.1\.proj"):
        convert_official(raw, "mobilevit_xxs")


def test_unknown_layout_is_not_claimed():
    assert convert_official({"backbone.conv.weight": torch.zeros(1)}, "mobilevit_xxs") is None
    assert {"timm", "ml-cvnets", "megvii-shufflenet-series"} <= set(known_formats())


def test_cvnets_v2_is_refused_clearly():
    sd = {k: torch.zeros(1) for k in ("conv_1.block.conv.weight", "conv_1x1_exp.block.conv.weight",
                                     "layer_3.1.global_rep.0.pre_norm_attn.0.weight")}  # fmt: skip
    with pytest.raises(CheckpointError, match="MobileViTv2"):
        convert_official(sd, "mobilevit_s")


class _RunsCode:
    def __reduce__(self):
        return (os.makedirs, ("PWNED_DIR",))


def test_pickle_needing_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"w": _RunsCode()}}, f)
    with pytest.raises(CheckpointError, match="needs code to load.*state_dict"):
        read_weights_file(path)
    assert not (tmp_path / "PWNED_DIR").exists()


def test_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_weights_file(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="safetensors"):
        read_weights_file(bad)


def test_model_options_are_validated_and_defaults_unchanged():
    with pytest.raises(ValueError, match="shuffle"):
        create_model("shufflenetv1_g3_x1_0", shuffle="after")
    with pytest.raises(ValueError, match="act"):
        create_model("mobilenetv1_025", act="gelu")
    assert create_model("shufflenetv1_g3_x1_0").classifier.bias is not None
    assert isinstance(create_model("mobilenetv1_025").features[0][2], torch.nn.ReLU)


@pytest.mark.parametrize(
    "file,name,stem",
    [
        ("megvii_shufflenetv1_g8_x1_0.pth.tar", "shufflenetv1_g8_x1_0", "megvii_shufflenetv1_g8_x1_0"),
        ("timm_mobilenetv1_025.safetensors", "mobilenetv1_025", "timm_mobilenetv1_025"),
    ],
)
def test_onnx_of_the_options_reproduces_original(tmp_path, file, name, stem):
    """The architecture options (shuffle after the depthwise conv, ReLU6) export and run in ONNX Runtime."""
    ort = pytest.importorskip("onnxruntime")
    model, _ = _load(file, name)
    x, expected = _io(stem)
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["images"], opset_version=17, dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])
    assert _rel_err(got, expected) <= TOL


def test_timm_training_checkpoint_prefers_ema():
    sd = read_weights_file(FIX / "timm_mobilenetv1_025.pth")
    broken = {k: torch.zeros_like(v) for k, v in sd.items()}
    conv = convert_official({"epoch": 3, "arch": "mobilenetv1_100", "state_dict": broken, "state_dict_ema": sd},
                            "mobilenetv1_025")  # fmt: skip
    assert conv is not None
    assert torch.equal(conv.state_dict["features.0.0.weight"], sd["conv_stem.weight"].float())
