"""The task registry: one entry per task holds its flags and its part in every room."""

from __future__ import annotations

import argparse
import importlib
import inspect

import pytest

from edgedeploy import options as opt
from edgedeploy.errors import EdgeDeployError
from edgedeploy.tasks import DETECT, SEGMENT, SLOTS, TASKS, Task, TaskFlag, add_all_task_flags, get_task, given_task_options


def _import_every_room() -> None:
    for module in SLOTS.values():
        importlib.import_module(module)
    for task in TASKS:
        importlib.import_module(f"edgedeploy.export.tasks.{task}")
        importlib.import_module(f"edgedeploy.train.{task}")
        importlib.import_module(f"edgedeploy.eval.{task}")


def test_every_task_has_every_part_once_the_rooms_are_imported():
    _import_every_room()
    for task in TASKS.values():
        assert set(task.parts) == set(SLOTS), task.name
    from edgedeploy.export.tasks import get_task_adapter
    from edgedeploy.runtime.pipelines import Classifier, Detector, Segmenter

    assert [TASKS[t].part("pipeline") for t in ("classify", "detect", "segment")] == [Classifier, Detector, Segmenter]
    assert get_task_adapter("detect").task == "detect"
    assert get_task("segment").part("trainer").config.__name__ == "SegmentConfig"


def test_a_missing_part_and_a_second_registration_are_clear_errors():
    task = Task("planted", "a task with no parts")
    with pytest.raises(EdgeDeployError, match="no pipeline registered; import edgedeploy.runtime.pipelines"):
        task.part("pipeline")
    task.provides("pipeline")(int)
    with pytest.raises(ValueError, match="registered twice"):
        task.provides("pipeline")(float)
    with pytest.raises(ValueError, match="unknown task slot"):
        task.provides("pipline")
    with pytest.raises(EdgeDeployError, match="unknown task 'detection'"):
        get_task("detection")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_all_task_flags(p)
    return p


def test_task_flags_are_parsed_once_and_a_flag_of_another_task_is_refused():
    args = _parser().parse_args(["--nms", "none", "--conf", "0.4", "--max-det", "7"])
    assert given_task_options(args, "detect") == {"nms": "none", "conf_thres": 0.4, "max_det": 7}
    with pytest.raises(EdgeDeployError, match="--nms applies to detect models; m is a classify model"):
        given_task_options(args, "classify", "m")
    seg = _parser().parse_args(["--no-upsample"])
    assert given_task_options(seg, "segment") == {"upsample": False}
    with pytest.raises(EdgeDeployError, match="--no-upsample applies to segment models"):
        given_task_options(seg, "detect")
    assert given_task_options(_parser().parse_args([]), "detect") == {}
    with pytest.raises(SystemExit):  # validated by the option's own range
        _parser().parse_args(["--iou-thres", "0"])


def test_the_commands_use_the_same_flag_objects():
    from edgedeploy.runtime import camera_cli

    p = argparse.ArgumentParser()
    camera_cli.configure(p)
    a = p.parse_args(["--source", "0"])
    assert (a.conf_thres, a.iou_thres, a.max_det) == (opt.SERVE_NMS.conf_thres, opt.SERVE_NMS.iou_thres, None)
    assert p.parse_args(["--source", "0", "--conf-thres", "0.6"]).conf_thres == 0.6
    flags = {f.dest: f for f in DETECT.flags}
    assert isinstance(flags["nms"], TaskFlag) and flags["nms"].choices == opt.NMS_MODE.choices
    assert [f.dest for f in SEGMENT.flags] == ["argmax", "upsample", "ignore_index"]
    with pytest.raises(EdgeDeployError, match="--ignore-index applies to segment models; yolox_nano is a detect"):
        given_task_options(_parser().parse_args(["--ignore-index", "3"]), "detect", "yolox_nano")


def test_detection_defaults_come_from_options():
    from edgedeploy.export.tasks.detect import DEFAULTS, build_export_module
    from edgedeploy.runtime.nms import batched_detections
    from edgedeploy.runtime.pipelines import Detector

    serve = opt.SERVE_NMS
    assert (DEFAULTS["conf_thres"], DEFAULTS["iou_thres"], DEFAULTS["max_det"]) == (serve.conf_thres, serve.iou_thres, serve.max_det)
    for fn in (Detector.__init__, batched_detections, build_export_module):
        params = inspect.signature(fn).parameters
        assert params["conf_thres"].default == serve.conf_thres and params["iou_thres"].default == serve.iou_thres
    assert opt.EVAL_NMS.conf_thres < serve.conf_thres and opt.EVAL_NMS.max_det > serve.max_det
    with pytest.raises(opt.OptionError, match="--conf-thres"):
        opt.NmsSettings(conf_thres=1.5, iou_thres=0.5, max_det=1)
    assert opt.NmsMode("trt") is opt.NmsMode.TRT and opt.NMS_MODE.choices == ("none", "onnx", "trt")
    assert opt.PRECISION.choices == tuple(p.value for p in opt.Precision)
    assert opt.CALIB_METHOD.choices[0] == opt.CalibMethod.AUTO.value


def test_triton_takes_the_validated_task_flags():
    from edgedeploy.engines import triton

    p = argparse.ArgumentParser()
    triton.configure(p)
    a = p.parse_args(["--engine", "x.onnx", "--repo", "r"])
    assert (a.conf_thres, a.iou_thres) == (opt.SERVE_NMS.conf_thres, opt.SERVE_NMS.iou_thres)
    with pytest.raises(SystemExit):  # was a plain float: 2.0 passed
        p.parse_args(["--engine", "x.onnx", "--repo", "r", "--conf-thres", "2"])
