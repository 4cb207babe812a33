"""Task pipelines over any engine: frame(s) in (uint8 BGR, as OpenCV reads them), results out in the original
frame's pixels.

    det = Detector("yolox_s.fp16.engine")          # or .onnx, or Detector.from_model("yolox_s", weights=...)
    dets = det(frame_bgr)                           # Detections(boxes [K,4] xyxy px, scores [K], classes [K])

Preprocessing, normalisation and output layout come from the artifact's sidecar. On every engine whose
capabilities say it takes device buffers (TensorRT, PyTorch on CUDA, ONNX Runtime CUDA) there is one GPU path:
frame (host array, or device array through `__cuda_array_interface__`/DLPack) -> the NVRTC preprocessing kernel
into the engine's input buffer -> inference -> GPU decode/NMS -> results, all on the engine's stream. Elsewhere
the CPU reference in `edgedeploy.data.preprocess`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgedeploy.data.preprocess import letterbox_geometry
from edgedeploy.models.artifact import ArtifactMeta, read_sidecar
from edgedeploy.errors import EdgeDeployError, InputError
from edgedeploy.runtime.engine import DYNAMIC, Engine
from edgedeploy.runtime.loader import load_engine
from edgedeploy.options import SERVE_NMS
from edgedeploy.tasks import CLASSIFY, DETECT, SEGMENT, TASKS


# ---- results ----------------------------------------------------------------------------------------------------
@dataclass
class Detections:
    boxes: np.ndarray  # [K, 4] float32 x1, y1, x2, y2 in original frame pixels
    scores: np.ndarray  # [K] float32
    classes: np.ndarray  # [K] int64
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.scores)

    def labels(self) -> list[str]:
        return [self.names[c] if 0 <= c < len(self.names) else str(c) for c in self.classes.tolist()]


@dataclass
class Classification:
    class_id: int
    score: float
    name: str
    probs: np.ndarray  # [C] softmax probabilities


@dataclass
class Segmentation:
    mask: np.ndarray  # [H, W] int32 class per pixel at the original frame size
    names: list[str] = field(default_factory=list)


@dataclass
class _Geometry:
    h: int
    w: int
    scale: Any  # float (letterbox) or (sx, sy) (stretch)
    pad: tuple[int, int]
    new_hw: tuple[int, int]


# ---- frame checks -------------------------------------------------------------------------------------------------
def as_bgr(frame: Any) -> np.ndarray:
    """Accept HxW gray, HxWx1, HxWx3 BGR or HxWx4 BGRA uint8; return HxWx3 BGR. Anything else: InputError."""
    import cv2

    frame = np.asarray(frame)
    if frame.dtype != np.uint8:
        raise InputError(
            f"frame dtype is {frame.dtype}; pipelines take uint8 BGR frames as cv2.imread/VideoCapture return them "
            "(for a float image in [0, 1] use `(img * 255).round().astype(np.uint8)`)"
        )
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    if frame.ndim in (2, 3) and (frame.shape[0] == 0 or frame.shape[1] == 0):  # before cv2, which would raise
        raise InputError(f"empty frame of shape {frame.shape}: a frame needs at least 1x1 pixels")
    if frame.ndim == 2:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    if frame.ndim != 3 or frame.shape[2] not in (3, 4):
        raise InputError(f"frame of shape {frame.shape}: expected HxW (gray), HxWx3 (BGR) or HxWx4 (BGRA)")
    return cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR) if frame.shape[2] == 4 else frame


def _meta_from_model(model: Any, imgsz: int | None, postprocess: dict[str, Any]) -> ArtifactMeta:
    info = getattr(model, "model_info", None)
    if info is None:
        raise EdgeDeployError("a bare nn.Module needs `meta=ArtifactMeta(...)` (task, input size, mean/std)")
    size = imgsz or info.imgsz
    meta = ArtifactMeta(model=info.name, task=info.task, input_shape=["batch", 3, size, size], mean=list(info.mean),
                        std=list(info.std), letterbox=info.letterbox, builder="torch")
    from edgedeploy.data.preprocess import InputConvention

    ckpt_meta = getattr(model, "checkpoint_meta", None) or {}
    if ckpt_meta.get("preprocess"):  # official weights (or fine-tuned from them): the original's convention
        meta.set_convention(InputConvention.from_dict(ckpt_meta["preprocess"]))
        meta.source = str(ckpt_meta.get("source", ""))
    if ckpt_meta.get("class_names"):
        meta.class_names = [str(c) for c in ckpt_meta["class_names"]]
    meta.postprocess = dict(postprocess)
    return meta


# ---- base -----------------------------------------------------------------------------------------------------------
class _Pipeline:
    """`meta` describes the input when the artifact has no sidecar; `sidecar` is the artifact's own sidecar when
    the caller has read it already (`load_pipeline`), so that it is read once and handed to the engine."""

    task = ""
    model_postprocess: dict[str, Any] = {}  # what a PyTorch model's outputs are, for a pipeline made from one

    def __init__(
        self,
        source: str | os.PathLike | Engine,
        *,
        meta: ArtifactMeta | None = None,
        sidecar: ArtifactMeta | None = None,
        backend: str | None = None,
        device: str | None = None,
        model: str | None = None,
        gpu_preprocess: bool | None = None,
        cuda_graph: bool = False,
        num_classes: int | None = None,
        imgsz: int | None = None,
    ) -> None:
        if isinstance(source, Engine):
            self.engine = source
            path = getattr(source, "path", None)
            meta = meta or (read_sidecar(path, required=False) if path else None)
        else:
            if sidecar is None and meta is None:
                sidecar = read_sidecar(source, required=not str(source).endswith((".pt", ".pth")))
            meta = meta or sidecar
            self.engine = load_engine(source, backend=backend, device=device, model=model, cuda_graph=cuda_graph,
                                      num_classes=num_classes, imgsz=imgsz, meta=sidecar)
            if meta is None and self.engine.source_model is not None:
                meta = self.meta_from_model(self.engine.source_model, imgsz)
        if meta is None:
            raise EdgeDeployError("no sidecar for this engine: pass meta=ArtifactMeta(...) describing its input")
        if self.task and meta.task and meta.task != self.task:
            raise EdgeDeployError(
                f"this artifact is a {meta.task!r} model; use {type(self).__name__} only for {self.task!r} models "
                f"(or `load_pipeline` to pick the right one)"
            )
        self.meta = meta
        shape = self.engine.input.shape
        if len(shape) == 4 and shape[2] != DYNAMIC and shape[3] != DYNAMIC:
            self.imgsz = (int(shape[2]), int(shape[3]))
        else:
            self.imgsz = (int(meta.input_shape[-2]), int(meta.input_shape[-1]))
        self.names = list(meta.class_names)
        self.input_dtype = self.engine.input.dtype
        self.gpu_pre = self._gpu_preprocessor(gpu_preprocess)

    def _gpu_preprocessor(self, wanted: bool | None) -> Any:
        """The NVRTC preprocessor on the engine's stream when the engine takes device buffers (None: the CPU path).
        `wanted=None` falls back to CPU preprocessing with one warning when the GPU path cannot start;
        `wanted=True` makes that an error."""
        caps = self.engine.capabilities
        if wanted is False or not caps.device_buffers:
            if wanted and not caps.device_buffers:
                raise EdgeDeployError(f"gpu_preprocess=True, but the {self.engine.backend} backend on "
                                      f"{self.engine.device} takes no device buffers")
            return None
        from edgedeploy.runtime.gpu_preprocess import GpuPreprocessFallbackWarning, GpuPreprocessor

        conv = self.meta.convention()
        try:
            if conv.resize == "shorter_crop" or conv.interpolation != "linear":  # what the kernel implements
                raise EdgeDeployError(f"the GPU kernel implements bilinear resize/letterbox, not this model's input "
                                      f"convention (resize={conv.resize}, interpolation={conv.interpolation})")
            stream = self.engine.stream if caps.stream else None  # PyTorch creates its stream on first use
            return GpuPreprocessor(self.imgsz, conv.mean, conv.std, letterbox=conv.letterbox, fp16=caps.fp16_io,
                                   stream=stream, device=self.engine.device_index, channel_order=conv.channel_order,
                                   scale=conv.scale, letterbox_align=conv.letterbox_align, pad_value=conv.pad_value)
        except EdgeDeployError as e:  # CudaError included: NVRTC missing, driver older than the CUDA line, ...
            if wanted:
                raise
            warnings.warn(f"GPU preprocessing is unavailable, preprocessing on the CPU instead: {e}",
                          GpuPreprocessFallbackWarning, stacklevel=3)
            return None

    @classmethod
    def meta_from_model(cls, model: Any, imgsz: int | None = None) -> ArtifactMeta:
        """The description of a PyTorch model (registry `model_info`, checkpoint meta) that a sidecar gives an
        exported one: what this pipeline needs to run it through any engine made from it."""
        return _meta_from_model(model, imgsz, cls.model_postprocess)

    @classmethod
    def from_model(cls, model: Any, *, weights: str | None = None, imgsz: int | None = None, num_classes: int | None = None,
                   device: str | None = None, meta: ArtifactMeta | None = None, **kwargs: Any):
        """PyTorch backend from a registry name (plus optional checkpoint) or an nn.Module with `model_info`."""
        from edgedeploy.runtime.backends.torch import TorchEngine

        if isinstance(model, str):
            from edgedeploy.models.registry import create_model

            model = create_model(model, num_classes=num_classes, weights=weights)
        meta = meta or cls.meta_from_model(model, imgsz)
        size = (int(meta.input_shape[-2]), int(meta.input_shape[-1]))
        engine = TorchEngine(model, input_shape=(DYNAMIC, 3, *size), input_name=meta.input_name, device=device,
                             cuda_graph=kwargs.pop("cuda_graph", False), device_io=kwargs.pop("device_io", None))
        return cls(engine, meta=meta, **kwargs)

    # ---- preprocessing ------------------------------------------------------------------------------------------
    def _geometry(self, frame: Any) -> _Geometry:
        h, w = _frame_hw(frame)
        scale, pad, new_hw = letterbox_geometry(h, w, *self.imgsz, self.meta.letterbox,
                                                self.meta.convention().letterbox_align)
        return _Geometry(h, w, scale, pad, new_hw)

    def preprocess(self, frames: Sequence[np.ndarray]) -> tuple[np.ndarray, list[_Geometry]]:
        """CPU reference path: (B,3,H,W) array in the engine's input dtype, plus each frame's geometry."""
        from edgedeploy.data.preprocess import to_input_tensor

        batch, geoms = [], []
        for f in frames:
            x, _, _ = to_input_tensor(f, self.imgsz, dtype=self.input_dtype, convention=self.meta.convention())
            batch.append(x)
            geoms.append(self._geometry(f))
        return np.concatenate(batch, axis=0), geoms

    # ---- execution --------------------------------------------------------------------------------------------
    def _chunks(self, n: int) -> list[slice]:
        step = self.engine.max_batch or n
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    def forward(self, frames: Sequence[np.ndarray]) -> tuple[dict[str, Any], list[_Geometry]]:
        """Run the engine on already-checked BGR frames; outputs may stay on the GPU (torch tensors)."""
        if self.gpu_pre is not None:
            return self._forward_gpu(frames)
        x, geoms = self.preprocess(frames)
        parts: list[dict[str, Any]] = []
        for sl in self._chunks(len(frames)):
            if self.engine.capabilities.torch_io:  # outputs stay on the model's device for the NMS
                import torch

                parts.append(self.engine.infer_torch(torch.from_numpy(x[sl])))
            else:
                parts.append(self.engine.infer(x[sl]))
        return _concat(parts), geoms

    def _forward_gpu(self, frames: Sequence[Any]) -> tuple[dict[str, Any], list[_Geometry]]:
        """The one GPU path, for every engine with device buffers: kernel -> engine input buffer -> execute, all
        enqueued on the engine's stream (the preprocessor was created on it), chunked by the engine's max batch."""
        eng = self.engine
        geoms = [self._geometry(f) for f in frames]
        chunks = self._chunks(len(frames))
        parts = []
        for sl in chunks:
            chunk = frames[sl]
            ptr = eng.device_input((len(chunk), 3, *self.imgsz))
            for i, f in enumerate(chunk):
                self.gpu_pre(f, ptr, i)
            eng.execute()
            parts.append(self._collect(copy=len(chunks) > 1))
        return _concat(parts), geoms

    def _collect(self, copy: bool) -> dict[str, Any]:
        """Outputs of a device run. Candidate boxes/scores for runtime NMS stay on the device (torch tensors,
        zero-copy views; copied on the device when another chunk will reuse the buffers); everything else comes
        to the host."""
        outs_on_device = _torch_cuda() or not self.engine.device.startswith("cuda")  # torch must see the memory
        if self.candidates_for_nms() and outs_on_device:
            from edgedeploy.runtime.nms import as_torch

            outs = {k: v if isinstance(v, np.ndarray) else as_torch(v, f"cuda:{self.engine.device_index}")
                    for k, v in self.engine.device_outputs().items()}
            return {k: v.copy() if isinstance(v, np.ndarray) else v.clone() for k, v in outs.items()} if copy else outs
        return self.engine.fetch_outputs()

    def candidates_for_nms(self) -> bool:
        """Whether the engine's outputs are candidates the runtime's NMS filters (they then stay on the device)."""
        return False

    def _stream_ctx(self) -> Any:
        """Torch work of the GPU path (decode, NMS, the final copy to the host) on the engine's stream, so it is
        ordered after inference without a host wait."""
        stream = self.engine.stream if self.gpu_pre is not None else None
        if stream is None or not _torch_cuda():
            return contextlib.nullcontext()
        import torch

        dev = torch.device("cuda", self.engine.device_index)
        return torch.cuda.stream(torch.cuda.ExternalStream(int(stream.ptr), device=dev))

    def __call__(self, frame: np.ndarray):
        return self.predict_batch([frame])[0]

    def predict_batch(self, frames: Sequence[np.ndarray]) -> list[Any]:
        if len(frames) == 0:
            return []
        frames = [self._check_frame(f) for f in frames]
        with self._stream_ctx():
            outs, geoms = self.forward(frames)
            return self.postprocess(outs, geoms)

    def _check_frame(self, frame: Any) -> Any:
        kind = _frame_location(frame)
        if kind == "host":
            return as_bgr(frame)
        if self.gpu_pre is None:
            raise InputError(
                f"a frame on the GPU needs a GPU backend with GPU preprocessing (TensorRT, PyTorch CUDA, ONNX Runtime "
                f"CUDA); for this {self.engine.backend} pipeline on {self.engine.device} pass a host array "
                "(e.g. `frame.cpu().numpy()`)")
        dev = _frame_device(frame)
        if dev is not None and dev != self.engine.device_index:
            raise InputError(
                f"the frame is on GPU {dev}, the engine runs on GPU {self.engine.device_index}; move the frame "
                f"(`frame.to('cuda:{self.engine.device_index}')`) or open the engine on device cuda:{dev}")
        if kind == "dlpack":  # DLPack-only producers (JAX, ...): torch wraps it without a copy and exposes the CAI
            import torch

            frame = torch.from_dlpack(frame)
        return frame  # read in place by the kernel, which also handles gray/BGRA and checks the dtype

    def postprocess(self, outs: dict[str, Any], geoms: list[_Geometry]) -> list[Any]:
        raise NotImplementedError

    def close(self) -> None:
        if self.gpu_pre is not None:
            self.gpu_pre.close()
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _concat(parts: list[dict[str, Any]]) -> dict[str, Any]:
    if len(parts) == 1:
        return parts[0]
    out = {}
    for k in parts[0]:
        vals = [p[k] for p in parts]
        if isinstance(vals[0], np.ndarray):
            out[k] = np.concatenate(vals, axis=0)
        else:
            import torch

            out[k] = torch.cat(vals, dim=0)
    return out


# DLPack device types: 1 CPU, 2 CUDA, 3 CUDA pinned host memory, 13 CUDA managed.
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13


def _frame_location(frame: Any) -> str:
    """'host' (numpy, CPU tensors), 'cai' (exposes __cuda_array_interface__) or 'dlpack' (a CUDA DLPack producer)."""
    if isinstance(frame, np.ndarray):
        return "host"
    if hasattr(frame, "__cuda_array_interface__"):
        return "cai"
    dl = getattr(frame, "__dlpack_device__", None)
    if dl is not None:
        try:
            dev_type = int(dl()[0])
        except Exception:  # noqa: BLE001 - not a usable DLPack producer: treat as a host array
            return "host"
        return "dlpack" if dev_type in (_DL_CUDA, _DL_CUDA_MANAGED) else "host"
    return "host"


def _frame_device(frame: Any) -> int | None:
    """GPU ordinal of a device frame, when it says (DLPack device, torch/cupy device), else None."""
    dl = getattr(frame, "__dlpack_device__", None)
    if dl is not None:
        try:
            dev_type, dev_id = dl()
            if int(dev_type) in (_DL_CUDA, _DL_CUDA_MANAGED):
                return int(dev_id)
        except Exception:  # noqa: BLE001
            pass
    dev = getattr(frame, "device", None)
    for attr in ("index", "id"):  # torch.device.index, cupy.cuda.Device.id
        v = getattr(dev, attr, None)
        if isinstance(v, int):
            return v
    return None


def _frame_hw(frame: Any) -> tuple[int, int]:
    cai = getattr(frame, "__cuda_array_interface__", None)
    shape = cai["shape"] if cai is not None else frame.shape
    return int(shape[0]), int(shape[1])


def _torch_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    return x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()


def _pick(outs: dict[str, Any], names: Sequence[str], index: int) -> Any:
    for n in names:
        if n in outs:
            return outs[n]
    return list(outs.values())[index]


# ---- tasks ----------------------------------------------------------------------------------------------------------
@CLASSIFY.provides("pipeline")
class Classifier(_Pipeline):
    task = "classify"

    def postprocess(self, outs: dict[str, Any], geoms: list[_Geometry]) -> list[Classification]:
        logits = _to_numpy(_pick(outs, ("logits", "output", "output0"), 0)).astype(np.float64)
        logits = logits.reshape(logits.shape[0], -1)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        results = []
        for p in probs:
            k = int(p.argmax())
            results.append(Classification(k, float(p[k]), self.names[k] if k < len(self.names) else str(k), p))
        return results


@DETECT.provides("pipeline")
class Detector(_Pipeline):
    task = "detect"
    model_postprocess = {"nms": "none", "max_det": SERVE_NMS.max_det}  # a PyTorch detector: decoded candidates

    def __init__(self, source: Any, *, conf_thres: float = SERVE_NMS.conf_thres, iou_thres: float = SERVE_NMS.iou_thres,
                 max_det: int | None = None, agnostic: bool = False, **kwargs: Any) -> None:
        super().__init__(source, **kwargs)
        self.conf_thres, self.iou_thres, self.agnostic = conf_thres, iou_thres, agnostic
        self.max_det = max_det or int(self.meta.postprocess.get("max_det", SERVE_NMS.max_det))

    def candidates_for_nms(self) -> bool:
        return self.meta.postprocess.get("nms", "none") == "none"

    def postprocess(self, outs: dict[str, Any], geoms: list[_Geometry]) -> list[Detections]:
        rows_per_image = self._final_rows(outs)
        return [self._to_frame(rows, g) for rows, g in zip(rows_per_image, geoms)]

    def _final_rows(self, outs: dict[str, Any]) -> list[np.ndarray]:
        return detection_rows(outs, conf_thres=self.conf_thres, iou_thres=self.iou_thres, max_det=self.max_det,
                              agnostic=self.agnostic)

    def _to_frame(self, rows: np.ndarray, g: _Geometry) -> Detections:
        from edgedeploy.runtime.nms import boxes_to_frame

        boxes = boxes_to_frame(rows[:, :4], g.scale, g.pad, g.h, g.w)
        return Detections(boxes, rows[:, 4].astype(np.float32), rows[:, 5].astype(np.int64), self.names)


def detection_rows(outs: dict[str, Any], *, conf_thres: float, iou_thres: float, max_det: int,
                   agnostic: bool = False) -> list[np.ndarray]:
    """A detector's outputs -> per image an array [K, 6] (x1, y1, x2, y2, score, class) in input-tensor pixels:
    NMS inside the engine (num_dets + padded boxes/scores/classes: read the first num_dets) or candidates
    (boxes [B,N,4], scores [B,N,C]: `runtime.nms.batched_detections` on their device). Also the Triton
    postprocess step's."""
    if "num_dets" in outs or len(outs) == 4:  # NMS inside the engine: fixed-size padded outputs
        num = _to_numpy(_pick(outs, ("num_dets", "num_detections"), 0)).reshape(-1)
        boxes = _to_numpy(_pick(outs, ("boxes", "det_boxes", "detection_boxes"), 1))
        scores = _to_numpy(_pick(outs, ("scores", "det_scores", "detection_scores"), 2))
        classes = _to_numpy(_pick(outs, ("classes", "det_classes", "detection_classes"), 3))
        rows = []
        for i, n in enumerate(num.tolist()):
            n = min(int(n), max_det)
            keep = scores[i, :n] > conf_thres
            rows.append(np.concatenate([boxes[i, :n][keep], scores[i, :n][keep, None],
                                        classes[i, :n][keep, None].astype(np.float32)], axis=1))
        return rows
    from edgedeploy.runtime.nms import batched_detections

    boxes = _pick(outs, ("boxes",), 0)
    scores = _pick(outs, ("scores",), 1)
    dets = batched_detections(boxes, scores, conf_thres=conf_thres, iou_thres=iou_thres,
                              max_det=max_det, agnostic=agnostic)
    return [_to_numpy(d) for d in dets]  # only the final detections leave the device


