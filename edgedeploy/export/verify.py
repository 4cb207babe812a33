"""`deploy verify ARTIFACT [--weights CKPT] [--data DIR]`: re-prove an exported artifact against its PyTorch model.

The artifact's sidecar records how its PyTorch model was made (`provenance`: the checkpoint path and sha256, or
seeded random weights and the seed, the task options, the input size); verify rebuilds that model exactly and
runs the same parity proof as `deploy export` (same inputs, same tolerance, same spread check, same table).

Exit codes: 0 proved; 4 the artifact disagrees with PyTorch (or its outputs do not depend on the input);
3 an engine with no runtime for it on this machine (TensorRT + an NVIDIA GPU); 1 bad input (no sidecar,
a truncated or non-ONNX file, a checkpoint of another model, a missing checkpoint).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgedeploy import options as opt
from edgedeploy.errors import CheckpointError, EdgeDeployError, RuntimeUnavailableError

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
# FP16 / INT8 artifacts are not element-wise equal to FP32 PyTorch: they are judged, as at export, by the task's
# agreement with the reference (top-1 / detections / pixels) on the parity inputs.
MIN_AGREEMENT = {"fp16": 0.99, "int8": 0.9}


@dataclass
class VerifyResult:
    artifact: str
    model: str
    precision: str
    random_weights: bool
    passed: bool
    figure: str
    table: str
    parity: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", help="an exported .onnx (with its .json sidecar) or a TensorRT .engine")
    parser.add_argument("--weights", help="checkpoint to prove against (default: the one the sidecar records; "
                                          "exports made without --weights are rebuilt from their seed)")
    parser.add_argument("--data", metavar="DIR", help="prove on these images instead of the synthetic inputs")
    parser.add_argument("--images", type=opt.EVAL_IMAGES.arg, help="parity inputs (default: as at export)")
    parser.add_argument("--rtol", type=opt.TOLERANCE.arg, help="default: the tolerance recorded at export")
    parser.add_argument("--atol", type=opt.TOLERANCE.arg, help="default: the tolerance recorded at export")
    parser.add_argument("--report", metavar="FILE", help="also write the result as JSON")


def _read_meta(path: Path):
    """(sidecar, whether it is the artifact's own: its onnx_sha256 then describes this file)."""
    from edgedeploy.models.artifact import read_sidecar, sidecar_path

    side = sidecar_path(path)
    if not side.exists() and path.name.endswith(".raw.onnx"):  # the raw export shares the simplified one's model
        alt = path.with_name(path.name[: -len(".raw.onnx")] + ".onnx")
        if sidecar_path(alt).exists():
            return read_sidecar(alt), False  # the raw export's own sha256 is not recorded
    if not side.exists():
        raise EdgeDeployError(
            f"no sidecar {side.name} beside {path.name}: verify needs it to rebuild the PyTorch model (model name, "
            "weights or seed, input size). Verify an artifact written by `deploy export`, with its .json beside it."
        )
    meta = read_sidecar(path)
    return meta, True


def _check_provenance(meta, side_name: str) -> None:
    if not meta.provenance:
        raise EdgeDeployError(
            f"{side_name} does not record how the model was made (exported by an older edgedeploy): re-export it "
            "with `deploy export` to verify it"
        )


def _check_onnx(path: Path) -> None:
    """A clear error for a truncated or non-ONNX file (before ONNX Runtime's own message)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001  (protobuf DecodeError, checker errors, ...)
        raise EdgeDeployError(
            f"{path} is not a readable ONNX model ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}): "
            "the file is truncated or corrupt; re-export it with `deploy export`"
        ) from e


def _engine_runner(path: Path) -> Callable[[np.ndarray], list[np.ndarray]]:
    import torch

    if importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available():
        raise RuntimeUnavailableError(
            f"no runtime for this engine here: {path.name} runs with TensorRT on an NVIDIA GPU "
            f"({'`import tensorrt` fails' if importlib.util.find_spec('tensorrt') is None else 'no CUDA GPU'} on "
            "this machine). Verify it where it runs, or verify the ONNX it was built from "
            "(`deploy verify MODEL.onnx`)."
        )
    from edgedeploy.export.parity import engine_runner
    from edgedeploy.runtime.loader import load_engine

    return engine_runner(load_engine(path))


def _check_weights(weights: str, model: str) -> None:
    from edgedeploy.models.checkpoint import read_checkpoint_meta

    name = read_checkpoint_meta(weights).model_name
    if name:
        from edgedeploy.models.registry import get_model_info

        if get_model_info(str(name)).name != model:
            raise CheckpointError(f"{weights} is a checkpoint of {name}, but the artifact is {model}: pass the "
                                  f"checkpoint {model} was exported from")


def verify(artifact: str, weights: str | None = None, data: str | None = None, images: int | None = None,
           rtol: float | None = None, atol: float | None = None,
           log: Callable[[str], None] | None = None) -> VerifyResult:
    """Re-prove `artifact` against its PyTorch model; raises ParityError (exit 4) when it disagrees."""
    from edgedeploy.export.options import ExportOptions
    from edgedeploy.export.parity import figure
    from edgedeploy.export.pipeline import RANDOM_WEIGHTS_LINE, _Exporter, check_insensitive, raise_if_failed
    from edgedeploy.io import sha256_file

    log = log or (lambda s: None)
    path = Path(artifact)
    if not path.is_file():
        raise EdgeDeployError(f"{artifact}: no such file")
    meta, own_sidecar = _read_meta(path)
    _check_provenance(meta, path.name + ".json")
    prov = meta.provenance
    is_engine = path.suffix in ENGINE_SUFFIXES
    random_weights = bool(prov.get("random_weights"))
    notes: list[str] = []
    if weights is None and not random_weights:
        weights = prov.get("weights")
        if not weights or not Path(weights).is_file():
            raise CheckpointError(f"{path.name} was exported from {weights or 'a checkpoint'}, which is not here: "
                                  "pass it with --weights CKPT")
    if weights is not None:
        _check_weights(weights, meta.model)
        random_weights = False
        if prov.get("weights_sha256") and sha256_file(weights) != prov["weights_sha256"]:
            notes.append(f"{weights} is not the checkpoint recorded at export (sha256 differs)")
    if random_weights:
        log(RANDOM_WEIGHTS_LINE.format(seed=prov.get("seed", 0)))
    log(f"verify {path.name} ({meta.model}, {meta.precision}) against PyTorch "
        + (f"weights {weights}" if weights else f"re-initialised from seed {prov.get('seed', 0)}"))

    runner: Callable[[np.ndarray], list[np.ndarray]] | None = None
    if is_engine:
        runner = _engine_runner(path)
    else:
        _check_onnx(path)
        if own_sidecar and meta.onnx_sha256 and sha256_file(path) != meta.onnx_sha256:
            notes.append(f"{path.name} changed since export (sha256 differs from its sidecar)")

    batch = meta.batch or {}
    dynamic = isinstance(meta.input_shape[0], str) if meta.input_shape else False
    options = ExportOptions(
        model=meta.model, weights=weights, num_classes=prov.get("num_classes"), imgsz=prov.get("imgsz"),
        batch=int(batch.get("opt", 1)), out=str(path.parent),
        dynamic_batch=(int(batch["min"]), int(batch["opt"]), int(batch["max"])) if dynamic else None,
        parity_inputs=int(images or prov.get("parity_inputs") or 4), reinit=random_weights,
        seed=int(prov.get("seed", 0)), task_options=dict(prov.get("task_options") or {}),
        model_kwargs=dict(prov.get("model_kwargs") or {}),
        rtol=rtol if rtol is not None else prov.get("rtol"), atol=atol if atol is not None else prov.get("atol"),
        calib="synthetic", eval_data="synthetic", progress=False,
        builder="none",  # verify builds nothing; and a builder would re-fit the NMS mode the sidecar already records
    )
    t0 = time.perf_counter()
    exporter = _Exporter(options, log, writes=False)
    inputs = None
    if data:
        from edgedeploy.export.calibration import read_image_dir

        imgs, skipped = read_image_dir(data, options.parity_inputs)
        inputs = [exporter.adapter.preprocess(i, exporter.info, exporter.imgsz) for i in imgs]
        if skipped:
            notes.append(f"{skipped} unreadable image(s) under {data} skipped")
    flat: list[str] = []
    try:
        if meta.precision in MIN_AGREEMENT:
            if runner is None:
                from edgedeploy.export.parity import engine_runner, onnx_engine

                runner = engine_runner(onnx_engine(path))
            k = len(exporter.output_names)
            pairs = [(x, ref[:k]) for x, ref in exporter.parity_reference(inputs)]
            result = _prove_low_precision(exporter, pairs, runner, meta.precision)
        else:
            result, flat = exporter.prove(path, inputs, runner)
    except EdgeDeployError:
        raise
    except Exception as e:  # noqa: BLE001  (ORT refusing the graph, or inputs/outputs of another model)
        raise EdgeDeployError(f"{path.name} cannot run as {meta.model}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:300] if str(e) else ''}") from e
    result.notes += notes
    check_insensitive(result, flat, random_weights, path.name, log)
    out = VerifyResult(str(path), meta.model, meta.precision, random_weights,
                       result.passed and not (flat and random_weights), figure(result), result.table(),
                       {**result.to_dict(), "time_s": time.perf_counter() - t0}, result.notes)
    for n in notes:
        log(f"  note: {n}")
    log(result.table())
    for n in result.notes:
        if n not in notes and not n.startswith("batches:"):
            log(f"  {n}")
    raise_if_failed(result, flat, random_weights, path.name, "the table above")
    return out


def _prove_low_precision(exporter, pairs, runner, precision: str):
    """FP16/INT8: the export's own judgement (the task's agreement with the reference), here against PyTorch;
    max-abs / max-relative figures are recorded, not judged."""
    from edgedeploy.export.parity import ParityResult, compare_outputs
    from edgedeploy.export.tasks.base import EvalData

    refs = {id(x): r for x, r in pairs}
    got = {id(x): runner(x) for x, _ in pairs}
    metrics = exporter.adapter.evaluate(lambda x: got[id(x)], EvalData([x for x, _ in pairs]),
                                        reference_fn=lambda x: refs[id(x)])
    agreement = float(metrics.get("agreement", 0.0))
    idx = [i for i, o in enumerate(pairs[0][1]) if np.asarray(o).dtype.kind == "f"]
    figures = compare_outputs([exporter.output_names[i] for i in idx],  # FP32 tolerance: figures, not judged
                              [np.concatenate([r[i] for _, r in pairs]) for i in idx],
                              [np.concatenate([got[id(x)][i] for x, _ in pairs]) for i in idx],
                              exporter.rtol, exporter.atol)
    need = MIN_AGREEMENT[precision]
    result = ParityResult(agreement >= need, exporter.rtol, exporter.atol, figures.outputs,
                          sum(int(x.shape[0]) for x, _ in pairs),
                          [f"{precision}: agreement with PyTorch {agreement:.3f} (needs >= {need}); max_abs and "
                           "max_rel are figures only at this precision"])
    for o in result.outputs:
        o.passed = result.passed
    return result


def run(args: argparse.Namespace) -> int:
    def log(line: str) -> None:
        print(line, flush=True)

    res = verify(args.artifact, weights=args.weights, data=args.data, images=args.images, rtol=args.rtol,
                 atol=args.atol, log=log)
    if args.report:
        from dataclasses import asdict

        from edgedeploy.io import atomic_write_json

        atomic_write_json(args.report, asdict(res))
    print(f"verified: {res.figure}")
    return 0


__all__ = ["VerifyResult", "configure", "run", "verify"]
