"""Engine-builder logic against a fake `tensorrt` module that records calls (no TensorRT needed), plus
TensorRT-RTX ahead-of-time builds and a `tensorrt` integration test where it imports."""

from __future__ import annotations

import enum
import json
import types
from pathlib import Path

import numpy as np
import pytest

from edgedeploy.engines.common import BuildRequest, build_engine, network_flags
from edgedeploy.models.artifact import ArtifactMeta, read_sidecar
from edgedeploy.errors import EngineBuildError


def make_fake_trt(input_shape=(-1, 3, 32, 32), parse_ok=True, build_ok=True, engine=b"ENGINE-BYTES"):
    """A module object shaped like `tensorrt` (10/11) whose objects append what they were asked to `calls`."""
    calls: list[tuple] = []

    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    class ILogger:
        def __init__(self):
            pass

    ILogger.Severity = Severity

    class Tensor:
        name = "images"
        shape = input_shape

    class Network:
        num_inputs = 1

        def get_input(self, i):
            return Tensor()

    class ParserError:
        def desc(self):
            return "Unsupported operator FancyOp"

        def node(self):
            return 7

        def node_name(self):
            return "/head/FancyOp"

        def node_operator(self):
            return "FancyOp"

    class OnnxParser:
        def __init__(self, network, logger):
            self.num_errors = 0 if parse_ok else 1

        def parse_from_file(self, path):
            calls.append(("parse", Path(path).name))
            return parse_ok

        def get_error(self, i):
            return ParserError()

    class Profile:
        def set_shape(self, name, mn, opt, mx):
            calls.append(("profile", name, tuple(mn), tuple(opt), tuple(mx)))

    class TimingCache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return self.data + b"+timed"

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls.append(("pool", pool, size))

        def add_optimization_profile(self, p):
            calls.append(("add_profile",))

        def create_timing_cache(self, data):
            calls.append(("create_timing_cache", bytes(data)))
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("set_timing_cache", ignore_mismatch))
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            calls.append(("create_network", flags))
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("build",))
            if not build_ok:
                self.logger.log(Severity.ERROR, "Error Code 4: no kernel for INT8 GroupConv on this target")
                return None
            self.logger.log(Severity.WARNING, "weights truncated to FP16 range")
            return engine

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99.0"
    trt.ILogger = ILogger
    trt.Builder = Builder
    trt.OnnxParser = OnnxParser
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 1}, start=1)
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0}, start=0)
    trt.calls = calls
    return trt


def _request(tmp_path: Path, **kw) -> BuildRequest:
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes(b"not really onnx, the fake parser does not read it")
    meta = ArtifactMeta(model="tiny", task="classify", precision="fp16", class_names=["a", "b"])
    return BuildRequest(onnx_path, tmp_path / "m.fp16.engine", meta, **kw)


def test_build_sets_strong_typing_profile_workspace_and_writes_sidecar(tmp_path):
    trt = make_fake_trt()
    req = _request(tmp_path, batch=(1, 4, 8), workspace_mb=256, timing_cache=tmp_path / "timing.cache")
    res = build_engine(trt, "tensorrt", req)

    assert ("create_network", 1 << 1) in trt.calls  # STRONGLY_TYPED is enum value 1 in the fake
    assert ("pool", trt.MemoryPoolType.WORKSPACE, 256 << 20) in trt.calls
    assert ("profile", "images", (1, 3, 32, 32), (4, 3, 32, 32), (8, 3, 32, 32)) in trt.calls
    assert ("add_profile",) in trt.calls
    assert req.engine_path.read_bytes() == b"ENGINE-BYTES"
    meta = read_sidecar(req.engine_path)
    assert meta.builder == "tensorrt" and meta.builder_version == "10.99.0"
    assert meta.batch == {"min": 1, "opt": 4, "max": 8}
    assert meta.class_names == ["a", "b"] and meta.precision == "fp16"
    assert len(meta.onnx_sha256) == 64
    assert res.warnings == ["weights truncated to FP16 range"]
    assert res.timing_cache == "created"


def test_timing_cache_is_reused_across_builds(tmp_path):
    cache = tmp_path / "timing.cache"
    build_engine(make_fake_trt(), "tensorrt", _request(tmp_path, timing_cache=cache))
    assert cache.read_bytes() == b"+timed"  # written back after the first build
    trt2 = make_fake_trt()
    res = build_engine(trt2, "tensorrt", _request(tmp_path, timing_cache=cache))
    assert ("create_timing_cache", b"+timed") in trt2.calls  # the second build starts from the first's cache
    assert ("set_timing_cache", False) in trt2.calls
    assert res.timing_cache == "reused"
    assert cache.read_bytes() == b"+timed+timed"