@SEGMENT.provides("pipeline")
class Segmenter(_Pipeline):
    task = "segment"

    def postprocess(self, outs: dict[str, Any], geoms: list[_Geometry]) -> list[Segmentation]:
        import cv2

        out = _pick(outs, ("logits", "mask", "output", "output0"), 0)
        if out.ndim == 4:  # logits [B,C,h,w] -> labels [B,h,w], on the GPU when the logits are there
            out = out.argmax(axis=1) if isinstance(out, np.ndarray) else out.argmax(dim=1)
        labels = _to_numpy(out)
        results = []
        for lab, g in zip(labels.astype(np.int32), geoms):
            if lab.shape != self.imgsz:  # not upsampled in the graph: bring to the input size first
                lab = cv2.resize(lab, (self.imgsz[1], self.imgsz[0]), interpolation=cv2.INTER_NEAREST)
            (px, py), (nh, nw) = g.pad, g.new_hw
            lab = lab[py : py + nh, px : px + nw]
            mask = cv2.resize(lab, (g.w, g.h), interpolation=cv2.INTER_NEAREST)
            results.append(Segmentation(mask.astype(np.int32), self.names))
        return results


def load_pipeline(source: str | os.PathLike, *, model: str | None = None, **kwargs: Any) -> _Pipeline:
    """Pick Classifier/Detector/Segmenter from the sidecar's task (or the registry model's task)."""
    meta = read_sidecar(source, required=False)
    task = meta.task if meta else None
    if task is None and model:
        from edgedeploy.models.registry import get_model_info

        task = get_model_info(model).task
    if task not in TASKS:
        raise EdgeDeployError(f"cannot tell the task of {Path(source).name}: no sidecar and no --model NAME")
    cls = TASKS[task].part("pipeline")
    det_keys = ("conf_thres", "iou_thres", "max_det", "agnostic")
    if cls is not Detector:
        kwargs = {k: v for k, v in kwargs.items() if k not in det_keys}
    return cls(source, model=model, sidecar=meta, **kwargs)  # the sidecar, read once, goes along
