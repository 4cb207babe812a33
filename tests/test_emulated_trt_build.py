"""`build_engine`'s timing cache against a stand-in TensorRT builder: a cache TensorRT rejects (another GPU or
TensorRT version) must not be reported as "reused"."""

from __future__ import annotations

import types
from enum import IntEnum

import pytest

from edgedeploy.engines.common import BuildRequest, build_engine
from edgedeploy.models.artifact import ArtifactMeta

pytestmark = pytest.mark.emulated_gpu


def fake_builder_trt(accept_cache: bool) -> types.ModuleType:
    class Severity(IntEnum):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    class ILogger:
        pass

    ILogger.Severity = Severity

    class Config:
        def __init__(self) -> None:
            self.cache = None

        def set_memory_pool_limit(self, *a):
            pass

        def create_timing_cache(self, data: bytes):
            return types.SimpleNamespace(data=bytes(data), serialize=lambda: b"cache:" + bytes(data)[:8])

        def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
            if cache.data and not accept_cache:
                return False  # what TensorRT does with a cache from another device/version
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return types.SimpleNamespace(num_inputs=0)

        def create_builder_config(self):
            return Config()

        def build_serialized_network(self, network, config):
            return b"\0" * 4096

    class OnnxParser:
        def __init__(self, network, logger):
            self.num_errors = 0

        def parse_from_file(self, path):
            return True

    m = types.ModuleType("tensorrt")
    m.ILogger, m.Builder, m.OnnxParser, m.__version__ = ILogger, Builder, OnnxParser, "10.99.0"
    m.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
    m.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
    return m


@pytest.mark.parametrize("accept", [True, False], ids=["accepted", "rejected"])
def test_timing_cache_state_says_what_tensorrt_did(tmp_path, accept):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"onnx")
    cache = tmp_path / "timing.cache"
    req = BuildRequest(onnx, tmp_path / "m.engine", ArtifactMeta(model="m", task="classify"), timing_cache=cache)
    first = build_engine(fake_builder_trt(accept), "tensorrt", req)
    assert first.timing_cache == "created" and cache.exists()
    second = build_engine(fake_builder_trt(accept), "tensorrt", req)
    if accept:
        assert second.timing_cache == "reused"
    else:
        assert second.timing_cache.startswith("rejected") and "reused" not in second.timing_cache
