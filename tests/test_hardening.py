"""Hardening: checkpoints never run code, artifacts honour the umask, options are validated once for the CLI and
the API, Ctrl-C cancels an engine build, failed runs leave nothing new."""

from __future__ import annotations

import argparse
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgedeploy.errors import CheckpointError, InputError
from edgedeploy.models.checkpoint import load_weights, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]


class _MakesFile:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling calls os.system(...)
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_that_runs_code_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "meta": _MakesFile(marker)}, path)
    legacy = tmp_path / "legacy.pt"
    torch.save({"x": _MakesFile(marker)}, legacy, _use_new_zipfile_serialization=False)
    for p in (path, legacy):
        with pytest.raises(CheckpointError, match=r"refused to load .*posix.system.*could run code.*convert it safely"):
            read_checkpoint(p)
    assert not marker.exists()
    # the planted file is live: an unrestricted load really runs it (what read_checkpoint used to do)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_whole_module_pickle_is_read_inert_and_refused(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    marker = tmp_path / "PWNED"
    with pytest.raises(CheckpointError, match="holds a Linear, not a state dict"):  # read as an inert stand-in
        read_checkpoint(tmp_path / "module.pt")
    assert not marker.exists()


def test_plain_metadata_numpy_scalars_and_namespaces_load(tmp_path):
    from edgedeploy.train.common import plain_tree

    old = {"top1": np.float64(0.75), "n": np.int64(3), "ok": np.bool_(True)}
    torch.save({"model": {"w": torch.ones(1)}, "meta": old, "args": argparse.Namespace(lr=0.1)}, tmp_path / "old.pt")
    ckpt = read_checkpoint(tmp_path / "old.pt")  # numpy scalars (checkpoints from before meta was made plain)
    assert float(ckpt["meta"]["top1"]) == 0.75 and ckpt["meta"]["n"] == 3 and ckpt["args"].lr == 0.1
    meta = {"top1": np.float64(0.75), "n": np.int64(3), "iou": np.array([0.5, 0.25]), "data": Path("/d"),
            "shape": (1, 2)}
    torch.save({"model": {"w": torch.ones(1)}, "meta": meta}, tmp_path / "arrays.pt")
    with pytest.raises(CheckpointError, match="refused to load"):  # arrays and paths: not on any allow-list
        read_checkpoint(tmp_path / "arrays.pt")
    plain = plain_tree(meta)
    assert plain == {"top1": 0.75, "n": 3, "iou": [0.5, 0.25], "data": "/d", "shape": [1, 2]}
    assert all(type(v) in (float, int, str, list) for v in plain.values())


def test_training_checkpoint_loads_with_weights_only(tmp_path):
    from edgedeploy.models.registry import create_model
    from edgedeploy.train.common import ModelEMA, WarmupCosine, build_optimizer, save_checkpoint

    model = create_model("mobilenetv3_small", num_classes=3)
    opt = build_optimizer(model, "sgd", lr=0.1)
    sched = WarmupCosine(opt, 2, 4)
    meta = {"model_name": "mobilenetv3_small", "num_classes": 3, "top1": np.float32(0.5), "data": tmp_path}
    save_checkpoint(tmp_path / "last.pt", model, ModelEMA(model), opt, sched, 0, np.float64(0.5), meta)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)  # plain torch, no allow-list needed
    assert ckpt["meta"]["top1"] == 0.5 and ckpt["meta"]["data"] == str(tmp_path)


def test_weights_of_another_model_name_the_recorded_model(tmp_path):
    from edgedeploy.models.registry import create_model

    small = create_model("mobilenetv3_small", num_classes=3)
    torch.save({"model": small.state_dict(), "meta": {"model_name": "mobilenetv3_small"}}, tmp_path / "s.pt")
    with pytest.raises(CheckpointError) as e:
        create_model("mobilenetv3_large", num_classes=3, weights=str(tmp_path / "s.pt"))
    assert "checkpoint of mobilenetv3_small" in str(e.value) and len(str(e.value).splitlines()) == 1
    with pytest.raises(CheckpointError, match="--num-classes 3"):  # same model, other head: the class hint stays
        load_weights(create_model("mobilenetv3_small", num_classes=5), tmp_path / "s.pt", model_name="mobilenetv3_small")


