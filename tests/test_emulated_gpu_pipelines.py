"""The pipelines' full GPU branch on the CPU (`emulated_gpu`): Classifier, Detector and Segmenter over a TensorRT
engine, with the real `TensorRTEngine` and `GpuPreprocessor` code running on CPU stand-ins for the CUDA layer and
for TensorRT (tests/emulated: device buffers pre-filled with a NaN marker, streams that only run work when
synchronised, CUDA graphs that replay what they captured, the real kernel built for the host, the exported ONNX
executed by ONNX Runtime as the "engine").

Each GPU-branch result is compared with the CPU branch (ONNX Runtime + OpenCV preprocessing) on the same ONNX.
"""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest

from emulated import fake_cuda, fake_tensorrt
from emulated.kernel_cpu import compiler
from test_runtime_models import frame_with_square, make_classifier_onnx, make_detector_onnx, make_segmenter_onnx

pytestmark = [pytest.mark.emulated_gpu,
              pytest.mark.skipif(compiler() is None, reason="no C++ compiler (g++/clang++) to build the kernel for the CPU")]

MAX_BATCH = 2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("emu")
    cls, _ = make_classifier_onnx(tmp, imgsz=(32, 32))
    det = make_detector_onnx(tmp, imgsz=(64, 64))
    seg = make_segmenter_onnx(tmp, imgsz=(64, 64), letterbox=True)
    out = {"classify": cls, "detect": det, "segment": seg}
    for task, onnx in list(out.items()):
        out[f"{task}.engine"] = fake_tensorrt.build_engine(onnx, onnx.with_suffix(".engine"), max_batch=MAX_BATCH)
        out[f"{task}.fp16.engine"] = fake_tensorrt.build_engine(onnx, onnx.with_name(onnx.stem + ".fp16.engine"),
                                                                max_batch=MAX_BATCH, fp16_io=True)
    return out


@pytest.fixture()
def gpu(monkeypatch):
    ledger = fake_cuda.install(monkeypatch)
    fake_tensorrt.install(monkeypatch)
    return ledger


