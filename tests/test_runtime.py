"""Runtime on CPU: backends agree, pipelines map results back to frame pixels, bad input is refused clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgedeploy.data.preprocess import letterbox, to_input_tensor
from edgedeploy.models.artifact import ArtifactMeta, write_sidecar
from edgedeploy.errors import EdgeDeployError, EngineCompatibilityError, InputError
from edgedeploy.runtime import Classifier, Detector, Segmenter, load_engine, load_pipeline
from edgedeploy.runtime.backends.tensorrt import check_engine_compat, check_engine_file
from edgedeploy.runtime.backends.torch import TorchEngine
from edgedeploy.data.preprocess import letterbox_geometry
from edgedeploy.runtime.nms import batched_detections
from edgedeploy.runtime.pipelines import as_bgr
from test_runtime_models import (
    make_classifier_onnx,
    make_detector_onnx,
    make_segmenter_onnx,
    frame_with_square,
)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("runtime")


@pytest.fixture(scope="module")
def classifier_onnx(tmp):
    return make_classifier_onnx(tmp)


@pytest.fixture(scope="module")
def detector_onnx(tmp):
    return make_detector_onnx(tmp)


# ---- backends -----------------------------------------------------------------------------------------------------
def test_onnxruntime_and_torch_backends_agree(classifier_onnx):
    path, model = classifier_onnx
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    with load_engine(path) as ort_engine:
        assert ort_engine.backend == "onnxruntime" and ort_engine.input.shape == (-1, 3, 32, 32)
        ort_out = ort_engine.infer(x)["logits"]
    torch_out = TorchEngine(model, input_shape=(-1, 3, 32, 32), output_names=["logits"], device="cpu").infer(x)["logits"]
    assert np.abs(torch_out).max() > 1.0  # realistic magnitudes, not ~0 outputs that would agree trivially
    np.testing.assert_allclose(ort_out, torch_out, rtol=1e-4, atol=1e-4)
    assert (ort_out.argmax(1) == torch_out.argmax(1)).all()


def test_wrong_input_size_channels_dtype_rank_are_clear_errors(classifier_onnx):
    path, _ = classifier_onnx
    with load_engine(path) as eng:
        with pytest.raises(InputError, match="height is 48, the model expects 32"):
            eng.infer(np.zeros((1, 3, 48, 32), np.float32))
        with pytest.raises(InputError, match="channel count is 1, the model expects 3"):
            eng.infer(np.zeros((1, 1, 32, 32), np.float32))
        with pytest.raises(InputError, match="dtype uint8.*expects float32.*raw image"):
            eng.infer(np.zeros((1, 3, 32, 32), np.uint8))
        with pytest.raises(InputError, match="rank 3"):
            eng.infer(np.zeros((3, 32, 32), np.float32))
        with pytest.raises(InputError, match="unknown \\['x'\\]"):
            eng.infer({"x": np.zeros((1, 3, 32, 32), np.float32)})


def test_static_batch_engine_refuses_larger_batch_and_pipeline_splits_it(tmp):
    (tmp / "static").mkdir(exist_ok=True)
    path, _ = make_classifier_onnx(tmp / "static", dynamic_batch=False)
    with load_engine(path) as eng:
        assert eng.max_batch == 1
        with pytest.raises(InputError, match="batch size is 2, the model expects 1"):
            eng.infer(np.zeros((2, 3, 32, 32), np.float32))
    clf = Classifier(path)
    frames = [np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8) for i in range(3)]
    batch = clf.predict_batch(frames)  # split into three batch-1 runs
    assert [r.class_id for r in batch] == [clf(f).class_id for f in frames]


def test_unknown_extension_and_missing_file(tmp):
    with pytest.raises(EdgeDeployError, match="does not exist"):
        load_engine(tmp / "nope.onnx")
    bad = tmp / "model.bin"
    bad.write_bytes(b"x")
    with pytest.raises(EdgeDeployError, match="cannot tell the backend"):
        load_engine(bad)


# ---- frames -------------------------------------------------------------------------------------------------------
def test_gray_rgba_and_single_channel_frames_are_converted(classifier_onnx):
    path, _ = classifier_onnx
    clf = Classifier(path)
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 255, (40, 60), dtype=np.uint8)
    bgr = np.repeat(gray[:, :, None], 3, axis=2)
    bgra = np.concatenate([bgr, np.full((40, 60, 1), 255, np.uint8)], axis=2)
    ref = clf(bgr).probs
    for frame in (gray, gray[:, :, None], bgra):
        np.testing.assert_allclose(clf(frame).probs, ref, atol=1e-6)
    with pytest.raises(InputError, match="uint8 BGR"):
        clf(bgr.astype(np.float32) / 255)
    with pytest.raises(InputError, match="expected HxW"):
        clf(np.zeros((40, 60, 5), np.uint8))
    with pytest.raises(InputError, match="empty frame"):
        as_bgr(np.zeros((0, 60, 3), np.uint8))


def test_letterbox_geometry_matches_cpu_reference():
    rng = np.random.default_rng(0)
    for h, w, dh, dw in [(480, 640, 640, 640), (1080, 1920, 640, 640), (333, 517, 320, 416), (64, 64, 64, 64)]:
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        out, scale, pad = letterbox(img, (dh, dw))
        g_scale, g_pad, (nh, nw) = letterbox_geometry(h, w, dh, dw, True)
        assert (g_scale, g_pad) == (scale, pad)
        # the content area in the reference is exactly (nh, nw) at the pad offset: the rest is the 114 fill
        assert (out[: g_pad[1]] == 114).all() and (out[g_pad[1] + nh :] == 114).all()
        assert (out[:, : g_pad[0]] == 114).all() and (out[:, g_pad[0] + nw :] == 114).all()


# ---- pipelines ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw, box", [((480, 640), (101, 53, 297, 211)), ((300, 170), (20, 150, 90, 260)),
                                     ((64, 64), (5, 9, 30, 40))])
def test_detector_maps_boxes_back_to_frame_pixels(detector_onnx, hw, box):
    det = Detector(detector_onnx)
    frame = frame_with_square(*hw, box)
    d = det(frame)
    assert len(d) == 1, "NMS must keep the bright box, drop its duplicate and the low-score candidate"
    scale = min(64 / hw[0], 64 / hw[1])
    np.testing.assert_allclose(d.boxes[0], box, atol=1.0 / scale + 1)
    assert d.classes[0] == 1 and d.labels() == ["square"] and abs(d.scores[0] - 0.9) < 1e-5


def test_detector_with_nms_in_graph_reads_only_num_dets(tmp):
    det = Detector(make_detector_onnx(tmp, nms="onnx"))
    frame = frame_with_square(360, 480, (40, 60, 200, 300))
    d = det(frame)
    assert len(d) == 1 and d.classes.tolist() == [2]
    np.testing.assert_allclose(d.boxes[0], (40, 60, 200, 300), atol=480 / 64 + 1)
    empty = det(np.full((360, 480, 3), 30, np.uint8))  # nothing bright: num_dets = 0
    assert len(empty) == 0


def test_batch_results_equal_single_image_results(detector_onnx, classifier_onnx):
    """Users hit 'only the last image is right' with dynamic batch: compare every image."""
    det = Detector(detector_onnx)
    boxes = [(10, 20, 60, 90), (200, 100, 300, 280), (0, 0, 30, 30), (150, 10, 170, 200)]
    frames = [frame_with_square(240 + 60 * i, 320, b) for i, b in enumerate(boxes)]
    batched = det.predict_batch(frames)
    for frame, res in zip(frames, batched):
        single = det(frame)
        np.testing.assert_array_equal(res.boxes, single.boxes)
        np.testing.assert_array_equal(res.classes, single.classes)
    for res, b, f in zip(batched, boxes, frames):
        np.testing.assert_allclose(res.boxes[0], b, atol=max(f.shape[:2]) / 64 + 1)

    clf = Classifier(classifier_onnx[0])
    rng = np.random.default_rng(3)
    imgs = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(5)]
    for res, img in zip(clf.predict_batch(imgs), imgs):
        np.testing.assert_allclose(res.probs, clf(img).probs, atol=1e-6)


def test_classifier_equals_model_on_reference_preprocessing(classifier_onnx):
    path, model = classifier_onnx
    clf = Classifier(path)
    img = np.random.default_rng(5).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    x, _, _ = to_input_tensor(img, 32, clf.meta.mean, clf.meta.std)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()[0]
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    res = clf(img)
    np.testing.assert_allclose(res.probs, probs, atol=1e-5)
    assert res.name == "abcde"[int(probs.argmax())]


@pytest.mark.parametrize("letterboxed", [True, False])
def test_segmenter_mask_in_frame_pixels(tmp, letterboxed):
    seg = Segmenter(make_segmenter_onnx(tmp, letterbox=letterboxed))
    box = (64, 40, 256, 176)
    frame = frame_with_square(240, 320, box)
    mask = seg(frame).mask
    assert mask.shape == (240, 320)
    truth = np.zeros((240, 320), bool)
    truth[40:176, 64:256] = True
    iou = (truth & (mask == 1)).sum() / (truth | (mask == 1)).sum()
    assert iou > 0.95


def test_torch_pipeline_from_module_runs_nms_on_model_device(tmp):
    from edgedeploy.models.registry import ModelInfo
    from test_runtime_models import OracleDetector

    model = OracleDetector()
    model.model_info = ModelInfo(name="oracle", builder=OracleDetector, task="detect", family="test", imgsz=64,
                                 letterbox=True)
    det = Detector.from_model(model, device="cpu")
    assert det.engine.backend == "torch"
    d = det(frame_with_square(200, 100, (10, 20, 60, 150)))
    assert len(d) == 1
    np.testing.assert_allclose(d.boxes[0], (10, 20, 60, 150), atol=200 / 64 + 1)


def test_load_pipeline_picks_task_and_refuses_wrong_class(tmp, detector_onnx, classifier_onnx):
    assert isinstance(load_pipeline(detector_onnx), Detector)
    assert isinstance(load_pipeline(classifier_onnx[0]), Classifier)
    with pytest.raises(EdgeDeployError, match="'detect' model; use Classifier only"):
        Classifier(detector_onnx)


def test_missing_sidecar_is_actionable(tmp, classifier_onnx):
    path = tmp / "nosidecar.onnx"
    path.write_bytes(classifier_onnx[0].read_bytes())
    with pytest.raises(EdgeDeployError, match="no sidecar.*Re-export"):
        Classifier(path)


# ---- NMS -------------------------------------------------------------------------------------------------------
def test_batched_detections_equal_per_image_torchvision_reference():
    from torchvision.ops import batched_nms

    g = torch.Generator().manual_seed(0)
    b, n, c = 3, 500, 6
    xy = torch.rand(b, n, 2, generator=g) * 300
    wh = torch.rand(b, n, 2, generator=g) * 60 + 4
    boxes = torch.cat([xy, xy + wh], dim=2)
    scores = torch.rand(b, n, c, generator=g) ** 3
    boxes[1] = boxes[0]  # identical candidates in two images must not suppress each other
    scores[1] = scores[0]
    out = batched_detections(boxes, scores, conf_thres=0.3, iou_thres=0.5, max_det=50)
    for i in range(b):
        best, cls = scores[i].max(1)
        keep = best > 0.3
        kb, ks, kc = boxes[i][keep], best[keep], cls[keep]
        ref = batched_nms(kb, ks, kc, 0.5)[:50]
        torch.testing.assert_close(out[i][:, :4], kb[ref])
        torch.testing.assert_close(out[i][:, 4], ks[ref])
        torch.testing.assert_close(out[i][:, 5].long(), kc[ref])
    torch.testing.assert_close(out[0], out[1])
    assert 10 < len(out[0]) <= 50
    agnostic = batched_detections(boxes, scores, conf_thres=0.3, iou_thres=0.5, max_det=500, agnostic=True)
    assert len(agnostic[2]) < len(batched_detections(boxes, scores, conf_thres=0.3, iou_thres=0.5, max_det=500)[2])


# ---- TensorRT checks that need no TensorRT ---------------------------------------------------------------------------
def _engine_meta(**kw) -> ArtifactMeta:
    base = dict(model="yolox_s", task="detect", builder="tensorrt", builder_version="10.13.0.35",
                compute_capability="8.6", gpu_name="NVIDIA GeForce RTX 3060")
    base.update(kw)
    return ArtifactMeta(**base)


def test_engine_compat_check_refuses_other_version_gpu_and_builder(tmp):
    ok = dict(runtime_builder="tensorrt", runtime_version="10.13.0.35", device_cc="8.6", path="m.engine")
    check_engine_compat(_engine_meta(), **ok)  # same version and GPU: accepted
    check_engine_compat(_engine_meta(builder_version="10.13.0"), **ok)  # only the components both give
    with pytest.raises(EngineCompatibilityError, match="built with tensorrt 10.13.0.35, this machine has 10.8.0.43.*Rebuild"):
        check_engine_compat(_engine_meta(), **{**ok, "runtime_version": "10.8.0.43"})
    with pytest.raises(EngineCompatibilityError, match="compute capability 8.6 \\(NVIDIA GeForce RTX 3060\\), this GPU is 9.0"):
        check_engine_compat(_engine_meta(), **{**ok, "device_cc": "9.0"})
    with pytest.raises(EngineCompatibilityError, match="built by tensorrt-rtx.*not interchangeable"):
        check_engine_compat(_engine_meta(builder="tensorrt-rtx"), **ok)
    with pytest.raises(EngineCompatibilityError, match="not a TensorRT engine"):
        check_engine_compat(_engine_meta(builder="torch.onnx"), **ok)
    check_engine_compat(_engine_meta(compute_capability=""), **{**ok, "device_cc": "9.0"})  # AOT: no GPU recorded


def test_truncated_engine_file_is_refused(tmp):
    p = tmp / "trunc.engine"
    p.write_bytes(b"\x00" * 100)
    with pytest.raises(EngineCompatibilityError, match="100 bytes: truncated"):
        check_engine_file(p)


def test_engine_without_tensorrt_says_what_to_install(tmp):
    p = tmp / "model.engine"
    p.write_bytes(b"\x00" * 4096)
    write_sidecar(p, _engine_meta())
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(EdgeDeployError, match="needs the `tensorrt` Python package.*run the .onnx"):
            load_engine(p)
    else:  # pragma: no cover - on a TensorRT machine the garbage engine must still be a clean error
        with pytest.raises(EdgeDeployError):
            load_engine(p)


def test_sidecar_json_is_what_the_runtime_reads(detector_onnx):
    d = json.loads((detector_onnx.parent / (detector_onnx.name + ".json")).read_text())
    assert d["postprocess"]["nms"] == "none" and d["letterbox"] is True


def test_several_engines_on_threads_give_single_thread_results(detector_onnx, classifier_onnx):
    from concurrent.futures import ThreadPoolExecutor

    det, clf = Detector(detector_onnx), Classifier(classifier_onnx[0])
    det2 = Detector(detector_onnx)  # a second instance of the same artifact: its own session/context
    frames = [frame_with_square(120, 160, (10 + 5 * i, 20, 60 + 5 * i, 90)) for i in range(12)]
    want_det = [det(f).boxes for f in frames]
    want_clf = [clf(f).class_id for f in frames]

    def work(pipe, kind):
        return [pipe(f).boxes if kind == "det" else pipe(f).class_id for f in frames]

    with ThreadPoolExecutor(3) as pool:
        futs = [pool.submit(work, det, "det"), pool.submit(work, det2, "det"), pool.submit(work, clf, "clf")]
        got = [f.result() for f in futs]
    for boxes in got[:2]:
        for a, b in zip(boxes, want_det):
            np.testing.assert_array_equal(a, b)
    assert got[2] == want_clf


def test_checkpoint_runs_through_torch_backend_like_the_model(tmp):
    from edgedeploy.models.registry import create_model

    model = create_model("mobilenetv1_025", num_classes=4).eval()
    ckpt = tmp / "mb.pt"
    torch.save(model.state_dict(), ckpt)
    clf = load_pipeline(ckpt, model="mobilenetv1_025", num_classes=4, imgsz=64, device="cpu")
    assert isinstance(clf, Classifier) and clf.engine.backend == "torch" and clf.imgsz == (64, 64)
    img = np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8)
    x, _, _ = to_input_tensor(img, 64, clf.meta.mean, clf.meta.std)
    with torch.no_grad():
        want = torch.softmax(model(torch.from_numpy(x)), 1).numpy()[0]
    np.testing.assert_allclose(clf(img).probs, want, atol=1e-5)


def test_gpu_frame_on_a_cpu_pipeline_says_how_to_pass_it(classifier_onnx):
    class DeviceFrame:  # what torch/cupy CUDA arrays expose
        shape = (48, 64, 3)
        __cuda_array_interface__ = {"shape": (48, 64, 3), "typestr": "|u1", "data": (0, False), "version": 3}

    with pytest.raises(InputError, match="needs a GPU backend with GPU preprocessing.*cpu\\(\\).numpy\\(\\)"):
        Classifier(classifier_onnx[0])(DeviceFrame())


def test_plugin_engine_without_the_plugin_says_what_to_load():
    """`--nms trt` engines name EfficientNMS_TRT in their sidecar: a TensorRT without the plugin library is
    caught before deserialisation (fake `tensorrt` module: the real one is not installable in this CI)."""
    from types import SimpleNamespace

    from edgedeploy.runtime.backends.tensorrt import check_plugins

    registered: dict[str, object] = {}
    calls = []
    trt = SimpleNamespace(
        Logger=type("Logger", (), {"ERROR": 1, "__init__": lambda self, level=0: None}),
        init_libnvinfer_plugins=lambda logger, ns: calls.append(ns),
        get_plugin_registry=lambda: SimpleNamespace(get_creator=lambda name, version, ns: registered.get(name)),
    )
    meta = _engine_meta()
    meta.postprocess = {"nms": "trt", "plugin": "EfficientNMS_TRT"}
    with pytest.raises(EngineCompatibilityError, match="EfficientNMS_TRT.*--nms onnx"):
        check_plugins(trt, meta, "yolox_s.fp16.engine")
    assert calls == [""]  # the standard plugins were registered before looking
    registered["EfficientNMS_TRT"] = object()
    check_plugins(trt, meta, "yolox_s.fp16.engine")  # present: accepted
    meta.postprocess = {"nms": "onnx"}
    check_plugins(SimpleNamespace(), meta, "x.engine")  # no plugin named: TensorRT is not even asked