def test_static_input_gets_no_profile(tmp_path):
    trt = make_fake_trt(input_shape=(2, 3, 32, 32))
    build_engine(trt, "tensorrt", _request(tmp_path, batch=(2, 2, 2)))
    assert not any(c[0] in ("profile", "add_profile") for c in trt.calls)


def test_dynamic_spatial_dims_are_refused(tmp_path):
    with pytest.raises(EngineBuildError, match="dynamic non-batch"):
        build_engine(make_fake_trt(input_shape=(-1, 3, -1, -1)), "tensorrt", _request(tmp_path))


def test_parser_errors_are_shown_and_nothing_is_written(tmp_path):
    req = _request(tmp_path)
    with pytest.raises(EngineBuildError) as e:
        build_engine(make_fake_trt(parse_ok=False), "tensorrt", req)
    assert "Unsupported operator FancyOp" in str(e.value) and "/head/FancyOp" in str(e.value)
    assert not req.engine_path.exists() and not Path(str(req.engine_path) + ".json").exists()


def test_builder_failure_carries_the_builder_log(tmp_path):
    req = _request(tmp_path)
    with pytest.raises(EngineBuildError, match="no kernel for INT8 GroupConv"):
        build_engine(make_fake_trt(build_ok=False), "tensorrt", req)
    assert not req.engine_path.exists()


def test_network_flags_without_strongly_typed_enum():
    trt = types.SimpleNamespace(NetworkDefinitionCreationFlag=types.SimpleNamespace())
    assert network_flags(trt) == 0


def test_tensorrt_builder_module_uses_injected_trt(tmp_path):
    from edgedeploy.engines import tensorrt_builder

    trt = make_fake_trt()
    res = tensorrt_builder.build(_request(tmp_path, timing_cache=tmp_path / "t.cache"), trt=trt)
    assert res.builder == "tensorrt" and (tmp_path / "t.cache").exists()


def test_missing_tensorrt_says_how_to_install(monkeypatch):
    import importlib.util

    from edgedeploy.engines import tensorrt_builder
    from edgedeploy.errors import EXIT_ENGINE_SKIPPED, BuilderUnavailableError

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    with pytest.raises(BuilderUnavailableError) as e:
        tensorrt_builder.load_tensorrt()
    assert "pip install tensorrt" in str(e.value) and e.value.exit_code == EXIT_ENGINE_SKIPPED


def _tiny_onnx(path: Path, dynamic: bool) -> None:
    import torch
    import torch.nn as nn

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 5)).eval()
    torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(path), dynamo=False, opset_version=17,
                      input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None)


@pytest.mark.rtx
def test_rtx_builds_a_dynamic_batch_engine(tmp_path):
    from edgedeploy.engines import rtx_builder

    onnx_path = tmp_path / "tiny.onnx"
    _tiny_onnx(onnx_path, dynamic=True)
    req = BuildRequest(onnx_path, tmp_path / "tiny.fp32.engine", ArtifactMeta(model="tiny", task="classify"),
                       batch=(1, 2, 4), workspace_mb=64)
    res = rtx_builder.build(req)
    assert res.engine_bytes > 1000 and req.engine_path.stat().st_size == res.engine_bytes
    meta = json.loads(Path(str(req.engine_path) + ".json").read_text())
    assert meta["builder"] == "tensorrt-rtx" and meta["batch"] == {"min": 1, "opt": 2, "max": 4}


@pytest.mark.rtx
def test_rtx_parser_error_is_readable(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from edgedeploy.engines import rtx_builder

    node = helper.make_node("NoSuchOp", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    with pytest.raises(EngineBuildError) as e:
        rtx_builder.build(BuildRequest(path, tmp_path / "bad.engine", ArtifactMeta(model="bad", task="classify")))
    assert "parser rejected bad.onnx" in str(e.value) and "NoSuchOp" in str(e.value)
    assert not (tmp_path / "bad.engine").exists()


@pytest.mark.tensorrt
def test_tensorrt_builds_and_runs_where_installed(tmp_path):  # not exercised in this project's CI
    from edgedeploy.engines import tensorrt_builder

    onnx_path = tmp_path / "tiny.onnx"
    _tiny_onnx(onnx_path, dynamic=True)
    req = BuildRequest(onnx_path, tmp_path / "tiny.fp32.engine", ArtifactMeta(model="tiny", task="classify"),
                       batch=(1, 2, 4), timing_cache=tmp_path / "timing.cache")
    res = tensorrt_builder.build(req)
    assert res.engine_bytes > 0 and (tmp_path / "timing.cache").stat().st_size > 0
    import tensorrt as trt

    engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(req.engine_path.read_bytes())
    assert engine is not None and engine.num_io_tensors == 2
    assert np.array_equal(engine.get_tensor_profile_shape("images", 0)[2], (4, 3, 32, 32))
