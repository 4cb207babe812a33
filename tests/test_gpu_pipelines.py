"""The one GPU pipeline (issue 17) on every GPU backend, run on the CPU with stand-ins (marker `emulated_gpu`).

The stand-ins are those of the TensorRT branch's tests (tests/emulated/fake_cuda.py, issue 15): device buffers in
host memory pre-filled with a NaN marker (an input slot nobody wrote shows up), streams that run queued work only when
synchronised, and the real NVRTC kernel source compiled for the host with g++ and launched over the launcher's grid.
The PyTorch backend's input tensors (CPU tensors here) are registered as device memory by `fake_cuda.adopt`, standing
in for torch's CUDA allocator.

What runs for real: the pipeline's GPU branch (capabilities, chunking, batch-index addressing, device frames and
their device check, output collection, NMS and box mapping), the PyTorch backend's device I/O (its input tensor
per shape, written through its address), and the ONNX Runtime CUDA backend's I/O binding (bound to host buffers on
the CPU provider). What only a GPU shows: real CUDA streams and events, CUDA-graph capture, the kernel on a GPU.
"""

from __future__ import annotations

import types
import warnings

import numpy as np
import pytest
import torch

from edgedeploy.errors import EdgeDeployError, InputError
from edgedeploy.runtime import Classifier, Detector, Segmenter
from edgedeploy.runtime.backends.onnxruntime import OnnxRuntimeEngine
from edgedeploy.runtime.backends.torch import TorchEngine
from edgedeploy.runtime.engine import Capabilities
from emulated import fake_cuda
from emulated.kernel_cpu import compiler
from test_runtime_models import (
    OracleDetector,
    frame_with_square,
    make_classifier_onnx,
    make_detector_onnx,
    make_segmenter_onnx,
)

pytestmark = pytest.mark.emulated_gpu


@pytest.fixture
def host_cuda(monkeypatch):
    """`fake_cuda` installed; the PyTorch backend's input tensors adopted as device memory; the kernel's destination
    pointers recorded in `ledger.dst` (one per launch)."""
    if compiler() is None:
        pytest.skip("no C++ compiler (g++/clang++) to build the kernel")
    ledger = fake_cuda.install(monkeypatch)
    real_input = TorchEngine.device_input

    def device_input(self, shape):
        key = tuple(int(d) for d in shape)
        fresh = key not in self._static_in
        ptr = real_input(self, shape)
        if fresh and self.torch_device.type == "cpu":
            fake_cuda.adopt(self._static_in[key].numpy())
        return ptr

    monkeypatch.setattr(TorchEngine, "device_input", device_input)
    ledger.dst = []
    real_launch = fake_cuda.Kernel.launch

    def launch(self, grid, block, args, stream):
        args = list(args)
        ledger.dst.append(int(args[5][0]))  # the kernel's `out` parameter (gpu_preprocess.kernel_args order)
        real_launch(self, grid, block, args, stream)

    monkeypatch.setattr(fake_cuda.Kernel, "launch", launch)
    return ledger


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu_pipelines")


FRAMES = [((480, 640), (101, 53, 297, 211)), ((300, 170), (20, 150, 90, 260)), ((64, 64), (5, 9, 30, 40))]


def _frames():
    return [frame_with_square(*hw, box) for hw, box in FRAMES]


def _same_detections(a, b, atol=1e-3):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x) == len(y) >= 1
        np.testing.assert_allclose(x.boxes, y.boxes, atol=atol)
        np.testing.assert_allclose(x.scores, y.scores, atol=1e-5)
        assert x.classes.tolist() == y.classes.tolist()


class HostDeviceFrame:
    """A frame "on the GPU" (`__cuda_array_interface__` + DLPack device) in fake_cuda device memory (row pitch can
    exceed width * channels, like a region of interest). Create it after `fake_cuda.install`."""

    def __init__(self, frame: np.ndarray, device: int = 0, extra_pitch: int = 0) -> None:
        h, w, c = frame.shape
        pitch = w * c + extra_pitch
        self._buf = fake_cuda.DeviceBuffer(h * pitch)
        self._buf._mem.reshape(h, pitch)[:, : w * c] = frame.reshape(h, w * c)
        self.shape, self.device_id = frame.shape, device
        self.__cuda_array_interface__ = {"shape": frame.shape, "typestr": "|u1", "version": 3,
                                         "data": (self._buf.ptr, False), "strides": (pitch, c, 1)}

    def __dlpack_device__(self):
        return (2, self.device_id)  # kDLCUDA


