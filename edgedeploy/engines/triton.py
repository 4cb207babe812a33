"""`deploy triton`: a Triton Inference Server model repository from an exported engine or ONNX file.

Layout written (all files atomically; the artifact is copied, not linked, so the repository can be shipped):

    REPO/<name>/config.pbtxt             platform tensorrt_plan | onnxruntime_onnx, dynamic batching, instances
    REPO/<name>/1/model.plan|model.onnx
    REPO/<name>_preprocess/config.pbtxt  python backend: raw BGR frame -> letterboxed/normalised NCHW tensor
    REPO/<name>_preprocess/1/model.py
    REPO/<name>_postprocess/...          detectors: python backend: NMS (unless the engine ran it: --nms trt/onnx)
                                         and boxes mapped back to frame pixels
    REPO/<name>_pipeline/config.pbtxt    ensemble: preprocess -> model [-> postprocess]; a detector's answers with
                                         final detections (num_dets, det_boxes xyxy in frame pixels, det_scores,
                                         det_classes), other tasks with the model outputs plus `scale_pad`

The python steps import `edgedeploy` (its one letterbox, NMS and box mapping), so the Triton container needs
`pip install edgedeploy` (with torch/torchvision for the NMS) in its Python environment.

IO names, dtypes and dims come from the artifact's sidecar and, for shapes, from the ONNX graph (for an engine,
the ONNX it was built from: the file beside it whose sha256 the sidecar records).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from edgedeploy import options as opt
from edgedeploy.errors import EdgeDeployError
from edgedeploy.io import atomic_path, atomic_write_text, sha256_file
from edgedeploy.models.artifact import ArtifactMeta, read_sidecar
from edgedeploy.runtime.engine import TensorSpec
from edgedeploy.tasks import DETECT

ONNX_TO_NUMPY = {1: np.float32, 10: np.float16, 6: np.int32, 7: np.int64, 2: np.uint8, 3: np.int8, 9: np.bool_}
NAME_TO_TRITON = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
    "uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "bool": "TYPE_BOOL",
}




def triton_type(dtype: np.dtype) -> str:
    """A tensor's numpy dtype as Triton's config names it (TYPE_FP32 when Triton has no such type here)."""
    return NAME_TO_TRITON.get(np.dtype(dtype).name, "TYPE_FP32")


def _onnx_io(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001  (protobuf DecodeError on a truncated/corrupt file, OSError ...)
        raise EdgeDeployError(
            f"cannot read {path}: not a valid ONNX file (truncated or corrupt? {type(e).__name__}). Re-export it "
            "with `deploy export`, or copy the complete file"
        ) from None
    try:  # fill in output shapes the exporter left symbolic
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:
        pass
    inits = {i.name for i in model.graph.initializer}

    def spec(v) -> TensorSpec:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        return TensorSpec(v.name, tuple(dims), np.dtype(ONNX_TO_NUMPY.get(t.elem_type, np.float32)))

    return [spec(v) for v in model.graph.input if v.name not in inits], [spec(v) for v in model.graph.output]


def _source_onnx_for_engine(engine: Path, meta: ArtifactMeta) -> Path | None:
    if not meta.onnx_sha256:
        return None
    for cand in sorted(engine.parent.glob("*.onnx")):
        if sha256_file(cand) == meta.onnx_sha256:
            return cand
    return None


def describe_io(artifact: Path, meta: ArtifactMeta) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Input and output specs of an artifact, preferring the ONNX graph's shapes and the sidecar's names."""
    onnx_path = artifact if artifact.suffix == ".onnx" else _source_onnx_for_engine(artifact, meta)
    if onnx_path is not None:
        return _onnx_io(onnx_path)
    # Engine without its ONNX: the sidecar knows the input fully and the output names; shapes stay dynamic.
    in_dims = tuple(-1 if isinstance(d, str) else int(d) for d in meta.input_shape)
    dtype = np.dtype(meta.input_dtype if meta.input_dtype in NAME_TO_TRITON else np.float32)
    inputs = [TensorSpec(meta.input_name, in_dims, dtype)]
    if not meta.output_names:
        raise EdgeDeployError(
            f"cannot describe the outputs of {artifact.name}: its sidecar lists none and the ONNX it was built from "
            "is not beside it. Keep the export folder together, or pass --onnx."
        )
    outputs = [TensorSpec(n, (-1,), np.dtype(np.float32)) for n in meta.output_names]
    return inputs, outputs


