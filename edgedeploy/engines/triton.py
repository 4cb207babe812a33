"""`deploy triton`: a Triton Inference Server model repository from an exported engine or ONNX file.

Layout written (all files atomically; the artifact is copied, not linked, so the repository can be shipped):

    REPO/<name>/config.pbtxt             platform tensorrt_plan | onnxruntime_onnx, dynamic batching, instances
    REPO/<name>/1/model.plan|model.onnx
    REPO/<name>_preprocess/config.pbtxt  python backend: raw BGR frame -> letterboxed/normalised NCHW tensor
    REPO/<name>_preprocess/1/model.py
    REPO/<name>_pipeline/config.pbtxt    ensemble: preprocess -> model (clients send frames, get model outputs
                                         plus the letterbox `scale_pad` to map boxes back to frame pixels)

IO names, dtypes and dims come from the artifact's sidecar and, for shapes, from the ONNX graph (for an engine,
the ONNX it was built from: the file beside it whose sha256 the sidecar records).
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path

from edgedeploy import options as opt
from edgedeploy.engines.sidecar import ArtifactMeta, read_sidecar
from edgedeploy.errors import EdgeDeployError
from edgedeploy.io import atomic_path, atomic_write_text, sha256_file

ONNX_TO_TRITON = {
    1: "TYPE_FP32", 10: "TYPE_FP16", 6: "TYPE_INT32", 7: "TYPE_INT64", 2: "TYPE_UINT8", 3: "TYPE_INT8", 9: "TYPE_BOOL",
}
NAME_TO_TRITON = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
    "uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "bool": "TYPE_BOOL",
}


@dataclass
class TensorSpec:
    name: str
    data_type: str  # TYPE_FP32 ...
    dims: list[int]  # full shape, -1 for dynamic axes, batch axis included


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
        return TensorSpec(v.name, ONNX_TO_TRITON.get(t.elem_type, "TYPE_FP32"), dims)

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
    in_dims = [-1 if isinstance(d, str) else int(d) for d in meta.input_shape]
    inputs = [TensorSpec(meta.input_name, NAME_TO_TRITON.get(meta.input_dtype, "TYPE_FP32"), in_dims)]
    if not meta.output_names:
        raise EdgeDeployError(
            f"cannot describe the outputs of {artifact.name}: its sidecar lists none and the ONNX it was built from "
            "is not beside it. Keep the export folder together, or pass --onnx."
        )
    outputs = [TensorSpec(n, "TYPE_FP32", [-1]) for n in meta.output_names]
    return inputs, outputs


def _dims(spec: TensorSpec, batched: bool) -> str:
    dims = spec.dims[1:] if batched else spec.dims
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def _io_block(kind: str, specs: list[TensorSpec], batched: bool) -> str:
    items = [
        f"  {{\n    name: \"{s.name}\"\n    data_type: {s.data_type}\n    dims: {_dims(s, batched)}\n  }}" for s in specs
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
    h, w = (int(model_input.dims[-2]), int(model_input.dims[-1]))
    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
        + _io_block("input", [TensorSpec("frame", "TYPE_UINT8", [-1, -1, -1, 3])], max_batch > 0)
        + _io_block(
            "output",
            [TensorSpec(model_input.name, model_input.data_type, [-1, 3, h, w]), TensorSpec("scale_pad", "TYPE_FP32", [-1, 3])],
            max_batch > 0,
        )
        + "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n"
        + "parameters [\n"
        + f'  {{ key: "letterbox" value: {{ string_value: "{int(meta.letterbox)}" }} }},\n'
        + f'  {{ key: "mean" value: {{ string_value: "{",".join(str(m) for m in meta.mean)}" }} }},\n'
        + f'  {{ key: "std" value: {{ string_value: "{",".join(str(s) for s in meta.std)}" }} }}\n]\n'
    )


def ensemble_config(name: str, pre: str, model: str, model_input: TensorSpec, outputs: list[TensorSpec], max_batch: int) -> str:
    batched = max_batch > 0
    out_maps = "\n".join(f'        {{ key: "{o.name}" value: "{o.name}" }}' for o in outputs)
    return (
        f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {max_batch}\n'
        + _io_block("input", [TensorSpec("frame", "TYPE_UINT8", [-1, -1, -1, 3])], batched)
        + _io_block("output", outputs + [TensorSpec("scale_pad", "TYPE_FP32", [-1, 3])], batched)
        + "ensemble_scheduling {\n  step [\n"
        + f'    {{\n      model_name: "{pre}"\n      model_version: -1\n'
        + '      input_map { key: "frame" value: "frame" }\n'
        + f'      output_map {{ key: "{model_input.name}" value: "preprocessed" }}\n'
        + '      output_map { key: "scale_pad" value: "scale_pad" }\n    },\n'
        + f'    {{\n      model_name: "{model}"\n      model_version: -1\n'
        + f'      input_map {{ key: "{model_input.name}" value: "preprocessed" }}\n'
        + "      output_map [\n" + out_maps.replace("\n", ",\n") + "\n      ]\n    }\n  ]\n}\n"
    )


PREPROCESS_MODEL_PY = '''"""Triton python-backend step written by `deploy triton`: BGR uint8 frames -> the model's input tensor.

