"""CUDA layer, NVRTC kernel, GPU preprocessing/NMS and TensorRT execution.

The NVRTC compile and error-reporting tests run anywhere cuda-python's NVRTC loads (no GPU needed). The rest is
marked `gpu` / `tensorrt`, to be run on the GPU machine: preprocessing equals the OpenCV CPU reference within
1/255, GPU NMS keeps the same boxes as torchvision on the CPU, TensorRT execution (with and without CUDA graphs)
equals ONNX Runtime. The speed targets of issue 6 (>= 10x preprocessing, >= 20x NMS, <= 5 % runtime overhead,
camera >= 90 % of bare throughput) are measured by benchmarks/runtime_targets.py, not asserted in timed tests.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgedeploy.data.preprocess import to_input_tensor
from test_runtime_models import frame_with_square, make_classifier_onnx


def _nvrtc_loads() -> bool:
    try:
        from cuda.bindings import nvrtc

        return int(nvrtc.nvrtcVersion()[0]) == 0
    except Exception:
        return False


needs_nvrtc = pytest.mark.skipif(not _nvrtc_loads(), reason="NVRTC (cuda-python + nvidia-cuda-nvrtc) not loadable")


# ---- runs without a GPU -----------------------------------------------------------------------------------------------
@needs_nvrtc
@pytest.mark.parametrize("arch", ["compute_75", "compute_87", "compute_90"])
def test_preprocess_kernel_compiles_to_ptx(arch):
    from edgedeploy.runtime.gpu_preprocess import compile_preprocess_ptx
    from edgedeploy.runtime.kernels import PREPROCESS_ENTRIES

    ptx = compile_preprocess_ptx(arch).decode()
    assert f".target sm_{arch.split('_')[1]}" in ptx
    for entry in PREPROCESS_ENTRIES:
        assert f".entry {entry}(" in ptx
    assert "cvt.rn.f16.f32" in ptx  # the FP16 store path is really there


@needs_nvrtc
@pytest.mark.parametrize("sm", [75, 87, 90, 120])
def test_preprocess_kernel_compiles_to_a_cubin_for_the_exact_architecture(sm):
    from edgedeploy.runtime import cuda
    from edgedeploy.runtime.gpu_preprocess import compile_preprocess_ptx

    if sm not in cuda.nvrtc_supported_archs():
        pytest.skip(f"this NVRTC {cuda.nvrtc_version()} does not target sm_{sm}")
    image = compile_preprocess_ptx(f"sm_{sm}")
    assert image.startswith(b"\x7fELF")  # machine code: the driver needs no PTX JIT (no PTX-version constraint)
    assert b"preprocess_f16" in image and b"preprocess_f32" in image


def test_missing_nvrtc_library_is_one_clear_error(monkeypatch):
    pytest.importorskip("cuda.bindings.nvrtc")
    from edgedeploy.runtime import cuda

    driver, runtime, _ = cuda._bindings()

    class NoNvrtc:
        def nvrtcVersion(self):
            raise RuntimeError("Failed to dlopen libnvrtc.so.13")

    monkeypatch.setattr(cuda, "_bindings", lambda: (driver, runtime, NoNvrtc()))
    with pytest.raises(cuda.CudaError, match=r"NVRTC .*could not be loaded.*edgedeploy\[cuda13\]"):
        cuda.nvrtc_version()


def test_no_driver_is_one_clear_error():
    pytest.importorskip("cuda.bindings.driver")
    from edgedeploy.runtime import cuda

    try:
        cuda.driver_version()
    except cuda.CudaError as e:
        assert "no NVIDIA driver" in str(e)
        with pytest.raises(cuda.CudaError, match="no NVIDIA driver"):
            cuda.init()
    else:
        pytest.skip("this machine has an NVIDIA driver")


@needs_nvrtc
def test_nvrtc_error_carries_the_compiler_log():
    from edgedeploy.runtime.cuda import CudaError, nvrtc_compile

    with pytest.raises(CudaError, match=r"nvrtcCompileProgram\(bad.cu, compute_80\) failed:[\s\S]*undefined"):
        nvrtc_compile('extern "C" __global__ void k(float* x) { x[0] = undefined_name; }', "bad.cu", "compute_80")


def test_cuda_errors_name_the_failed_call():
    runtime = pytest.importorskip("cuda.bindings.runtime")
    from edgedeploy.runtime.cuda import CudaError, check

    with pytest.raises(CudaError, match=r"cudaMalloc\(16\) failed: cudaErrorMemoryAllocation \(out of memory\)"):
        check((runtime.cudaError_t.cudaErrorMemoryAllocation, 0), "cudaMalloc(16)")
    assert check((runtime.cudaError_t.cudaSuccess, 42), "cudaFoo") == 42


# ---- GPU ------------------------------------------------------------------------------------------------------------------
def _unnormalise(x: np.ndarray, mean, std) -> np.ndarray:
    return (x.astype(np.float32) * np.asarray(std, np.float32)[:, None, None] + np.asarray(mean, np.float32)[:, None, None]) * 255


def _gpu_preprocess(frame, size, letterbox, fp16=False):
    from edgedeploy.runtime import cuda
    from edgedeploy.runtime.gpu_preprocess import GpuPreprocessor

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    pre = GpuPreprocessor(size, mean, std, letterbox=letterbox, fp16=fp16)
    dtype = np.float16 if fp16 else np.float32
    buf = cuda.DeviceBuffer(3 * size[0] * size[1] * np.dtype(dtype).itemsize)
    pre(frame, buf.ptr)
    out = np.empty((1, 3, *size), dtype)
    buf.copy_to_host(out, pre.stream)
    pre.stream.synchronize()
    buf.free()
    pre.close()
    return out, mean, std


@pytest.mark.gpu
@pytest.mark.parametrize("hw, size, letterbox", [((1080, 1920), (640, 640), True), ((480, 640), (224, 224), False),
                                                 ((333, 517), (320, 416), True), ((64, 64), (64, 64), True)])
def test_gpu_preprocess_matches_opencv_reference(hw, size, letterbox):
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    gpu, mean, std = _gpu_preprocess(frame, size, letterbox)
    ref, _, _ = to_input_tensor(frame, size, mean, std, letterboxed=letterbox)
    diff = np.abs(_unnormalise(gpu[0], mean, std) - _unnormalise(ref[0], mean, std))
    assert diff.max() <= 1.0 + 1e-3, f"max diff {diff.max():.3f}/255"


@pytest.mark.gpu
def test_gpu_preprocess_gray_bgra_fp16_and_device_frames():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    bgr = rng.integers(0, 256, (360, 480, 3), dtype=np.uint8)
    bgra = np.concatenate([bgr, np.full((360, 480, 1), 7, np.uint8)], axis=2)
    gray = bgr[:, :, 1].copy()
    ref_bgr, mean, std = _gpu_preprocess(bgr, (256, 256), True)
    np.testing.assert_array_equal(_gpu_preprocess(bgra, (256, 256), True)[0], ref_bgr)
    cpu_gray, _, _ = to_input_tensor(gray, (256, 256), mean, std, letterboxed=True)
    gpu_gray = _gpu_preprocess(gray, (256, 256), True)[0]
    assert np.abs(_unnormalise(gpu_gray[0], mean, std) - _unnormalise(cpu_gray[0], mean, std)).max() <= 1.001
    half = _gpu_preprocess(bgr, (256, 256), True, fp16=True)[0]
    np.testing.assert_allclose(half.astype(np.float32), ref_bgr, atol=5e-3)
    on_gpu = torch.from_numpy(bgr).cuda()  # used in place through __cuda_array_interface__, no copy
    np.testing.assert_array_equal(_gpu_preprocess(on_gpu, (256, 256), True)[0], ref_bgr)


@pytest.mark.gpu
def test_torch_frame_still_being_written_on_torchs_stream_is_waited_for():
    """The frame's upload is queued behind a long spin on torch's current stream; the kernel runs on our own
    non-blocking stream and must be ordered after it (torch exports no "stream" in its array interface)."""
    torch = pytest.importorskip("torch")
    from edgedeploy.runtime import cuda
    from edgedeploy.runtime.gpu_preprocess import GpuPreprocessor

    host = torch.from_numpy(frame_with_square(480, 640, (100, 80, 400, 300))).pin_memory()
    pre = GpuPreprocessor((320, 320), (0.0,) * 3, (1.0,) * 3, letterbox=True)
    buf = cuda.DeviceBuffer(3 * 320 * 320 * 4)
    frame = torch.zeros(host.shape, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)  # keeps torch's stream busy for tens of ms
    frame.copy_(host, non_blocking=True)
    pre(frame, buf.ptr)
    del frame  # record_stream keeps the allocator from handing the memory out before the kernel read it
    out = np.empty((1, 3, 320, 320), np.float32)
    buf.copy_to_host(out, pre.stream)
    pre.stream.synchronize()
    ref, _, _ = to_input_tensor(host.numpy(), (320, 320), (0.0,) * 3, (1.0,) * 3, letterboxed=True)
    assert np.abs(out - ref).max() <= 1 / 255 + 1e-6
    buf.free()
    pre.close()


@pytest.mark.gpu
def test_cuda_graph_replays_preprocess_kernel():
    from edgedeploy.runtime import cuda
    from edgedeploy.runtime.gpu_preprocess import GpuPreprocessor

    host = frame_with_square(240, 320, (10, 10, 100, 100))
    pre = GpuPreprocessor((128, 128), (0.5,) * 3, (0.25,) * 3, letterbox=True)
    frame = cuda.DeviceBuffer(host.nbytes, host.shape, np.uint8)  # a device frame: read in place, no staging
    frame.copy_from_host(host, pre.stream)
    buf = cuda.DeviceBuffer(3 * 128 * 128 * 4)
    pre(frame, buf.ptr)  # launch once outside capture (module load, first-use costs)
    graph = cuda.CudaGraph()
    assert graph.capture(pre.stream, lambda s: pre(frame, buf.ptr)), graph.error
    graph.launch(pre.stream)
    ref = np.empty((3, 128, 128), np.float32)
    buf.copy_to_host(ref, pre.stream)
    pre.stream.synchronize()
    white = np.full_like(host, 255)
    frame.copy_from_host(white, pre.stream)  # the graph reads the same device memory: new content, new result
    graph.launch(pre.stream)
    out = np.empty_like(ref)
    buf.copy_to_host(out, pre.stream)
    pre.stream.synchronize()
    assert not np.array_equal(out, ref)
    assert np.allclose(out[:, 64, 64], (1.0 - 0.5) / 0.25) and np.allclose(out[:, 2, 64], (114 / 255 - 0.5) / 0.25)


@pytest.mark.gpu
def test_gpu_nms_keeps_same_boxes_as_cpu_on_yolox_s_sized_output():
    torch = pytest.importorskip("torch")
    from edgedeploy.runtime.nms import batched_detections

    g = torch.Generator().manual_seed(0)
    n, c = 8400, 80  # YOLOX-S at 640: 80*80 + 40*40 + 20*20 candidates, COCO classes
    xy = torch.rand(1, n, 2, generator=g) * 600
    boxes = torch.cat([xy, xy + torch.rand(1, n, 2, generator=g) * 120 + 8], dim=2)
    scores = torch.rand(1, n, c, generator=g) ** 6  # most candidates low, as after sigmoid(obj)*sigmoid(cls)
    kw = dict(conf_thres=0.25, iou_thres=0.45, max_det=300)
    cpu = batched_detections(boxes, scores, **kw)[0]
    gpu_boxes, gpu_scores = boxes.cuda(), scores.cuda()
    gpu = batched_detections(gpu_boxes, gpu_scores, **kw)[0].cpu()
    assert len(cpu) > 10  # the comparison is over real suppression work, not an empty result
    torch.testing.assert_close(gpu, cpu)


@pytest.mark.gpu
def test_torch_backend_on_cuda_matches_cpu(tmp_path):
    from edgedeploy.runtime import Classifier

    path, model = make_classifier_onnx(tmp_path)
    from edgedeploy.models.artifact import read_sidecar

    meta = read_sidecar(path)
    model.model_info = None
    frames = [np.random.default_rng(i).integers(0, 255, (50, 70, 3), dtype=np.uint8) for i in range(4)]
    cpu = Classifier.from_model(model, meta=meta, device="cpu").predict_batch(frames)
    gpu = Classifier.from_model(model, meta=meta, device="cuda").predict_batch(frames)
    for a, b in zip(cpu, gpu):
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-4)


# ---- TensorRT -------------------------------------------------------------------------------------------------------------
def _build_engine(onnx_path, engine_path, max_batch=8):
    """Build with the TensorRT Python API and record the sidecar the runtime checks."""
    import tensorrt as trt

    from edgedeploy.models.artifact import read_sidecar, write_sidecar
    from edgedeploy.runtime import cuda

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_path.read_bytes()), [parser.get_error(i) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    inp = network.get_input(0)
    _, c, h, w = inp.shape
    profile.set_shape(inp.name, (1, c, h, w), (max_batch // 2, c, h, w), (max_batch, c, h, w))
    config.add_optimization_profile(profile)
    engine_path.write_bytes(bytes(builder.build_serialized_network(network, config)))
    meta = read_sidecar(onnx_path)
    meta.builder, meta.builder_version = "tensorrt", trt.__version__
    meta.compute_capability = cuda.compute_capability()
    write_sidecar(engine_path, meta)
    return engine_path


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_engine_matches_onnxruntime_every_batch_image_and_cuda_graph(tmp_path):
    from edgedeploy.benchmarks.bench import BenchConfig, run_benchmark
    from edgedeploy.runtime import load_engine

    onnx_path, _ = make_classifier_onnx(tmp_path)
    engine_path = _build_engine(onnx_path, tmp_path / "cls.engine")
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    ref = load_engine(onnx_path).infer(x)["logits"]
    with load_engine(engine_path) as eng:
        np.testing.assert_allclose(eng.infer(x)["logits"], ref, atol=1e-3)
        for i in range(8):  # every image of the batch equals its batch-1 run
            np.testing.assert_allclose(eng.infer(x[i : i + 1])["logits"][0], ref[i], atol=1e-3)
    with load_engine(engine_path, cuda_graph=True) as eng:
        np.testing.assert_allclose(eng.infer(x)["logits"], ref, atol=1e-3)
        np.testing.assert_allclose(eng.infer(x[:3])["logits"], ref[:3], atol=1e-3)  # shape change: re-capture
        graphed = run_benchmark(eng, BenchConfig(iterations=50, warmup_ms=20), progress=False)
        assert eng.use_cuda_graph, "capture should succeed for a static-output engine"
        assert graphed.h2d is not None and graphed.compute is not None  # the CUDA-event split is reported
        np.testing.assert_allclose(eng.infer(x)["logits"], ref, atol=1e-3)  # graph replays after the benchmark


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_truncated_engine_is_a_clear_error(tmp_path):
    from edgedeploy.errors import EngineCompatibilityError
    from edgedeploy.runtime import load_engine
    import shutil

    onnx_path, _ = make_classifier_onnx(tmp_path)
    engine_path = _build_engine(onnx_path, tmp_path / "cls.engine")
    cut = tmp_path / "cut.engine"
    cut.write_bytes(engine_path.read_bytes()[: engine_path.stat().st_size // 2])
    shutil.copy(str(engine_path) + ".json", str(cut) + ".json")
    with pytest.raises(EngineCompatibilityError, match="could not deserialise.*Rebuild"):
        load_engine(cut)


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_detector_on_tensorrt_with_gpu_preprocess_maps_boxes(tmp_path):
    from edgedeploy.runtime import Detector
    from test_runtime_models import make_detector_onnx

    onnx_path = make_detector_onnx(tmp_path)
    engine_path = _build_engine(onnx_path, tmp_path / "det.engine", max_batch=4)
    det = Detector(engine_path)
    assert det.gpu_pre is not None
    frames = [frame_with_square(480, 640, (101, 53, 297, 211)), frame_with_square(300, 170, (20, 150, 90, 260))]
    for f, box, res in zip(frames, [(101, 53, 297, 211), (20, 150, 90, 260)], det.predict_batch(frames)):
        assert len(res) == 1
        np.testing.assert_allclose(res.boxes[0], box, atol=max(f.shape[:2]) / 64 + 1)


# ---- TensorRT-RTX: ahead-of-time engines build without a GPU, so the load checks run on real plans here ---------------
@pytest.fixture(scope="module")
def rtx_engine(tmp_path_factory):
    trt = pytest.importorskip("tensorrt_rtx_bindings")
    from edgedeploy.models.artifact import read_sidecar, write_sidecar

    tmp = tmp_path_factory.mktemp("rtx")
    onnx_path, _ = make_classifier_onnx(tmp)
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(onnx_path.read_bytes())
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape(network.get_input(0).name, (1, 3, 32, 32), (2, 3, 32, 32), (4, 3, 32, 32))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None
    engine_path = tmp / "cls.engine"
    engine_path.write_bytes(bytes(plan))
    meta = read_sidecar(onnx_path)
    meta.builder, meta.builder_version = "tensorrt-rtx", trt.__version__
    write_sidecar(engine_path, meta)
    return engine_path


@pytest.mark.rtx
def test_truncated_real_plan_is_refused_with_tensorrts_reason(rtx_engine):
    import tensorrt_rtx_bindings as trt

    from edgedeploy.errors import EngineCompatibilityError
    from edgedeploy.runtime.backends.tensorrt import check_engine_file, deserialize_engine

    data = check_engine_file(rtx_engine)  # a complete plan passes the size check
    with pytest.raises(EngineCompatibilityError, match=r"could not deserialise cut.engine[\s\S]*Rebuild[\s\S]*Serialization"):
        deserialize_engine(trt, data[: len(data) // 2], "cut.engine")


@pytest.mark.rtx
def test_rtx_plan_with_other_version_is_refused_before_touching_the_gpu(rtx_engine, tmp_path):
    import shutil

    from edgedeploy.models.artifact import read_sidecar, write_sidecar
    from edgedeploy.errors import EngineCompatibilityError
    from edgedeploy.runtime import load_engine

    other = tmp_path / "old.engine"
    shutil.copy(rtx_engine, other)
    meta = read_sidecar(rtx_engine)
    meta.builder_version = "1.0.0.1"
    write_sidecar(other, meta)
    with pytest.raises(EngineCompatibilityError, match="built with tensorrt-rtx 1.0.0.1, this machine has 1\\.[\\s\\S]*Rebuild"):
        load_engine(other)


@pytest.mark.rtx
def test_rtx_plan_without_driver_is_a_cuda_error_naming_cuinit(rtx_engine):
    if _has_gpu():
        pytest.skip("this machine has a GPU driver")
    from edgedeploy.runtime import load_engine
    from edgedeploy.runtime.cuda import CudaError

    with pytest.raises(CudaError, match="cuInit failed: no NVIDIA driver"):
        load_engine(rtx_engine)


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_two_tensorrt_engines_on_threads_each_with_own_stream(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from edgedeploy.runtime import load_engine

    onnx_path, _ = make_classifier_onnx(tmp_path)
    engine_path = _build_engine(onnx_path, tmp_path / "cls.engine")
    x = np.random.default_rng(0).standard_normal((40, 4, 3, 32, 32)).astype(np.float32)
    ref = load_engine(onnx_path)
    want = [ref.infer(b)["logits"] for b in x]
    engines = [load_engine(engine_path), load_engine(engine_path, cuda_graph=True)]
    assert engines[0].stream.ptr != engines[1].stream.ptr
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda e: [e.infer(b)["logits"] for b in x], engines))
    for res in results:
        for a, b in zip(res, want):
            np.testing.assert_allclose(a, b, atol=1e-3)