def _dims(spec: TensorSpec, batched: bool) -> str:
    dims = list(spec.shape[1:] if batched else spec.shape)
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def _io_block(kind: str, specs: list[TensorSpec], batched: bool) -> str:
    items = [
        f"  {{\n    name: \"{s.name}\"\n    data_type: {triton_type(s.dtype)}\n    dims: {_dims(s, batched)}\n  }}" for s in specs
    ]
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def model_config(
    name: str,
    platform: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    max_batch: int,
    instances: int,
    kind: str,
    preferred_batch: list[int] | None,
    queue_delay_us: int = 100,
) -> str:
    batched = max_batch > 0
    text = f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {max_batch}\n'
    text += _io_block("input", inputs, batched) + _io_block("output", outputs, batched)
    if batched:
        prefs = preferred_batch or [b for b in (1, 2, 4, 8, 16, 32) if b <= max_batch]
        text += (
            "dynamic_batching {\n"
            f"  preferred_batch_size: [ {', '.join(str(b) for b in prefs)} ]\n"
            f"  max_queue_delay_microseconds: {queue_delay_us}\n}}\n"
        )
    text += f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]\n"
    return text


def preprocess_config(name: str, meta: ArtifactMeta, model_input: TensorSpec, max_batch: int) -> str:
    h, w = (int(model_input.shape[-2]), int(model_input.shape[-1]))
    conv = meta.convention()  # the sidecar's input convention (channel order, scale, mean/std, letterbox rule)
    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
        + _io_block("input", [TensorSpec("frame", (-1, -1, -1, 3), np.dtype(np.uint8))], max_batch > 0)
        + _io_block(
            "output",
            [TensorSpec(model_input.name, (-1, 3, h, w), model_input.dtype), TensorSpec("scale_pad", (-1, 3), np.dtype(np.float32)),
             TensorSpec("frame_hw", (-1, 2), np.dtype(np.int32))],
            max_batch > 0,
        )
        + "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n"
        + _parameters({"convention": json.dumps(conv.to_dict()).replace('"', '\\"')})
    )


def _parameters(values: dict) -> str:
    items = [f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in values.items()]
    return "parameters [\n" + ",\n".join(items) + "\n]\n"


DETECTION_OUTPUTS = ("num_dets", "det_boxes", "det_scores", "det_classes")


def detection_outputs(max_det: int) -> list[TensorSpec]:
    return [TensorSpec("num_dets", (-1, 1), np.dtype(np.int32)), TensorSpec("det_boxes", (-1, max_det, 4), np.dtype(np.float32)),
            TensorSpec("det_scores", (-1, max_det), np.dtype(np.float32)), TensorSpec("det_classes", (-1, max_det), np.dtype(np.int32))]


def nms_in_engine(meta: ArtifactMeta) -> bool:
    """--nms trt/onnx exports run the NMS in the engine (num_dets + padded boxes/scores/classes)."""
    return (meta.postprocess or {}).get("nms", "none") not in ("none", "", None)


def postprocess_config(name: str, meta: ArtifactMeta, model_input: TensorSpec, model_outputs: list[TensorSpec],
                       max_batch: int, conf_thres: float, iou_thres: float) -> str:
    max_det = int((meta.postprocess or {}).get("max_det", opt.SERVE_NMS.max_det))
    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
        + _io_block("input", model_outputs + [TensorSpec("frame_hw", (-1, 2), np.dtype(np.int32))], max_batch > 0)
        + _io_block("output", detection_outputs(max_det), max_batch > 0)
        + "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n"
        + _parameters({"letterbox": int(meta.letterbox), "letterbox_align": meta.convention().letterbox_align,
                       "input_hw": f"{model_input.shape[-2]},{model_input.shape[-1]}",
                       "conf_thres": conf_thres, "iou_thres": iou_thres, "max_det": max_det,
                       "nms_in_engine": int(nms_in_engine(meta))})
    )


