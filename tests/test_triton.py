"""`deploy triton` writes repositories that Triton's own model-config schema accepts."""

import sys
import types

import numpy as np
import pytest
import torch

from edgedeploy.cli import main
from edgedeploy.engines.sidecar import ArtifactMeta, write_sidecar
from edgedeploy.engines.triton import PREPROCESS_MODEL_PY, write_triton_repo
from edgedeploy.io import sha256_file

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import text_format  # noqa: E402


class TinyDetector(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=4)

    def forward(self, x):
        f = self.conv(x).flatten(2).transpose(1, 2)  # [B, N, 8]
        return f[..., :4], f[..., 4:].sigmoid()


def _export(tmp_path, dynamic: bool, task="detect"):
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(
        TinyDetector().eval(), torch.zeros(1, 3, 64, 64), str(path), input_names=["images"],
        output_names=["boxes", "scores"], opset_version=17, dynamo=False,
        dynamic_axes={"images": {0: "batch"}, "boxes": {0: "batch"}, "scores": {0: "batch"}} if dynamic else None,
    )
    meta = ArtifactMeta(model="tiny", task=task, input_shape=["batch" if dynamic else 1, 3, 64, 64],
                        output_names=["boxes", "scores"], letterbox=True, mean=[0, 0, 0], std=[1, 1, 1],
                        batch={"min": 1, "opt": 4, "max": 16}, onnx_sha256=sha256_file(path))
    write_sidecar(path, meta)
    return path, meta


def _parse(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_onnx_dynamic_batch_repo_parses_with_triton_schema(tmp_path):
    onnx_path, _ = _export(tmp_path, dynamic=True)
    dirs = write_triton_repo(onnx_path, tmp_path / "repo", max_batch=8, instances=2, kind="KIND_CPU")
    cfg = _parse(dirs[0] / "config.pbtxt")
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 8
    assert [i.name for i in cfg.input] == ["images"] and list(cfg.input[0].dims) == [3, 64, 64]
    assert cfg.input[0].data_type == model_config_pb2.TYPE_FP32
    # The exporter leaves the box axis symbolic under a dynamic batch: Triton takes -1 for "variable".
    assert [o.name for o in cfg.output] == ["boxes", "scores"] and len(cfg.output[0].dims) == 2
    assert cfg.HasField("dynamic_batching") and max(cfg.dynamic_batching.preferred_batch_size) <= 8
    assert cfg.instance_group[0].count == 2 and cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert (dirs[0] / "1" / "model.onnx").read_bytes() == onnx_path.read_bytes()
    # Detectors get a preprocess step and an ensemble, both valid configs.
    pre, ens = _parse(dirs[1] / "config.pbtxt"), _parse(dirs[2] / "config.pbtxt")
    assert pre.backend == "python" and list(pre.output[0].dims) == [3, 64, 64]
    steps = ens.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["tiny_preprocess", "tiny"]
    assert dict(steps[1].output_map) == {"boxes": "boxes", "scores": "scores"}


def test_fixed_batch_artifact_is_not_batched_by_triton(tmp_path):
    onnx_path, _ = _export(tmp_path, dynamic=False, task="classify")
    dirs = write_triton_repo(onnx_path, tmp_path / "repo", max_batch=8)
    cfg = _parse(dirs[0] / "config.pbtxt")
    assert cfg.max_batch_size == 0 and list(cfg.input[0].dims) == [1, 3, 64, 64]
    assert not cfg.HasField("dynamic_batching") and len(dirs) == 1
    assert list(cfg.output[0].dims) == [1, 256, 4] and list(cfg.output[1].dims) == [1, 256, 4]


def test_engine_uses_the_onnx_it_was_built_from_for_shapes(tmp_path):
    onnx_path, meta = _export(tmp_path, dynamic=True)
    engine = tmp_path / "tiny.fp16.engine"
    engine.write_bytes(b"not a real plan: the writer only copies it")
    meta.precision, meta.builder = "fp16", "tensorrt"
    write_sidecar(engine, meta)
    assert main(["triton", "--engine", str(engine), "--repo", str(tmp_path / "repo"), "--name", "det"]) == 0
    cfg = _parse(tmp_path / "repo" / "det" / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan" and [o.name for o in cfg.output] == ["boxes", "scores"]
    assert len(cfg.output[1].dims) == 2  # from the source ONNX (batch axis removed), not a bare [-1]
    assert (tmp_path / "repo" / "det" / "1" / "model.plan").read_bytes() == engine.read_bytes()


def test_engine_on_cpu_and_missing_sidecar_are_clear_errors(tmp_path, capsys):
    onnx_path, meta = _export(tmp_path, dynamic=True)
    engine = tmp_path / "x.engine"
    engine.write_bytes(b"plan")
    assert main(["triton", "--engine", str(engine), "--repo", str(tmp_path / "r")]) == 1
    assert "no sidecar" in capsys.readouterr().err
    write_sidecar(engine, meta)
    assert main(["triton", "--engine", str(engine), "--repo", str(tmp_path / "r"), "--kind", "KIND_CPU"]) == 1
    assert "GPU only" in capsys.readouterr().err


def test_python_backend_preprocess_matches_cpu_reference(monkeypatch):
    # Run the generated model.py's preprocessing with a stand-in for Triton's python-backend module.
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    ns: dict = {}
    exec(compile(PREPROCESS_MODEL_PY, "model.py", "exec"), ns)
    from edgedeploy.data.preprocess import to_input_tensor

    frame = np.random.default_rng(0).integers(0, 255, (120, 200, 3), dtype=np.uint8)
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    x, sp = ns["preprocess"](frame, (96, 96), True, mean, std)
    ref, scale, pad = to_input_tensor(frame, 96, mean, std, letterboxed=True)
    np.testing.assert_allclose(x, ref[0], atol=1e-6)
    assert sp.tolist() == pytest.approx([scale, pad[0], pad[1]])


def test_triton_client_builds_a_batched_uint8_request():
    import importlib.util
    from pathlib import Path

    grpcclient = pytest.importorskip("tritonclient.grpc")
    spec = importlib.util.spec_from_file_location("triton_client", Path(__file__).parents[1] / "examples" / "triton_client.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    frames = [np.full((48, 64, 3), i, np.uint8) for i in range(3)]
    (inp,) = mod.build_request(frames, grpcclient)
    assert inp.name() == "frame" and inp.datatype() == "UINT8" and inp.shape() == [3, 48, 64, 3]
    with pytest.raises(ValueError):
        mod.build_request([frames[0], np.zeros((10, 10, 3), np.uint8)], grpcclient)
    boxes = mod.to_frame_pixels(np.array([[10, 20, 30, 40]], np.float32), np.array([0.5, 2, 4], np.float32))
    np.testing.assert_allclose(boxes, [[16, 32, 56, 72]])
