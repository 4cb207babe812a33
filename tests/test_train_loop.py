"""The shared training loop and the typed configs: presets, resume rules, CLI flags -> config, epoch numbering."""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from edgedeploy.models.checkpoint import read_checkpoint
from edgedeploy.train import cli as train_cli
from edgedeploy.train.config import ClassifyConfig, DetectConfig, SegmentConfig, build_config
from edgedeploy.train.loop import TaskSpec, fit


def test_preset_fills_only_what_was_not_given():
    preset = {"epochs": 18, "lr": 3e-3, "optimizer": "adamw", "imgsz": 64, "train_per_class": 500}
    cfg = build_config(ClassifyConfig, preset, model="m", data="synthetic", epochs=2, batch_size=None)
    assert (cfg.epochs, cfg.lr, cfg.optimizer, cfg.imgsz, cfg.batch_size) == (2, 3e-3, "adamw", 64, 64)
    own = build_config(ClassifyConfig, preset, model="m", data="/data/flowers")
    assert (own.epochs, own.lr, own.optimizer, own.imgsz) == (None, 0.05, "sgd", None)  # the dataclass defaults
    # another optimizer without an lr takes that optimizer's usual lr and weight decay
    switched = build_config(ClassifyConfig, preset, model="m", data="/data/flowers", optimizer="adamw")
    assert (switched.lr, switched.weight_decay) == (2e-3, 0.05)
    # a resumed run takes its recorded config, not the preset
    assert build_config(ClassifyConfig, preset, model="m", resume="run/last.pt").epochs is None


def test_resume_restores_the_recorded_config_except_runtime_fields_and_given_epochs():
    started = SegmentConfig(model="lraspp_mobilenetv3_small", epochs=3, lr=6e-3, scale_range=(0.75, 1.25), seed=4)
    recorded = json.loads(json.dumps(started.recorded()))  # as the checkpoint keeps it
    assert "device" not in recorded and "resume" not in recorded
    again = SegmentConfig(resume="run", device="cpu", workers=0).restored(recorded)
    assert (again.model, again.epochs, again.lr, again.scale_range, again.seed) == (
        "lraspp_mobilenetv3_small", 3, 6e-3, (0.75, 1.25), 4)
    assert (again.device, again.workers, again.resume) == ("cpu", 0, "run")
    assert SegmentConfig(epochs=5).restored(recorded).epochs == 5  # extend a finished run


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train_cli.configure(parser)
    return parser.parse_args(list(argv))


def test_cli_flags_reach_each_task_config():
    det = train_cli.build_config(_parse("--model", "yolox_nano", "--data", "d", "--batch", "4", "--mosaic", "0.5",
                                        "--close-mosaic", "2", "--no-hsv", "--precise-bn", "0", "--weights", "w.pth",
                                        "--time-limit", "1.5", "--eval-interval", "2", "--no-ema"), "detect")
    assert isinstance(det, DetectConfig)
    assert (det.batch_size, det.mosaic, det.close_mosaic, det.hsv, det.precise_bn, det.weights) == (
        4, 0.5, 2, False, 0, "w.pth")
    assert (det.time_limit, det.eval_interval, det.ema, det.momentum, det.grad_clip) == (1.5, 2, False, 0.937, 10.0)
    assert train_cli.build_config(_parse("--model", "yolox_nano"), "detect").imgsz == 256  # the synthetic preset

    seg = train_cli.build_config(_parse("--model", "lraspp_mobilenetv3_small", "--data", "d", "--lr-schedule",
                                        "cosine", "--ignore-index", "11", "--scale-range", "0.5", "1.5"), "segment")
    assert isinstance(seg, SegmentConfig)
    assert (seg.lr_schedule, seg.ignore_index, seg.scale_range, seg.lr) == ("cosine", 11, (0.5, 1.5), 0.005)

    cls = train_cli.build_config(_parse("--model", "mobilenetv3_small", "--label-smoothing", "0.2", "--quiet"),
                                 "classify")
    assert isinstance(cls, ClassifyConfig)
    assert (cls.label_smoothing, cls.progress, cls.epochs, cls.optimizer) == (0.2, False, 18, "adamw")


class ToySpec(TaskSpec):
    """A linear model fitting y = 2x: enough to drive every part of the loop in a second."""

    task = "classify"
    metric = "val/score"

    def load_data(self):
        x = torch.linspace(-1, 1, 32)[:, None]
        return DataLoader(TensorDataset(x, 2 * x), batch_size=8)

    def build_model(self, resuming):
        return nn.Linear(1, 1).to(self.device)

    def meta(self):
        return {"model_name": self.cfg.model, "task": "classify"}

    def loss(self, model, batch):
        loss = nn.functional.mse_loss(model(batch[0]), batch[1])
        return loss, {"loss": loss.item()}, len(batch[0])

    def validate(self, model, epoch):
        return {"val/score": float(-model.weight.detach().sub(2).abs().sum())}, {"checked": epoch + 1}


def test_one_loop_numbers_epochs_from_1_validates_on_interval_and_resumes(tmp_path):
    cfg = ClassifyConfig(model="mobilenetv3_small", data="toy", epochs=3, lr=0.1, eval_interval=2, device="cpu",
                         out_dir=str(tmp_path / "run"), progress=False, grad_clip=1.0)
    run = fit(ToySpec(cfg))
    assert [r["epoch"] for r in run.rows] == [1, 2, 3]
    assert ["val/score" in r for r in run.rows] == [False, True, True]  # every 2nd epoch and after the last
    last = read_checkpoint(tmp_path / "run" / "last.pt")
    assert last["epoch"] == 2 and last["meta"]["checked"] == 3 and last["meta"]["train_args"]["epochs"] == 3
    assert (tmp_path / "run" / "best.pt").is_file()
    assert run.best == max(r["val/score"] for r in run.rows if "val/score" in r)

    more = fit(ToySpec(ClassifyConfig(resume=str(tmp_path / "run"), epochs=4, device="cpu", progress=False)))
    assert [r["epoch"] for r in more.rows] == [1, 2, 3, 4] and more.cfg.lr == 0.1 and more.cfg.grad_clip == 1.0


def test_time_limit_stops_after_the_epoch_and_validates_it(tmp_path, capsys):
    cfg = ClassifyConfig(model="mobilenetv3_small", data="toy", epochs=5, eval_interval=10, time_limit=0.0,
                         device="cpu", out_dir=str(tmp_path / "run"), progress=False)
    run = fit(ToySpec(cfg))
    assert [r["epoch"] for r in run.rows] == [1] and "val/score" in run.rows[0]
    assert "--time-limit 0 min reached after epoch 1" in capsys.readouterr().out


def test_a_flag_of_another_tasks_config_is_an_error():
    import pytest

    from edgedeploy.errors import EdgeDeployError

    with pytest.raises(EdgeDeployError, match="--mosaic does not apply to classify models"):
        train_cli.build_config(_parse("--model", "mobilenetv3_small", "--mosaic", "0.5"), "classify")
    with pytest.raises(EdgeDeployError, match="--label-smoothing does not apply to detect models"):
        train_cli.build_config(_parse("--model", "yolox_nano", "--label-smoothing", "0.1"), "detect")