def _torch_detector(**kw) -> Detector:
    model = OracleDetector()
    model.model_info = types.SimpleNamespace(name="oracle", task="detect", imgsz=64, mean=(0.485, 0.456, 0.406),
                                             std=(0.229, 0.224, 0.225), letterbox=True)
    return Detector.from_model(model, device="cpu", **kw)


# ---- PyTorch backend ----------------------------------------------------------------------------------------------
def test_torch_device_path_equals_cpu_path_and_uses_the_engines_stream(host_cuda):
    cpu = _torch_detector()
    gpu = _torch_detector(device_io=True)
    assert cpu.gpu_pre is None and gpu.gpu_pre is not None
    caps = gpu.engine.capabilities
    assert caps == Capabilities(device_buffers=True, stream=True, graph_capture=False, fp16_io=False,
                                torch_io=True)
    assert gpu.gpu_pre.stream is gpu.engine.stream, "kernel and model must share one stream"
    frames = _frames()
    want = cpu.predict_batch(frames)
    got = gpu.predict_batch(frames)
    _same_detections(got, want)
    for (hw, box), d in zip(FRAMES, got):  # and both are right in frame pixels
        np.testing.assert_allclose(d.boxes[0], box, atol=max(hw) / 64 + 1)
    base = gpu.engine._static_in[(3, 3, 64, 64)].data_ptr()
    assert host_cuda.dst == [base + i * 3 * 64 * 64 * 4 for i in range(3)]  # image i at offset i
    stream = gpu.engine.stream
    gpu.close()
    assert stream.handle is None and gpu.engine._stream is None
    assert host_cuda.live() == {}, "a stream, event, kernel module or buffer outlived close()"


def test_torch_device_path_chunks_past_max_batch_and_device_frames(host_cuda):
    cpu, gpu = _torch_detector(), _torch_detector(device_io=True)
    gpu.engine.max_batch = 2  # 3 frames -> chunks of 2 + 1: outputs of the first chunk must survive the second
    frames = _frames()
    dev_frames = [HostDeviceFrame(f, extra_pitch=5) for f in frames]
    got = gpu.predict_batch([dev_frames[0], frames[1], dev_frames[2]])
    _same_detections(got, cpu.predict_batch(frames))
    assert sorted(gpu.engine._static_in) == [(1, 3, 64, 64), (2, 3, 64, 64)]


def test_emulation_catches_a_wrong_batch_index(host_cuda, monkeypatch):
    """Planted error: every frame written into slot 0. The slots left unwritten (NaN-filled here) must make the
    results differ from the CPU path, so the equality above is a real check."""
    gpu = _torch_detector(device_io=True)
    real_input = gpu.engine.device_input

    def nan_filled(shape):
        ptr = real_input(shape)
        gpu.engine._static_in[tuple(shape)].fill_(float("nan"))
        return ptr

    monkeypatch.setattr(gpu.engine, "device_input", nan_filled)
    frames = _frames()
    right = gpu.predict_batch(frames)
    _same_detections(right, _torch_detector().predict_batch(frames))
    pre = gpu.gpu_pre
    gpu.gpu_pre = lambda f, ptr, i: pre(f, ptr, 0)
    wrong = gpu.predict_batch(frames)
    assert [len(d) for d in wrong] != [len(d) for d in right] or not np.allclose(wrong[0].boxes, right[0].boxes)


def test_device_frame_on_another_gpu_is_refused_with_both_numbers(host_cuda):
    gpu = _torch_detector(device_io=True)
    frame = HostDeviceFrame(_frames()[0], device=1)
    with pytest.raises(InputError, match=r"frame is on GPU 1, the engine runs on GPU 0.*cuda:0"):
        gpu(frame)


