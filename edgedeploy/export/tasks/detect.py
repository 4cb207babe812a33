"""Detection export: decode inside the graph, and NMS three ways (`task_options["nms"]`).

* ``none``: outputs ``boxes`` [B, N, 4] (xyxy, input pixels) and ``scores`` [B, N, C] (obj x cls); the runtime
  runs `runtime.nms.batched_detections` on the host.
* ``onnx`` (default): the standard ONNX ``NonMaxSuppression`` op (TensorRT maps it to its built-in INMSLayer, no
  plugin), then gather + pad inside the graph to fixed-size outputs ``num_dets`` [B, 1] int32, ``boxes``
  [B, K, 4], ``scores`` [B, K], ``classes`` [B, K] int32 (K = max_det; padding: zeros, class -1), sorted by score.
* ``trt``: a ``TRT::EfficientNMS_TRT`` plugin node with the same four outputs. ONNX Runtime cannot run it, and an
  engine built from it needs TensorRT's plugin library at deserialisation (`trt.init_libnvinfer_plugins`);
  NVIDIA deprecated the plugin in 10.12. Prefer ``onnx``.

Semantics match `runtime.nms.batched_detections` exactly: each box keeps its best class; boxes with score >
conf_thres go through per-class NMS (one class when `agnostic`), the best `max_det` per image are kept. Per-class
NMS is done with a one-hot score tensor [B, C, N] (only the best class non-zero), so IoUs are computed on the real
coordinates, with no class-offset trick. In eager PyTorch the NMS op runs `torchvision.ops.batched_nms`, so the
parity proof compares the ONNX op against torchvision.

Options (``ExportOptions.task_options``): nms ("onnx"), max_det (100), iou_thres (0.45), conf_thres (0.25),
agnostic (False).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from edgedeploy import options as opt
from edgedeploy.errors import ExportError
from edgedeploy.export.options import ExportOptions
from edgedeploy.export.parity import OutputParity, ParityResult, compare_output, compare_outputs
from edgedeploy.export.tasks.base import EvalData, RunFn, TaskAdapter
from edgedeploy.tasks import DETECT

if TYPE_CHECKING:
    import torch.nn as nn

    from edgedeploy.models.registry import ModelInfo

# The export defaults: the serving thresholds (edgedeploy.options.SERVE_NMS) and ONNX NonMaxSuppression.
DEFAULTS = {"nms": opt.NmsMode.ONNX.value, "max_det": opt.SERVE_NMS.max_det, "iou_thres": opt.SERVE_NMS.iou_thres,
            "conf_thres": opt.SERVE_NMS.conf_thres, "agnostic": False}
NMS_OUTPUTS = ["num_dets", "boxes", "scores", "classes"]
TOPK_LIMIT = 3840  # TensorRT's TopK: the most detections an engine's NMS can keep


def _short_reason(why: str) -> str:
    """The telling part of a builder's log line ("nms_0 has no runners that implement it")."""
    import re

    m = re.search(r"\S+ has no runners that implement it|Plugin not found[^\"]*", why)
    return m.group(0) if m else why[:200]


