"""`deploy triton` writes repositories that Triton's own model-config schema accepts."""

import sys
import types

import numpy as np
import pytest
import torch

from edgedeploy.cli import main
from edgedeploy.models.artifact import ArtifactMeta, write_sidecar
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
    # Detectors get a preprocess step, a postprocess (NMS) step and an ensemble ending in it, all valid configs.
    pre, post, ens = (_parse(d / "config.pbtxt") for d in dirs[1:])
    assert pre.backend == "python" and list(pre.output[0].dims) == [3, 64, 64]
    assert post.backend == "python" and [i.name for i in post.input] == ["boxes", "scores", "frame_hw"]
    steps = ens.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["tiny_preprocess", "tiny", "tiny_postprocess"]
    assert dict(steps[1].output_map) == {"boxes": "raw_boxes", "scores": "raw_scores"}
    assert dict(steps[2].input_map) == {"boxes": "raw_boxes", "scores": "raw_scores", "frame_hw": "frame_hw"}
    assert [o.name for o in ens.output] == ["num_dets", "det_boxes", "det_scores", "det_classes"]
    assert list(ens.output[1].dims) == [100, 4]  # padded to max_det


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
    from edgedeploy.data.preprocess import InputConvention, to_input_tensor

    frame = np.random.default_rng(0).integers(0, 255, (120, 200, 3), dtype=np.uint8)
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    conv = InputConvention(mean=tuple(mean.tolist()), std=tuple(std.tolist()), resize="letterbox")
    x, sp = ns["preprocess"](frame, (96, 96), conv)
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
    out = {"num_dets": np.array([[2], [0]], np.int32), "det_boxes": np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4),
           "det_scores": np.array([[0.9, 0.5, 0.0], [0.0, 0.0, 0.0]], np.float32),
           "det_classes": np.array([[3, 1, 0], [0, 0, 0]], np.int32)}
    (b0, s0, c0), (b1, s1, c1) = mod.final_detections(out)
    np.testing.assert_array_equal(b0, [[0, 1, 2, 3], [4, 5, 6, 7]])
    assert s0.tolist() == pytest.approx([0.9, 0.5]) and c0.tolist() == [3, 1] and len(b1) == len(s1) == len(c1) == 0


# ---- the detector ensemble, run locally step by step ------------------------------------------------------------
class _PbTensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class _PbResponse:
    def __init__(self, output_tensors=None, error=None):
        self.output_tensors, self.error = list(output_tensors or []), error


class _PbRequest:
    def __init__(self, tensors):
        self.tensors = tensors


def _fake_pb_utils():
    """Stand-in for Triton's `triton_python_backend_utils`: the calls the generated model.py files make."""
    m = types.ModuleType("triton_python_backend_utils")
    m.Tensor, m.InferenceResponse = _PbTensor, _PbResponse
    m.get_input_tensor_by_name = lambda request, name: request.tensors.get(name)
    return m


class LocalEnsemble:
    """Runs a `deploy triton` repository's ensemble the way the server schedules it: each step's input_map /
    output_map over a tensor namespace; python steps through their model.py, ONNX models through ONNX Runtime."""

    def __init__(self, repo, name):
        from google.protobuf import json_format
        import onnxruntime as ort

        self.repo, self.cfg = repo, _parse(repo / name / "config.pbtxt")
        self.models = {}
        for step in self.cfg.ensemble_scheduling.step:
            d = repo / step.model_name
            cfg = _parse(d / "config.pbtxt")
            if cfg.backend == "python":
                ns: dict = {"__name__": f"triton_{step.model_name}"}
                exec(compile((d / "1" / "model.py").read_text(), str(d / "1" / "model.py"), "exec"), ns)
                model = ns["TritonPythonModel"]()
                model.initialize({"model_config": json_format.MessageToJson(cfg, preserving_proto_field_name=True)})
                self.models[step.model_name] = ("python", model, ns)
            else:
                self.models[step.model_name] = ("onnx", ort.InferenceSession(str(d / "1" / "model.onnx")), None)

    def __call__(self, frames: np.ndarray) -> dict:
        space = {"frame": frames}
        for step in self.cfg.ensemble_scheduling.step:
            kind, model, _ = self.models[step.model_name]
            inputs = {k: space[v] for k, v in step.input_map.items()}
            if kind == "python":
                (resp,) = model.execute([_PbRequest({k: _PbTensor(k, v) for k, v in inputs.items()})])
                outs = {t.name(): t.as_numpy() for t in resp.output_tensors}
            else:
                names = [o.name for o in model.get_outputs()]
                outs = dict(zip(names, model.run(names, inputs)))
            for k, v in step.output_map.items():
                assert v not in space, f"ensemble tensor {v!r} written twice (Triton refuses such an ensemble)"
                space[v] = outs[k]
        return {o.name: space[o.name] for o in self.cfg.output}


@pytest.mark.parametrize("nms", ["none", "onnx"])
def test_detector_ensemble_returns_what_detector_returns(tmp_path, monkeypatch, nms):
    """The ensemble's python steps (fake pb_utils) around the model, run locally: final detections in frame
    pixels equal `Detector` on the same frames, for NMS in the postprocess step and NMS in the engine."""
    from edgedeploy.runtime import Detector
    from test_runtime_models import frame_with_square, make_detector_onnx

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    onnx_path = make_detector_onnx(tmp_path, nms=nms)
    write_triton_repo(onnx_path, tmp_path / "repo", name="det", kind="KIND_CPU")
    ensemble = LocalEnsemble(tmp_path / "repo", "det_pipeline")
    det = Detector(onnx_path, device="cpu")
    batches = [[frame_with_square(360, 480, (40, 60, 200, 300)), frame_with_square(360, 480, (300, 10, 470, 90)),
                np.full((360, 480, 3), 30, np.uint8)],  # nothing bright: no detection
               [frame_with_square(200, 90, (5, 120, 60, 190))]]
    for frames in batches:
        out = ensemble(np.stack(frames))
        want = det.predict_batch(frames)
        assert out["num_dets"].reshape(-1).tolist() == [len(d) for d in want]
        for i, d in enumerate(want):
            k = len(d)
            np.testing.assert_allclose(out["det_boxes"][i, :k], d.boxes, atol=1e-3)
            np.testing.assert_allclose(out["det_scores"][i, :k], d.scores, atol=1e-5)
            assert out["det_classes"][i, :k].tolist() == d.classes.tolist()
    assert sum(len(d) for d in det.predict_batch(batches[0])) == 2


def test_detector_ensemble_check_catches_a_missing_letterbox_undo(tmp_path, monkeypatch):
    """Planted error: the postprocess step leaves boxes in input-tensor pixels; the comparison must see it."""
    from edgedeploy.runtime import Detector
    from test_runtime_models import frame_with_square, make_detector_onnx

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    onnx_path = make_detector_onnx(tmp_path)
    write_triton_repo(onnx_path, tmp_path / "repo", name="det", kind="KIND_CPU")
    ensemble = LocalEnsemble(tmp_path / "repo", "det_pipeline")
    ensemble.models["det_postprocess"][2]["boxes_to_frame"] = lambda boxes, *a: np.asarray(boxes, np.float32)
    frame = frame_with_square(360, 480, (40, 60, 200, 300))
    out = ensemble(frame[None])
    d = Detector(onnx_path, device="cpu")(frame)
    assert out["num_dets"][0, 0] == len(d) == 1
    assert not np.allclose(out["det_boxes"][0, :1], d.boxes, atol=1.0)