# -------------------------------------------------------------------------------------------------- umask
UMASK_SCRIPT = r"""
import os, sys, stat, json
from pathlib import Path
os.umask(int(sys.argv[2], 8))
from edgedeploy.io import atomic_write_text, atomic_torch_save, current_umask
from edgedeploy.engines.triton import write_triton_repo
from edgedeploy.models.artifact import ArtifactMeta, write_sidecar
out = Path(sys.argv[1])
atomic_write_text(out / "a" / "report.json", "{}")
import torch
atomic_torch_save({"w": torch.zeros(1)}, out / "a" / "w.pt")
onnx = Path(sys.argv[3])
write_triton_repo(onnx, out / "repo", name="m", preprocess=True)
modes = {str(p.relative_to(out)): oct(stat.S_IMODE(p.stat().st_mode)) for p in sorted(out.rglob("*"))}
print(json.dumps({"umask": oct(current_umask()), "modes": modes}))
"""


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    from edgedeploy.cli import main

    out = tmp_path_factory.mktemp("onnx")
    assert main(["export", "--model", "mobilenetv3_small", "--imgsz", "64", "--builder", "none", "--out", str(out),
                 "--no-progress"]) == 0
    return out / "mobilenetv3_small" / "mobilenetv3_small.onnx"


@pytest.mark.parametrize("umask,file_mode,dir_mode", [("022", 0o644, 0o755), ("077", 0o600, 0o700)])
def test_artifacts_honour_the_umask(tmp_path, tiny_onnx, umask, file_mode, dir_mode):
    import json

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", UMASK_SCRIPT, str(tmp_path / "o"), umask, str(tiny_onnx)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["umask"] == oct(int(umask, 8))
    modes = got["modes"]
    for name in ("a/report.json", "a/w.pt", "repo/m/1/model.onnx", "repo/m/config.pbtxt", "repo/m_preprocess/1/model.py"):
        assert modes[name] == oct(file_mode), (name, modes)
    for name in ("a", "repo", "repo/m", "repo/m/1", "repo/m_preprocess/1"):
        assert modes[name] == oct(dir_mode), (name, modes)


def test_current_umask_does_not_change_it():
    from edgedeploy.io import current_umask

    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027 and current_umask() == 0o027
    finally:
        os.umask(old)


# ------------------------------------------------------------------------------------------------ options
def test_cli_and_api_share_the_validators(tmp_path):
    from edgedeploy.benchmarks.bench import BenchConfig
    from edgedeploy.export.pipeline import export
    from edgedeploy.models.registry import create_model
    from edgedeploy.options import IMGSZ, OptionError

    with pytest.raises(OptionError) as api:
        export("mobilenetv3_small", imgsz=0, out=str(tmp_path / "x"))
    assert str(api.value) == "--imgsz 0: must be from 32 to 4096 pixels (square input side)"
    with pytest.raises(argparse.ArgumentTypeError) as cli:
        IMGSZ.arg("0")
    assert str(cli.value) == "0: must be from 32 to 4096 pixels (square input side)"
    for bad in ({"num_classes": 0}, {"num_classes": -3}, {"batch": 0}, {"calib_method": "magic"},
                {"task_options": {"iou_thres": 2.0}}, {"dynamic_batch": (4, 2, 8)}):
        with pytest.raises(OptionError):
            export("mobilenetv3_small", out=str(tmp_path / "x"), **bad)
    with pytest.raises(OptionError, match="from 1 to"):
        create_model("mobilenetv3_small", num_classes=0)
    for bad in ({"iterations": 0}, {"iterations": -5}, {"duration_s": 0.0}, {"percentiles": (101.0,)}):
        with pytest.raises(OptionError):
            BenchConfig(**bad)
    assert not (tmp_path / "x").exists()


def test_validators_accept_the_edges_and_refuse_just_outside():
    from edgedeploy.options import CONF_THRES, IMGSZ, IOU_THRES, OptionError, dynamic_batch

    assert IMGSZ.check("32") == 32 and IMGSZ.check(4096) == 4096
    for bad in (31, 4097, 3.5, True, "nan", None):
        with pytest.raises(OptionError):
            IMGSZ.check(bad)
    assert CONF_THRES.check(0) == 0.0 and IOU_THRES.check(1) == 1.0
    for bad in (float("nan"), float("inf"), -0.001):
        with pytest.raises(OptionError):
            CONF_THRES.check(bad)
    with pytest.raises(OptionError):
        IOU_THRES.check(0)
    assert dynamic_batch("1:8:16") == (1, 8, 16)


