"""The three tasks (classify, detect, segment), each one registry entry.

An entry holds what every command needs to know about a task: its command-line flags (defined here once, with
their types from `edgedeploy.options`) and its parts, one per room:

    pipeline        runtime/   frames in, `Classification` / `Detections` / `Segmentation` out
    evaluator       eval/      top-1, COCO mAP or mIoU of an artifact on a labelled split
    trainer         train/     the task's spec for the one training loop
    export_adapter  export/    what `deploy export` does differently for the task

This module sits on the lowest floor, so it cannot import those rooms; each room registers its part when its
module is imported (`@DETECT.provides("pipeline")`), as timm's model files register their variants. A room
only looks up parts of its own floor or lower ones, which it has imported.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from edgedeploy import options as opt
from edgedeploy.errors import EdgeDeployError

# slot -> the module that provides it (named in the error when a part is looked up before it is registered)
SLOTS: dict[str, str] = {
    "pipeline": "edgedeploy.runtime.pipelines",
    "evaluator": "edgedeploy.eval.cli",
    "trainer": "edgedeploy.train",
    "export_adapter": "edgedeploy.export.tasks",
}


@dataclass(frozen=True)
class TaskFlag:
    """One task-specific command-line flag. Its argparse default is None unless a command passes one, so that a
    command can tell a flag given from one left out (a flag meant for another task is then an error); `default`
    is what an unset flag means there, shown in the help."""

    dest: str
    flags: tuple[str, ...]
    help: str
    type: Callable[[str], Any] | None = None
    action: str | None = None
    choices: tuple[str, ...] | None = None
    default: Any = None

    def add_to(self, group: Any, default: Any = None) -> None:
        shown = default if default is not None else self.default
        kwargs: dict[str, Any] = {"dest": self.dest, "default": default,
                                  "help": self.help + (f" (default {shown:g})" if isinstance(shown, (int, float))
                                                       and not isinstance(shown, bool) else "")}
        if self.action:
            kwargs["action"] = self.action
        else:
            kwargs["type"] = self.type
            if self.choices:
                kwargs["choices"] = self.choices
        group.add_argument(*self.flags, **kwargs)

    @property
    def shown(self) -> str:
        return self.flags[0]


@dataclass
class Task:
    name: str
    summary: str
    flags: tuple[TaskFlag, ...] = ()
    # what an input side must be a multiple of for every model of the task (a model may ask for more:
    # ModelInfo.imgsz_multiple): YOLO heads need whole stride-32 grids; classifiers pool adaptively (EfficientNet
    # is published at 240, 300, 380 ...) and LR-ASPP's pooling branch takes any size
    imgsz_multiple: int = 1
    parts: dict[str, Any] = field(default_factory=dict, repr=False)

    def provides(self, slot: str) -> Callable[[Any], Any]:
        """Decorator registering the task's part for `slot` (see SLOTS); registering one twice is a bug."""
        if slot not in SLOTS:
            raise ValueError(f"unknown task slot {slot!r}; slots: {', '.join(SLOTS)}")

        def register(part: Any) -> Any:
            if slot in self.parts and self.parts[slot] is not part:
                raise ValueError(f"task {self.name!r}: {slot} registered twice ({self.parts[slot]!r}, {part!r})")
            self.parts[slot] = part
            return part

        return register

    def part(self, slot: str) -> Any:
        if slot not in self.parts:
            raise EdgeDeployError(f"task {self.name!r} has no {slot} registered; import {SLOTS.get(slot, slot)} first")
        return self.parts[slot]

    def add_flags(self, parser: argparse.ArgumentParser, defaults: Mapping[str, Any] | None = None,
                  only: tuple[str, ...] | None = None) -> None:
        """Add this task's flags as a group; `defaults` by dest (else None: 'not given'); `only` some dests."""
        if not self.flags:
            return
        group = parser.add_argument_group(f"{self.name} models")
        for f in self.flags:
            if only is None or f.dest in only:
                f.add_to(group, (defaults or {}).get(f.dest))


CLASSIFY = Task("classify", "image classification (top-1/top-5 of a class list)")
DETECT = Task("detect", "object detection (boxes, scores, classes; NMS in the graph, on the host or none)",
              imgsz_multiple=32, flags=(
    TaskFlag("nms", ("--nms",), "NMS in the graph: ONNX NonMaxSuppression, TensorRT's EfficientNMS_TRT plugin, or "
             "none (decoded boxes + scores; NMS on the host). Default: what the engine builder supports",
             type=str, choices=opt.NMS_MODE.choices),
    TaskFlag("max_det", ("--max-det",), "detections kept per image", type=opt.MAX_DET.arg,
             default=opt.SERVE_NMS.max_det),
    TaskFlag("iou_thres", ("--iou-thres", "--iou"), "NMS IoU threshold", type=opt.IOU_THRES.arg,
             default=opt.SERVE_NMS.iou_thres),
    TaskFlag("conf_thres", ("--conf-thres", "--conf"), "score threshold", type=opt.CONF_THRES.arg,
             default=opt.SERVE_NMS.conf_thres),
    TaskFlag("agnostic", ("--agnostic",), "class-agnostic NMS", action="store_true"),
))
SEGMENT = Task("segment", "semantic segmentation (per-pixel class ids or logits)", flags=(
    TaskFlag("argmax", ("--argmax",), "output class ids (in-graph argmax), not logits", action="store_true"),
    TaskFlag("upsample", ("--no-upsample",), "keep logits at 1/8 resolution (no in-graph resize to the input size)",
             action="store_false"),
    TaskFlag("ignore_index", ("--ignore-index",), "mask value left out of mIoU (default: the checkpoint's, else 255)",
             type=int),
))

TASKS: dict[str, Task] = {t.name: t for t in (CLASSIFY, DETECT, SEGMENT)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise EdgeDeployError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name]


def add_all_task_flags(parser: argparse.ArgumentParser) -> None:
    """Every task's flags, each defaulting to None (not given); see `given_task_options`."""
    for task in TASKS.values():
        task.add_flags(parser)


def given_task_options(args: argparse.Namespace | Mapping[str, Any], task: str, model: str = "the model") -> dict:
    """The task-specific flags that were given (not None); one meant for another task is an error, not ignored."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    given = {}
    for other in TASKS.values():
        for f in other.flags:
            value = values.get(f.dest)
            if value is None:
                continue
            if other.name != task:
                raise EdgeDeployError(f"{f.shown} applies to {other.name} models; {model} is a {task} model")
            given[f.dest] = value
    return given
