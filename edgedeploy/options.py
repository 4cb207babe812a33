"""Every user-facing option defined and validated once, for the CLI and the Python API alike.

Each option knows its valid range; a bad value raises `OptionError` (exit code 2) whose message names the
flag, the value and the range. The CLI uses the same objects as argparse types (`type=IMGSZ.arg`), the Python
API calls them directly (`IMGSZ.check(imgsz)`), so `deploy export --imgsz 0` and `export(imgsz=0)` say the
same thing. This module sits in the lowest room: it imports nothing from the rest of edgedeploy but errors.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from enum import Enum
from typing import Any, Sequence

from edgedeploy.errors import EXIT_USAGE, EdgeDeployError


class OptionError(EdgeDeployError, ValueError):
    """An option value outside its valid range (exit code 2, like an argparse usage error)."""

    exit_code = EXIT_USAGE


_ARG = "\x00"  # stands for the flag in messages argparse prefixes with "argument --flag: " itself


def _argtype(check, metavar: str):
    def parse(text: str):
        try:
            return check(text, _ARG)
        except OptionError as e:
            raise argparse.ArgumentTypeError(str(e).replace(_ARG + " ", "").replace(_ARG, "")) from None

    parse.__name__ = metavar  # argparse names the type in "invalid <name> value" messages
    return parse


@dataclass(frozen=True)
class IntOption:
    flag: str
    lo: int
    hi: int
    what: str = ""

    def check(self, value: Any, flag: str | None = None) -> int:
        flag = flag or self.flag
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            v = int(str(value).strip()) if isinstance(value, str) else int(value)
        except (TypeError, ValueError, OverflowError):
            raise OptionError(f"{flag} {value!r}: expected a whole number from {self.lo} to {self.hi}") from None
        if not self.lo <= v <= self.hi:
            raise OptionError(f"{flag} {v}: must be from {self.lo} to {self.hi}{self.what}")
        return v

    def check_optional(self, value: Any, flag: str | None = None) -> int | None:
        return None if value is None else self.check(value, flag)

    @property
    def arg(self):
        return _argtype(self.check, "int")


@dataclass(frozen=True)
class FloatOption:
    flag: str
    lo: float
    hi: float
    lo_open: bool = False  # lo itself not allowed
    what: str = ""

    def _range(self) -> str:
        return f"{'above' if self.lo_open else 'from'} {self.lo:g} {'up ' if self.lo_open else ''}to {self.hi:g}"

    def check(self, value: Any, flag: str | None = None) -> float:
        flag = flag or self.flag
        try:
            if isinstance(value, bool):
                raise ValueError
            v = float(value)
        except (TypeError, ValueError, OverflowError):
            raise OptionError(f"{flag} {value!r}: expected a number {self._range()}") from None
        if not math.isfinite(v) or v < self.lo or v > self.hi or (self.lo_open and v == self.lo):
            raise OptionError(f"{flag} {v:g}: must be {self._range()}{self.what}")
        return v

    def check_optional(self, value: Any, flag: str | None = None) -> float | None:
        return None if value is None else self.check(value, flag)

    @property
    def arg(self):
        return _argtype(self.check, "float")


@dataclass(frozen=True)
class ChoiceOption:
    flag: str
    choices: tuple[str, ...]

    def check(self, value: Any, flag: str | None = None) -> str:
        if value not in self.choices:
            raise OptionError(f"{flag or self.flag} {value!r}: choose one of {', '.join(self.choices)}")
        return str(value)

    def check_optional(self, value: Any, flag: str | None = None) -> str | None:
        return None if value is None else self.check(value, flag)


# ---------------------------------------------------------------------------------------------- the options
MAX_IMGSZ = 4096
IMGSZ = IntOption("--imgsz", 32, MAX_IMGSZ, " pixels (square input side)")
NUM_CLASSES = IntOption("--num-classes", 1, 100_000)
BATCH = IntOption("--batch", 1, 4096)
ITERATIONS = IntOption("--iterations", 1, 100_000_000)
EPOCHS = IntOption("--epochs", 1, 100_000)
WORKERS = IntOption("--workers", 0, 256)
SEED = IntOption("--seed", 0, 2**32 - 1)
OPSET = IntOption("--opset", 11, 20, " (TorchScript exporter; Q/DQ per-channel INT8 needs 13+)")
CALIB_IMAGES = IntOption("--calib-images", 1, 1_000_000)
EVAL_IMAGES = IntOption("--eval-images", 1, 1_000_000)
WORKSPACE_MB = IntOption("--workspace", 1, 1 << 22, " MB")
MAX_DET = IntOption("--max-det", 1, 100_000)
TOP = IntOption("--top", 0, 1_000_000, " (0 = all layers)")
MAX_FRAMES = IntOption("--max-frames", 1, 10**12)
RECONNECT = IntOption("--reconnect", 0, 1000)
INSTANCES = IntOption("--instances", 1, 256)
TRITON_MAX_BATCH = IntOption("--max-batch", 0, 4096, " (0: no Triton batching)")

CONF_THRES = FloatOption("--conf-thres", 0.0, 1.0)
IOU_THRES = FloatOption("--iou-thres", 0.0, 1.0, lo_open=True)
TOLERANCE = FloatOption("--rtol/--atol", 0.0, 1e6)
LR = FloatOption("--lr", 0.0, 100.0, lo_open=True)
WEIGHT_DECAY = FloatOption("--weight-decay", 0.0, 1.0)
LABEL_SMOOTHING = FloatOption("--label-smoothing", 0.0, 1.0)
WARMUP_MS = FloatOption("--warmup", 0.0, 3_600_000.0, what=" ms")
DURATION_S = FloatOption("--duration", 0.0, 86_400.0, lo_open=True, what=" s")
PERCENTILE = FloatOption("--percentiles", 0.0, 100.0)



class Precision(str, Enum):
    """An engine's arithmetic: FP32, FP16 (FP32 plus half-precision kernels), INT8 (explicit Q/DQ, FP16 fallback)."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class NmsMode(str, Enum):
    """Where a detector's NMS runs: on the host after the engine (`none`), in the graph as ONNX
    NonMaxSuppression (`onnx`), or as TensorRT's EfficientNMS_TRT plugin (`trt`)."""

    NONE = "none"
    ONNX = "onnx"
    TRT = "trt"