def detect_options(options: ExportOptions) -> dict[str, Any]:
    """The detection knobs with defaults filled in (ExportOptions validated the values given)."""
    unknown = set(options.task_options) - set(DEFAULTS)
    if unknown:
        raise ExportError(f"unknown detection export option(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    o = {**DEFAULTS, **options.task_options}
    if int(o["max_det"]) > TOPK_LIMIT:
        raise ExportError(f"--max-det {o['max_det']}: an engine keeps at most {TOPK_LIMIT} (TensorRT TopK limit)")
    return {"nms": opt.NMS_MODE.check(o["nms"]), "max_det": int(o["max_det"]), "iou_thres": float(o["iou_thres"]),
            "conf_thres": float(o["conf_thres"]), "agnostic": bool(o["agnostic"])}


def _torch():
    import torch

    return torch


def _nms_ops():
    """The two custom ops, built lazily so importing this module stays torch-free."""
    torch = _torch()
    import torchvision

    class OnnxNMS(torch.autograd.Function):
        """ONNX NonMaxSuppression: boxes [B, N, 4] xyxy, scores [B, C, N] -> selected [K, 3] (batch, class, box).

        Eager: torchvision batched_nms per image (classes as groups), capped at `max_out` per class."""

        @staticmethod
        def forward(ctx, boxes, scores, max_out: int, iou: float, conf: float):
            rows = []
            for b in range(boxes.shape[0]):
                cand = (scores[b] > conf).nonzero()  # [M, 2] (class, box)
                cls, idx = cand[:, 0], cand[:, 1]
                keep = torchvision.ops.batched_nms(boxes[b, idx].float(), scores[b, cls, idx].float(), cls, iou)
                for c in cls[keep].unique():
                    k = keep[cls[keep] == c][:max_out]
                    rows.append(torch.stack((torch.full_like(k, b), cls[k], idx[k]), 1))
            return torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.long, device=boxes.device)

        @staticmethod
        def symbolic(g, boxes, scores, max_out: int, iou: float, conf: float):
            # Thresholds as constants: TensorRT's parser requires them to be initializers.
            return g.op(
                "NonMaxSuppression", boxes, scores,
                g.op("Constant", value_t=torch.tensor([max_out], dtype=torch.long)),
                g.op("Constant", value_t=torch.tensor([iou], dtype=torch.float32)),
                g.op("Constant", value_t=torch.tensor([conf], dtype=torch.float32)),
                center_point_box_i=0,
            )

    class EfficientNMS(torch.autograd.Function):
        """TensorRT's EfficientNMS_TRT plugin: boxes [B, N, 4], scores [B, N, C] -> the four padded outputs.

        Eager: the same computation as the `onnx` path (batched_nms), which the plugin reproduces."""

        @staticmethod
        def forward(ctx, boxes, scores, max_det: int, iou: float, conf: float, agnostic: bool):
            sc = scores.amax(-1, keepdim=True).transpose(1, 2) if agnostic else scores.transpose(1, 2)
            sel = OnnxNMS.forward(None, boxes, sc, max_det, iou, conf)
            best, cls = scores.max(-1)
            return _pad_selected(sel, boxes, best, cls, max_det)

        @staticmethod
        def symbolic(g, boxes, scores, max_det: int, iou: float, conf: float, agnostic: bool):
            outs = g.op(
                "TRT::EfficientNMS_TRT", boxes, scores,
                background_class_i=-1, box_coding_i=0, iou_threshold_f=iou, max_output_boxes_i=max_det,
                plugin_version_s="1", score_activation_i=0, score_threshold_f=conf, class_agnostic_i=int(agnostic),
                outputs=4,
            )
            batch = boxes.type().sizes()[0] if boxes.type().sizes() else None
            outs[0].setType(boxes.type().with_dtype(torch.int32).with_sizes([batch, 1]))
            outs[1].setType(boxes.type().with_sizes([batch, max_det, 4]))
            outs[2].setType(boxes.type().with_sizes([batch, max_det]))
            outs[3].setType(boxes.type().with_dtype(torch.int32).with_sizes([batch, max_det]))
            return outs

    return OnnxNMS, EfficientNMS


def _pad_selected(sel, boxes, best, cls, max_det: int):
    """Selected (batch, class, box) rows -> fixed-size, score-sorted outputs, with traceable ops only:
    scatter a keep mask, TopK over the masked scores, gather. Independent of the NMS op's output order."""
    torch = _torch()
    b, n = boxes.shape[0], boxes.shape[1]
    keep = torch.zeros(b * n, dtype=boxes.dtype, device=boxes.device)
    keep = keep.index_put((sel[:, 0] * n + sel[:, 2],), torch.ones_like(sel[:, 0], dtype=boxes.dtype))
    masked = torch.where(keep.view(b, n) > 0, best, torch.full_like(best, -1.0))
    k = min(max_det, n)
    top_s, top_i = masked.topk(k, dim=1)
    valid = top_s >= 0
    det_boxes = torch.gather(boxes, 1, top_i.unsqueeze(-1).expand(-1, -1, 4))
    det_boxes = torch.where(valid.unsqueeze(-1), det_boxes, torch.zeros_like(det_boxes))  # Where, not Cast + Mul:
    # the FP16 converter mis-types Cast-to-float nodes
    det_scores = torch.where(valid, top_s, torch.zeros_like(top_s))
    det_classes = torch.where(valid, torch.gather(cls, 1, top_i), torch.full_like(top_i, -1)).to(torch.int32)
    num = valid.sum(1, keepdim=True).to(torch.int32)
    if k < max_det:  # fewer candidates than max_det: pad to the promised shape
        pad = max_det - k
        det_boxes = torch.nn.functional.pad(det_boxes, (0, 0, 0, pad))
        det_scores = torch.nn.functional.pad(det_scores, (0, pad))
        det_classes = torch.nn.functional.pad(det_classes, (0, pad), value=-1)
    return num, det_boxes, det_scores, det_classes


