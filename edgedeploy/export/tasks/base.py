"""The task adapter interface: what the export pipeline needs to know about a task (classify/detect/segment).

The pipeline (edgedeploy.export.pipeline) is task-agnostic. It asks the model's adapter, found by
`get_task_adapter(info.task)`, for:

- `wrap_for_export(model, options)`  the nn.Module that is actually exported (e.g. detector + decode + NMS,
                                     segmenter + argmax). Default: the model unchanged.
- `output_names(options)`            ONNX output names, in the order the wrapped module returns them.
- `input_names(options)`             default ["images"].
- `dynamic_axes(options)`            default: axis 0 of every input and output is "batch" when
                                     options.dynamic_batch is set, else {}.
- `synthetic_images(info, imgsz, n, rng)`  real-looking uint8 BGR HxWx3 images (drawn shapes, textures) used
                                     for parity inputs, calibration and the held-out eval set when the user
                                     gives no directory. Override with something that fires the task's head.
- `preprocess(img_bgr, info, imgsz)` image -> (1, 3, imgsz, imgsz) float32 network input. Default: the CPU
                                     reference in edgedeploy.data.preprocess (letterbox iff info.letterbox).
- `sample_inputs(info, imgsz, n, rng)`  parity inputs, each (1, 3, H, W) float32: preprocessed synthetic images,
                                     and two uniform [0, 1) tensors (the classic recipe's inputs: random inputs reach
                                     patterns images do not).
- `compare(names, torch_outs, onnx_outs, rtol, atol)` -> ParityResult. Default: assert_allclose on every
                                     output. Override when an output is discrete (NMS indices, argmax masks)
                                     and must be compared differently (e.g. matched boxes, pixel agreement).
- `parity_tolerance(precision)`      (rtol, atol) for "fp32" parity; FP16/INT8 are judged by `evaluate`.
- `parity_probes(module, options)`   [(name, layer)] whose raw outputs are compared too (detector heads).
- `reinitialise_for_parity(module, sample, seed)`  seeded weights for a proof without `--weights`. Default: the
                                     generic re-initialisation in edgedeploy.export.weights.
- `runs_in_onnxruntime(options)`     False when the graph holds a node ORT cannot run (a TensorRT plugin).
- `fit_to_builder(options, builder)` the task options changed to what `builder` can build (a detector's NMS),
                                     with the choice recorded, or the reason an explicit option cannot be built.
- `recorded_data_root(ckpt_meta, recorded)` the dataset folder a checkpoint was trained on, for calibration and
                                     the held-out eval (a detector's synthetic set is regenerated).
- `dataset_postprocess(dataset_meta, ckpt_meta)`  sidecar `postprocess` fields that come from the data (a
                                     segmenter's ignore label and palette).
- `auto_calib_method`                (method, why) that `--calib-method auto` means for the task, or None for the
                                     generic choice (see edgedeploy.export.int8.resolve_calib_method).
- `load_eval_data(info, imgsz, source, n, rng)` -> EvalData: held-out inputs (+ targets when the source has
                                     labels). source is a directory or "synthetic".
- `evaluate(run_fn, eval_data, reference_fn=None)` -> dict[str, float]: the task metric for one artifact
                                     (`run_fn(x: (B,3,H,W) float32) -> list[np.ndarray]` in output_names order),
                                     and, when `reference_fn` (the FP32 artifact) is given, agreement with it.
                                     Classify: {"top1": .., "agreement": ..}; keys are the task's choice.
                                     "agreement" in [0, 1] is what FP16/INT8 reports compare.
- `fp16_op_block_list(options)`      ONNX op types kept in FP32 in the FP16 model.
- `int8_exclusions(onnx_model, options)` -> list[(node_name, reason)]: nodes kept out of INT8 (e.g. the final
                                     Sigmoid/decode of a detector); the pipeline adds the generic ones.
- `sidecar_postprocess(options)`     the task's `postprocess` dict for the artifact sidecar (ArtifactMeta).

Write a new task as `edgedeploy/export/tasks/<task>.py` with a TaskAdapter subclass registered as the task's
part (`@DETECT.provides("export_adapter")`, see edgedeploy.tasks); `get_task_adapter("<task>")` imports it lazily.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from edgedeploy.errors import ExportError
from edgedeploy.export.options import ExportOptions
from edgedeploy.tasks import TASKS
from edgedeploy.export.parity import OutputParity, ParityResult, compare_outputs

if TYPE_CHECKING:  # keep torch/onnx out of import time
    import onnx
    import torch.nn as nn

    from edgedeploy.models.registry import ModelInfo

RunFn = Callable[[np.ndarray], list[np.ndarray]]
SYNTHETIC_EVAL_IMAGES = 64  # held-out synthetic renders when no cap is given (a real split is used whole)

# Op types whose FP16 versions overflow or lose too much (LayerNorm variance, softmax exponent, reductions).
DEFAULT_FP16_BLOCK_LIST = (
    "LayerNormalization",
    "Softmax",
    "LogSoftmax",
    "ReduceMean",
    "ReduceSum",
    "ReduceL2",
    "ReduceLogSumExp",
    "Pow",
    "Sqrt",
    "Exp",
    "Erf",
    "TopK",
    "NonMaxSuppression",
    "RoiAlign",
    "Resize",
    "Range",
)


@dataclass
class EvalData:
    """Held-out inputs for FP16/INT8 accuracy; `targets` is None when the source has no labels."""

    inputs: list[np.ndarray]  # each (1, 3, H, W) float32
    targets: list[Any] | None = None
    source: str = "synthetic"
    skipped: int = 0  # unreadable images skipped
    meta: dict[str, Any] = field(default_factory=dict)
    available: int | None = None  # images in the source (inputs may be a capped, evenly spaced subset)


class TaskAdapter:
    """Base class; see the module docstring for the contract. Subclasses set `task` and `output_names`."""

    task: str = ""
    # Set by the export pipeline from the checkpoint: real image files of the model's data (parity inputs are
    # drawn from them instead of synthetic renders) and the dataset facts eval needs (class_names, ignore_index).
    image_files: list | None = None
    dataset_meta: dict[str, Any] = {}

    # --- graph ---------------------------------------------------------------------------------------------
    def wrap_for_export(self, model: "nn.Module", options: ExportOptions) -> "nn.Module":
        return model

    def input_names(self, options: ExportOptions) -> list[str]:
        return ["images"]

    def output_names(self, options: ExportOptions) -> list[str]:
        raise NotImplementedError

    def dynamic_axes(self, options: ExportOptions) -> dict[str, dict[int, str]]:
        if not options.dynamic_batch:
            return {}
        return {n: {0: "batch"} for n in self.input_names(options) + self.output_names(options)}

    # --- data ----------------------------------------------------------------------------------------------
    def synthetic_images(self, info: "ModelInfo", imgsz: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        """Drawn shapes on textured backgrounds (uint8 BGR); tasks override with images that fire their head."""
        import cv2

        images = []
        for _ in range(n):
            img = rng.integers(0, 256, (imgsz // 8 + 1, imgsz // 8 + 1, 3), dtype=np.uint8)
            img = cv2.resize(img, (imgsz, imgsz), interpolation=cv2.INTER_CUBIC)
            for _ in range(int(rng.integers(1, 4))):
                color = tuple(int(c) for c in rng.integers(0, 256, 3))
                x0, y0 = (int(v) for v in rng.integers(0, imgsz * 3 // 4, 2))
                w, h = (int(v) for v in rng.integers(imgsz // 8, imgsz // 2, 2))
                if rng.random() < 0.5:
                    cv2.rectangle(img, (x0, y0), (x0 + w, y0 + h), color, -1)
                else:
                    cv2.circle(img, (x0 + w // 2, y0 + h // 2), max(w, h) // 2, color, -1)
            images.append(img)
        return images

    def preprocess(self, img_bgr: np.ndarray, info: "ModelInfo", imgsz: int) -> np.ndarray:
        from edgedeploy.data.preprocess import convention_for, to_input_tensor

        x, _, _ = to_input_tensor(img_bgr, imgsz, convention=convention_for(info))
        return x

    def images(self, info: "ModelInfo", imgsz: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        """`n` uint8 BGR images: the model's own data when the pipeline set `image_files`, else synthetic renders."""
        if self.image_files:
            from edgedeploy.export.calibration import read_image

            files = list(self.image_files)
            images = []
            for i in rng.permutation(len(files)):  # random files, corrupt ones passed over
                img = read_image(files[int(i)])
                if img is not None:
                    images.append(img)
                if len(images) == n:
                    break
            if images:
                return [images[i % len(images)] for i in range(n)]
        return self.synthetic_images(info, imgsz, n, rng)

    def sample_inputs(self, info: "ModelInfo", imgsz: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        images = [self.preprocess(img, info, imgsz) for img in self.images(info, imgsz, max(n - 2, 1), rng)]
        # Uniform [0, 1) tensors, the classic torch -> ONNX recipe's inputs. Not N(0, 1): on BatchNorm-calibrated
        # re-initialised weights its activations run 5-20x the calibrated scale and float noise with them
        # (efficientnet_b0: logits std 3.4 vs 0.23 on images, max |torch - ORT| 9e-5 vs 2e-6).
        uniform = [rng.random((1, 3, imgsz, imgsz), dtype=np.float32) for _ in range(2)]
        from edgedeploy.data.preprocess import InputConvention, convention_for

        c = convention_for(info)
        if c != InputConvention.from_info(info):  # the weights' own convention (e.g. BGR 0-255): uniform pixels in
            # 64-192 mapped through it, on the scale the weights expect (full-range noise on pixel-scale random-weight
            # fixtures drives their heads chaotic: torch vs ORT apart by 1e-3 of the outputs' spread)
            m, sd = np.asarray(c.mean, np.float32).reshape(3, 1, 1), np.asarray(c.std, np.float32).reshape(3, 1, 1)
            uniform = [(((64 + 128 * u) * np.float32(c.scale)) - m) / sd for u in uniform]
        images += [u.astype(np.float32) for u in uniform]
        return images

    def load_eval_data(
        self, info: "ModelInfo", imgsz: int, source: str, n: int, rng: np.random.Generator
    ) -> EvalData:
        """Default: unlabeled images (a directory, or synthetic); `evaluate` then reports agreement only."""
        if source == "synthetic":
            imgs = self.synthetic_images(info, imgsz, n or SYNTHETIC_EVAL_IMAGES, rng)
            return EvalData([self.preprocess(i, info, imgsz) for i in imgs], None, "synthetic", available=len(imgs))
        from edgedeploy.export.calibration import list_images, read_image_files

        files = list_images(source)
        images, skipped = read_image_files(files, n, source)
        return EvalData([self.preprocess(i, info, imgsz) for i in images], None, source, skipped, available=len(files))

    # --- judging -------------------------------------------------------------------------------------------
    def parity_tolerance(self, precision: str = "fp32") -> tuple[float, float]:
        """The classic torch -> ONNX recipe's: assert_allclose(rtol=1e-3, atol=1e-5)."""
        return (1e-3, 1e-5)

    def compare(
        self,
        names: Sequence[str],
        torch_outs: Sequence[np.ndarray],
        onnx_outs: Sequence[np.ndarray],
        rtol: float,
        atol: float,
    ) -> ParityResult:
        return compare_outputs(names, torch_outs, onnx_outs, rtol, atol)

    def parity_probes(self, module: "nn.Module", options: ExportOptions) -> list[tuple[str, "nn.Module"]]:
        """Layers whose raw outputs the parity proof also compares, strictly, found in the ONNX by their weights
        (a detector's prediction convs: the logits before the decode's exp()). Default: none."""
        return []

    def reinitialise_for_parity(self, module: "nn.Module", sample: np.ndarray, seed: int = 0) -> dict[str, Any]:
        """Seeded weights for a proof without --weights (bit-identical per seed)."""
        from edgedeploy.export.weights import reinitialise_for_parity

        return reinitialise_for_parity(module, sample, seed=seed)

    def runs_in_onnxruntime(self, options: ExportOptions) -> bool:
        return True

    def fit_to_builder(self, options: ExportOptions, builder: str) -> tuple[dict[str, Any] | None, dict[str, str] | None, str]:
        """(new task options or None, the choice to record or None, why an explicitly asked option cannot be
        built by `builder` or ""). Default: every option builds."""
        return None, None, ""

    def recorded_data_root(self, ckpt_meta: dict[str, Any], recorded: Any) -> "Path | None":
        """The training data folder the checkpoint records (`recorded`: edgedeploy.data.sources.Recorded)."""
        from pathlib import Path

        return Path(str(recorded.path)) if recorded.found else None

    def dataset_postprocess(self, dataset_meta: dict[str, Any], ckpt_meta: dict[str, Any]) -> dict[str, Any]:
        return {}

    auto_calib_method: tuple[str, str] | None = None

    def evaluate(self, run_fn: RunFn, eval_data: EvalData, reference_fn: RunFn | None = None) -> dict[str, float]:
        """Default: cosine similarity of all outputs against the reference (tasks should override)."""
        if reference_fn is None:
            return {}
        cos = []
        for x in eval_data.inputs:
            for a, b in zip(run_fn(x), reference_fn(x)):
                a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
                d = np.linalg.norm(a) * np.linalg.norm(b)
                cos.append(float(a @ b / d) if d else 1.0)
        return {"agreement": float(np.mean(cos)) if cos else 1.0}

    # --- precision -----------------------------------------------------------------------------------------
    def fp16_op_block_list(self, options: ExportOptions) -> list[str]:
        """Op types that stay FP32 in the FP16 model: the numerically sensitive defaults plus `--fp16-keep`."""
        return list(DEFAULT_FP16_BLOCK_LIST) + [op for op in options.fp16_keep if op not in DEFAULT_FP16_BLOCK_LIST]

    def int8_exclusions(self, onnx_model: "onnx.ModelProto", options: ExportOptions) -> list[tuple[str, str]]:
        return []

    # --- artifact metadata ---------------------------------------------------------------------------------
    def sidecar_postprocess(self, options: ExportOptions) -> dict[str, Any]:
        return {}


def get_task_adapter(task: str) -> TaskAdapter:
    """A new adapter for `task` (the task registry's `export_adapter` part), importing
    edgedeploy.export.tasks.<task> on first use."""
    if task not in TASKS:
        raise ExportError(f"no export adapter for task {task!r}; tasks: {', '.join(TASKS)}")
    if "export_adapter" not in TASKS[task].parts:
        importlib.import_module(f"edgedeploy.export.tasks.{task}")
    return TASKS[task].part("export_adapter")()


__all__ = [
    "DEFAULT_FP16_BLOCK_LIST",
    "EvalData",
    "OutputParity",
    "ParityResult",
    "RunFn",
    "TaskAdapter",
    "get_task_adapter",
]
