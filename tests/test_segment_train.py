"""Segmentation training: a tiny end-to-end run through the CLI entry point, checkpoints, resume, learning."""

import json

import numpy as np
import pytest
import torch

from edgedeploy.errors import EdgeDeployError
from edgedeploy.models import create_model
from edgedeploy.train.common import WarmupPoly


@pytest.fixture()
def data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEDEPLOY_DATA", str(tmp_path / "datasets"))
    return tmp_path


@pytest.mark.slow
def test_tiny_training_run_writes_loadable_checkpoints(data_home, monkeypatch):
    from edgedeploy import cli
    from edgedeploy.train import segment

    # keep the synthetic set tiny: the CLI path takes the preset, shrink it for the test
    monkeypatch.setitem(segment.SYNTHETIC_PRESET, "imgsz", 64)
    monkeypatch.setitem(segment.SYNTHETIC_PRESET, "synthetic", {"n_train": 8, "n_val": 2})
    out = data_home / "run"
    assert cli.main(["train", "--model", "lraspp_mobilenetv3_small", "--data", "synthetic", "--epochs", "1",
                     "--batch", "4", "--out", str(out), "--workers", "0", "--device", "cpu", "--quiet",
                     "--lr-schedule", "cosine", "--ignore-index", "255"]) == 0

    rows = json.loads((out / "metrics.json").read_text())
    assert len(rows) == 1 and np.isfinite(rows[0]["train/loss"]) and 0.0 <= rows[0]["val/miou"] <= 1.0
    assert (out / "results.png").is_file() and (out / "best.pt").is_file()
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    meta = ckpt["meta"]
    assert meta["task"] == "segment" and meta["num_classes"] == 5 and meta["class_names"][0] == "background"
    assert meta["imgsz"] == 64 and meta["train_args"]["lr_schedule"] == "cosine"
    model = create_model("lraspp_mobilenetv3_small", num_classes=5, weights=str(out / "best.pt")).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 5, 64, 64)
    with pytest.raises(EdgeDeployError, match="already finished"):
        segment.train_segmentation(resume=str(out / "last.pt"), progress=False)

    # `deploy eval` on the best checkpoint reproduces the validation mIoU recorded during training
    from edgedeploy.eval.request import EvalRequest
    from edgedeploy.eval.segment import evaluate_artifact
    from edgedeploy.models.artifact import describe_artifact

    scores_json = data_home / "scores.json"
    request = EvalRequest(describe_artifact(str(out / "best.pt")), data="synthetic", split="val", device="cpu",
                          json=str(scores_json), quiet=True)
    assert evaluate_artifact(request) == 0
    scores = json.loads(scores_json.read_text())
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=False)["meta"]
    assert scores["miou"] == pytest.approx(best["miou"], abs=1e-6)
    assert scores["pixel_acc"] == pytest.approx(best["pixel_acc"], abs=1e-6)


@pytest.mark.slow
def test_loss_decreases_on_a_fixed_batch(data_home):
    from edgedeploy.data.synthetic_segment import make_synthetic_segmentation
    from edgedeploy.data.voc import open_segmentation_data
    from edgedeploy.train.segment import _loss_fn

    torch.manual_seed(0)
    root = make_synthetic_segmentation(n_train=2, n_val=1, imgsz=64, progress=False)
    ds = open_segmentation_data(root, "train", imgsz=64, train=False)
    x = torch.stack([ds[i][0] for i in range(2)])
    y = torch.stack([ds[i][1] for i in range(2)])
    assert (y == 255).any()  # the ignore border is present, and must not break the loss
    model = create_model("lraspp_mobilenetv3_small", num_classes=ds.num_classes).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    criterion = _loss_fn(255)
    losses = []
    for _ in range(10):
        loss = criterion(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.6 * losses[0], losses


def test_poly_schedule_shape():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupPoly(opt, epochs=2, iters_per_epoch=10, warmup_epochs=0.5, power=0.9)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1)  # warm-up start
    assert lrs[5] == pytest.approx((1 - 5 / 20) ** 0.9)  # first post-warm-up step follows the poly curve
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))
    assert lrs[-1] == pytest.approx((1 / 20) ** 0.9)
