"""Classification top-1/top-5 for PyTorch models, checkpoints, ONNX files and engines.

`evaluate_classifier(predict, dataset)` scores a torch model or any predict function taking a normalised float32
NCHW numpy batch and returning logits (`edgedeploy.eval.predictors`), so ONNX Runtime sessions and TensorRT
engines are scored by this code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from edgedeploy.errors import CheckpointError, DatasetError, EdgeDeployError
from edgedeploy.eval.predictors import PredictFn, artifact_predict_fn, select_device, torch_predict_fn


def evaluate_classifier(
    predict: nn.Module | PredictFn,
    dataset: Dataset,
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = True,
    desc: str = "eval",
) -> dict[str, Any]:
    """Top-1/top-5 accuracy (fractions) of `predict` on a dataset of (normalised CHW tensor, label) items.

    `predict` is a torch model, or any callable mapping a float32 NCHW numpy batch to logits (N, classes).
    Returns {"top1", "top5", "n", "per_class_top1"}.
    """
    from tqdm import tqdm

    fn = torch_predict_fn(predict, channels_last=True) if isinstance(predict, nn.Module) else predict
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    correct1 = correct5 = n = 0
    per_class_hits: dict[int, list[int]] = {}
    for x, y in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress):
        out = fn(np.ascontiguousarray(x.numpy(), dtype=np.float32))
        if isinstance(out, (list, tuple)):
            out = out[0]
        logits = torch.as_tensor(np.asarray(out), dtype=torch.float32).reshape(x.shape[0], -1)
        if logits.shape[0] != y.shape[0]:
            raise EdgeDeployError(f"predictor returned {logits.shape[0]} rows for a batch of {y.shape[0]} images")
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hit1 = topk[:, 0] == y
        correct1 += int(hit1.sum())
        correct5 += int((topk == y[:, None]).any(1).sum())
        n += int(y.shape[0])
        for label, hit in zip(y.tolist(), hit1.tolist()):
            per_class_hits.setdefault(label, [0, 0])
            per_class_hits[label][0] += int(hit)
            per_class_hits[label][1] += 1
    if n == 0:
        raise DatasetError("evaluation dataset is empty")
    return {
        "top1": correct1 / n,
        "top5": correct5 / n,
        "n": n,
        "per_class_top1": {c: h / t for c, (h, t) in sorted(per_class_hits.items())},
    }


def load_classifier(
    weights: str | os.PathLike, model_name: str | None = None, num_classes: int | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a checkpoint: name, class count and model options (an official file's, e.g. timm
    MobileNetV1's ReLU6) come from the checkpoint unless given."""
    from edgedeploy.models.checkpoint import checkpoint_meta
    from edgedeploy.models.registry import create_model

    if not os.path.isfile(weights):
        raise CheckpointError(f"checkpoint not found: {weights}")
    meta = checkpoint_meta(weights, model_name)  # ours, or what an official file says about itself
    name = model_name or meta.get("model_name")
    if not name:
        raise CheckpointError(f"{weights} does not record its model: pass --model NAME")
    n = num_classes if num_classes is not None else meta.get("num_classes")
    model = create_model(name, num_classes=n, weights=str(weights))  # builds with the file's model options
    return model.eval(), meta


def predictor_for_artifact(
    path: str | os.PathLike,
    model_name: str | None = None,
    num_classes: int | None = None,
    device: str | None = None,
) -> tuple[nn.Module | PredictFn, int]:
    """(predict, batch size) for `evaluate_classifier`: a torch model for .pt checkpoints, else a predict function
    over `edgedeploy.runtime.loader.load_engine` (ONNX Runtime / TensorRT). Fixed-batch engines get padded batches.
    """
    if Path(path).suffix.lower() in (".pt", ".pth", ".ckpt"):
        model, _ = load_classifier(path, model_name, num_classes)
        return model.to(select_device(device)), 64
    return artifact_predict_fn(path, model_name, batch=64)
