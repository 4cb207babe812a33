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
    input_convention: str | None = None  # preset name overriding the checkpoint's (e.g. "yolox-legacy")
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
    calib: str | None = None  # image directory, dataset folder (its train split) or "synthetic"; None: the
    # checkpoint's recorded training data (an error when it is gone), synthetic only for re-initialised weights
    calib_images: int = 64
    calib_method: str = "auto"  # auto | minmax | ema | percentile | entropy (see export.int8.resolve_calib_method)
    eval_data: str | None = None  # held-out images for FP16/INT8 accuracy: directory or "synthetic"; None: the
    # checkpoint's validation split when it recorded its (classification) dataset, else synthetic
    eval_images: int | None = None  # None: the whole held-out split; N caps it (evenly spaced)
    ignore_index: int | None = None  # segmentation: mask value left out of mIoU; None: the checkpoint's (else 255)
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
    # architecture options (e.g. {"shuffle": "after_dw_inverse"}); default: those the checkpoint implies.
    # `deploy verify` passes the ones recorded at export so it rebuilds the same architecture.
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """The shared validators (edgedeploy.options): `export(imgsz=0)` fails as `deploy export --imgsz 0` does."""
        from edgedeploy import options as opt

        self.num_classes = opt.NUM_CLASSES.check_optional(self.num_classes)
        self.imgsz = opt.IMGSZ.check_optional(self.imgsz)
        if self.dynamic_batch is not None:
            self.dynamic_batch = opt.dynamic_batch(self.dynamic_batch)
        else:
            self.batch = opt.BATCH.check(self.batch)
        self.opset = opt.OPSET.check(self.opset)
        self.calib_images = opt.CALIB_IMAGES.check(self.calib_images)
        self.eval_images = opt.EVAL_IMAGES.check_optional(self.eval_images)
        self.calib_method = opt.CALIB_METHOD.check(self.calib_method)
        self.builder = opt.BUILDER.check(self.builder)
        self.fp16_io = opt.FP16_IO.check(self.fp16_io)
        self.workspace_mb = opt.WORKSPACE_MB.check_optional(self.workspace_mb)
        self.rtol = opt.TOLERANCE.check_optional(self.rtol, "--rtol")
        self.atol = opt.TOLERANCE.check_optional(self.atol, "--atol")
        self.seed = opt.SEED.check(self.seed)
        t = self.task_options
        for key, option in (("max_det", opt.MAX_DET), ("conf_thres", opt.CONF_THRES), ("iou_thres", opt.IOU_THRES),
                            ("nms", opt.NMS_MODE)):
            if t.get(key) is not None:
                t[key] = option.check(t[key])

    @property
    def batch_shape(self) -> tuple[int, int, int]:
        """(min, opt, max) batch, static batches giving (b, b, b)."""
        return tuple(self.dynamic_batch) if self.dynamic_batch else (self.batch, self.batch, self.batch)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