def build_export_module(model: "nn.Module", nms: str = DEFAULTS["nms"], max_det: int = DEFAULTS["max_det"],
                        iou_thres: float = DEFAULTS["iou_thres"], conf_thres: float = DEFAULTS["conf_thres"],
                        agnostic: bool = False) -> "nn.Module":
    """Wrap an eval-mode detector (returning (boxes, scores)) with in-graph NMS; `nms="none"` returns it as is."""
    torch = _torch()
    OnnxNMS, EfficientNMS = _nms_ops()

    class DetectWithNMS(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            boxes, scores = self.model(x)
            best, cls = scores.max(-1)
            num_classes = scores.shape[-1]
            # Only the best class keeps its score: per-class NMS then equals batched_nms on (best, cls).
            is_best = cls.unsqueeze(-1) == torch.arange(num_classes, device=cls.device)
            one_best = torch.where(is_best, best.unsqueeze(-1), torch.zeros_like(scores))  # [B, N, C]
            if nms == "trt":
                return EfficientNMS.apply(boxes, one_best, max_det, iou_thres, conf_thres, agnostic)
            per_class = best.unsqueeze(1) if agnostic else one_best.transpose(1, 2)  # [B, C or 1, N]
            sel = OnnxNMS.apply(boxes, per_class, max_det, iou_thres, conf_thres)
            return _pad_selected(sel, boxes, best, cls, max_det)

    if opt.NMS_MODE.check(nms) == "none":
        return model
    return DetectWithNMS().eval()


def _prediction_convs(model: "nn.Module"):
    """(conv, first objectness/class output channel, channels per prediction) for each head output conv."""
    head = getattr(model, "head", None)
    if hasattr(head, "num_anchors"):  # YOLOv5: one conv per level, A x (xywh, obj, classes)
        return [(c, 4, 5 + head.num_classes) for c in head.m]
    convs = [(c, 0, c.out_channels) for c in list(getattr(head, "cls_preds", [])) + list(getattr(head, "obj_preds", []))]
    return convs + [(c, None, c.out_channels) for c in getattr(head, "reg_preds", [])]


def spread_head_biases(model: "nn.Module") -> None:
    """Zero the objectness/class bias priors (0.01 and ~8 objects per image make every untrained score ~0, and ~0
    passes any parity check), so NMS has real candidates to sort. Box biases are kept."""
    torch = _torch()
    with torch.no_grad():
        for conv, first, per in _prediction_convs(model):
            if first is not None:
                conv.bias.view(-1, per)[:, first:].zero_()


# Each BatchNorm variance floored at its layer's mean. Measured on yolox_nano at 416 px: the detector is then
# well inside the ordered regime (PyTorch vs ONNX Runtime 1e-6 on the raw logits, but the coarse head levels move
# only 7e-5..8e-4 across inputs); at 0.3-0.5 the logits move 1e-2..0.4 but float noise grows to 2e-5..3e-4 and
# NMS keeps other boxes (BatchNorm-calibrated random detectors are chaotic: noise/std ~1e-3 vs ~1e-5 for
# MobileNets). See docs/EXPORT.md, "Parity proof".
DETECTOR_VAR_FLOOR = 1.0


def make_detector_realistic(model: "nn.Module", sample, seed: int = 0) -> "nn.Module":
    """Weights with realistic output statistics for a parity proof without trained weights.

    BatchNorm running statistics are measured on `sample` (so activations are normalised as in a trained net,
    instead of collapsing to constants), the prediction convs are redrawn so objectness/class logits have std ~0.3
    (tails below ~10: a sigmoid saturating to exactly 1.0 in float32 would make the best class a float-noise tie)
    and box logits std ~0.3 (YOLOX sizes ~3 strides), and the bias priors are zeroed. Returns the model in eval mode."""
    from edgedeploy.export.weights import seeded_redraw

    torch = _torch()
    seeded_redraw(model, seed)  # every parameter from the seed (biases, BatchNorm affine): bit-identical per seed
    x = torch.as_tensor(np.ascontiguousarray(sample))
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    heads = {id(c) for c, _, _ in _prediction_convs(model)}
    with torch.no_grad():
        # Every other conv redrawn from the seed too, so the proof is reproducible (and a CI run is not a lottery).
        for conv in (m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and id(m) not in heads):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / conv.weight[0].numel() ** 0.5)
        for conv, first, per in _prediction_convs(model):
            fan_in = conv.weight[0].numel()
            w = torch.randn(conv.weight.shape, generator=g) / fan_in ** 0.5
            gain = torch.full((conv.out_channels,), 0.5)
            if first is not None:
                gain.view(-1, per)[:, first:] = 2.0
            conv.weight.copy_(w * gain.view(-1, 1, 1, 1))
        saved = [(m, m.momentum) for m in bns]
        model.train()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration passes
        for _ in range(2):
            model(x)
        for m, mom in saved:
            m.momentum = mom
            # A channel nearly constant on the few calibration images would amplify any other image ~30x per
            # layer (1 / sqrt(eps)): floor each variance at its layer's mean.
            m.running_var.clamp_(min=float(m.running_var.mean()) * DETECTOR_VAR_FLOOR)
        for conv in getattr(getattr(model, "head", None), "reg_preds", []):  # YOLOX: boxes ~3 strides wide, so
            conv.bias[2:4].fill_(float(np.log(3.0)))  # neighbouring cells overlap and NMS has work (as trained)
    model.eval()
    spread_head_biases(model)
    return model


