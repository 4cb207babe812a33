"""What `deploy export` / `edgedeploy.export.export()` was asked to do, in one plain dataclass.

Task adapters receive it too; task-specific knobs (e.g. a detector's `max_det`, `conf_thres`) live in
`task_options` so this class stays the same for every task.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

BUILDERS = ("auto", "tensorrt", "tensorrt-rtx", "none")


@dataclass
class ExportOptions:
    model: str
    weights: str | None = None
    num_classes: int | None = None
    imgsz: int | None = None  # None: the model's registered default
    batch: int = 1  # static batch (ignored when dynamic_batch is set)
    dynamic_batch: tuple[int, int, int] | None = None  # (min, opt, max) -> a dynamic batch axis + TRT profile
    opset: int = 17
    out: str = "exports"
    simplify: bool = True
    simplifier: str = "auto"  # auto (onnxsim, then onnxslim, then none) | onnxsim | onnxslim | none
    fp16: bool = False
    fp16_io: str = "fp32"  # "fp32": keep FP32 inputs/outputs around the FP16 graph; "fp16": FP16 IO
    fp16_keep: list[str] = field(default_factory=list)  # extra ONNX op types kept in FP32 in the FP16 model
    int8: bool = False
    calib: str | None = None  # image directory or "synthetic"; None: the checkpoint's training data, else synthetic
    calib_images: int = 64
    calib_method: str = "auto"  # auto | minmax | ema | percentile | entropy (see export.int8.resolve_calib_method)
    eval_data: str | None = None  # held-out images for FP16/INT8 accuracy: directory or "synthetic"; None: the
    # checkpoint's validation split when it recorded its (classification) dataset, else synthetic
    eval_images: int = 64
    parity_inputs: int = 4  # real-looking images, plus one random-normal input
    rtol: float | None = None  # None: the task adapter's parity_tolerance()
    atol: float | None = None
    builder: str = "auto"
    workspace_mb: int | None = None  # TensorRT workspace memory-pool limit
    timing_cache: str | None = None  # default: <out>/timing.cache (reused across builds)
    reinit: bool | None = None  # None: re-initialise only when no weights were given (see parity docs)
    seed: int = 0
    force: bool = False  # ignore up-to-date artifacts
    progress: bool = True
    task_options: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_shape(self) -> tuple[int, int, int]:
        """(min, opt, max) batch, static batches giving (b, b, b)."""
        return tuple(self.dynamic_batch) if self.dynamic_batch else (self.batch, self.batch, self.batch)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