# ------------------------------------------------------------------------------------------ interrupts
class _FakeTrt:
    """Just enough of a TensorRT module to drive build_engine, with a build that takes 40 monitor steps."""

    __version__ = "fake"

    class ILogger:
        class Severity:
            ERROR, WARNING = 1, 2

        def __init__(self, *a):
            pass

    class IProgressMonitor:
        def __init__(self, *a):
            pass

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 0

    class MemoryPoolType:
        WORKSPACE = 0

    def __init__(self, interrupt_at: int | None):
        self.interrupt_at = interrupt_at
        self.steps = 0
        trt = self

        class Config:
            progress_monitor = None

            def add_optimization_profile(self, p):
                pass

        class Network:
            num_inputs = 0

        class Parser:
            def __init__(self, *a):
                pass

            def parse_from_file(self, path):
                return True

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return Network()

            def create_builder_config(self):
                self.config = Config()
                return self.config

            def build_serialized_network(self, network, config):
                for i in range(40):
                    trt.steps += 1
                    if i == trt.interrupt_at:
                        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the build
                    if not config.progress_monitor.step_complete("build", i):
                        return None  # cancelled, as TensorRT does
                return b"engine-bytes"

        self.Builder, self.OnnxParser = Builder, Parser


@pytest.mark.parametrize("interrupt_at", [None, 5])
def test_ctrl_c_cancels_the_build_and_writes_nothing(tmp_path, interrupt_at):
    from edgedeploy.engines.common import BuildRequest, build_engine
    from edgedeploy.models.artifact import ArtifactMeta

    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx")
    trt = _FakeTrt(interrupt_at)
    req = BuildRequest(onnx, tmp_path / "m.engine", ArtifactMeta("m", "classify"))
    handler = signal.getsignal(signal.SIGINT)
    if interrupt_at is None:
        res = build_engine(trt, "fake", req, use_timing_cache=False)
        assert res.engine_path.read_bytes() == b"engine-bytes" and trt.steps == 40
    else:
        with pytest.raises(KeyboardInterrupt):
            build_engine(trt, "fake", req, use_timing_cache=False)
        assert trt.steps == interrupt_at + 1  # the monitor stopped the build at the next step
        assert not list(tmp_path.glob("m.engine*")) and not list(tmp_path.glob("*.tmp"))
    assert signal.getsignal(signal.SIGINT) is handler  # the user's handler is back


# ---------------------------------------------------------------------------------------------- runtime
def test_empty_frames_are_input_errors():
    from edgedeploy.runtime.pipelines import as_bgr

    for shape in ((0, 0), (0, 5), (5, 0, 3), (0, 0, 4)):
        with pytest.raises(InputError, match="empty frame"):
            as_bgr(np.zeros(shape, np.uint8))
    assert as_bgr(np.zeros((1, 1), np.uint8)).shape == (1, 1, 3)


# ---------------------------------------------------------------------------------------- failed runs
def test_cleanup_removes_only_the_empty_folders_a_run_created(tmp_path):
    from edgedeploy.io import missing_dirs, remove_empty_dirs

    (tmp_path / "keep").mkdir()
    created = missing_dirs(tmp_path / "keep" / "a" / "b")
    assert created == [tmp_path / "keep" / "a" / "b", tmp_path / "keep" / "a"]
    (tmp_path / "keep" / "a" / "b").mkdir(parents=True)
    remove_empty_dirs(created)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"] and not any((tmp_path / "keep").iterdir())
    created = missing_dirs(tmp_path / "keep" / "c" / "d")
    (tmp_path / "keep" / "c" / "d").mkdir(parents=True)
    (tmp_path / "keep" / "c" / "result.txt").write_text("partial but useful")
    remove_empty_dirs(created)
    assert (tmp_path / "keep" / "c" / "result.txt").exists() and not (tmp_path / "keep" / "c" / "d").exists()

def test_eval_on_a_detector_takes_the_detection_flags(tmp_path, monkeypatch):
    """`deploy eval` parses --conf-thres/--iou-thres/--max-det/--out and hands them to the detection evaluator."""
    import edgedeploy.eval.cli  # noqa: F401  (registers the evaluators)
    from edgedeploy.cli import main
    from edgedeploy.models.artifact import ArtifactMeta, write_sidecar
    from edgedeploy.tasks import DETECT

    art = tmp_path / "det.onnx"
    art.write_bytes(b"stand-in: the evaluator is replaced below")
    write_sidecar(art, ArtifactMeta("yolox_nano", "detect", input_shape=[1, 3, 64, 64]))
    seen = {}
    monkeypatch.setitem(DETECT.parts, "evaluator", lambda request: seen.update(vars(request.nms), out=request.out) or 0)
    assert main(["eval", str(art), "--data", "synthetic", "--conf-thres", "0.3", "--iou-thres", "0.5", "--max-det", "7",
                 "--out", str(tmp_path / "ev")]) == 0
    assert (seen["conf_thres"], seen["iou_thres"], seen["max_det"], seen["out"]) == (0.3, 0.5, 7, str(tmp_path / "ev"))