def _match_detections(ref: np.ndarray, got: np.ndarray, iou_min: float = 0.5) -> tuple[int, list[tuple[int, int]]]:
    """Greedy same-class matching by IoU; returns (number matched, index pairs)."""
    if len(ref) == 0 or len(got) == 0:
        return 0, []
    x1 = np.maximum(ref[:, None, 0], got[None, :, 0])
    y1 = np.maximum(ref[:, None, 1], got[None, :, 1])
    x2 = np.minimum(ref[:, None, 2], got[None, :, 2])
    y2 = np.minimum(ref[:, None, 3], got[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda a: (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])  # noqa: E731
    iou = inter / (area(ref)[:, None] + area(got)[None] - inter + 1e-9)
    iou[ref[:, None, 5] != got[None, :, 5]] = 0
    pairs, used = [], set()
    for i in np.argsort(-ref[:, 4]):
        j = int(np.argmax(np.where([k in used for k in range(len(got))], -1, iou[i])))
        if iou[i, j] >= iou_min and j not in used:
            used.add(j)
            pairs.append((int(i), j))
    return len(pairs), pairs


def _match_exact(ref: np.ndarray, got: np.ndarray, rtol: float, atol: float, same_class: bool = True,
                 ref_rows=None, got_rows=None) -> list[tuple[int, int]]:
    """Pairs (i, j) of the same detection: same class, score within atol, every coordinate within
    atol + rtol * |coordinate| (relative to the box's largest coordinate, as x1 = cx - w/2 cancels)."""
    pairs, used = [], set()
    for i in range(len(ref)) if ref_rows is None else ref_rows:
        tol = atol + rtol * np.abs(ref[i, :4]).max()
        for j in range(len(got)) if got_rows is None else got_rows:
            if j in used or (same_class and got[j, 5] != ref[i, 5]) or abs(got[j, 4] - ref[i, 4]) > atol:
                continue
            if (np.abs(got[j, :4] - ref[i, :4]) <= tol).all():
                used.add(j)
                pairs.append((i, j))
                break
    return pairs


def _yolo_split(source: str) -> tuple[Any, str] | None:
    """(root, split) when `source` is a labelled YOLO split folder or a YOLO dataset root (its val split)."""
    from pathlib import Path

    if not source or source == "synthetic":
        return None
    path = Path(source)
    if path.parent.name == "images" and (path.parent.parent / "labels" / path.name).is_dir():
        return path.parent.parent, path.name
    if (path / "images" / "val").is_dir() and (path / "labels" / "val").is_dir():
        return path, "val"
    return None


@DETECT.provides("export_adapter")
class DetectAdapter(TaskAdapter):
    task = "detect"

    def wrap_for_export(self, model: "nn.Module", options: ExportOptions) -> "nn.Module":
        o = detect_options(options)
        self._nms = o["nms"]  # sample_inputs() depends on it and is not given the options
        self._post = o  # and `--nms none` outputs are judged with the exported thresholds (as the graph NMS would)
        reinit = options.reinit if options.reinit is not None else not options.weights
        if reinit:
            spread_head_biases(model)
        return build_export_module(model.eval(), o["nms"], o["max_det"], o["iou_thres"], o["conf_thres"], o["agnostic"])

    def reinitialise_for_parity(self, module: "nn.Module", sample: np.ndarray, seed: int = 0) -> dict[str, float]:
        """Parity without trained weights (the pipeline's hook): see `make_detector_realistic`. The generic
        re-init (random BN statistics) collapses a detector's scores to one value, and ties make NMS arbitrary."""
        torch = _torch()
        detector = getattr(module, "model", module)
        make_detector_realistic(detector, sample, seed)  # every parameter from the seed: bit-identical per seed
        with torch.no_grad():
            _, scores = detector(torch.as_tensor(np.ascontiguousarray(sample)))
        best = scores.amax(-1)
        return {"score_std": float(best.std()), "score_max": float(best.max()), "method": "bn_calibrated_head_spread"}

    def parity_probes(self, module: "nn.Module", options: ExportOptions) -> list[tuple[str, "nn.Module"]]:
        """The prediction convs: decoded boxes amplify float noise through exp() (boxes of ~1000 px differ by
        ~100 px on BatchNorm-calibrated weights) and post-NMS scores are sorted, so the raw logits are also
        compared at the strict tolerance, and the input-spread check applies to them."""
        detector = getattr(module, "model", module)
        names = {id(m): n for n, m in detector.named_modules()}
        return [(f"raw:{names[id(c)]}", c) for c, _, _ in _prediction_convs(detector)]

    def output_names(self, options: ExportOptions) -> list[str]:
        return ["boxes", "scores"] if detect_options(options)["nms"] == "none" else list(NMS_OUTPUTS)

    def runs_in_onnxruntime(self, options: ExportOptions) -> bool:
        """False for `--nms trt`: ORT has no EfficientNMS_TRT kernel (the pipeline should skip ORT parity)."""
        return detect_options(options)["nms"] != "trt"

    def fit_to_builder(self, options: ExportOptions, builder: str) -> tuple[dict[str, Any] | None, dict[str, str] | None, str]:
        """The in-graph NMS fitted to the builder that will run (TensorRT-RTX 1.7 cannot build ONNX
        NonMaxSuppression: "has no runners"). A defaulted NMS the builder cannot build -> decoded boxes + scores
        and the runtime's NMS (`--nms none`), recorded; an explicit `--nms` it cannot build -> the reason: the
        ONNX files are still written and the engines are skipped with exit 3."""
        if builder == "tensorrt":
            from edgedeploy.engines.tensorrt_builder import supported_nms
        else:
            from edgedeploy.engines.rtx_builder import supported_nms
        mode = detect_options(options)["nms"]
        why = supported_nms().get(mode, "")
        if not why:
            return None, None, ""
        if "nms" in options.task_options:  # asked for explicitly: keep it, skip the engines (exit 3)
            return None, None, f"{builder} cannot build --nms {mode}: {why}"
        choice = {"nms": "none", "default": mode, "builder": builder, "builder_reason": why,
                  "reason": f"{builder} cannot build the default --nms {mode} ({_short_reason(why)}); exported decoded "
                            "boxes + scores (--nms none): the runtime runs NMS (deploy run/bench, the Triton ensemble)"}
        return {**options.task_options, "nms": "none"}, choice, ""

    def recorded_data_root(self, ckpt_meta: dict[str, Any], recorded: Any) -> "Path | None":
        """The YOLO-layout folder a detector checkpoint was trained on (the synthetic set is regenerated from the
        parameters the checkpoint records, as `deploy eval` does)."""
        if not recorded.synthetic:
            return super().recorded_data_root(ckpt_meta, recorded)
        from pathlib import Path

        data = ckpt_meta.get("data")
        if str(data).lower() == "synthetic" and isinstance(ckpt_meta.get("synthetic"), dict):
            from edgedeploy.data.synthetic_detect import synthetic_detection_dataset

            return Path(synthetic_detection_dataset(**ckpt_meta["synthetic"]))
        root = Path(data) if data else None
        return root if root is not None and (root / "images").is_dir() else None

    # measured on yolox_nano, mAP@.5:.95 vs FP32 0.368: ema 0.356 with 64 or 0.348 with 256 calibration images;
    # percentile 0.326 / 0.105; minmax 0.298 / 0.093: rare large activations in mosaic-trained heads make the
    # global range grow with the calibration set.
    auto_calib_method = ("ema", "auto: detectors calibrate with a moving-average range (robust to rare outlier images)")

    def synthetic_images(self, info: "ModelInfo", imgsz: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        """The synthetic detection dataset's renderer (what `deploy train --data synthetic` learns)."""
        try:
            from edgedeploy.data.synthetic_detect import SHAPES, render_image
        except ImportError:
            return super().synthetic_images(info, imgsz, n, rng)
        out = []
        for _ in range(n):  # every shape class and the training set's object count: calibration sees them all
            img = render_image(rng, imgsz, len(SHAPES), 8)
            out.append(img[0] if isinstance(img, tuple) else img)
        return out

    def sample_inputs(self, info: "ModelInfo", imgsz: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
        """With NMS in the graph: real-looking images only (random inputs can drive several class sigmoids to ~1.0
        at once, so the best class, and with it the NMS grouping, becomes a float-noise tie between PyTorch and
        ONNX Runtime); the element-wise `--nms none` proof also takes the uniform [0, 1) inputs."""
        if getattr(self, "_nms", "onnx") == "none":
            return super().sample_inputs(info, imgsz, n, rng)
        return [self.preprocess(img, info, imgsz) for img in self.images(info, imgsz, max(n, 1), rng)]

    def fp16_op_block_list(self, options: ExportOptions) -> list[str]:
        # The decode's exp/pow and the score product feed NMS thresholds: keep them FP32.
        return super().fp16_op_block_list(options) + ["Sigmoid", "TopK", "ScatterND", "GatherElements"]

    def int8_exclusions(self, onnx_model, options: ExportOptions) -> list[tuple[str, str]]:
        """The prediction convs and everything after them (decode, NMS), found by walking back from the outputs
        and stopping at the first Conv on each path."""
        producers = {o: n for n in onnx_model.graph.node for o in n.output}
        seen: dict[str, object] = {}
        stack = [producers[o] for o in self.output_names(options) if o in producers]
        while stack:
            node = stack.pop()
            if node.name in seen:
                continue
            seen[node.name] = node
            if node.op_type != "Conv":
                stack += [producers[i] for i in node.input if i in producers]
        reason = ("detection head output conv / decode / NMS: INT8 error on the logits moves scores across the "
                  "confidence and NMS thresholds (Ultralytics keeps these FP32); well under 1% of the MACs")
        return [(name, reason) for name, node in seen.items() if node.op_type in ("Conv", "Sigmoid", "Mul", "Exp",
                                                                                  "Pow", "Add", "Sub")]

    def compare(self, names: Sequence[str], torch_outs: Sequence[np.ndarray], onnx_outs: Sequence[np.ndarray],
                rtol: float, atol: float) -> ParityResult:
        """nms none: element-wise. With NMS: same detection count per image, then detections matched (same class,
        boxes within rtol/atol, scores within atol); the raw arrays can only differ in the order of tied scores."""
        if list(names) == ["boxes", "scores"]:
            # Boxes are pixel coordinates: x1 = cx - w/2 cancels two values of the image's scale, so float noise
            # is relative to that scale, not to the (possibly ~0) result. Box atol is atol x the typical
            # coordinate (median |box|, ~imgsz/2): 4.3e-4 px on a 256-px yolox_nano, 1.7e-6 of the image.
            # And the rtol of a coordinate is taken relative to its box's largest coordinate (the scale of the
            # terms that cancelled), as `_match_exact` does for detections after NMS.
            ref_boxes = np.asarray(torch_outs[0], np.float64)
            box_scale = max(1.0, float(np.median(np.abs(ref_boxes))))
            per_box = atol * box_scale + rtol * np.abs(ref_boxes).max(axis=-1, keepdims=True)
            box_row = compare_output("boxes", torch_outs[0], onnx_outs[0], rtol, per_box)
            boxes = ParityResult(box_row.passed, rtol, atol, [box_row])
            scores = compare_outputs(["scores"], torch_outs[1:], onnx_outs[1:], rtol, atol)
            result = ParityResult(boxes.passed and scores.passed, rtol, atol, boxes.outputs + scores.outputs)
            result.notes.append(f"boxes compared with atol {atol * box_scale:.2e} px ({atol:g} x median |box| "
                                f"{box_scale:.1f} px) + rtol x the box's largest coordinate")
            return result
        if list(names) != NMS_OUTPUTS:
            return compare_outputs(names, torch_outs, onnx_outs, rtol, atol)
        ref, got = self._to_dets(torch_outs), self._to_dets(onnx_outs)
        max_det = int(np.asarray(torch_outs[1]).shape[1])
        notes, bad, total, max_box, max_score, ties = [], 0, 0, 0.0, 0.0, 0
        for i, (r, g) in enumerate(zip(ref, got)):
            total += len(r)
            if len(r) != len(g):
                bad += abs(len(r) - len(g))
                notes.append(f"image {i}: {len(r)} detections in PyTorch, {len(g)} exported")
            pairs = _match_exact(r, g, rtol, atol)
            for a, b in pairs:  # box difference relative to the box's largest coordinate
                scale = max(float(np.abs(r[a, :4]).max()), 1.0)
                max_box = max(max_box, float(np.abs(r[a, :4] - g[b, :4]).max()) / scale)
                max_score = max(max_score, float(abs(r[a, 4] - g[b, 4])))
            unmatched = [a for a in range(len(r)) if a not in {p[0] for p in pairs}]
            free = [b for b in range(len(g)) if b not in {p[1] for p in pairs}]
            # Saturated scores (>= 1 - 1e-4: several classes at probability ~1, random-normal inputs do that):
            # the best class is a float-noise tie, so the same box and score under another class is the same answer.
            sat = [a for a in unmatched if r[a, 4] >= 1.0 - 1e-4]
            flips = _match_exact(r, g, rtol, atol, same_class=False, ref_rows=sat, got_rows=free)
            unmatched = [a for a in unmatched if a not in {p[0] for p in flips}]
            free = [b for b in free if b not in {p[1] for p in flips}]
            ties += len(flips)
            # Equal scores make NMS order-dependent: among candidates whose sigmoids saturated to exactly 1.0
            # (random-normal inputs do that) ORT and torchvision may keep different boxes, and at the max_det
            # cut-off either may cut a different one of equal score. Only those swaps are tolerated.
            cut = r[:, 4].min() if len(r) == max_det else None
            tie = []
            for a in unmatched:
                twin = next((b for b in free if g[b, 5] == r[a, 5] and min(g[b, 4], r[a, 4]) >= 1.0 - 1e-6), None)
                if twin is not None:
                    free.remove(twin)
                    tie.append(a)
                elif cut is not None and abs(r[a, 4] - cut) <= atol:
                    tie.append(a)
            ties += len(tie)
            bad += len(unmatched) - len(tie) if len(r) == len(g) else 0
        passed = bad == 0
        ref_std = float(np.concatenate([d.ravel() for d in ref]).std()) if total else 0.0
        outs = [OutputParity("detections", [total, 6], max_score, max_box, 1.0 if passed else 0.0, bad,
                             total, passed, ref_std, "; ".join(notes[:5]))]
        result = ParityResult(passed, rtol, atol, outs, len(ref))
        result.notes.append(f"{total} detections compared (max relative box diff {max_box:.2e}, max score diff "
                            f"{max_score:.2e})" + (f", {ties} differ only among equal-score candidates" if ties else ""))
        if total == 0:
            result.notes.append("no detections above conf_thres: weak evidence (trained weights or a lower "
                                "conf_thres give a meaningful proof)")
        return result

    @staticmethod
    def _to_dets(outs: Sequence[np.ndarray]) -> list[np.ndarray]:
        num, boxes, scores, classes = outs
        return [np.concatenate([boxes[b, :int(num[b, 0])], scores[b, :int(num[b, 0]), None],
                                classes[b, :int(num[b, 0]), None]], 1).astype(np.float64) for b in range(len(num))]

    def load_eval_data(self, info: "ModelInfo", imgsz: int, source: str, n: int | None,
                       rng: np.random.Generator) -> EvalData:
        """Labelled held-out data, so FP16/INT8 are judged by COCO mAP: the val split of a dataset folder in any
        layout `open_detection_dataset` reads (YOLO txt, Ultralytics data YAML, COCO json), or one YOLO split
        folder (`ROOT/images/<split>` beside `ROOT/labels/<split>`). Any other folder, or synthetic, gives
        unlabelled images (agreement with FP32 only). `n` None: the whole split; else n evenly spaced images."""
        from pathlib import Path

        from edgedeploy.data.sources import open_detection_dataset
        from edgedeploy.data.yolo_format import load_yolo_dataset
        from edgedeploy.errors import DatasetError

        split = _yolo_split(source)
        ds = None
        if split is not None:
            ds = load_yolo_dataset(*split)
        elif source and source != "synthetic" and (Path(source).is_dir() or Path(source).suffix.lower() in
                                                   (".yaml", ".yml", ".json")):
            try:
                ds = open_detection_dataset(source, "val")
            except DatasetError as e:
                if "neither a YOLO dataset" not in str(e):
                    raise  # a dataset with a problem is reported, not demoted to unlabelled images
        if ds is None:
            return super().load_eval_data(info, imgsz, source, n, rng)
        import dataclasses

        from edgedeploy.data.preprocess import convention_for, to_input_tensor

        if len(ds) == 0:
            raise ExportError(f"--eval-data {source}: no images in the {ds.split!r} split of {ds.root}")
        count = len(ds) if n is None else min(n, len(ds))
        picks = sorted({int(i) for i in np.linspace(0, len(ds) - 1, count).round()})  # spread evenly
        sub = dataclasses.replace(ds, records=[ds.records[i] for i in picks])
        inputs, geometry = [], []
        for i in range(len(sub)):
            x, scale, pad = to_input_tensor(sub.load_image(i), imgsz, convention=convention_for(info))
            inputs.append(x)
            geometry.append((scale, pad))
        where = f"{ds.root} ({ds.split} split, {ds.layout or ds.format})"
        return EvalData(inputs, {"dataset": sub, "geometry": geometry}, where, ds.skipped_images,
                        {"classes": list(sub.names)}, len(ds))

    def evaluate(self, run_fn: RunFn, eval_data: EvalData, reference_fn: RunFn | None = None) -> dict[str, float]:
        """COCO mAP@.5:.95 / mAP@.5 at the exported thresholds when the data is labelled; detections per image
        and, against the reference artifact, agreement = F1 of same-class IoU>=0.5 matches."""
        dets = [self._outputs_to_dets(run_fn(x)) for x in eval_data.inputs]
        flat = [d for ds in dets for d in ds]
        metrics: dict[str, float] = {"n": float(len(flat)),
                                     "dets_per_image": float(np.mean([len(d) for d in flat])) if flat else 0.0}
        if eval_data.targets is not None:
            from edgedeploy.eval.detect import detections_to_coco, score_detections

            ds = eval_data.targets["dataset"]
            results: list[dict] = []
            for i, (det, (scale, pad)) in enumerate(zip(flat, eval_data.targets["geometry"])):
                results += detections_to_coco(np.asarray(det, np.float32).reshape(-1, 6), ds[i], scale, pad)
            scores = score_detections(ds, results, verbose=False)
            metrics["map50_95"], metrics["map50"] = float(scores.map), float(scores.map50)
        if reference_fn is not None:
            ref = [d for x in eval_data.inputs for d in self._outputs_to_dets(reference_fn(x))]
            matched = sum(_match_detections(r, g)[0] for r, g in zip(ref, flat))
            n_ref, n_got = sum(len(r) for r in ref), sum(len(g) for g in flat)
            metrics["agreement"] = 1.0 if n_ref + n_got == 0 else 2.0 * matched / (n_ref + n_got)
        return metrics

    def _outputs_to_dets(self, outs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(outs) == 4:
            return self._to_dets(outs)
        import torch

        from edgedeploy.runtime.nms import batched_detections

        o = getattr(self, "_post", DEFAULTS)
        dets = batched_detections(torch.from_numpy(np.asarray(outs[0], np.float32)),
                                  torch.from_numpy(np.asarray(outs[1], np.float32)), conf_thres=o["conf_thres"],
                                  iou_thres=o["iou_thres"], max_det=o["max_det"], agnostic=o["agnostic"])
        return [d.double().numpy() for d in dets]

    def sidecar_postprocess(self, options: ExportOptions) -> dict[str, Any]:
        o = detect_options(options)
        meta: dict[str, Any] = {**o, "boxes": "xyxy", "coordinates": "input_pixels",
                                "outputs": self.output_names(options)}
        if o["nms"] == "none":
            meta["scores"] = "objectness x class probability, per class; run NMS on the host"
        else:
            meta["padding"] = "rows past num_dets: boxes/scores 0, classes -1"
        if o["nms"] == "trt":
            meta["plugin"] = "EfficientNMS_TRT"
            meta["plugin_note"] = ("needs TensorRT's plugin library at engine deserialisation: "
                                   "trt.init_libnvinfer_plugins(logger, '') (libnvinfer_plugin); "
                                   "not runnable in ONNX Runtime; deprecated since TensorRT 10.12")
        return meta


