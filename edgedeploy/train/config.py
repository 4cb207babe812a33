"""Typed training configurations: one dataclass per task on a shared base.

The defaults are the dataclass defaults (the recipe for your own data). A task's synthetic preset is a dict of
explicit overrides that `build_config` applies to the fields the caller did not give, when `data="synthetic"`.
`deploy train` (train/cli.py) builds these from its flags; the Python API takes keyword arguments; the training
code only ever sees a config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, ClassVar, Mapping, TypeVar

DEFAULT_EPOCHS = 30
# Fields a resumed run takes from the caller; every other field comes from the checkpoint's `train_args`.
RUNTIME_FIELDS = ("device", "workers", "amp", "progress", "time_limit", "resume", "out_dir", "project", "name")


@dataclass
class TrainConfig:
    """Fields every task shares. `epochs=None`: 30, or on resume what the run planned."""

    model: str = ""
    data: str = "synthetic"
    epochs: int | None = None
    batch_size: int = 16
    imgsz: int | None = None  # None: the model's registered size
    lr: float = 0.01
    optimizer: str = "sgd"  # sgd | adamw
    weight_decay: float = 5e-4
    momentum: float = 0.9
    lr_schedule: str = "cosine"  # cosine | poly, per iteration after a linear warm-up
    warmup_epochs: float = 1.0  # at most half the run
    ema: bool = True
    amp: bool = True  # CUDA only
    grad_clip: float | None = None  # max gradient norm (None or 0: no clipping)
    workers: int | None = None  # None: the task's default for the device
    device: str | None = None
    seed: int = 0
    out_dir: str | None = None  # run folder; None: project/name, name2, ...
    project: str = "runs/train"
    name: str | None = None  # None: the model's name
    resume: bool | str = False  # True: out_dir/last.pt; or a run folder / last.pt
    num_classes: int | None = None  # must match the data; synthetic: how many classes to generate
    eval_interval: int = 1  # validate every N epochs (and always after the last)
    time_limit: float | None = None  # minutes: stop after the epoch in which it runs out
    max_iters: int | None = None  # iterations per epoch at most (smoke tests)
    progress: bool = True

    OPTIMIZER_DEFAULTS: ClassVar[dict[str, dict[str, float]]] = {}  # optimizer -> its lr / weight decay

    def recorded(self) -> dict[str, Any]:
        """What the checkpoint keeps as `train_args` so a resumed run continues as started."""
        return {k: v for k, v in asdict(self).items() if k not in RUNTIME_FIELDS}

    def restored(self, recorded: Mapping[str, Any]) -> "TrainConfig":
        """This config continued from a checkpoint's `train_args`: recorded fields win, except the runtime
        fields and `epochs` when given (a finished run can be extended)."""
        names = {f.name for f in fields(self)} - set(RUNTIME_FIELDS)
        saved = {k: v for k, v in recorded.items() if k in names}
        if "scale_range" in saved and saved["scale_range"] is not None:
            saved["scale_range"] = tuple(saved["scale_range"])
        if self.epochs is not None:
            saved["epochs"] = self.epochs
        return replace(self, **saved)


@dataclass
class ClassifyConfig(TrainConfig):
    """ImageNet-style recipe for small models, scaled to short runs."""

    model: str = "mobilenetv3_small"
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-5
    label_smoothing: float = 0.1
    augment: str = "standard"  # none | light | standard

    OPTIMIZER_DEFAULTS: ClassVar[dict[str, dict[str, float]]] = {
        "sgd": {"lr": 0.05, "weight_decay": 5e-5},
        "adamw": {"lr": 2e-3, "weight_decay": 0.05},
    }


@dataclass
class DetectConfig(TrainConfig):
    """YOLO recipe: SGD momentum 0.937, mosaic until the last `close_mosaic` epochs, precise BN before eval."""

    model: str = "yolox_nano"
    momentum: float = 0.937
    grad_clip: float | None = 10.0
    workers: int | None = 2
    weights: str | None = None  # initial weights (same model family; another class count re-initialises the head)
    mosaic: float = 1.0  # probability of a 4-image mosaic per sample
    close_mosaic: int | None = None  # last N epochs without mosaic; None: ~15% of the run
    hsv: bool = True
    flip: float = 0.5
    precise_bn: int = 8  # batches to re-estimate BatchNorm statistics before each evaluation (0: off)
    synthetic_train: int = 512
    synthetic_val: int = 128


@dataclass
class SegmentConfig(TrainConfig):
    """torchvision's LR-ASPP recipe: SGD, poly, lr 0.02 at batch 32 scaled to a batch of 8, weight decay 1e-6."""

    model: str = "lraspp_mobilenetv3"
    batch_size: int = 8
    lr: float = 0.005
    weight_decay: float = 1e-6
    lr_schedule: str = "poly"
    weights: str | None = None  # initial weights (ours or torchvision's); other class counts re-initialise the head
    ignore_index: int = 255
    scale_range: tuple[float, float] = (0.5, 2.0)  # random rescale of the shorter side relative to imgsz
    synthetic: dict | None = None  # keyword arguments of the synthetic set (n_train, n_val, ...)
    max_train_images: int | None = None
    max_val_images: int | None = None


C = TypeVar("C", bound=TrainConfig)


def build_config(cls: type[C], preset: Mapping[str, Any], **given: Any) -> C:
    """`cls` from the arguments given (None: not given). With `data="synthetic"` (and not resuming: a resumed run
    takes its recorded config) the preset fills what was not given; choosing an optimizer without an lr takes that
    optimizer's usual lr and weight decay."""
    given = {k: v for k, v in given.items() if v is not None}
    names = {f.name for f in fields(cls)}
    base: dict[str, Any] = {}
    if str(given.get("data", cls.data)).lower() == "synthetic" and not given.get("resume"):
        base.update({k: v for k, v in preset.items() if k in names})
    chosen, default = given.get("optimizer"), base.get("optimizer", cls.optimizer)
    if chosen and chosen != default and "lr" not in given:
        base.update(cls.OPTIMIZER_DEFAULTS.get(chosen, {}))
    return cls(**{**base, **given})


@dataclass(frozen=True)
class Trainer:
    """A task's part for `deploy train` in the task registry (`@CLASSIFY.provides("trainer")`): its typed config,
    its synthetic preset, the training function and the line printed when it is done (None: it prints its own)."""

    config: type[TrainConfig]
    preset: Mapping[str, Any]
    train: Callable[[Any], Any]
    summary: Callable[[Any], str] | None = None

    def build(self, **given: Any) -> TrainConfig:
        return build_config(self.config, self.preset, **given)


def as_config(cls: type[C], preset: Mapping[str, Any], model: "str | C", data: Any, **options: Any) -> C:
    """`model` itself when it is a ready `cls`, else `cls` built (`build_config`) from the model name, data and
    options: what every `train_*` function of the Python API accepts."""
    if isinstance(model, cls):
        return model
    return build_config(cls, preset, model=model, data=str(data), **options)