def _frames(n: int, seed: int = 0) -> list[np.ndarray]:
    """Odd sizes and aspect ratios, a bright square each (what the oracle models find), textured background."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = int(rng.integers(41, 130)), int(rng.integers(41, 170))
        x1, y1 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        f = frame_with_square(h, w, (x1, y1, x1 + w // 3 + 3, y1 + h // 3 + 3))
        f[:, :, 0] = np.minimum(f[:, :, 0], rng.integers(0, 120, (h, w)).astype(np.uint8) + (f[:, :, 0] > 200) * 255)
        out.append(f)
    return out


def _pipelines(cls, engine, onnx, **kw):
    gpu_pipe = cls(engine, **kw)
    assert gpu_pipe.engine.backend == "tensorrt" and gpu_pipe.gpu_pre is not None, "the GPU branch must be taken"
    return gpu_pipe, cls(onnx)


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32-io", "fp16-io"])
def test_classifier_gpu_branch_equals_cpu_branch_with_chunking(gpu, models, fp16):
    from edgedeploy.runtime.pipelines import Classifier

    engine = models["classify.fp16.engine" if fp16 else "classify.engine"]
    g, c = _pipelines(Classifier, engine, models["classify"])
    assert g.engine.max_batch == MAX_BATCH and g.input_dtype == (np.float16 if fp16 else np.float32)
    frames = _frames(5, seed=1)  # 5 frames, max batch 2: chunks of 2, 2, 1
    got, ref = g.predict_batch(frames), c.predict_batch(frames)
    probs_g, probs_c = np.stack([r.probs for r in got]), np.stack([r.probs for r in ref])
    assert not np.isnan(probs_g).any()
    np.testing.assert_allclose(probs_g, probs_c, atol=0.02 if fp16 else 0.01)
    assert [r.class_id for r in got] == [r.class_id for r in ref]
    assert gpu.launches["preprocess_f16" if fp16 else "preprocess_f32"] == 5
    g.close()
    c.close()


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["plain", "cuda-graph"])
def test_detector_gpu_branch_maps_boxes_back_to_the_frame(gpu, models, cuda_graph):
    from edgedeploy.runtime.pipelines import Detector

    g, c = _pipelines(Detector, models["detect.engine"], models["detect"], cuda_graph=cuda_graph)
    frames = _frames(5, seed=2)
    # batch sizes 1, 2 (+ chunking 5 -> 2, 2, 1), 1 again: a graph must be re-captured whenever the shape changes
    for batch in ([frames[0]], frames[1:3], frames, [frames[4]]):
        got, ref = g.predict_batch(batch), c.predict_batch(batch)
        for d_g, d_c in zip(got, ref):
            assert len(d_g) == len(d_c) == 1  # the duplicate was suppressed, the far box under threshold
            np.testing.assert_allclose(d_g.boxes, d_c.boxes, atol=1.01)
            np.testing.assert_array_equal(d_g.classes, d_c.classes)
            np.testing.assert_allclose(d_g.scores, d_c.scores, atol=1e-3)
    if cuda_graph:
        assert g.engine.graph is not None and g.engine.use_cuda_graph, g.engine.graph.error
        assert g.engine.graph.replays >= 1 and g.engine.graph.captures >= 3
    g.close()
    c.close()


def test_detector_boxes_are_where_the_square_is(gpu, models):
    from edgedeploy.runtime.pipelines import Detector

    det = Detector(models["detect.fp16.engine"])
    box = (101, 53, 297, 211)
    d = det(frame_with_square(480, 640, box))
    assert len(d) == 1 and d.labels() == ["square"]
    np.testing.assert_allclose(d.boxes[0], box, atol=640 / 64 + 1)  # one input pixel, in frame pixels
    det.close()


def test_segmenter_gpu_branch_equals_cpu_branch(gpu, models):
    from edgedeploy.runtime.pipelines import Segmenter

    g, c = _pipelines(Segmenter, models["segment.engine"], models["segment"], cuda_graph=True)
    frames = _frames(3, seed=3)
    for m_g, m_c, f in zip(g.predict_batch(frames), c.predict_batch(frames), frames):
        assert m_g.mask.shape == f.shape[:2]
        assert (m_g.mask == m_c.mask).mean() > 0.99
        assert m_g.mask.sum() > 0
    g.close()
    c.close()


def test_close_releases_every_stream_event_module_buffer_and_graph(gpu, models):
    from edgedeploy.runtime.pipelines import Detector

    det = Detector(models["detect.engine"], cuda_graph=True)
    det.predict_batch(_frames(3, seed=4))
    assert gpu.live()  # something is held while the pipeline lives
    det.close()
    assert gpu.live() == {}, f"leaked: {gpu.live()}"


def test_standalone_preprocessor_destroys_its_own_stream_and_unloads_its_module(gpu):
    from edgedeploy.runtime.gpu_preprocess import GpuPreprocessor

    pre = GpuPreprocessor((32, 32), (0.5,) * 3, (0.5,) * 3, letterbox=True)
    out = fake_cuda.DeviceBuffer(3 * 32 * 32 * 4)
    pre(np.zeros((40, 50, 3), np.uint8), out.ptr)
    pre.close()
    pre.close()  # twice is fine
    out.free()
    assert gpu.live() == {}, f"leaked: {gpu.live()}"


def test_device_frame_waits_for_its_producer_stream(gpu):
    """A frame still being written on another stream (CAI v3 "stream") is read only after that work: the kernel is
    ordered after the producer. Without the wait it would read the marker bytes."""
    from edgedeploy.runtime.gpu_preprocess import GpuPreprocessor

    host = frame_with_square(48, 64, (10, 8, 40, 30))
    producer = fake_cuda.Stream()
    dev = fake_cuda.DeviceBuffer(host.nbytes, host.shape, np.uint8)
    dev.copy_from_host(host, producer)  # queued, not yet run

    class Frame:  # what CuPy exports: version 3 with the producing stream
        __cuda_array_interface__ = {**dev.__cuda_array_interface__, "stream": producer.ptr}

    pre = GpuPreprocessor((32, 32), (0.0,) * 3, (1.0,) * 3, letterbox=True)
    out = fake_cuda.DeviceBuffer(3 * 32 * 32 * 4, (1, 3, 32, 32), np.float32)
    pre(Frame(), out.ptr)
    pre.stream.synchronize()
    got = out.host_view().copy()
    from edgedeploy.data.preprocess import to_input_tensor

    ref, _, _ = to_input_tensor(host, (32, 32), (0.0,) * 3, (1.0,) * 3, letterboxed=True)
    assert np.abs(got - ref).max() <= 1 / 255 + 1e-6
    pre.close()


def test_pitched_device_roi_through_the_preprocessor(gpu):
    from edgedeploy.data.preprocess import to_input_tensor
    from edgedeploy.runtime.gpu_preprocess import GpuPreprocessor

    parent = np.random.default_rng(9).integers(0, 256, (90, 130, 3), dtype=np.uint8)
    dev = fake_cuda.DeviceBuffer(parent.nbytes, parent.shape, np.uint8)
    s = fake_cuda.Stream()
    dev.copy_from_host(parent, s)
    s.synchronize()
    x0, y0, w, h = 13, 7, 77, 61

    class Roi:
        __cuda_array_interface__ = {"shape": (h, w, 3), "typestr": "|u1", "version": 2, "strides": (130 * 3, 3, 1),
                                    "data": (dev.ptr + y0 * 130 * 3 + x0 * 3, False)}

    pre = GpuPreprocessor((48, 48), (0.0,) * 3, (1.0,) * 3, letterbox=True)
    out = fake_cuda.DeviceBuffer(3 * 48 * 48 * 4, (1, 3, 48, 48), np.float32)
    pre(Roi(), out.ptr)
    pre.stream.synchronize()
    ref, _, _ = to_input_tensor(np.ascontiguousarray(parent[y0 : y0 + h, x0 : x0 + w]), (48, 48), (0.0,) * 3,
                                (1.0,) * 3, letterboxed=True)
    assert np.abs(out.host_view() - ref).max() <= 1 / 255 + 1e-6
    pre.close()


# ---- planted break: graph replay on stale buffers/shapes -------------------------------------------------------------
def test_graph_replay_with_stale_capture_is_caught(gpu, models, monkeypatch):
    """Plant the bug of replaying a graph captured for another batch (no re-capture on a shape change): the
    comparison with the CPU branch must fail."""
    from edgedeploy.runtime.backends.tensorrt import TensorRTEngine
    from edgedeploy.runtime.pipelines import Detector

    def stale(self, shapes):  # the real method, minus the graph reset
        for name, shape in shapes.items():
            self.context.set_input_shape(name, shape)
        self._current_shapes = dict(shapes)

    monkeypatch.setattr(TensorRTEngine, "set_input_shapes", stale)
    g, c = _pipelines(Detector, models["detect.engine"], models["detect"], cuda_graph=True)
    frames = _frames(2, seed=5)
    g.predict_batch(frames[:1])  # captured for batch 1
    got, ref = g.predict_batch(frames), c.predict_batch(frames)  # replayed for batch 2: image 2 never computed
    same = all(len(a) == len(b) and np.allclose(a.boxes, b.boxes, atol=1.01) for a, b in zip(got, ref))
    assert not same, "a graph replayed with the wrong batch went unnoticed"
    g.close()
    c.close()


# ---- bad input: the GPU path cannot start ---------------------------------------------------------------------------
def _classify_both(models):
    from edgedeploy.runtime.pipelines import Classifier

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pipe = Classifier(models["classify.engine"])
    return pipe, [x for x in w if "GPU preprocessing" in str(x.message)]


def test_nvrtc_missing_falls_back_to_cpu_preprocessing_with_one_warning(gpu, models, monkeypatch):
    from edgedeploy.runtime import cuda
    from edgedeploy.runtime.gpu_preprocess import GpuPreprocessFallbackWarning
    from edgedeploy.runtime.pipelines import Classifier

    def no_nvrtc():
        raise cuda.CudaError("NVRTC (the run-time CUDA compiler) could not be loaded (libnvrtc.so.13: cannot open)")

    monkeypatch.setattr(cuda, "nvrtc_supported_archs", no_nvrtc)
    pipe, warned = _classify_both(models)
    assert pipe.gpu_pre is None and len(warned) == 1 and warned[0].category is GpuPreprocessFallbackWarning
    assert "NVRTC" in str(warned[0].message) and "CPU" in str(warned[0].message)
    frames = _frames(3, seed=6)
    ref = Classifier(models["classify"]).predict_batch(frames)
    got = pipe.predict_batch(frames)  # the TensorRT engine still runs, fed by the CPU preprocessing
    np.testing.assert_allclose(np.stack([r.probs for r in got]), np.stack([r.probs for r in ref]), atol=1e-5)
    pipe.close()
    assert gpu.live() == {}
    with pytest.raises(cuda.CudaError, match="NVRTC"):  # asked for explicitly: no silent fallback
        Classifier(models["classify.engine"], gpu_preprocess=True)


def test_gpu_nvrtc_cannot_target_falls_back_and_says_which_extra(gpu, models, monkeypatch, tmp_path):
    """Xavier (sm_72) with the CUDA 13 NVRTC, which dropped it: one warning naming `edgedeploy[cuda12]`."""
    monkeypatch.setattr(fake_cuda._State, "compute_capability", "7.2")
    models = {"classify.engine": fake_tensorrt.build_engine(models["classify"], tmp_path / "xavier.engine",
                                                            compute_capability="7.2")}
    pipe, warned = _classify_both(models)
    assert pipe.gpu_pre is None and len(warned) == 1
    assert "compute capability 7.2" in str(warned[0].message) and "edgedeploy[cuda12]" in str(warned[0].message)
    pipe.close()


def test_kernel_target_is_a_cubin_for_the_device_or_ptx_the_driver_accepts(gpu):
    from edgedeploy.runtime import cuda

    assert cuda.target_for_device("8.7", [75, 80, 86, 87, 90], (13, 0), 13000) == "sm_87"  # exact cubin
    assert cuda.target_for_device("8.7", [75, 80, 86, 87, 90], (12, 9), 12020) == "sm_87"  # cubin: any 12.x driver
    assert cuda.target_for_device("12.1", [75, 80, 86, 87, 90], (12, 6), 13000) == "compute_90"  # newer GPU: PTX
    with pytest.raises(cuda.CudaError, match=r"edgedeploy\[cuda12\]"):  # CUDA 13 PTX on a CUDA 12.6 driver
        cuda.target_for_device("12.1", [75, 80, 86, 87, 90, 120], (13, 0), 12060)
    with pytest.raises(cuda.CudaError, match=r"cannot JIT PTX from a newer NVRTC"):  # PTX 12.9 on a 12.2 driver
        cuda.target_for_device("12.1", [75, 80, 86, 87, 90], (12, 9), 12020)
    with pytest.raises(cuda.CudaError, match=r"cannot compile for compute capability 7.2"):
        cuda.target_for_device("7.2", [75, 80, 86, 87, 90], (13, 0), 13000)
    from edgedeploy.runtime.gpu_preprocess import GpuPreprocessor

    GpuPreprocessor((16, 16), (0,) * 3, (1,) * 3, letterbox=True).close()
    assert gpu.launches["compile:sm_87"] == 1


def test_driver_older_than_the_cuda_line_is_one_clear_error(monkeypatch, models, tmp_path):
    from edgedeploy.models.artifact import read_sidecar

    fake_cuda.install(monkeypatch, driver=12060)  # a JetPack 6 / r5xx driver under the CUDA 13 bindings
    fake_tensorrt.install(monkeypatch)
    from edgedeploy.runtime import cuda
    from edgedeploy.runtime.pipelines import Classifier

    with pytest.raises(cuda.CudaError) as e:
        Classifier(models["classify.engine"])
    assert "supports CUDA 12.6" in str(e.value) and "edgedeploy[cuda12]" in str(e.value)


    beside = fake_tensorrt.build_engine(models["classify"], tmp_path / "c.engine")
    shutil.copy(models["classify"], tmp_path / "c.onnx")
    with pytest.raises(cuda.CudaError, match=r"edgedeploy\[cuda12\].*c.onnx runs on ONNX Runtime"):
        Classifier(beside)
    Classifier(tmp_path / "c.onnx", meta=read_sidecar(models["classify"])).close()  # and it does
    assert cuda.cuda_line_problem(12060, 12) is None and cuda.cuda_line_problem(13000, 13) is None
    assert cuda.extra_for_driver(12020) == "cuda12" and cuda.extra_for_driver(13010) == "cuda13"


def test_engine_built_for_another_gpu_is_refused_naming_both(gpu, models, tmp_path):
    from edgedeploy.models.artifact import read_sidecar
    from edgedeploy.errors import EngineCompatibilityError
    from edgedeploy.runtime.pipelines import Classifier

    other = fake_tensorrt.build_engine(models["classify"], tmp_path / "cls_sm86.engine", compute_capability="8.6")
    with pytest.raises(EngineCompatibilityError, match=r"built for compute capability 8.6.*this GPU is 8.7.*Rebuild"):
        Classifier(other)
    other.with_suffix(".engine.json").unlink()  # no sidecar: TensorRT itself refuses, and its reason is carried
    with pytest.raises(EngineCompatibilityError, match=r"could not deserialise[\s\S]*incompatible device"):
        Classifier(other, meta=read_sidecar(models["classify"]))


def test_refused_engine_points_at_the_onnx_beside_it(gpu, models):
    from edgedeploy.errors import EngineCompatibilityError
    from edgedeploy.runtime.pipelines import Classifier

    beside = fake_tensorrt.build_engine(models["classify"], models["classify"].with_name("cls_b.engine"),
                                        compute_capability="9.0")


    shutil.copy(models["classify"], beside.with_suffix(".onnx"))
    with pytest.raises(EngineCompatibilityError, match=r"cls_b.onnx runs on ONNX Runtime"):
        Classifier(beside)


def test_a_frame_written_to_the_wrong_batch_slot_shows_as_the_marker(gpu, models, monkeypatch):
    """Plant the bug of writing every frame of a chunk into slot 0: the other slots keep the device memory's NaN
    marker bytes (or the previous chunk's data) and the comparison with the CPU branch fails."""
    from edgedeploy.runtime.gpu_preprocess import GpuPreprocessor
    from edgedeploy.runtime.pipelines import Classifier

    real = GpuPreprocessor.__call__
    monkeypatch.setattr(GpuPreprocessor, "__call__", lambda self, frame, dst, i=0: real(self, frame, dst, 0))
    g, c = _pipelines(Classifier, models["classify.engine"], models["classify"])
    frames = _frames(2, seed=8)
    got = np.stack([r.probs for r in g.predict_batch(frames)])
    ref = np.stack([r.probs for r in c.predict_batch(frames)])
    assert np.isnan(got[1]).all()  # slot 1 was never written: NaN in, NaN out
    assert not np.allclose(got, ref, atol=0.01, equal_nan=False)
    g.close()
    c.close()
