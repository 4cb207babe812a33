"""Classification: `images` (B,3,H,W) -> `logits` (B,num_classes); metric top-1 and top-1 agreement."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgedeploy.export.options import ExportOptions
from edgedeploy.export.tasks.base import EvalData, RunFn, TaskAdapter
from edgedeploy.tasks import CLASSIFY

if TYPE_CHECKING:
    from edgedeploy.models.registry import ModelInfo


@CLASSIFY.provides("export_adapter")
class ClassifyAdapter(TaskAdapter):
    task = "classify"

    def output_names(self, options: ExportOptions) -> list[str]:
        return ["logits"]

    def synthetic_images(self, info: "ModelInfo", imgsz: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        """The built-in shapes dataset's renderer (what `deploy train --data synthetic` learns), cycling classes."""
        try:
            from edgedeploy.data.synthetic_classify import SHAPES, render_shape_image
        except ImportError:
            return super().synthetic_images(info, imgsz, n, rng)
        return [render_shape_image(SHAPES[i % len(SHAPES)], imgsz, rng) for i in range(n)]

    def load_eval_data(self, info: "ModelInfo", imgsz: int, source: str, n: int, rng: np.random.Generator) -> EvalData:
        """Labelled data (top-1) from a dataset root with a val split (`deploy train`'s layout: labels in
        classes.txt order) or a folder of class sub-folders; a flat folder or `synthetic` gives no labels."""
        root = Path(source)
        if source != "synthetic" and root.is_dir() and any(p.is_dir() for p in root.iterdir()):
            from edgedeploy.data.imagefolder import VAL_SPLIT_NAMES, read_class_names
            from edgedeploy.export.calibration import read_image_folder

            classes = None
            split = next((root / v for v in VAL_SPLIT_NAMES if (root / v).is_dir()), None)
            if split is not None:
                classes = read_class_names(root)
                root = split
            elif (root / "classes.txt").is_file():
                classes = read_class_names(root)
            images, labels, classes, skipped, available = read_image_folder(root, n, classes)
            inputs = [self.preprocess(i, info, imgsz) for i in images]
            return EvalData(inputs, labels, str(root), skipped, {"classes": classes}, available)
        return super().load_eval_data(info, imgsz, source, n, rng)

    def evaluate(self, run_fn: RunFn, eval_data: EvalData, reference_fn: RunFn | None = None) -> dict[str, float]:
        preds = np.array([int(np.argmax(run_fn(x)[0][0])) for x in eval_data.inputs])
        metrics: dict[str, float] = {"n": float(len(preds))}
        metrics["classes_predicted"] = float(len(set(preds.tolist())))  # 1 means the ranking is degenerate
        if eval_data.targets is not None:
            metrics["top1"] = float((preds == np.asarray(eval_data.targets)).mean())
        if reference_fn is not None:
            ref = np.array([int(np.argmax(reference_fn(x)[0][0])) for x in eval_data.inputs])
            metrics["agreement"] = float((preds == ref).mean())
        return metrics

    def int8_exclusions(self, onnx_model, options: ExportOptions) -> list[tuple[str, str]]:
        from edgedeploy.export.int8 import final_classifier_nodes

        reason = ("final classifier: its INT8 error moves the logit ranking (top-1) directly, and it is <1% of "
                  "the MACs, so FP32 costs nothing measurable")
        return [(n, reason) for n in final_classifier_nodes(onnx_model, self.output_names(options))]

    def sidecar_postprocess(self, options: ExportOptions) -> dict[str, Any]:
        return {"output": "logits", "softmax": False}