def test_cpu_torch_tensor_frame_takes_the_host_path(host_cuda):
    gpu = _torch_detector(device_io=True)
    frame = _frames()[0]
    d = gpu(torch.from_numpy(frame))  # DLPack device CPU: a host frame
    np.testing.assert_allclose(d.boxes[0], FRAMES[0][1], atol=480 / 64 + 1)


def test_gpu_path_that_cannot_start_falls_back_to_cpu_with_one_warning(monkeypatch):
    """The real `runtime.cuda` whose driver call fails (as on a machine without a GPU): the pipeline warns once
    and serves on the CPU path; `gpu_preprocess=True` makes it an error."""
    from edgedeploy.runtime import cuda
    from edgedeploy.runtime.gpu_preprocess import GpuPreprocessFallbackWarning

    def no_gpu(device=0):
        raise cuda.CudaError("cuInit failed: no NVIDIA driver on this machine")

    monkeypatch.setattr(cuda, "init", no_gpu)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        det = _torch_detector(device_io=True)
    assert det.gpu_pre is None
    assert [(w.category, str(w.message)) for w in caught if issubclass(w.category, RuntimeWarning)] == [
        (GpuPreprocessFallbackWarning, "GPU preprocessing is unavailable, preprocessing on the CPU instead: "
                                       "cuInit failed: no NVIDIA driver on this machine")]
    assert len(det(_frames()[0])) == 1
    with pytest.raises(EdgeDeployError, match="cuInit failed"):
        _torch_detector(device_io=True, gpu_preprocess=True)


def test_capabilities_are_declared_by_the_engines(tmp):
    clf_path, model = make_classifier_onnx(tmp)
    assert OnnxRuntimeEngine(clf_path, device="cpu").capabilities == Capabilities()
    assert TorchEngine(model, input_shape=(-1, 3, 32, 32), device="cpu").capabilities == Capabilities(torch_io=True)
    half = TorchEngine(model, input_shape=(-1, 3, 32, 32), device="cpu", half=True, device_io=True)
    assert half.capabilities.fp16_io and half.capabilities.device_buffers
    with pytest.raises(EdgeDeployError, match="takes no device buffers"):
        Classifier(clf_path, device="cpu", gpu_preprocess=True)


# ---- ONNX Runtime CUDA backend (I/O binding) ----------------------------------------------------------------------
def _ort_cuda(path):
    from edgedeploy.runtime.backends.onnxruntime_cuda import OnnxRuntimeCudaEngine

    return OnnxRuntimeCudaEngine(path, io_device="cpu")


def test_ort_cuda_io_binding_path_equals_cpu_path_for_every_task(host_cuda, tmp):
    det_path = make_detector_onnx(tmp)
    frames = _frames()
    cpu = Detector(det_path, device="cpu")
    gpu = Detector(_ort_cuda(det_path))
    assert gpu.gpu_pre is not None and gpu.gpu_pre.stream is gpu.engine.stream
    _same_detections(gpu.predict_batch(frames), cpu.predict_batch(frames))
    assert gpu.engine._in_buf.nbytes >= 3 * 3 * 64 * 64 * 4

    clf_path, _ = make_classifier_onnx(tmp)
    want = Classifier(clf_path, device="cpu").predict_batch(frames)
    got = Classifier(_ort_cuda(clf_path)).predict_batch(frames)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)

    seg_path = make_segmenter_onnx(tmp)
    want = Segmenter(seg_path, device="cpu").predict_batch(frames)
    got = Segmenter(_ort_cuda(seg_path)).predict_batch(frames)
    for a, b in zip(got, want):
        assert (a.mask == b.mask).all() and a.mask.sum() > 0


