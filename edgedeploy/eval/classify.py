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
from edgedeploy.eval.predictors import PredictFn, artifact_predict_fn, torch_predict_fn
from edgedeploy.runtime.engine import select_device
from edgedeploy.eval.request import EvalRequest
from edgedeploy.tasks import CLASSIFY


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
    MobileNetV1's ReLU6) come from the checkpoint unless given. Returns (model, the checkpoint's meta dict)."""
    from edgedeploy.models.artifact import describe_artifact
    from edgedeploy.models.registry import create_model

    if not os.path.isfile(weights):
        raise CheckpointError(f"checkpoint not found: {weights}")
    desc = describe_artifact(weights, model=model_name, num_classes=num_classes)
    if not desc.model:
        raise CheckpointError(f"{weights} does not record its model: pass --model NAME")
    model = create_model(desc.model, num_classes=desc.num_classes, weights=str(weights))  # with the file's options
    return model.eval(), desc.checkpoint.as_dict()


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


@CLASSIFY.provides("evaluator")
def evaluate_artifact(request: EvalRequest) -> int:
    """`deploy eval` for classifiers: top-1/top-5 (overall and per class) of the artifact on the val split."""
    from edgedeploy.data.imagefolder import classification_datasets
    from edgedeploy.io import atomic_write_json

    desc, path, data = request.artifact, request.path, request.data
    if desc.model is None:
        raise EdgeDeployError(f"{path} does not record its model: pass --model NAME")
    if request.split != "val":
        raise EdgeDeployError("classification eval reads the val split of the dataset (--split val)")
    saved = desc.data.get("train_args") or {}
    num_classes = len(desc.class_names) if data == "synthetic" and desc.class_names else None
    # open the artifact first: a corrupt file fails in a second, not after the dataset is read or generated
    predict, batch = predictor_for_artifact(path, desc.model, desc.num_classes if desc.is_checkpoint else None,
                                            request.device)
    mean, std = desc.convention.unit_mean_std()
    _, val, class_names, root = classification_datasets(
        data, desc.imgsz, mean, std, num_classes=num_classes, seed=int(saved.get("seed", 0)), augment=False,
        progress=not request.quiet,
    )
    if desc.class_names and list(desc.class_names) != list(class_names):
        raise EdgeDeployError(
            f"{path} was trained on classes {list(desc.class_names)}, but {root} has {class_names}: labels would "
            "not line up"
        )
    scores = evaluate_classifier(predict, val, batch_size=request.batch or batch, workers=request.workers,
                                 progress=not request.quiet)
    print(
        f"{Path(path).name} on {root} ({scores['n']} val images): top-1 {100 * scores['top1']:.2f}%  "
        f"top-5 {100 * scores['top5']:.2f}%"
    )
    for label, acc in scores["per_class_top1"].items():
        print(f"  {class_names[label]:<20} {100 * acc:6.2f}%")
    if request.json:
        atomic_write_json(request.json, {"artifact": str(path), "data": str(root), **scores})
    return 0
