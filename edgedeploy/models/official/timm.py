"""timm checkpoints (`.pth` state dicts, hub `.safetensors`, timm training checkpoints) of MobileViT and MobileNetV1.

Pure renames: the tensors keep their values and shapes.
- MobileViT (`timm/models/mobilevit.py`, ByobNet blocks): `stem.*`, `stages.k.j.*`, `final_conv.*`, `head.fc.*`.
- MobileNetV1 (`timm/models/efficientnet.py: _gen_mobilenet_v1`): `conv_stem`, `bn1`, `blocks.i.j.{conv_dw,bn1,
  conv_pw,bn2}`, `classifier`; timm's MobileNetV1 uses ReLU6, so the model is built with `act="relu6"`.
Input convention from each model's timm `pretrained_cfg`: RGB, /255, resize the shorter side to size / crop_pct
with bicubic interpolation (PIL's, as torchvision's Resize on a PIL image: `cubic_pil`; OpenCV's bicubic differs by
up to 7/255 on the test image), centre crop; mean/std 0/1 (MobileViT) and 0.5/0.5 (MobileNetV1).
"""

from __future__ import annotations

from typing import Any, Mapping

from edgedeploy.models.official import Converted, register_converter
from edgedeploy.models.official._common import finish, identify_variant, rename, tensor_dict, with_num_classes

SOURCE = "timm"
# timm training checkpoints: {"epoch", "arch", "state_dict", "state_dict_ema", ...}; hub files are bare.
_WRAPPERS = ("state_dict_ema", "state_dict", "model")

_MOBILEVIT_RULES: list[tuple[str, str]] = [
    (r"^stem\.conv\.", "stem.0."),
    (r"^stem\.bn\.", "stem.1."),
    (r"^stages\.0\.0\.", "layer1."),
    *[(rf"^stages\.{i}\.", f"layer{i + 1}.") for i in range(1, 5)],
    (r"\.conv1_1x1\.conv\.", ".block.0.0."),
    (r"\.conv1_1x1\.bn\.", ".block.0.1."),
    (r"\.conv2_kxk\.conv\.", ".block.1.0."),
    (r"\.conv2_kxk\.bn\.", ".block.1.1."),
    (r"\.conv3_1x1\.conv\.", ".block.2.0."),
    (r"\.conv3_1x1\.bn\.", ".block.2.1."),
    (r"\.conv_kxk\.conv\.", ".local.0.0."),
    (r"\.conv_kxk\.bn\.", ".local.0.1."),
    (r"\.conv_1x1\.", ".local.1."),
    (r"\.mlp\.fc1\.", ".ffn.0."),
    (r"\.mlp\.fc2\.", ".ffn.2."),
    (r"\.conv_proj\.conv\.", ".proj.0."),
    (r"\.conv_proj\.bn\.", ".proj.1."),
    (r"\.conv_fusion\.conv\.", ".fuse.0."),
    (r"\.conv_fusion\.bn\.", ".fuse.1."),
    (r"^final_conv\.conv\.", "head_conv.0."),
    (r"^final_conv\.bn\.", "head_conv.1."),
    (r"^head\.fc\.", "classifier.1."),
]

# timm `pretrained_cfg` of mobilevit_{xxs,xs,s}.cvnets_in1k and mobilenetv1_100.ra4_e3600_r224_in1k.
MOBILEVIT_PREPROCESS: dict[str, Any] = {
    "channel_order": "rgb", "scale": 1 / 255, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0),
    "resize": "shorter_crop", "interpolation": "cubic_pil", "crop_pct": 0.9,
}  # fmt: skip
MOBILENETV1_PREPROCESS: dict[str, Any] = {
    "channel_order": "rgb", "scale": 1 / 255, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
    "resize": "shorter_crop", "interpolation": "cubic_pil", "crop_pct": 0.875,
}  # fmt: skip


def _is_mobilevit(sd: Mapping[str, Any]) -> bool:
    return "stem.conv.weight" in sd and "final_conv.conv.weight" in sd and any(".conv_fusion." in k for k in sd)


def _is_mobilenetv1(sd: Mapping[str, Any]) -> bool:
    if "conv_stem.weight" not in sd:
        return False
    parts = {k.split(".")[3] for k in sd if k.startswith("blocks.") and k.count(".") >= 4}
    return bool(parts) and parts <= {"conv_dw", "bn1", "conv_pw", "bn2"}


def _mobilenetv1_rules(sd: Mapping[str, Any]) -> list[tuple[str, str]]:
    # blocks.i.j are numbered per stage; ours are one flat `features` list after the stem (features.0).
    blocks = sorted({tuple(int(p) for p in k.split(".")[1:3]) for k in sd if k.startswith("blocks.")})
    rules: list[tuple[str, str]] = [(r"^conv_stem\.", "features.0.0."), (r"^bn1\.", "features.0.1."),
                                    (r"^classifier\.", "classifier.1.")]  # fmt: skip
    for flat, (i, j) in enumerate(blocks, start=1):
        rules.append((rf"^blocks\.{i}\.{j}\.conv_dw\.", f"features.{flat}.0.0."))
        rules.append((rf"^blocks\.{i}\.{j}\.bn1\.", f"features.{flat}.0.1."))
        rules.append((rf"^blocks\.{i}\.{j}\.conv_pw\.", f"features.{flat}.1.0."))
        rules.append((rf"^blocks\.{i}\.{j}\.bn2\.", f"features.{flat}.1.1."))
    return rules


@register_converter("timm")
def convert_timm(ckpt: Mapping[str, Any], model_name: str) -> Converted | None:
    sd = tensor_dict(ckpt, _WRAPPERS)
    if sd is None:
        return None
    if _is_mobilevit(sd):
        new = rename(sd, _MOBILEVIT_RULES)
        variant = identify_variant(new, "mobilevit", "classifier.1.weight", {}, model_name, "timm MobileViT")
        kw = with_num_classes({}, new, "classifier.1.weight")
        out = Converted(new, SOURCE, kw, dict(MOBILEVIT_PREPROCESS), variant, [
            f"timm MobileViT checkpoint: {len(sd)} tensors renamed to {variant} (values unchanged)"])  # fmt: skip
        return finish(out, model_name)
    if _is_mobilenetv1(sd):
        kwargs = {"act": "relu6"}
        new = rename(sd, _mobilenetv1_rules(sd))
        variant = identify_variant(new, "mobilenetv1", "classifier.1.weight", kwargs, model_name, "timm MobileNetV1")
        kw = with_num_classes(kwargs, new, "classifier.1.weight")
        out = Converted(new, SOURCE, kw, dict(MOBILENETV1_PREPROCESS), variant, [
            f"timm MobileNetV1 checkpoint: {len(sd)} tensors renamed to {variant} (values unchanged); "
            "built with ReLU6 as in timm"])  # fmt: skip
        return finish(out, model_name)
    return None

