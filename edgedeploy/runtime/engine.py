"""The `Engine` interface every backend implements (`runtime.loader.load_engine` picks the backend for a path).

An engine takes named NCHW arrays and returns named arrays. It validates its inputs against the artifact's
IO specs (rank, static dims, channel count, dtype) so a wrong input is a clear `InputError` rather than a
crash or, worse, a silently wrong result.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from edgedeploy.errors import EdgeDeployError, InputError

# Dynamic dimensions are stored as -1 (TensorRT's convention); ONNX symbolic names map to -1 too.
DYNAMIC = -1


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # -1 for a dynamic dimension
    dtype: np.dtype

    @property
    def is_dynamic(self) -> bool:
        return any(d == DYNAMIC for d in self.shape)

    def describe(self) -> str:
        dims = "x".join("?" if d == DYNAMIC else str(d) for d in self.shape)
        return f"{self.name} [{dims}] {np.dtype(self.dtype).name}"


@dataclass
class Timing:
    """Per-call split in milliseconds. Fields a backend cannot measure stay None (trtexec prints them only
    when it can measure them, and so do we)."""

    enqueue_ms: float | None = None
    h2d_ms: float | None = None
    compute_ms: float | None = None
    d2h_ms: float | None = None
    latency_ms: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Capabilities:
    """What a backend offers the GPU pipeline; pipelines read these instead of branching on backend names.

    device_buffers: the engine takes its input in a device buffer the pipeline writes (`device_input`) and runs
        on it without a host copy (`execute`); its outputs can be read in place (`device_outputs`).
    stream: the engine runs on `engine.stream` (a `runtime.cuda.Stream`); the pipeline's kernel is launched on
        that same stream, so preprocessing -> inference -> post-processing are ordered without a host wait.
    graph_capture: the engine can replay its inference as a CUDA graph (same input shape).
    fp16_io: the input tensor is FP16 (the preprocessing kernel writes FP16).
    torch_io: `infer_torch` takes a torch tensor and returns torch tensors on the engine's device (the
        detector's NMS then runs there and only the final detections come to the host).
    """

    device_buffers: bool = False
    stream: bool = False
    graph_capture: bool = False
    fp16_io: bool = False
    torch_io: bool = False


class Engine(abc.ABC):
    """A loaded model ready to run. Use as a context manager, or call `close()` when done.

    Engines with `capabilities.device_buffers` also implement the device I/O protocol the GPU pipeline uses:
    `device_input(shape) -> pointer`, `execute()`, `device_outputs()`, `fetch_outputs()`; `stream` and
    `device_index` say where they run.
    """

    backend: str = "abstract"
    device: str = "cpu"
    device_index: int = 0
    stream: Any = None

    def __init__(self) -> None:
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self.last_timing = Timing()
        self.max_batch: int | None = None  # None: unknown/unbounded dynamic batch

    # ---- public API -------------------------------------------------------------------------------------
    def infer(self, feed: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch. `feed` is an array (single-input models) or {input name: array}."""
        return self._infer(self.validate(feed))

    @abc.abstractmethod
    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None:
        """Release backend resources. Safe to call twice."""

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        ins = ", ".join(s.describe() for s in self.inputs)
        outs = ", ".join(s.describe() for s in self.outputs)
        return f"<{type(self).__name__} {self.backend}/{self.device} in: {ins} out: {outs}>"

    @property
    def input(self) -> TensorSpec:
        return self.inputs[0]

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(fp16_io=bool(self.inputs) and self.inputs[0].dtype == np.float16)

    @property
    def source_model(self) -> Any:
        """The PyTorch module this engine runs (its `model_info` describes the input), None for a compiled
        artifact (its sidecar does)."""
        return None

    def infer_torch(self, x: Any) -> dict[str, Any]:
        """Tensor in, tensors out on the engine's device (engines whose capabilities say torch_io)."""
        raise EdgeDeployError(f"the {self.backend} backend takes no torch tensors; use infer()")

    # ---- device I/O protocol (engines whose capabilities say device_buffers) -------------------------------------
    def device_input(self, shape: tuple[int, ...]) -> int:
        """Make the (first) input `shape` and return the device address the pipeline writes it to."""
        raise EdgeDeployError(f"the {self.backend} backend on {self.device} has no device input buffer")

    def execute(self) -> None:
        """Run on the device input written since `device_input`, enqueued on `self.stream`."""
        raise EdgeDeployError(f"the {self.backend} backend on {self.device} cannot run on device buffers")

    def device_outputs(self) -> dict[str, Any]:
        """The last `execute`'s outputs where they are (torch tensors or `__cuda_array_interface__` objects),
        valid until the next `execute`."""
        raise EdgeDeployError(f"the {self.backend} backend on {self.device} has no device outputs")

    def fetch_outputs(self) -> dict[str, np.ndarray]:
        """The last `execute`'s outputs copied to host arrays (waits for them)."""
        raise EdgeDeployError(f"the {self.backend} backend on {self.device} has no device outputs")

    # ---- validation ---------------------------------------------------------------------------------------
    def validate(self, feed: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not isinstance(feed, Mapping):
            if len(self.inputs) != 1:
                names = ", ".join(s.name for s in self.inputs)
                raise InputError(f"this model has {len(self.inputs)} inputs ({names}); pass a dict {{name: array}}")
            feed = {self.inputs[0].name: feed}
        expected = {s.name for s in self.inputs}
        missing, unknown = expected - set(feed), set(feed) - expected
        if missing or unknown:
            raise InputError(
                f"input names do not match the model: missing {sorted(missing)}, unknown {sorted(unknown)}; "
                f"the model takes {', '.join(s.describe() for s in self.inputs)}"
            )
        out: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            out[spec.name] = check_input(np.asarray(feed[spec.name]), spec, self.max_batch)
        return out


def select_device(device: str | None = None):
    """'auto'/None -> cuda if available else cpu; 'cpu'; 'cuda', 'cuda:1' or just '1' (a `torch.device`)."""
    import torch

    if device is None or str(device).lower() in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = str(device).lower()
    if name.isdigit():
        name = f"cuda:{name}"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EdgeDeployError(
                f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda}). Use --device cpu, or check the driver with `nvidia-smi`."
            )
        index = torch.device(name).index or 0
        if index >= torch.cuda.device_count():
            raise EdgeDeployError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif name != "cpu":
        raise EdgeDeployError(f"--device {device}: expected auto, cpu, cuda, cuda:N or N")
    return torch.device(name)