def ensemble_config(name: str, pre: str, model: str, model_input: TensorSpec, outputs: list[TensorSpec], max_batch: int,
                    post: str | None = None, max_det: int = opt.SERVE_NMS.max_det) -> str:
    """preprocess -> model, and with `post` -> postprocess, whose final detections are the ensemble's outputs."""
    batched = max_batch > 0
    # with a postprocess step the model's outputs are internal tensors (raw_*): an engine with NMS inside names
    # its outputs num_dets/boxes/..., and an ensemble tensor may be written by one step only
    raw = "raw_" if post else ""
    out_maps = "\n".join(f'        {{ key: "{o.name}" value: "{raw}{o.name}" }}' for o in outputs)
    final = detection_outputs(max_det) if post else outputs + [TensorSpec("scale_pad", (-1, 3), np.dtype(np.float32))]
    steps = [
        f'    {{\n      model_name: "{pre}"\n      model_version: -1\n'
        + '      input_map { key: "frame" value: "frame" }\n'
        + f'      output_map {{ key: "{model_input.name}" value: "preprocessed" }}\n'
        # map only what a later step or the client reads: the detector's postprocess takes frame_hw, clients of
        # the raw outputs scale_pad
        + ('      output_map { key: "frame_hw" value: "frame_hw" }\n    }' if post else
           '      output_map { key: "scale_pad" value: "scale_pad" }\n    }'),
        f'    {{\n      model_name: "{model}"\n      model_version: -1\n'
        + f'      input_map {{ key: "{model_input.name}" value: "preprocessed" }}\n'
        + "      output_map [\n" + out_maps.replace("\n", ",\n") + "\n      ]\n    }",
    ]
    if post:
        in_maps = ",\n".join(f'        {{ key: "{o.name}" value: "{raw}{o.name}" }}' for o in outputs)
        in_maps += ',\n        { key: "frame_hw" value: "frame_hw" }'
        final_maps = ",\n".join(f'        {{ key: "{n}" value: "{n}" }}' for n in DETECTION_OUTPUTS)
        steps.append(f'    {{\n      model_name: "{post}"\n      model_version: -1\n'
                     + "      input_map [\n" + in_maps + "\n      ]\n"
                     + "      output_map [\n" + final_maps + "\n      ]\n    }")
    return (
        f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {max_batch}\n'
        + _io_block("input", [TensorSpec("frame", (-1, -1, -1, 3), np.dtype(np.uint8))], batched)
        + _io_block("output", final, batched)
        + "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n"
    )


PREPROCESS_MODEL_PY = '''"""Triton python-backend step written by `deploy triton`: BGR uint8 frames -> the model's input tensor.

Letterbox (detectors; centred or top-left, pad value) or resize (classifiers/segmenters), then the model's input
convention from the config parameters: channel order (BGR->RGB unless the model takes BGR), pixel scale (/255 or
none), (x - mean) / std with mean/std in scaled units, HWC->CHW.
Also returns scale_pad = (scale, pad_x, pad_y) so clients map boxes back to frame pixels: (xy - pad) / scale.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from edgedeploy.data.preprocess import InputConvention, to_input_tensor


def preprocess(frame, size, convention, dtype=np.float32):
    x, scale, (pad_x, pad_y) = to_input_tensor(frame, size, dtype=dtype, convention=convention)
    return x[0], np.array([scale, pad_x, pad_y], np.float32)


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        self.convention = InputConvention.from_dict(json.loads(params["convention"]))
        out = cfg["output"][0]
        self.out_name = out["name"]
        self.size = (int(out["dims"][-2]), int(out["dims"][-1]))
        self.dtype = np.float16 if out["data_type"] == "TYPE_FP16" else np.float32

    def execute(self, requests):
        responses = []
        for request in requests:
            frames = pb_utils.get_input_tensor_by_name(request, "frame").as_numpy()
            pairs = [preprocess(f, self.size, self.convention, self.dtype) for f in frames]
            x = np.stack([p[0] for p in pairs])
            sp = np.stack([p[1] for p in pairs])
            hw = np.array([f.shape[:2] for f in frames], np.int32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.out_name, x),
                                                         pb_utils.Tensor("scale_pad", sp),
                                                         pb_utils.Tensor("frame_hw", hw)]))
        return responses
'''


