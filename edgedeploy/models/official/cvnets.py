"""Apple ml-cvnets MobileViT (v1) checkpoints (`mobilevit_{xxs,xs,s}.pt`: a bare state dict).

Pure renames (311 tensors for every size, same shapes and values): `conv_1`, `layer_k` (`block.exp_1x1/conv_3x3/
red_1x1`, `local_rep`, `global_rep.i.pre_norm_mha/pre_norm_ffn`, `conv_proj`, `fusion`), `conv_1x1_exp`,
`classifier.fc`. The architecture is the one `edgedeploy.models.mobilevit` implements (outputs equal to ml-cvnets'
within float rounding), so no model option is needed.

Input convention: the MobileViT v1 weights were trained and evaluated with CVNets v0.1, which read images with
OpenCV and never converted them (`cv2.imread`: **BGR**), divided by 255 with no mean/std, resized the shorter
side to 288 with `cv2.INTER_LINEAR` and centre-cropped 256 (`data/datasets/classification/imagenet.py`,
`data/transforms/image.py` at tag cvnets-v0.1; the v0.2+ model zoo says "For MobileViTv1 results, see v0.1").
"""

from __future__ import annotations

from typing import Any, Mapping

from edgedeploy.errors import CheckpointError
from edgedeploy.models.official import Converted, register_converter
from edgedeploy.models.official._common import finish, identify_variant, rename, tensor_dict, with_num_classes

SOURCE = "ml-cvnets"

_RULES: list[tuple[str, str]] = [
    (r"^conv_1\.block\.conv\.", "stem.0."),
    (r"^conv_1\.block\.norm\.", "stem.1."),
    (r"\.block\.exp_1x1\.block\.conv\.", ".block.0.0."),
    (r"\.block\.exp_1x1\.block\.norm\.", ".block.0.1."),
    (r"\.block\.conv_3x3\.block\.conv\.", ".block.1.0."),
    (r"\.block\.conv_3x3\.block\.norm\.", ".block.1.1."),
    (r"\.block\.red_1x1\.block\.conv\.", ".block.2.0."),
    (r"\.block\.red_1x1\.block\.norm\.", ".block.2.1."),
    (r"^layer_1\.0\.", "layer1."),
    (r"^layer_(\d)\.", r"layer\1."),
    (r"\.local_rep\.conv_3x3\.block\.conv\.", ".local.0.0."),
    (r"\.local_rep\.conv_3x3\.block\.norm\.", ".local.0.1."),
    (r"\.local_rep\.conv_1x1\.block\.conv\.", ".local.1."),
    (r"\.global_rep\.(\d+)\.pre_norm_mha\.0\.", r".transformer.\1.norm1."),
    (r"\.global_rep\.(\d+)\.pre_norm_mha\.1\.qkv_proj\.", r".transformer.\1.attn.qkv."),
    (r"\.global_rep\.(\d+)\.pre_norm_mha\.1\.out_proj\.", r".transformer.\1.attn.proj."),
    (r"\.global_rep\.(\d+)\.pre_norm_ffn\.0\.", r".transformer.\1.norm2."),
    (r"\.global_rep\.(\d+)\.pre_norm_ffn\.1\.", r".transformer.\1.ffn.0."),
    (r"\.global_rep\.(\d+)\.pre_norm_ffn\.4\.", r".transformer.\1.ffn.2."),
    (r"\.global_rep\.\d+\.(weight|bias)$", r".norm.\1"),  # the LayerNorm closing the transformer
    (r"\.conv_proj\.block\.conv\.", ".proj.0."),
    (r"\.conv_proj\.block\.norm\.", ".proj.1."),
    (r"\.fusion\.block\.conv\.", ".fuse.0."),
    (r"\.fusion\.block\.norm\.", ".fuse.1."),
    (r"^conv_1x1_exp\.block\.conv\.", "head_conv.0."),
    (r"^conv_1x1_exp\.block\.norm\.", "head_conv.1."),
    (r"^classifier\.fc\.", "classifier.1."),
]

PREPROCESS: dict[str, Any] = {
    "channel_order": "bgr", "scale": 1 / 255, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0),
    "resize": "shorter_crop", "interpolation": "linear", "crop_pct": 256 / 288,
}  # fmt: skip


@register_converter("ml-cvnets")
def convert_cvnets(ckpt: Mapping[str, Any], model_name: str) -> Converted | None:
    sd = tensor_dict(ckpt, ("state_dict", "model"))
    if sd is None or "conv_1.block.conv.weight" not in sd or "conv_1x1_exp.block.conv.weight" not in sd:
        return None
    if not any(".global_rep." in k for k in sd):
        return None  # another ml-cvnets classifier (MobileNet, ResNet...): not ours to convert
    if not any(".pre_norm_mha." in k for k in sd):
        raise CheckpointError(
            "this is an ml-cvnets MobileViTv2 (or later) checkpoint; only MobileViT v1 (mobilevit_xxs/xs/s) "
            "checkpoints are supported"
        )
    new = rename(sd, _RULES)
    variant = identify_variant(new, "mobilevit", "classifier.1.weight", {}, model_name, "ml-cvnets MobileViT")
    out = Converted(new, SOURCE, with_num_classes({}, new, "classifier.1.weight"), dict(PREPROCESS), variant, [
        f"ml-cvnets MobileViT checkpoint: {len(sd)} tensors renamed to {variant} (values unchanged); "
        "input convention: BGR, /255, shorter side 288 bilinear, centre crop 256 (CVNets v0.1)"])  # fmt: skip
    return finish(out, model_name)