Letterbox (detectors) or resize (classifiers/segmenters), BGR->RGB, /255, (x - mean) / std, HWC->CHW.
Also returns scale_pad = (scale, pad_x, pad_y) so clients map boxes back to frame pixels: (xy - pad) / scale.
"""

import json

import cv2
import numpy as np
import triton_python_backend_utils as pb_utils


def preprocess(frame, size, letterbox, mean, std, dtype=np.float32):
    h_out, w_out = size
    h, w = frame.shape[:2]
    if letterbox:
        scale = min(h_out / h, w_out / w)
        nh, nw = int(round(h * scale)), int(round(w * scale))
        pad_y, pad_x = (h_out - nh) // 2, (w_out - nw) // 2
        canvas = np.full((h_out, w_out, 3), 114, np.uint8)
        canvas[pad_y:pad_y + nh, pad_x:pad_x + nw] = cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_LINEAR)
    else:
        scale, pad_x, pad_y = 1.0, 0, 0
        canvas = cv2.resize(frame, (w_out, h_out), interpolation=cv2.INTER_LINEAR)
    x = (canvas[:, :, ::-1].astype(np.float32) / 255.0 - mean) / std
    return x.transpose(2, 0, 1).astype(dtype), np.array([scale, pad_x, pad_y], np.float32)


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        self.letterbox = params.get("letterbox", "0") == "1"
        self.mean = np.array([float(v) for v in params["mean"].split(",")], np.float32)
        self.std = np.array([float(v) for v in params["std"].split(",")], np.float32)
        out = cfg["output"][0]
        self.out_name = out["name"]
        self.size = (int(out["dims"][-2]), int(out["dims"][-1]))
        self.dtype = np.float16 if out["data_type"] == "TYPE_FP16" else np.float32

    def execute(self, requests):
        responses = []
        for request in requests:
            frames = pb_utils.get_input_tensor_by_name(request, "frame").as_numpy()
            pairs = [preprocess(f, self.size, self.letterbox, self.mean, self.std, self.dtype) for f in frames]
            x = np.stack([p[0] for p in pairs])
            sp = np.stack([p[1] for p in pairs])
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.out_name, x), pb_utils.Tensor("scale_pad", sp)]))
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
) -> list[Path]:
    """Write the model (and for detectors by default, a preprocess + ensemble) into `repo`. Returns model dirs."""
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

    dynamic_batch = bool(inputs[0].dims) and inputs[0].dims[0] == -1
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
        (repo / pre / "1").mkdir(parents=True, exist_ok=True)
        atomic_write_text(repo / pre / "1" / "model.py", PREPROCESS_MODEL_PY)
        atomic_write_text(repo / pre / "config.pbtxt", preprocess_config(pre, meta, inputs[0], max_batch))
        (repo / ens / "1").mkdir(parents=True, exist_ok=True)
        atomic_write_text(repo / ens / "config.pbtxt", ensemble_config(ens, pre, name, inputs[0], outputs, max_batch))
        written += [repo / pre, repo / ens]
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
                   help="add a python-backend preprocess step and an ensemble (default: on for detectors)")


def run(args: argparse.Namespace) -> int:
    written = write_triton_repo(
        args.engine or args.onnx, args.repo, args.name, args.max_batch, args.instances, args.kind,
        args.preferred_batch, args.preprocess,
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