POSTPROCESS_MODEL_PY = '''"""Triton python-backend step written by `deploy triton` for detectors: the model's outputs -> final detections
in frame pixels, exactly as `edgedeploy.runtime.Detector` computes them: NMS with `edgedeploy.runtime.nms`
(unless the engine already ran it: `--nms trt/onnx`), then the letterbox undone with the same geometry.

Outputs, padded to max_det: num_dets [1] int32, det_boxes [max_det, 4] xyxy float32 frame pixels,
det_scores [max_det] float32, det_classes [max_det] int32.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from edgedeploy.data.preprocess import letterbox_geometry
from edgedeploy.runtime.nms import boxes_to_frame
from edgedeploy.runtime.pipelines import detection_rows


def postprocess(outs, frame_hw, input_hw, letterbox, conf_thres, iou_thres, max_det, align="center"):
    """outs: {model output name: [B, ...] array}; frame_hw [B, 2] -> (num [B,1], boxes, scores, classes)."""
    rows = detection_rows(outs, conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det)
    b = len(rows)
    num = np.zeros((b, 1), np.int32)
    boxes = np.zeros((b, max_det, 4), np.float32)
    scores = np.zeros((b, max_det), np.float32)
    classes = np.zeros((b, max_det), np.int32)
    for i, (r, (h, w)) in enumerate(zip(rows, frame_hw.tolist())):
        scale, pad, _ = letterbox_geometry(int(h), int(w), input_hw[0], input_hw[1], letterbox, align)
        k = min(len(r), max_det)
        num[i, 0] = k
        boxes[i, :k] = boxes_to_frame(r[:k, :4], scale, pad, int(h), int(w))
        scores[i, :k] = r[:k, 4]
        classes[i, :k] = r[:k, 5].astype(np.int32)
    return num, boxes, scores, classes


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        self.letterbox = p["letterbox"] == "1"
        self.align = p.get("letterbox_align", "center")
        self.input_hw = tuple(int(v) for v in p["input_hw"].split(","))
        self.conf_thres, self.iou_thres = float(p["conf_thres"]), float(p["iou_thres"])
        self.max_det = int(p["max_det"])
        self.inputs = [i["name"] for i in cfg["input"] if i["name"] != "frame_hw"]

    def execute(self, requests):
        responses = []
        for request in requests:
            outs = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs}
            hw = pb_utils.get_input_tensor_by_name(request, "frame_hw").as_numpy()
            num, boxes, scores, classes = postprocess(outs, hw, self.input_hw, self.letterbox, self.conf_thres,
                                                      self.iou_thres, self.max_det, self.align)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("num_dets", num), pb_utils.Tensor("det_boxes", boxes),
                pb_utils.Tensor("det_scores", scores), pb_utils.Tensor("det_classes", classes)]))
        return responses
'''


def write_triton_repo(
    artifact: str | Path,
    repo: str | Path,
    name: str | None = None,
    max_batch: int = 8,
    instances: int = 1,
    kind: str = "KIND_GPU",
    preferred_batch: list[int] | None = None,
    preprocess: bool | None = None,
    conf_thres: float = opt.SERVE_NMS.conf_thres,
    iou_thres: float = opt.SERVE_NMS.iou_thres,
) -> list[Path]:
    """Write the model (and for detectors by default, preprocess + postprocess + ensemble) into `repo`.
    Returns the model dirs."""
    artifact = Path(artifact)
    if not artifact.is_file():
        raise EdgeDeployError(f"artifact not found: {artifact}")
    if artifact.suffix == ".onnx":
        platform, filename = "onnxruntime_onnx", "model.onnx"
    elif artifact.suffix in (".engine", ".plan"):
        platform, filename = "tensorrt_plan", "model.plan"
    else:
        raise EdgeDeployError(f"{artifact.name}: expected a .onnx or .engine/.plan file")
    if kind not in ("KIND_GPU", "KIND_CPU"):
        raise EdgeDeployError(f"--kind must be KIND_GPU or KIND_CPU, not {kind}")
    if platform == "tensorrt_plan" and kind == "KIND_CPU":
        raise EdgeDeployError("a TensorRT plan runs on the GPU only: use --kind KIND_GPU")
    meta = read_sidecar(artifact, required=False)
    if meta is None:
        raise EdgeDeployError(
            f"no sidecar {artifact.name}.json beside {artifact}: it records the task, input, normalisation and "
            "batch the Triton configuration needs. Copy the .json that `deploy export` wrote with the artifact, "
            "or re-export: `deploy export --model NAME --out DIR` (add --dynamic-batch 1:8:16 for Triton batching)"
        )
    if platform == "tensorrt_plan" and meta.builder == "tensorrt-rtx":
        raise EdgeDeployError(
            f"{artifact.name} is a TensorRT-RTX {meta.builder_version} engine: it runs only with the TensorRT-RTX "
            "runtime on an RTX-class GPU, and Triton's TensorRT backend (platform tensorrt_plan) cannot load it. "
            "Serve the ONNX instead (`deploy triton --onnx ...`), or build a TensorRT plan with the TensorRT version "
            "of your Triton container (`deploy export --builder tensorrt` inside it)"
        )
    inputs, outputs = describe_io(artifact, meta)
    name = name or artifact.name.split(".")[0]

    dynamic_batch = bool(inputs[0].shape) and inputs[0].shape[0] == -1
    if dynamic_batch:
        max_batch = min(max_batch, int(meta.batch.get("max", max_batch)) or max_batch)
    else:
        # A fixed-batch artifact cannot be batched by Triton: describe its full shape instead.
        max_batch = 0

    repo = Path(repo)
    model_dir = repo / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    with atomic_path(model_dir / "1" / filename) as tmp:
        shutil.copyfile(artifact, tmp)
    atomic_write_text(model_dir / "config.pbtxt", model_config(name, platform, inputs, outputs, max_batch, instances, kind, preferred_batch))
    written = [model_dir]

    if preprocess is None:
        preprocess = meta.task == "detect"
    if preprocess:
        pre, ens = f"{name}_preprocess", f"{name}_pipeline"
        post = f"{name}_postprocess" if meta.task == "detect" else None
        max_det = int((meta.postprocess or {}).get("max_det", opt.SERVE_NMS.max_det))
        (repo / pre / "1").mkdir(parents=True, exist_ok=True)
        atomic_write_text(repo / pre / "1" / "model.py", PREPROCESS_MODEL_PY)
        atomic_write_text(repo / pre / "config.pbtxt", preprocess_config(pre, meta, inputs[0], max_batch))
        written.append(repo / pre)
        if post:
            (repo / post / "1").mkdir(parents=True, exist_ok=True)
            atomic_write_text(repo / post / "1" / "model.py", POSTPROCESS_MODEL_PY)
            atomic_write_text(repo / post / "config.pbtxt",
                              postprocess_config(post, meta, inputs[0], outputs, max_batch, conf_thres, iou_thres))
            written.append(repo / post)
        (repo / ens / "1").mkdir(parents=True, exist_ok=True)
        atomic_write_text(repo / ens / "config.pbtxt",
                          ensemble_config(ens, pre, name, inputs[0], outputs, max_batch, post, max_det))
        written.append(repo / ens)
    return written