class CalibMethod(str, Enum):
    """How INT8 ranges are taken from the calibration images (`auto`: per model family, see docs/EXPORT.md)."""

    AUTO = "auto"
    MINMAX = "minmax"
    EMA = "ema"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"


def _values(enum: type[Enum]) -> tuple[str, ...]:
    return tuple(m.value for m in enum)


PRECISION = ChoiceOption("--precision", _values(Precision))
NMS_MODE = ChoiceOption("--nms", _values(NmsMode))
CALIB_METHOD = ChoiceOption("--calib-method", _values(CalibMethod))
BUILDER = ChoiceOption("--builder", ("auto", "tensorrt", "tensorrt-rtx", "none"))
FP16_IO = ChoiceOption("--fp16-io", ("fp32", "fp16"))


@dataclass(frozen=True)
class NmsSettings:
    """A detector's post-processing thresholds: score threshold, IoU threshold and detections kept per image."""

    conf_thres: float
    iou_thres: float
    max_det: int

    def __post_init__(self) -> None:
        CONF_THRES.check(self.conf_thres)
        IOU_THRES.check(self.iou_thres)
        MAX_DET.check(self.max_det)


# The detection defaults, defined here only. Serving (pipelines, exported NMS, Triton, the camera app) keeps
# confident boxes; scoring mAP keeps nearly all of them (YOLOv5's and YOLOX's evaluation settings).
SERVE_NMS = NmsSettings(conf_thres=0.25, iou_thres=0.45, max_det=100)
EVAL_NMS = NmsSettings(conf_thres=0.001, iou_thres=0.65, max_det=300)


def dynamic_batch(value: Any, flag: str = "--dynamic-batch") -> tuple[int, int, int]:
    """'MIN:OPT:MAX' (or a 3-sequence) with 1 <= MIN <= OPT <= MAX <= BATCH.hi."""
    try:
        parts = value.split(":") if isinstance(value, str) else list(value)
        mn, opt, mx = (BATCH.check(p, flag) for p in parts)
    except (OptionError, ValueError, TypeError):
        raise OptionError(f"{flag} {value!r}: expected MIN:OPT:MAX, e.g. 1:8:16, each from {BATCH.lo} to {BATCH.hi}") from None
    if not mn <= opt <= mx:
        raise OptionError(f"{flag} {mn}:{opt}:{mx}: need MIN <= OPT <= MAX")
    return mn, opt, mx


dynamic_batch.arg = _argtype(dynamic_batch, "MIN:OPT:MAX")  # type: ignore[attr-defined]


def percentiles(value: Any, flag: str = "--percentiles") -> tuple[float, ...]:
    items: Sequence[Any] = [p for p in value.split(",") if p.strip()] if isinstance(value, str) else list(value)
    if not items:
        raise OptionError(f"{flag} {value!r}: give at least one percentile, e.g. 90,95,99")
    return tuple(PERCENTILE.check(p, flag) for p in items)


percentiles.arg = _argtype(percentiles, "PERCENTILES")  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------ memory estimate
# Peak memory of a forward pass of these CNNs as a multiple of the FP32 input tensor: an upper bound, so only
# sizes that cannot possibly fit are refused (see docs/TROUBLESHOOTING.md for the measured figure).
ACTIVATION_FACTOR = 80


def physical_memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def check_input_memory(imgsz: int, batch: int = 1, flag: str = "--imgsz") -> None:
    """Refuse an input size whose forward pass cannot fit in this machine's memory (before allocating it)."""
    need = ACTIVATION_FACTOR * 4 * 3 * int(batch) * int(imgsz) ** 2
    have = physical_memory_bytes()
    if have and need > have:
        raise OptionError(
            f"{flag} {imgsz} with batch {batch}: a forward pass needs about {need / 2**30:.0f} GiB, more than this "
            f"machine's {have / 2**30:.0f} GiB; use a smaller --imgsz or --batch"
        )


def check_imgsz(imgsz: Any, multiple: int = 1, batch: int = 1, flag: str = "--imgsz", who: str = "this model") -> int:
    """IMGSZ's range, a model-specific multiple (detectors: the largest stride) and the memory estimate."""
    v = IMGSZ.check(imgsz, flag)
    if multiple > 1 and v % multiple:
        raise OptionError(f"{flag} {v}: must be a multiple of {multiple} for {who} (e.g. {max(multiple, v // multiple * multiple)})")
    check_input_memory(v, batch, flag)
    return v
