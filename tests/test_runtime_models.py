"""Small models with known answers for the runtime, bench and camera tests (no tests in this module).

The "oracle" detector/segmenter find the pixels brighter than white-ish in the normalised input, so the right
answer for a synthetic frame is known exactly in frame pixels -- which is what the letterbox round trip must
reproduce after the runtime maps the boxes back.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from edgedeploy.models.artifact import ArtifactMeta, write_sidecar

# A pure-white pixel normalises to (1 - 0.485) / 0.229 = 2.25 in channel 0; padding (114) to -0.16, black to -2.1.
BRIGHT = 1.5


class TinyClassifier(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU()
        )
        self.fc = nn.Linear(32, num_classes)
        with torch.no_grad():  # realistic magnitudes: non-trivial BN statistics, logits spread over several units
            bn = self.features[1]
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            self.fc.weight.mul_(20.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def _bright_box(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B,3,H,W] -> (boxes [B,4] xyxy input px around bright pixels, found [B])."""
    h, w = x.shape[2], x.shape[3]
    mask = (x[:, 0] > BRIGHT).float()
    cols, rows = mask.amax(dim=1), mask.amax(dim=2)  # [B,W], [B,H]
    ar_w = torch.arange(w, dtype=torch.float32, device=x.device)
    ar_h = torch.arange(h, dtype=torch.float32, device=x.device)
    x1 = (ar_w + (1 - cols) * 1e4).amin(1)
    x2 = (ar_w * cols).amax(1) + 1
    y1 = (ar_h + (1 - rows) * 1e4).amin(1)
    y2 = (ar_h * rows).amax(1) + 1
    return torch.stack([x1, y1, x2, y2], dim=1), cols.amax(1)


class OracleDetector(nn.Module):
    """Eval-mode detector contract: (boxes [B,3,4], scores [B,3,C]). Candidate 0 is the bright box (class 1,
    score 0.9), candidate 1 a shifted duplicate (score 0.6, IoU > 0.45: NMS must drop it), candidate 2 a far box
    below the confidence threshold."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor):
        box, found = _bright_box(x)
        dup = box + torch.tensor([2.0, 2.0, 2.0, 2.0], device=x.device)
        far = torch.zeros_like(box) + torch.tensor([0.0, 0.0, 4.0, 4.0], device=x.device)
        boxes = torch.stack([box, dup, far], dim=1)
        onehot = torch.zeros(1, 1, self.num_classes, device=x.device)
        onehot[..., 1] = 1.0
        level = torch.tensor([0.9, 0.6, 0.1], device=x.device).view(1, 3, 1)
        scores = onehot * level * found.view(-1, 1, 1)
        return boxes, scores


class OracleDetectorWithNMS(nn.Module):
    """Output layout of an engine exported with `--nms onnx`: num_dets, boxes, scores, classes (padded to 4)."""

    def forward(self, x: torch.Tensor):
        box, found = _bright_box(x)
        b = x.shape[0]
        pad = torch.full((b, 3, 4), 7.0)  # garbage beyond num_dets must be ignored
        boxes = torch.cat([box[:, None], pad], dim=1)
        scores = torch.cat([0.8 * found[:, None], torch.full((b, 3), 0.99)], dim=1)
        classes = torch.cat([torch.full((b, 1), 2, dtype=torch.int32), torch.ones(b, 3, dtype=torch.int32)], dim=1)
        num = found.round().to(torch.int32).view(b, 1)
        return num, boxes, scores, classes


class OracleSegmenter(nn.Module):
    """Logits [B,2,H,W]: class 1 where the input is bright."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([BRIGHT - x[:, :1], x[:, :1] - BRIGHT], dim=1)


def export(model: nn.Module, path: Path, imgsz: tuple[int, int], output_names: list[str], meta: ArtifactMeta,
           dynamic_batch: bool = True) -> Path:
    model.eval()
    dyn = {n: {0: "batch"} for n in ["images", *output_names]} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(1, 3, *imgsz), str(path), input_names=["images"],
                          output_names=output_names, dynamic_axes=dyn, opset_version=17, dynamo=False)
    meta.input_shape = ["batch" if dynamic_batch else 1, 3, *imgsz]
    meta.output_names = output_names
    meta.builder = "torch.onnx"
    write_sidecar(path, meta)
    return path


def make_classifier_onnx(tmp: Path, imgsz=(32, 32), dynamic_batch=True) -> tuple[Path, nn.Module]:
    model = TinyClassifier().eval()
    meta = ArtifactMeta(model="tiny_classifier", task="classify", class_names=list("abcde"))
    return export(model, tmp / "cls.onnx", imgsz, ["logits"], meta, dynamic_batch), model


def make_detector_onnx(tmp: Path, imgsz=(64, 64), nms: str = "none", dynamic_batch=True) -> Path:
    meta = ArtifactMeta(model="oracle_detector", task="detect", letterbox=True, class_names=["bg", "square", "other"],
                        postprocess={"nms": nms, "max_det": 10})
    if nms == "none":
        return export(OracleDetector(), tmp / "det.onnx", imgsz, ["boxes", "scores"], meta, dynamic_batch)
    return export(OracleDetectorWithNMS(), tmp / "det_nms.onnx", imgsz, ["num_dets", "boxes", "scores", "classes"],
                  meta, dynamic_batch)


def make_segmenter_onnx(tmp: Path, imgsz=(64, 64), letterbox: bool = True) -> Path:
    meta = ArtifactMeta(model="oracle_segmenter", task="segment", letterbox=letterbox, class_names=["bg", "square"])
    return export(OracleSegmenter(), tmp / f"seg_{int(letterbox)}.onnx", imgsz, ["logits"], meta)


def frame_with_square(h: int, w: int, box: tuple[int, int, int, int], background: int = 30) -> np.ndarray:
    """uint8 BGR frame, dark background, white rectangle at box = (x1, y1, x2, y2) (x2/y2 exclusive)."""
    f = np.full((h, w, 3), background, np.uint8)
    x1, y1, x2, y2 = box
    f[y1:y2, x1:x2] = 255
    return f
