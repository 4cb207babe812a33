"""Megvii ShuffleNet-Series ShuffleNetV1 checkpoints (`.pth.tar`: `{"state_dict": ...}`, keys prefixed `module.`).

Renames: `first_conv.{0,1}` -> `stem.{0,1}`; `features.N.branch_main_1.{0,1,3,4}` -> `features.N.{reduce.0,reduce.1,
depthwise.0,depthwise.1}`; `branch_main_2.{0,1}` -> `expand.{0,1}`; `classifier.0` -> `classifier`.
Architecture differences, chosen automatically: the original shuffles channels after the depthwise conv with the
inverse permutation (`shuffle="after_dw_inverse"`) and its classifier has no bias (`classifier_bias=False`).

Input convention (`ShuffleNetV1/train.py`, validation): `OpencvResize(256)` (shorter side, `cv2.INTER_LINEAR`),
`CenterCrop(224)`, `ToBGRTensor`: BGR, float 0-255, no mean/std.
"""

from __future__ import annotations

from typing import Any, Mapping

from edgedeploy.models.official import Converted, register_converter
from edgedeploy.models.official._common import finish, identify_variant, rename, tensor_dict, with_num_classes

SOURCE = "megvii-shufflenet-series"

_RULES: list[tuple[str, str]] = [
    (r"^first_conv\.", "stem."),
    (r"\.branch_main_1\.0\.", ".reduce.0."),
    (r"\.branch_main_1\.1\.", ".reduce.1."),
    (r"\.branch_main_1\.3\.", ".depthwise.0."),
    (r"\.branch_main_1\.4\.", ".depthwise.1."),
    (r"\.branch_main_2\.0\.", ".expand.0."),
    (r"\.branch_main_2\.1\.", ".expand.1."),
    (r"^classifier\.0\.", "classifier."),
]

PREPROCESS: dict[str, Any] = {
    "channel_order": "bgr", "scale": 1.0, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0),
    "resize": "shorter_crop", "interpolation": "linear", "crop_pct": 224 / 256,
}  # fmt: skip


@register_converter("megvii-shufflenet-series")
def convert_shufflenet(ckpt: Mapping[str, Any], model_name: str) -> Converted | None:
    sd = tensor_dict(ckpt, ("state_dict",))
    if sd is None or "first_conv.0.weight" not in sd or not any(".branch_main_1." in k for k in sd):
        return None  # ShuffleNetV2 files have `branch_main` without the _1/_2 split
    kwargs = {"shuffle": "after_dw_inverse", "classifier_bias": "classifier.0.bias" in sd}
    new = rename(sd, _RULES)
    variant = identify_variant(new, "shufflenetv1", "classifier.weight", kwargs, model_name, "Megvii ShuffleNetV1")
    out = Converted(new, SOURCE, with_num_classes(kwargs, new, "classifier.weight"), dict(PREPROCESS), variant, [
        f"Megvii ShuffleNetV1 checkpoint: {len(sd)} tensors renamed to {variant} (values unchanged); built with "
        "the original's channel shuffle after the depthwise conv (inverse permutation) and no classifier bias; "
        "input: BGR pixels 0-255, shorter side 256 bilinear, centre crop 224"])  # fmt: skip
    return finish(out, model_name)
