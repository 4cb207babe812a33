"""The JSON sidecar written beside every exported artifact (`model.onnx` -> `model.onnx.json`,
`model.fp16.engine` -> `model.fp16.engine.json`).

It carries what a runtime needs to use the artifact without the Python model (task, input, normalisation,
class names, output layout) and what it needs to refuse an engine built elsewhere (builder, version, GPU).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from edgedeploy.errors import EdgeDeployError
from edgedeploy.io import atomic_write_json

SIDECAR_VERSION = 1


@dataclass
class ArtifactMeta:
    model: str  # registry name, e.g. "mobilenetv3_large"
    task: str  # "classify" | "detect" | "segment"
    input_name: str = "images"
    input_shape: list[int | str] = field(default_factory=lambda: [1, 3, 224, 224])  # "batch" for a dynamic axis
    input_dtype: str = "float32"
    output_names: list[str] = field(default_factory=list)
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # applied to RGB in [0, 1]
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    letterbox: bool = False  # detection input is letterboxed (pad 114), classifiers are resized
    # The full input convention (`edgedeploy.data.preprocess.InputConvention.to_dict()`): channel order, scale,
    # mean/std in scaled units, resize rule, interpolation, crop, letterbox alignment and pad. Authoritative when
    # present; sidecars written before it existed are read through mean/std/letterbox above (RGB, /255).
    preprocess: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # where the weights came from when not ours, e.g. "megvii-yolox"
    class_names: list[str] = field(default_factory=list)
    # The training data as the checkpoint recorded it ({"path": absolute, "as_typed", "layout", "synthetic", ...}):
    # `deploy eval ARTIFACT` uses it when no --data is given.
    data: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"  # "fp32" | "fp16" | "int8"
    batch: dict[str, int] = field(default_factory=lambda: {"min": 1, "opt": 1, "max": 1})
    # Task-specific output description, e.g. {"nms": "onnx", "max_det": 100, "boxes": "xyxy"} for detectors,
    # {"argmax": false, "upsampled": true} for segmenters.
    postprocess: dict[str, Any] = field(default_factory=dict)
    # Provenance: who built it, and for engines where it can run.
    builder: str = "none"  # "torch.onnx" | "tensorrt" | "tensorrt-rtx"
    builder_version: str = ""
    gpu_name: str = ""
    compute_capability: str = ""  # "8.6"; empty for ONNX and for AOT builds
    build_time_s: float = 0.0
    onnx_sha256: str = ""
    created: str = ""
    sidecar_version: int = SIDECAR_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def convention(self):
        """The `InputConvention` to feed this artifact (from `preprocess`, else the legacy fields)."""
        from edgedeploy.data.preprocess import InputConvention

        if self.preprocess:
            return InputConvention.from_dict(self.preprocess)
        return InputConvention(mean=tuple(self.mean), std=tuple(self.std),
                               resize="letterbox" if self.letterbox else "resize")

    def set_convention(self, conv) -> None:
        """Record `conv` in `preprocess` and keep the legacy fields as close as they can say it."""
        self.preprocess = conv.to_dict()
        self.mean, self.std = conv.unit_mean_std()
        self.letterbox = conv.letterbox

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ArtifactMeta":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def sidecar_path(artifact: str | os.PathLike) -> Path:
    return Path(str(artifact) + ".json")


def write_sidecar(artifact: str | os.PathLike, meta: ArtifactMeta) -> Path:
    return atomic_write_json(sidecar_path(artifact), meta.to_dict())


def read_sidecar(artifact: str | os.PathLike, required: bool = True) -> ArtifactMeta | None:
    p = sidecar_path(artifact)
    if not p.exists():
        if required:
            raise EdgeDeployError(
                f"no sidecar {p.name} beside {artifact}: it records the model's task, input and normalisation. "
                "Re-export with `deploy export`, or pass --model/--imgsz explicitly."
            )
        return None
    try:
        return ArtifactMeta.from_dict(json.loads(p.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise EdgeDeployError(f"sidecar {p} is corrupt ({e}); re-export the model") from e
