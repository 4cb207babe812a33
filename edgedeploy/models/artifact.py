"""What an artifact (checkpoint, ONNX file, engine, or a bare registry name) says about itself, read in one place.

`ArtifactMeta` is the JSON sidecar written beside every exported artifact (`model.onnx` -> `model.onnx.json`,
`model.fp16.engine` -> `model.fp16.engine.json`): what a runtime needs to use the artifact without the Python
model (task, input, normalisation, class names, output layout) and what it needs to refuse an engine built
elsewhere (builder, version, GPU). A checkpoint's own record is `models.checkpoint.CheckpointMeta`.

`describe_artifact` merges the two with the registry defaults (explicit argument > checkpoint meta / sidecar >
registry) and validates image size, class count and names, task and preprocessing once; every command reads an
artifact through it.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping

from edgedeploy import options as opt
from edgedeploy.data.preprocess import InputConvention
from edgedeploy.errors import CheckpointError, EdgeDeployError
from edgedeploy.io import atomic_write_json, file_key

if TYPE_CHECKING:
    from edgedeploy.models.checkpoint import CheckpointMeta
    from edgedeploy.models.registry import ModelInfo

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
    # How the PyTorch model was made (weights path/sha256 or seeded random weights, seed, task options): what
    # `deploy verify` needs to rebuild it and re-prove the artifact.
    provenance: dict[str, Any] = field(default_factory=dict)
    sidecar_version: int = SIDECAR_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def convention(self) -> InputConvention:
        """The `InputConvention` to feed this artifact (from `preprocess`, else the legacy fields)."""
        if self.preprocess:
            return InputConvention.from_dict(self.preprocess)
        return InputConvention(mean=tuple(self.mean), std=tuple(self.std),
                               resize="letterbox" if self.letterbox else "resize")

    def set_convention(self, conv: InputConvention) -> None:
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


_SIDECARS: dict[tuple, dict[str, Any]] = {}  # file_key -> parsed JSON; each read gets its own ArtifactMeta


def read_sidecar(artifact: str | os.PathLike, required: bool = True) -> ArtifactMeta | None:
    """The sidecar beside `artifact` (None, or an error when `required`, if there is none). Each version of the
    file is parsed once per process; every call returns a new ArtifactMeta the caller may change."""
    p = sidecar_path(artifact)
    if not p.exists():
        if required:
            raise EdgeDeployError(
                f"no sidecar {p.name} beside {artifact}: it records the model's task, input and normalisation. "
                "Re-export with `deploy export`, or pass --model/--imgsz explicitly."
            )
        return None
    key = file_key(p)
    if key not in _SIDECARS:
        try:
            _SIDECARS[key] = _load_json(p)
        except json.JSONDecodeError as e:
            raise EdgeDeployError(f"sidecar {p} is corrupt ({e}); re-export the model") from e
    try:
        return ArtifactMeta.from_dict(copy.deepcopy(_SIDECARS[key]))
    except TypeError as e:
        raise EdgeDeployError(f"sidecar {p} is corrupt ({e}); re-export the model") from e


def _load_json(p: Path) -> Any:
    return json.loads(p.read_text())


# ------------------------------------------------------------------------------------------------ resolver

ENGINE_SUFFIXES = (".engine", ".plan")


def artifact_kind(path: str | os.PathLike | None) -> str:
    """"registry" (no file), "onnx", "engine" or "checkpoint" (anything else: .pt, .safetensors, ...)."""
    if path is None:
        return "registry"
    suffix = Path(path).suffix.lower()
    return "onnx" if suffix == ".onnx" else "engine" if suffix in ENGINE_SUFFIXES else "checkpoint"


def imgsz_multiple(task: str | None, info: "ModelInfo | None" = None) -> int:
    """What an input side must be a multiple of: the task's rule (edgedeploy.tasks) and the model's own."""
    from math import lcm

    from edgedeploy.tasks import TASKS

    return lcm(TASKS[task].imgsz_multiple if task in TASKS else 1, info.imgsz_multiple if info is not None else 1)


@dataclass(frozen=True)
class ArtifactDescription:
    """One artifact, described once: every field resolved (explicit argument > checkpoint meta / sidecar >
    registry default) and validated. `sidecar` and `checkpoint` are what the files said, as read."""

    kind: str  # "checkpoint" | "onnx" | "engine" | "registry"
    path: str | None
    model: str | None  # registry name (None: an artifact that does not say, with no --model)
    task: str | None
    imgsz: int | None
    num_classes: int | None
    class_names: tuple[str, ...]
    convention: InputConvention | None
    source: str = ""  # where the weights came from when not ours, e.g. "megvii-yolox"
    # The training data in checkpoint-meta keys (data, data_as_typed, synthetic, train_args), read-only.
    data: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    batch: int | None = None  # the fixed batch an exported artifact takes (None: dynamic or unknown)
    ignore_index: int | None = None
    sidecar: ArtifactMeta | None = field(default=None, repr=False)
    checkpoint: "CheckpointMeta | None" = field(default=None, repr=False)
    info: "ModelInfo | None" = field(default=None, repr=False)

    @property
    def is_checkpoint(self) -> bool:
        return self.kind == "checkpoint"

    def recorded(self) -> dict[str, Any]:
        """The data fields as a checkpoint meta dict (what `data.sources.recorded_data` reads); a copy."""
        return copy.deepcopy(dict(self.data))


def sidecar_data_meta(side: ArtifactMeta) -> dict[str, Any]:
    """The checkpoint-style data fields (`data`, `data_as_typed`, `synthetic`, `train_args`) an export sidecar
    carries, so an exported artifact is evaluated on the data its checkpoint was trained on."""
    data = dict(side.data or {})
    out: dict[str, Any] = {}
    if data.get("synthetic"):
        out["data"], out["train_args"] = "synthetic", {"data": "synthetic"}
        if data.get("path") and data["path"] != "synthetic":
            out["data"] = data["path"]  # the generated folder (regenerated when gone)
        if data.get("synthetic_params"):
            out["synthetic"] = data["synthetic_params"]
    elif data.get("path"):
        out["data"] = data["path"]
    if data.get("as_typed"):
        out["data_as_typed"] = data["as_typed"]
    return out


def _info(name: str | None, explicit: bool) -> "ModelInfo | None":
    """The registry entry of `name`; a recorded name the registry does not know (a hand-made engine) gives None."""
    from edgedeploy.models.registry import get_model_info

    if not name:
        return None
    try:
        return get_model_info(name)
    except EdgeDeployError:
        if explicit:
            raise
        return None


def describe_artifact(
    path: str | os.PathLike | None = None,
    *,
    model: str | None = None,
    imgsz: int | None = None,
    num_classes: int | None = None,
    class_names: list[str] | tuple[str, ...] | None = None,
    ignore_index: int | None = None,
    sidecar: ArtifactMeta | None = None,
    multiple: int | None = None,
    batch: int = 1,
) -> ArtifactDescription:
    """Describe `path` (a checkpoint, ONNX file or engine; None: the registry model `model` alone).

    Precedence: explicit argument > checkpoint meta / sidecar (`sidecar` given: used instead of reading it) >
    registry default. Validates once: the image size (`options.check_imgsz`, a multiple of `multiple`, default
    the task's stride multiple, and the memory for `batch`), the class count (`options.NUM_CLASSES`), the class
    names against it, an explicit `model` against the task/family the artifact records, and the preprocessing.
    """
    from edgedeploy.models.checkpoint import read_checkpoint_meta

    kind = artifact_kind(path)
    if kind == "registry" and not model:
        raise EdgeDeployError("describe an artifact: give a path or a registry model name")
    if path is not None and not Path(path).exists():
        raise (CheckpointError(f"checkpoint not found: {path}") if kind == "checkpoint"
               else EdgeDeployError(f"{path} does not exist"))
    ck = read_checkpoint_meta(path, model) if kind == "checkpoint" else None
    side = sidecar if sidecar is not None else (read_sidecar(path, required=False) if path is not None else None)
    recorded_model = (ck.model_name if ck else None) or (side.model if side else None)
    name = model or recorded_model
    info = _info(name, explicit=bool(model))
    recorded_task = (ck.task if ck else None) or (side.task if side else None)
    if model and info is not None:
        _check_model(path, info, recorded_model, recorded_task, official=bool(ck and ck.source))
    task = info.task if info is not None else recorded_task

    side_size = side.input_shape[-1] if side and side.input_shape and isinstance(side.input_shape[-1], int) else None
    size = imgsz if imgsz is not None else (
        (ck.imgsz if ck else None) or (None if side_size else info.imgsz if info is not None else None))
    if size is not None:  # given, trained at or the registry's: checked (a built artifact's size is a fact)
        size = opt.check_imgsz(size, imgsz_multiple(task, info) if multiple is None else multiple, batch=batch,
                               who=f"{task} models" if task else "this model")
    size = size or side_size

    names = tuple(str(c) for c in class_names) if class_names else (
        (ck.class_names if ck else ()) or (tuple(side.class_names) if side else ()))
    nc = opt.NUM_CLASSES.check_optional(num_classes, "--num-classes")
    nc = nc or (ck.num_classes if ck else None) or (len(side.class_names) if side and side.class_names else None)
    if nc and names and len(names) != nc:
        raise EdgeDeployError(f"{path or name}: {len(names)} class names ({', '.join(names[:5])}"
                              f"{' ...' if len(names) > 5 else ''}) for {nc} classes: pass --num-classes {len(names)}")

    convention = _convention(path, ck, side, info)
    data: dict[str, Any] = {}
    if ck is not None:
        keys = ("data", "data_as_typed", "synthetic", "train_args")
        data = {k: copy.deepcopy(ck.raw[k]) for k in keys if k in ck.raw}
    elif side is not None:
        data = sidecar_data_meta(side)
    if ignore_index is None:
        ignore_index = ck.ignore_index if ck else ((side.postprocess or {}).get("ignore_index") if side else None)
    fixed = side.input_shape[0] if side and side.input_shape and isinstance(side.input_shape[0], int) else None
    return ArtifactDescription(
        kind=kind, path=None if path is None else str(path), model=info.name if info is not None else name,
        task=task, imgsz=int(size) if size else None, num_classes=nc, class_names=names, convention=convention,
        source=(ck.source if ck else "") or (side.source if side else ""), data=MappingProxyType(data), batch=fixed,
        ignore_index=None if ignore_index is None else int(ignore_index), sidecar=side, checkpoint=ck, info=info)


def _check_model(path: Any, info: "ModelInfo", recorded_model: str | None, recorded_task: str | None,
                 official: bool) -> None:
    """An explicit --model that contradicts what the artifact records is refused: another task, or for
    detectors another variant (official files name their variant when their weights are converted)."""
    have = _info(recorded_model, explicit=False)
    task = have.task if have is not None else recorded_task
    if task and task != info.task:
        raise EdgeDeployError(f"--model {info.name} is a {info.task} model, but {path} records a {task} model"
                              + (f" ({recorded_model}): pass --model {recorded_model}" if recorded_model else ""))
    if info.task == "detect" and have is not None and not official:
        check_family(have.name, info.name, path)


def check_family(saved: str | None, model_name: str, path: Any) -> None:
    """Refuse a checkpoint of another detector before its keys are compared (clearer than 300 missing keys)."""
    from edgedeploy.models.registry import get_model_info

    if not saved:
        return
    want, have = get_model_info(model_name), get_model_info(saved)
    if want.name != have.name:
        hint = (
            f"it is a {have.family} checkpoint and {model_name} is a {want.family} model: the two YOLO families do "
            "not share weights" if want.family != have.family else "a different size of the same family"
        )
        raise CheckpointError(f"{path} was trained as {have.name}, not {want.name} ({hint}). Pass --model {have.name}.")


def _convention(path: Any, ck: "CheckpointMeta | None", side: ArtifactMeta | None,
                info: "ModelInfo | None") -> InputConvention | None:
    """The input convention: a checkpoint's recorded one (official weights), the sidecar's, else the registry's."""
    try:
        if ck is not None and ck.preprocess:
            return InputConvention.from_dict(ck.preprocess)
        if side is not None:
            return side.convention()
    except (EdgeDeployError, TypeError, ValueError) as e:
        raise EdgeDeployError(f"{path}: the recorded input convention is not valid ({e})") from None
    if info is not None:
        from edgedeploy.data.preprocess import convention_for

        return convention_for(info)
    return None
