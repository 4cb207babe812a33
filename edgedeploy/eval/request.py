"""What `deploy eval` asks a task's evaluator to do, typed: the artifact (described once), the data and the
run settings. Each evaluator module registers its entry with `@<TASK>.provides("evaluator")`; it takes one
`EvalRequest` and returns an exit code."""

from __future__ import annotations

from dataclasses import dataclass

from edgedeploy.models.artifact import ArtifactDescription
from edgedeploy.options import EVAL_NMS, NmsSettings


@dataclass(frozen=True)
class EvalRequest:
    artifact: ArtifactDescription  # model, task, imgsz, classes, convention, ignore index, recorded data
    data: str  # dataset folder / data YAML / COCO json, or "synthetic"
    split: str = "val"
    batch: int | None = None  # None: the evaluator's default for the backend
    workers: int = 0
    device: str = "auto"  # PyTorch checkpoints
    out: str | None = None  # detect: folder for pr_curve.png and eval_<artifact>.json
    json: str | None = None  # also write the scores here
    quiet: bool = False  # no progress bars
    nms: NmsSettings = EVAL_NMS  # detect: thresholds of the post-processing

    @property
    def path(self) -> str:
        return str(self.artifact.path)