def check_input(x: np.ndarray, spec: TensorSpec, max_batch: int | None = None) -> np.ndarray:
    """Raise `InputError` naming the problem and the expected layout; return a C-contiguous array."""
    if x.dtype != spec.dtype:
        hint = ""
        if x.dtype == np.uint8:
            hint = " (this looks like a raw image: use a pipeline (Classifier/Detector/Segmenter) to preprocess it)"
        raise InputError(
            f"input {spec.name!r} has dtype {x.dtype}, the model expects {np.dtype(spec.dtype).name}{hint}; "
            f"convert with `x.astype(np.{np.dtype(spec.dtype).name})`"
        )
    if x.ndim != len(spec.shape):
        raise InputError(
            f"input {spec.name!r} has shape {tuple(x.shape)} (rank {x.ndim}), the model expects {spec.describe()}"
        )
    for axis, (got, want) in enumerate(zip(x.shape, spec.shape)):
        if want != DYNAMIC and got != want:
            what = {0: "batch size", 1: "channel count"}.get(axis, f"dimension {axis}")
            if len(spec.shape) == 4 and axis >= 2:
                what = "height" if axis == 2 else "width"
            raise InputError(
                f"input {spec.name!r}: {what} is {got}, the model expects {want} (full layout {spec.describe()}, "
                f"got {tuple(x.shape)})"
            )
    if max_batch is not None and x.shape[0] > max_batch:
        raise InputError(f"batch of {x.shape[0]} exceeds this engine's maximum batch {max_batch}; split the batch")
    return np.ascontiguousarray(x)