def test_ort_gpu_install_problems_name_the_fix():
    from edgedeploy.runtime.backends.onnxruntime_cuda import OrtGpuInstallError, check_ort_gpu_install

    def dists(*names):
        return [types.SimpleNamespace(metadata={"Name": n}) for n in names]

    with pytest.raises(OrtGpuInstallError, match=r"both the CPU package `onnxruntime` and `onnxruntime-gpu`.*"
                                                 r"pip uninstall -y onnxruntime onnxruntime-gpu"):
        check_ort_gpu_install(["CUDAExecutionProvider", "CPUExecutionProvider"], dists("onnxruntime", "onnxruntime-gpu"))
    with pytest.raises(OrtGpuInstallError, match=r"needs the `onnxruntime-gpu` package.*edgedeploy\[ort-gpu\]"):
        check_ort_gpu_install(["CPUExecutionProvider"], dists("onnxruntime"))
    check_ort_gpu_install(["CUDAExecutionProvider", "CPUExecutionProvider"], dists("onnxruntime-gpu"))  # fine


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_ort_gpu_without_usable_cuda_is_refused_not_silently_cpu(host_cuda, tmp, monkeypatch):
    """onnxruntime-gpu whose CUDA provider cannot load (no CUDA/cuDNN): ORT falls back to the CPU with only a log
    line; the engine refuses instead, naming the fix. Here the CPU build plays that install."""
    import onnxruntime as ort

    from edgedeploy.runtime.backends import onnxruntime_cuda as oc

    path, _ = make_classifier_onnx(tmp)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(oc, "_ort_distributions", lambda dists=None: {"onnxruntime-gpu"})
    with pytest.raises(oc.OrtGpuInstallError, match=r"could not start its CUDA execution provider.*cuDNN.*"
                                                    r"onnxruntime-gpu\[cuda,cudnn\]"):
        oc.OnnxRuntimeCudaEngine(path)


def test_ort_cuda_on_this_cpu_install_says_what_to_install(tmp):
    from edgedeploy.runtime import load_engine

    path, _ = make_classifier_onnx(tmp)
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has onnxruntime-gpu")
    with pytest.raises(EdgeDeployError, match="onnxruntime-gpu"):
        load_engine(path, device="cuda")


class _ReplayGraph:
    """Stands in for `torch.cuda.CUDAGraph` with its semantics: capture fixes the input and output tensors; a
    replay recomputes into those same output tensors from whatever the static input holds now."""

    def __init__(self, engine) -> None:
        self.engine, self.replays = engine, 0

    def replay(self) -> None:
        shape = self.engine._shape
        static_out = self.engine._graphs[shape][1]
        fresh = self.engine._named(self.engine.model(self.engine._static_in[shape]))
        for k, v in static_out.items():
            v.copy_(fresh[k])
        self.replays += 1


def test_torch_graph_replay_buffers_survive_chunking(host_cuda, monkeypatch):
    """CUDA-graph bookkeeping of the PyTorch backend: one graph per input shape, replays read the static input the
    kernel wrote, and outputs of a chunk survive the next chunk's replay of the same graph (4 frames, max batch 2)."""
    import contextlib

    cpu, gpu = _torch_detector(), _torch_detector(device_io=True)
    eng = gpu.engine
    graphs = []

    def new_graph():
        graphs.append(_ReplayGraph(eng))
        return graphs[-1]

    monkeypatch.setattr(torch.cuda, "CUDAGraph", new_graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g, stream=None: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(synchronize=lambda: 0))
    eng.use_cuda_graph, eng.max_batch = True, 2
    frames = _frames() + [frame_with_square(240, 320, (200, 30, 260, 200))]
    want = cpu.predict_batch(frames)
    for _ in range(2):
        _same_detections(gpu.predict_batch(frames), want)
        _same_detections(gpu.predict_batch(frames[::-1]), want[::-1])
    assert len(graphs) == 1 and graphs[0].replays == 8 and eng.graph_error is None
    # planted error: chunks not copied out before the next replay -> the first chunk reads the second's results
    monkeypatch.setattr(gpu, "_collect", lambda copy: type(gpu)._collect(gpu, copy=False))
    got = gpu.predict_batch(frames)
    assert not all(np.allclose(g.boxes, w.boxes, atol=1e-3) for g, w in zip(got, want) if len(g) == len(w))
