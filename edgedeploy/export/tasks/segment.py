"""Segmentation: `images` (B,3,H,W) -> `logits` (B,C,H,W) or, with `--argmax`, `mask` (B,H,W) int32 class ids.

task_options:
  argmax   (bool, default False)  put the per-pixel argmax in the graph: 1 byte-ish per pixel leaves the GPU
                                  instead of C floats, and nothing is left to do on the host.
  upsample (bool, default True)   resize logits to the input size in the graph (bilinear, as in training);
                                  False returns them at 1/8 resolution for the caller to resize.

Parity: logits against PyTorch with allclose; an argmax mask by pixel agreement (a float-rounding tie may
flip a pixel, so >= 99.9% equal pixels passes). FP16/INT8 are judged by mIoU on labelled held-out data (the
checkpoint's own val split, with its ignore index, unless --eval-data says otherwise) and by pixel agreement
with FP32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from edgedeploy.export.options import ExportOptions
from edgedeploy.export.parity import OutputParity, ParityResult, compare_outputs
from edgedeploy.export.tasks.base import EvalData, RunFn, TaskAdapter
from edgedeploy.tasks import SEGMENT

if TYPE_CHECKING:
    import torch.nn as nn

    from edgedeploy.models.registry import ModelInfo

MASK_AGREEMENT = 0.999  # argmax parity: fraction of pixels that must carry the same class


def _segment_wrapper(model: "nn.Module", argmax: bool, upsample: bool) -> "nn.Module":
    import torch
    import torch.nn as nn

    class SegmentExport(nn.Module):
        """The model as deployed: logits (optionally at 1/8) or an int32 class-id mask."""

        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.model = inner
            self.argmax = argmax

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.model(x)
            # int32: TensorRT's native index type (ArgMax -> TopK indices); int64 outputs get narrowed anyway
            return out.argmax(1).to(torch.int32) if self.argmax else out

    if hasattr(model, "upsample"):
        model.upsample = upsample
    elif not upsample:
        from edgedeploy.errors import ExportError

        raise ExportError(f"{type(model).__name__} has no `upsample` switch: export it with upsample=True")
    return SegmentExport(model)


def pixel_agreement(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float((a == b).mean()) if a.size else 1.0


@SEGMENT.provides("export_adapter")
class SegmentAdapter(TaskAdapter):
    task = "segment"

    @staticmethod
    def argmax(options: ExportOptions) -> bool:
        return bool(options.task_options.get("argmax", False))

    @staticmethod
    def upsample(options: ExportOptions) -> bool:
        return bool(options.task_options.get("upsample", True))

    # --- graph ---------------------------------------------------------------------------------------------
    def wrap_for_export(self, model: "nn.Module", options: ExportOptions) -> "nn.Module":
        return _segment_wrapper(model, self.argmax(options), self.upsample(options))

    def output_names(self, options: ExportOptions) -> list[str]:
        return ["mask"] if self.argmax(options) else ["logits"]

    # --- data ----------------------------------------------------------------------------------------------
    def synthetic_images(self, info: "ModelInfo", imgsz: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        """Images from the built-in segmentation set's renderer: the shapes `--data synthetic` trains on."""
        from edgedeploy.data.synthetic_segment import render_sample

        return [render_sample(imgsz, rng)[0] for _ in range(n)]

    def load_eval_data(self, info: "ModelInfo", imgsz: int, source: str, n: int | None,
                       rng: np.random.Generator) -> EvalData:
        """Labelled: the val split of a segmentation dataset folder (images/masks, CamVid, VOC) or of the synthetic
        set, read with the checkpoint's class list and ignore index (`dataset_meta`, set by the pipeline); a plain
        image folder gives unlabelled inputs (agreement only). `n` None: the whole split."""
        from pathlib import Path

        from edgedeploy.data.voc import open_segmentation_data, segmentation_layout

        meta = self.dataset_meta or {}
        names = list(meta.get("class_names") or []) or None
        ignore = meta.get("ignore_index")
        ignore = 255 if ignore is None else int(ignore)
        if source != "synthetic":
            if segmentation_layout(source) == "unknown" and Path(source).is_dir():
                return super().load_eval_data(info, imgsz, source, n, rng)
            ds = open_segmentation_data(source, "val", imgsz=imgsz, train=False, class_names=names,
                                        ignore_index=ignore)
        else:
            ds = open_segmentation_data("synthetic", "val", imgsz=imgsz, train=False, class_names=names,
                                        ignore_index=ignore, synthetic_kwargs={"progress": False})
        ds.mean, ds.std = tuple(info.mean), tuple(info.std)
        count = len(ds) if n is None else min(n, len(ds))
        picks = sorted({int(i) for i in np.linspace(0, len(ds) - 1, count).round()}) if count else []
        inputs, masks = [], []
        for i in picks:
            x, mask = ds.eval_item(i)
            inputs.append(x[None])
            masks.append(mask)
        where = "synthetic" if source == "synthetic" else f"{ds.root} (val split, {ds.layout})"
        meta_out = {"num_classes": ds.num_classes, "class_names": ds.class_names, "ignore_index": ds.ignore_index}
        if ds.own_class_names is not None:
            meta_out["classes"] = ds.own_class_names  # the pipeline refuses a list that is not the checkpoint's
        return EvalData(inputs, masks, where, meta=meta_out, available=len(ds))

    # --- judging -------------------------------------------------------------------------------------------
    def compare(self, names: Sequence[str], torch_outs: Sequence[np.ndarray], onnx_outs: Sequence[np.ndarray],
                rtol: float, atol: float) -> ParityResult:
        if list(names) != ["mask"]:
            return compare_outputs(names, torch_outs, onnx_outs, rtol, atol)
        ref, got = np.asarray(torch_outs[0]), np.asarray(onnx_outs[0])
        if ref.shape != got.shape:
            op = OutputParity("mask", list(ref.shape), float("inf"), float("inf"), 0.0, ref.size, ref.size, False, 0.0,
                              f"shape mismatch: torch {ref.shape} vs exported {got.shape}")
            return ParityResult(False, rtol, atol, [op])
        agree = pixel_agreement(ref, got)
        bad = int((ref != got).sum())
        ok = agree >= MASK_AGREEMENT
        op = OutputParity("mask", list(ref.shape), float(np.abs(ref.astype(np.int64) - got).max()) if ref.size else 0.0,
                          0.0, agree, bad, int(ref.size), ok, float(ref.std()),
                          "" if ok else f"only {100 * agree:.3f}% of pixels agree (need {100 * MASK_AGREEMENT:.1f}%)")
        return ParityResult(ok, rtol, atol, [op], notes=[f"mask compared by pixel agreement: {100 * agree:.4f}%"])

    def evaluate(self, run_fn: RunFn, eval_data: EvalData, reference_fn: RunFn | None = None) -> dict[str, float]:
        import torch

        from edgedeploy.eval.segment import SegmentationMeter, predictions_at

        meter = None
        if eval_data.targets is not None:
            nc = int(eval_data.meta.get("num_classes") or 0)
            meter = SegmentationMeter(nc, eval_data.meta.get("ignore_index", 255)) if nc else None
        agree, pixels = 0, 0
        for i, x in enumerate(eval_data.inputs):
            out = run_fn(x)[0][0]
            size = tuple(eval_data.targets[i].shape) if eval_data.targets is not None else tuple(x.shape[-2:])
            pred = predictions_at(out, size)
            if meter is not None:
                if out.ndim == 3 and out.shape[0] != meter.num_classes:
                    meter = None  # a model of other classes than the eval set: agreement only
                else:
                    meter.update(pred, torch.as_tensor(eval_data.targets[i]).long())
            if reference_fn is not None:
                ref = predictions_at(reference_fn(x)[0][0], size)
                agree += int((pred == ref).sum())
                pixels += pred.numel()
        metrics: dict[str, float] = {"n": float(len(eval_data.inputs))}
        if meter is not None:
            s = meter.scores()
            metrics.update(miou=s.miou, pixel_acc=s.pixel_acc)
        if reference_fn is not None:
            metrics["agreement"] = agree / max(pixels, 1)
        return metrics

    # --- precision -----------------------------------------------------------------------------------------
    def int8_exclusions(self, onnx_model, options: ExportOptions) -> list[tuple[str, str]]:
        """The two 1x1 classifier convs write the logits directly (their INT8 error moves class boundaries) and
        are <1% of the MACs: kept in FP32."""
        graph = onnx_model.graph
        heads = []
        for node in graph.node:
            text = " ".join([node.name, *node.input])
            if node.op_type == "Conv" and ("low_classifier" in text or "high_classifier" in text):
                heads.append((node.name, "final classifier conv: writes the logits (<1% of MACs)"))
        return heads

    # --- artifact metadata ---------------------------------------------------------------------------------
    def dataset_postprocess(self, dataset_meta: dict[str, Any], ckpt_meta: dict[str, Any]) -> dict[str, Any]:
        """What a mask's values mean beyond the class ids: the ignore (void) label the model was trained with."""
        ignore = dataset_meta.get("ignore_index")
        out: dict[str, Any] = {"ignore_index": int(ignore) if ignore is not None else 255}
        if ckpt_meta.get("palette"):
            out["palette"] = ckpt_meta["palette"]
        return out

    def sidecar_postprocess(self, options: ExportOptions) -> dict[str, Any]:
        return {"output": "mask" if self.argmax(options) else "logits", "argmax": self.argmax(options),
                "upsampled": self.upsample(options), "stride": 1 if self.upsample(options) else 8,
                "mask_dtype": "int32" if self.argmax(options) else None}



__all__ = ["SegmentAdapter", "pixel_agreement"]