def configure(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--engine", help="TensorRT engine (.engine/.plan) with its .json sidecar")
    src.add_argument("--onnx", help="ONNX file with its .json sidecar")
    p.add_argument("--repo", required=True, help="model repository directory to write into")
    p.add_argument("--name", help="model name in the repository (default: the artifact's stem)")
    p.add_argument("--max-batch", type=opt.TRITON_MAX_BATCH.arg, default=8, help="Triton max_batch_size (needs a dynamic-batch export)")
    p.add_argument("--instances", type=opt.INSTANCES.arg, default=1, help="execution instances per GPU")
    p.add_argument("--kind", default="KIND_GPU", choices=["KIND_GPU", "KIND_CPU"])
    p.add_argument("--preferred-batch", type=opt.BATCH.arg, nargs="*", help="preferred dynamic-batch sizes")
    p.add_argument("--preprocess", action=argparse.BooleanOptionalAction, default=None,
                   help="add a python-backend preprocess step and an ensemble (default: on for detectors; a detector's "
                        "ensemble also ends in NMS + boxes in frame pixels)")
    # detectors: the thresholds of the ensemble's final NMS step
    DETECT.add_flags(p, defaults={"conf_thres": opt.SERVE_NMS.conf_thres, "iou_thres": opt.SERVE_NMS.iou_thres},
                     only=("conf_thres", "iou_thres"))


def run(args: argparse.Namespace) -> int:
    written = write_triton_repo(
        args.engine or args.onnx, args.repo, args.name, args.max_batch, args.instances, args.kind,
        args.preferred_batch, args.preprocess, args.conf_thres, args.iou_thres,
    )
    for d in written:
        print(f"wrote {d}/config.pbtxt")
    meta = read_sidecar(args.engine, required=False) if args.engine else None
    if meta is not None and meta.builder == "tensorrt":
        print(f"note: this plan needs TensorRT {meta.builder_version or '(version not recorded)'} in the Triton "
              f"container (plans do not move between TensorRT versions) and a GPU of compute capability "
              f"{meta.compute_capability or '(not recorded)'}")
    print(f"start a server with: tritonserver --model-repository {Path(args.repo).resolve()}")
    return 0
