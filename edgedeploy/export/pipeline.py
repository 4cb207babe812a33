"""The export pipeline behind `deploy export` and `edgedeploy.export.export()`.

torch -> ONNX (+checker) -> parity (raw) -> simplify -> parity (simplified) -> FP16 ONNX -> INT8 Q/DQ ONNX ->
engines. Each step is recorded in export_report.json with a reuse key: re-running with the same inputs reuses
every artifact whose key and file are unchanged (`force=True` rebuilds all).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgedeploy.models.artifact import ArtifactMeta, write_sidecar
from edgedeploy.errors import BuilderUnavailableError, EdgeDeployError, EngineBuildError, ParityError
from edgedeploy.export.options import BUILDERS, ExportOptions
from edgedeploy.export.parity import (ParityResult, add_probe_outputs, engine_runner, figure as parity_figure,
                                     onnx_engine, prove, torch_engine)
from edgedeploy.export.report import REPORT_NAME, ExportReport, Step, load_report
from edgedeploy.io import missing_dirs, sha256_file
from edgedeploy.export.tasks.base import EvalData, TaskAdapter, get_task_adapter

FAILED_REPORT_NAME = "export_report.failed.json"  # the last failed run, beside the good report
_CODE_FILES = ("onnx_export.py", "simplify.py", "parity.py", "fp16.py", "int8.py", "weights.py", "pipeline.py")


def code_version() -> str:
    """edgedeploy version + a hash of the export code: a code change invalidates reused artifacts."""
    from edgedeploy.version import __version__

    h = hashlib.sha256(__version__.encode())
    here = Path(__file__).parent
    for name in _CODE_FILES:
        h.update((here / name).read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise EdgeDeployError(
            f"output directory {out_dir} is not writable ({e.strerror or e}): pass --out DIR with a folder you can write"
        ) from e


def select_builder(name: str) -> tuple[str, str]:
    """('tensorrt'|'tensorrt-rtx'|'none', reason). 'auto' prefers TensorRT, then TensorRT-RTX."""
    import importlib.util

    if name not in BUILDERS:
        raise EdgeDeployError(f"unknown builder {name!r}: choose one of {', '.join(BUILDERS)}")
    has_trt = importlib.util.find_spec("tensorrt") is not None
    has_rtx = importlib.util.find_spec("tensorrt_rtx_bindings") is not None
    if name == "none":
        return "none", "--builder none"
    if name == "tensorrt":
        if not has_trt:
            from edgedeploy.engines.tensorrt_builder import INSTALL_HINT

            raise BuilderUnavailableError(INSTALL_HINT)
        return "tensorrt", ""
    if name == "tensorrt-rtx":
        if not has_rtx:
            from edgedeploy.engines.rtx_builder import INSTALL_HINT

            raise BuilderUnavailableError(INSTALL_HINT)
        return "tensorrt-rtx", ""
    if has_trt:
        return "tensorrt", ""
    if has_rtx:
        return "tensorrt-rtx", ""
    from edgedeploy.engines.tensorrt_builder import INSTALL_HINT

    return "none", INSTALL_HINT


def _fraction(v: float, name: str = "") -> str:
    """A metric in [0, 1] with the digits that show a difference: agreement 0.9995 is not "1.000"."""
    text = f"{v:.4f}" if name == "agreement" else f"{v:.3f}"
    if v != 1.0 and float(text) == 1.0:  # closer to 1 than the digits show
        text = f"{v:.7f}".rstrip("0")
    return text


def _progress(enabled: bool, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False, disable=not enabled)


def reinit_inputs(imgsz: int) -> int:
    """Image-like inputs the re-initialisation calibrates BatchNorm statistics on: enough that the deepest
    (stride-32) layers see >= 1024 values per channel, 16 to 256 inputs. With fewer, statistics of a 2x2 map
    over a handful of images left MobileNetV3's logits 10-30x larger on other images than on those, and float
    noise with them (mobilenetv3_large at 224 px with 4 inputs, mobilenetv3_small at 64 px with 16)."""
    cells = max(1, (imgsz // 32) ** 2)
    return int(min(256, max(16, -(-1024 // cells))))


RANDOM_WEIGHTS_LINE = ("random weights: parity proof only (no --weights: weights re-drawn from --seed {seed} and "
                       "BatchNorm-calibrated so the outputs depend on the input; not a usable model)")


def check_insensitive(result: ParityResult, flat: list[str], random_weights: bool, artifact: str,
                      log: Callable[[str], None]) -> None:
    """Record (and with user weights, print) outputs that barely move across the parity inputs."""
    if not flat:
        return
    note = "outputs that barely depend on the input (weak evidence): " + ", ".join(flat)
    result.notes.append(note)
    if not random_weights:
        log(f"  warning: {artifact}: {note}; trained weights or --data with real images give a stronger proof")


def raise_if_failed(result: ParityResult, flat: list[str], random_weights: bool, artifact: str,
                    report_path: Path | str) -> None:
    """ParityError on a mismatch; InsensitiveProofError when re-initialised weights gave input-insensitive outputs
    (a proof over such outputs cannot fail, so it is refused)."""
    from edgedeploy.errors import InsensitiveProofError

    if not result.passed:
        raise ParityError(
            f"{artifact} disagrees with PyTorch beyond rtol={result.rtol:g}, atol={result.atol:g}:\n{result.table()}\n"
            f"details in {report_path}"
        )
    if flat and random_weights:
        raise InsensitiveProofError(
            f"parity proof of {artifact} refused: with re-initialised weights the outputs hardly depend on the input "
            f"({', '.join(flat)}), so agreement within atol proves nothing:\n{result.table()}\n"
            "This is a bug in the re-initialisation for this model (please report it); exporting with trained "
            "--weights avoids it."
        )


class _Exporter:
    def __init__(self, options: ExportOptions, log: Callable[[str], None], writes: bool = True):
        """`writes=False` (deploy verify): nothing is written, nothing reused; only the model and the proof."""
        from edgedeploy.models.registry import get_model_info

        self.o = options
        self.log = log
        self.info = get_model_info(options.model)
        self.adapter: TaskAdapter = get_task_adapter(self.info.task)
        from edgedeploy.models.artifact import describe_artifact

        # the checkpoint's meta (ours: num_classes, class_names, imgsz; official: source, input convention, class
        # count) gives the defaults; the image size is validated against the task's and the model's multiple here
        self.described = describe_artifact(options.weights, model=self.info.name, imgsz=options.imgsz,
                                           batch=options.batch_shape[2])
        self.imgsz = int(self.described.imgsz)
        self.name = self.info.name
        self.ckpt_meta = self.described.checkpoint.as_dict() if self.described.checkpoint else {}
        self._apply_input_convention()
        self._class_names = [str(c) for c in self.ckpt_meta.get("class_names") or []]
        self._resolve_data_sources()
        if options.fp16 or options.int8:
            self.eval_data()  # bad held-out data (classes, masks, labels) stops here, before anything is written
        self.out = Path(options.out) / self.name
        self._new_dirs = missing_dirs(self.out) if writes else []  # removed again if a failed run leaves them empty
        if writes:
            _check_writable(self.out)
        self._prior = load_report(self.out) if writes else None  # kept (reuse keys included) if this run fails
        self.previous = None if options.force else self._prior
        self._started = time.time()
        self.weights_sha = sha256_file(options.weights) if options.weights and Path(options.weights).is_file() else None
        self.code = code_version()
        self.report = ExportReport(
            model=self.name,
            task=self.info.task,
            out_dir=str(self.out),
            imgsz=self.imgsz,
            options=options.to_dict(),
            environment=self._environment(),
        )
        from edgedeploy.export.simplify import tool_order

        tool_order(options.simplifier)  # an unknown --simplifier fails before anything is written
        self.nms_choice, self.nms_unbuildable = self._fit_to_builder()
        if options.int8 and not self._runs_in_ort():
            raise EdgeDeployError("--int8 needs ONNX Runtime to calibrate the FP32 graph, and it cannot run the "
                                  "EfficientNMS_TRT plugin node of --nms trt: export with --nms onnx or --nms none")
        self.input_names = self.adapter.input_names(options)
        self.output_names = self.adapter.output_names(options)
        rtol, atol = self.adapter.parity_tolerance("fp32")
        self.rtol = options.rtol if options.rtol is not None else rtol
        self.atol = options.atol if options.atol is not None else atol
        self.random_weights = bool(options.reinit if options.reinit is not None else not options.weights)
        self._model = None

    # ----------------------------------------------------------------------------------------------- helpers
    def _resolve_data_sources(self) -> None:
        """Where calibration and held-out images come from. Unset --calib/--eval-data: a `deploy train` checkpoint
        records its dataset (absolute path); its train split calibrates INT8 and its val split measures FP16/INT8
        (top-1, mAP or mIoU), for every task. Recorded data that is gone, or weights that record none, stop the
        export with an error naming the flag to pass: synthetic images are used only when asked for
        (`synthetic`), for a checkpoint trained on them, or for re-initialised weights (no checkpoint at all).
        Calibrating a detector on images that are not its own is what costs INT8 most: measured on yolox_nano,
        3-class synthetic renders gave mAP@.5:.95 0.025 against 0.326 with its training images (FP32 0.368)."""
        from edgedeploy.data.sources import missing_data_error, recorded_data, split_images
        from edgedeploy.errors import DatasetError

        o = self.o
        task = self.info.task
        rec = recorded_data(self.ckpt_meta)
        self.recorded = rec
        needs_calib = o.int8 and o.calib is None
        needs_eval = (o.int8 or o.fp16) and o.eval_data is None
        root = self.adapter.recorded_data_root(self.ckpt_meta, rec)
        if root is None and o.weights and not rec.synthetic and (needs_calib or needs_eval):
            flags = ([("--calib DIR (images like the training set's) or --calib synthetic")] if needs_calib else []) + (
                ["--eval-data DIR (a labelled val split) or --eval-data synthetic"] if needs_eval else [])
            raise missing_data_error(o.weights, rec, " and ".join(flags))
        self.data_root = root
        self.calib_files: list[Path] | None = None
        self.calib_where = "synthetic"
        if o.calib is None and root is not None:
            files, folder, layout = split_images(root, task, "train")
            o.calib, self.calib_files, self.calib_where = str(folder), files, f"{folder} (train split, {layout})"
        elif o.calib is None:
            o.calib = "synthetic"
            self.calib_where = ("synthetic renders (trained on the synthetic set)" if rec.synthetic else
                                "synthetic renders (no checkpoint: re-initialised weights)")
        elif o.calib != "synthetic":
            calib = Path(o.calib)
            if not calib.exists():
                raise DatasetError(f"--calib {o.calib}: not found; pass a folder of images, a dataset folder (its "
                                   "train split is used), or `--calib synthetic`")
            try:
                files, folder, layout = split_images(calib, task, "train")
                self.calib_files, self.calib_where = files, f"{folder} (train split, {layout})"
            except DatasetError:
                from edgedeploy.export.calibration import list_images

                self.calib_files, self.calib_where = list_images(calib), f"{calib} (folder of images)"
        else:
            self.calib_where = "synthetic renders (--calib synthetic)"
        if self.calib_files is not None and not self.calib_files:
            raise DatasetError(f"--calib {o.calib}: no images in {self.calib_where}")
        if o.eval_data is None:
            o.eval_data = str(root) if root is not None else "synthetic"
        if o.eval_data != "synthetic" and not Path(o.eval_data).exists():
            raise DatasetError(f"--eval-data {o.eval_data}: not found; pass a labelled dataset folder (its val "
                               "split is used) or `--eval-data synthetic`")
        ignore = o.ignore_index if o.ignore_index is not None else self.ckpt_meta.get("ignore_index")
        self.adapter.dataset_meta = {"class_names": self._class_names, "ignore_index": ignore}
        if self.calib_files:  # parity inputs from the model's own kind of images, not synthetic renders
            self.adapter.image_files = self.calib_files

    def _fit_to_builder(self) -> tuple[dict[str, str] | None, str]:
        """The task options fitted to the builder that will run (the adapter's `fit_to_builder`): (the choice
        recorded in the report and sidecars, or None; why an explicitly asked option cannot be built, or "")."""
        try:
            builder, _ = select_builder(self.o.builder)
        except BuilderUnavailableError:
            return None, ""  # reported by step_engines
        if builder == "none":
            return None, ""
        new_options, choice, unbuildable = self.adapter.fit_to_builder(self.o, builder)
        if new_options is not None:
            self.o.task_options = new_options
            self.report.options["task_options"] = dict(new_options)
        return choice, unbuildable

    def _apply_input_convention(self) -> None:
        """The input convention travels with the weights: an official checkpoint's (or one fine-tuned from it),
        unless --input-convention names another; every preprocessing path then reads it from `self.info`."""
        from edgedeploy.data.preprocess import convention_for, preset, with_convention

        for note in self.ckpt_meta.get("notes") or []:
            self.log(f"  weights: {note}")
        conv = self.ckpt_meta.get("preprocess")
        if self.o.input_convention:
            conv = preset(self.o.input_convention)
        self.info = with_convention(self.info, conv)
        c = convention_for(self.info)
        self.convention = c
        if conv:
            self.log(f"  input convention: {c.channel_order.upper()}, scale {c.scale:.6g}, mean {list(c.mean)}, "
                     f"std {list(c.std)}, {c.resize} ({c.letterbox_align if c.letterbox else c.interpolation})")

    def _environment(self) -> dict[str, str]:
        import onnx
        import onnxruntime
        import torch

        return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                "code": code_version()}

    def path(self, suffix: str) -> Path:
        return self.out / f"{self.name}{suffix}"

    def reusable(self, name: str, key: str) -> Step | None:
        """The previous run's step when its key matches and all its artifacts are still there."""
        prev = self.previous.step(name) if self.previous else None
        if prev and prev.key == key and prev.status in ("ok", "reused") and all((self.out / a).exists() for a in prev.artifacts):
            prev.status = "reused"
            prev.time_s = 0.0
            return prev
        return None

    def record(self, step: Step) -> Step:
        self.report.add(step)
        for a in step.artifacts:
            self.report.artifacts[step.name if len(step.artifacts) == 1 else a] = a
        if self._prior is None or self._redone():  # a run that only reused steps leaves the good report as it was
            self._report_so_far().write()
        self.log(f"  {step.name:<20} {step.status:<7} {step.time_s:6.1f}s  {step.figure}")
        return step

    def _report_so_far(self, started: float | None = None) -> ExportReport:
        """This run's steps over the previous report's: steps not reached yet keep their entries and reuse
        keys (the keys chain on upstream keys, so a changed ONNX still invalidates what was built from it).
        `started`: also drop kept steps whose artifacts were rewritten since then (by this failed run; 2 s of
        slack for file systems with coarse timestamps: at worst a step is redone)."""
        if self._prior is None:
            return self.report
        done = {s.name for s in self.report.steps}
        kept = [s for s in self._prior.steps if s.name not in done and not (
            started is not None and any((self.out / a).exists() and (self.out / a).stat().st_mtime >= started - 2.0
                                        for a in s.artifacts))]
        merged = copy.copy(self.report)
        merged.steps = list(self.report.steps) + kept
        merged.artifacts = {**self._prior.artifacts, **self.report.artifacts}
        return merged

    def _redone(self) -> bool:
        """Whether this run rewrote any artifact (a step not reused)."""
        return any(s.status != "reused" for s in self.report.steps)

    def _failed(self, err: BaseException) -> None:
        """A failed or interrupted run: the report keeps every good step (the previous run's included), the
        failure goes beside it in export_report.failed.json, and folders this run created empty are removed."""
        from edgedeploy.io import atomic_write_json, remove_empty_dirs

        try:
            if self.out.is_dir() and (self.report.steps or self._prior is not None):
                if self._prior is None or self._redone():
                    self._report_so_far(started=self._started).write()
                atomic_write_json(self.out / FAILED_REPORT_NAME, {
                    "error": f"{type(err).__name__}: {err}" if str(err) else type(err).__name__,
                    "interrupted": isinstance(err, KeyboardInterrupt),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "steps": [vars(s) for s in self.report.steps],
                })
        finally:
            remove_empty_dirs(self._new_dirs)

    def meta(self, precision: str, input_dtype: str = "float32") -> ArtifactMeta:
        mn, opt, mx = self.o.batch_shape
        return ArtifactMeta(
            model=self.name,
            task=self.info.task,
            input_name=self.input_names[0],
            input_shape=["batch" if self.o.dynamic_batch else opt, 3, self.imgsz, self.imgsz],
            input_dtype=input_dtype,
            output_names=self.output_names,
            mean=self.convention.unit_mean_std()[0],
            std=self.convention.unit_mean_std()[1],
            letterbox=self.convention.letterbox,
            preprocess=self.convention.to_dict(),
            source=str(self.ckpt_meta.get("source", "")),
            class_names=self._class_names,
            precision=precision,
            batch={"min": mn, "opt": opt, "max": mx},
            postprocess={**self.adapter.sidecar_postprocess(self.o), **self.adapter.dataset_postprocess(self.adapter.dataset_meta, self.ckpt_meta),
                         **({"nms_choice": self.nms_choice["reason"]} if self.nms_choice else {})},
            data=self._sidecar_data(),
            builder="torch.onnx",
            builder_version=self.report.environment.get("torch", ""),
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            provenance=self.provenance(),
        )

    def _sidecar_data(self) -> dict[str, Any]:
        """The training data as the checkpoint records it, so `deploy eval X.onnx` finds it without --data."""
        rec = self.recorded
        if rec.path is None and not rec.synthetic:
            return {}
        return {"path": rec.path if not rec.synthetic or rec.found else "synthetic", "as_typed": rec.as_typed,
                "layout": self.ckpt_meta.get("data_layout", ""), "synthetic": rec.synthetic,
                "synthetic_params": self.ckpt_meta.get("synthetic") or (self.ckpt_meta.get("train_args") or {}).get("synthetic")}

    def provenance(self) -> dict[str, Any]:
        """What `deploy verify` needs to rebuild the identical PyTorch model and proof."""
        o = self.o
        return {"weights": str(Path(o.weights).resolve()) if o.weights else None, "weights_sha256": self.weights_sha,
                "random_weights": self.random_weights, "seed": o.seed, "num_classes": o.num_classes,
                "imgsz": self.imgsz, "task_options": dict(o.task_options), "parity_inputs": o.parity_inputs,
                "rtol": self.rtol, "atol": self.atol,
                "model_kwargs": {**(self.ckpt_meta.get("model_kwargs") or {}), **o.model_kwargs}}

    def write_onnx_sidecar(self, onnx_path: Path, precision: str, input_dtype: str = "float32") -> None:
        m = self.meta(precision, input_dtype)
        m.onnx_sha256 = sha256_file(onnx_path)
        write_sidecar(onnx_path, m)

    def rng(self, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.o.seed, stream])

    # ----------------------------------------------------------------------------------------------- model
    def model(self):
        if self._model is not None:
            return self._model
        from edgedeploy.models.registry import create_model

        model = create_model(self.name, num_classes=self.o.num_classes or self.ckpt_meta.get("num_classes"),
                             weights=self.o.weights, **self.o.model_kwargs).eval()
        wrapped = self.adapter.wrap_for_export(model, self.o).eval()
        self.reinit_info = {"reinitialised": self.random_weights}
        if self.random_weights:
            sample = np.concatenate(self.adapter.sample_inputs(self.info, self.imgsz, reinit_inputs(self.imgsz),
                                                               self.rng(9)))
            self.reinit_info.update(self.adapter.reinitialise_for_parity(wrapped, sample, seed=self.o.seed))
        self._model = wrapped
        return wrapped

    def parity_batches(self, inputs: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """Parity inputs (default: the adapter's sample inputs) grouped into the batch sizes the artifact
        accepts (dynamic: max batch and 1)."""
        if inputs is None:
            inputs = self.adapter.sample_inputs(self.info, self.imgsz, self.o.parity_inputs, self.rng(1))
        mn, opt, mx = self.o.batch_shape

        def chunks(size: int) -> list[np.ndarray]:
            out = []
            for i in range(0, len(inputs), size):
                group = inputs[i:i + size]
                group += [group[j % len(group)] for j in range(size - len(group))]  # pad by repetition
                out.append(np.concatenate(group))
            return out

        if self.o.dynamic_batch:  # every image compared in a full batch, and the smallest batch too
            return chunks(mx) + [np.concatenate(inputs[:mn])] if mn <= len(inputs) else chunks(mx)
        return chunks(opt)

    # ----------------------------------------------------------------------------------------------- steps
    def step_onnx(self) -> Path:
        raw = self.path(".raw.onnx")
        opts = self.o
        key = _key("onnx", self.name, self.weights_sha, opts.num_classes, self.imgsz, opts.opset, opts.batch_shape,
                   bool(opts.dynamic_batch), opts.reinit, opts.seed, opts.task_options, self.code)
        if self.reusable("onnx_export", key):
            self.record(self.report_prev("onnx_export"))
            return raw
        from edgedeploy.export.onnx_export import export_onnx

        t0 = time.perf_counter()
        model = self.model()
        sample = np.concatenate([self.adapter.sample_inputs(self.info, self.imgsz, 1, self.rng(2))[0]] * opts.batch_shape[1])
        proto = export_onnx(model, sample, raw, self.input_names, self.output_names,
                            self.adapter.dynamic_axes(opts), opts.opset)
        details = {"opset": opts.opset, "nodes": len(proto.graph.node), "checker": "passed",
                   "inputs": self.input_names, "outputs": self.output_names,
                   "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in self.adapter.dynamic_axes(opts).items()},
                   **self.reinit_info}
        self.record(Step("onnx_export", "ok", time.perf_counter() - t0,
                         f"{len(proto.graph.node)} nodes, opset {opts.opset}, checker ok", details, key, [raw.name]))
        return raw

    def report_prev(self, name: str) -> Step:
        return self.previous.step(name)  # type: ignore[union-attr]

    def parity_reference(self, inputs: list[np.ndarray] | None = None) -> list[tuple[np.ndarray, list[np.ndarray]]]:
        """(input batch, PyTorch outputs + probe outputs) pairs; the default inputs' are shared by the raw and
        simplified proofs."""
        if inputs is None and hasattr(self, "_parity_ref"):
            return self._parity_ref
        probes = self.probes()
        torch_run = engine_runner(torch_engine(self.model(), self.input_names[0],
                                               self.output_names + [n for n, _ in probes], [m for _, m in probes]))
        pairs = [(x, torch_run(x)) for x in self.parity_batches(inputs)]
        if inputs is None:
            self._parity_ref = pairs
        return pairs

    def probes(self) -> list[tuple[str, Any]]:
        if not hasattr(self, "_probes"):
            self._probes = self.adapter.parity_probes(self.model(), self.o)
        return self._probes

    def prove(self, artifact: Path, inputs: list[np.ndarray] | None = None, runner: Callable | None = None):
        """The parity proof of `artifact` (an ONNX, or any `runner` e.g. an engine, then without probes):
        (ParityResult, outputs too flat to prove anything)."""
        pairs = self.parity_reference(inputs)
        # Raw pre-decode probes make a random-weight detector's proof input-sensitive; with the user's weights the
        # final outputs move with the input by themselves and are what is judged (a random-weight fixture's raw
        # logits near 0 differ torch vs ORT by ~1e-4 from float32 noise, while its boxes and scores agree).
        probes = self.probes() if runner is None and self.random_weights else []
        names = [n for n, _ in probes]
        missing: list[str] = []
        if runner is not None:
            k = len(self.output_names)
            pairs = [(x, ref[:k]) for x, ref in pairs]
            return prove(self.adapter.compare, self.output_names, pairs, runner, self.rtol, self.atol)
        if not probes:
            return prove(self.adapter.compare, self.output_names, pairs, engine_runner(onnx_engine(artifact)),
                         self.rtol, self.atol)
        with tempfile.TemporaryDirectory(prefix="edgedeploy-probe-") as tmp:
            probed = Path(tmp) / artifact.name
            weights = [(n, m.weight.detach().cpu().numpy()) for n, m in probes]
            missing = add_probe_outputs(artifact, weights, probed)
            found = [n for n in names if n not in missing]
            k = len(self.output_names)
            keep = list(range(k)) + [k + i for i, n in enumerate(names) if n not in missing]
            pairs = [(x, [ref[i] for i in keep]) for x, ref in pairs]
            return prove(self.adapter.compare, self.output_names, pairs, engine_runner(onnx_engine(probed)),
                         self.rtol, self.atol, found, missing)

    def _runs_in_ort(self) -> bool:
        return self.adapter.runs_in_onnxruntime(self.o)

    def step_parity(self, name: str, onnx_path: Path, key: str) -> None:
        if not self._runs_in_ort():  # e.g. a TensorRT plugin node
            self.record(Step(name, "skipped", 0.0, "graph has a TensorRT plugin op: not runnable in ONNX Runtime",
                             {"reason": "not runnable in ONNX Runtime"}))
            return
        if self.reusable(name, key):
            self.record(self.report_prev(name))
            return
        t0 = time.perf_counter()
        result, flat = self.prove(onnx_path)
        check_insensitive(result, flat, self.random_weights, onnx_path.name, self.log)
        ok = result.passed and not (flat and self.random_weights)
        step = Step(name, "ok" if ok else "failed", time.perf_counter() - t0, parity_figure(result),
                    {**result.to_dict(), "table": result.table()}, key if ok else "", [])
        self.record(step)
        raise_if_failed(result, flat, self.random_weights, onnx_path.name, self.out / REPORT_NAME)

    def step_simplify(self, raw: Path, onnx_key: str) -> Path:
        path = self.path(".onnx")
        key = _key("simplify", onnx_key, self.o.simplify, self.o.simplifier)
        if self.reusable("simplify", key):
            self.record(self.report_prev("simplify"))
            return path
        import onnx

        from edgedeploy.export.simplify import SimplifyResult, op_histogram, simplify_model
        from edgedeploy.io import atomic_write_bytes

        t0 = time.perf_counter()
        model = onnx.load(str(raw))
        if self.o.simplify:
            out, res = simplify_model(model, self.o.simplifier, check_runtime=self._runs_in_ort())
        else:
            out, res = model, SimplifyResult("none", len(model.graph.node), len(model.graph.node),
                                            op_histogram(model), op_histogram(model), "disabled (--no-simplify)")
        if res.error and self.o.simplify:
            self.log(f"  simplify: {res.tool} used; passed over: {res.error[:300]}")
        atomic_write_bytes(path, out.SerializeToString())
        self.write_onnx_sidecar(path, "fp32")
        fig = f"{res.tool}: {res.nodes_before} -> {res.nodes_after} nodes" + (f" ({res.error[:60]})" if res.error else "")
        self.record(Step("simplify", "ok", time.perf_counter() - t0, fig, vars(res), key, [path.name]))
        return path

    def eval_data(self) -> EvalData:
        if not hasattr(self, "_eval"):
            self._eval = self.adapter.load_eval_data(self.info, self.imgsz, self.o.eval_data, self.o.eval_images, self.rng(4))
            e = self._eval
            self.log(f"  evaluation: {len(e.inputs)} of {e.available or len(e.inputs)} images from {e.source}"
                     + ("" if e.targets is not None else " (unlabelled: agreement with FP32 only)")
                     + (f", {e.skipped} unreadable skipped" if e.skipped else ""))
            data_classes = [str(c) for c in self._eval.meta.get("classes") or []]
            if data_classes and self._class_names and data_classes != self._class_names:
                raise EdgeDeployError(
                    f"--eval-data {self.o.eval_data}: its classes ({', '.join(data_classes[:8])}) are not the "
                    f"checkpoint's ({', '.join(self._class_names[:8])}) in label order; top-1 would be meaningless. "
                    "Point --eval-data at the dataset the model was trained on (with its classes.txt)"
                )
        return self._eval

    def _accuracy(self, fp32_path: Path, low_path: Path) -> dict[str, Any]:
        """The task metric for FP32 and the low-precision ONNX on the held-out set, and their agreement."""
        data = self.eval_data()
        low = engine_runner(onnx_engine(low_path))
        if not hasattr(self, "_fp32_outputs"):  # FP32 outputs on the eval set, shared by the FP16 and INT8 steps
            self._fp32_runner = engine_runner(onnx_engine(fp32_path))
            self._fp32_outputs: dict[int, list[np.ndarray]] = {}

        def ref(x: np.ndarray) -> list[np.ndarray]:
            k = id(x)
            if k not in self._fp32_outputs:
                self._fp32_outputs[k] = self._fp32_runner(x)
            return self._fp32_outputs[k]

        bar = _progress(self.o.progress, 2 * len(data.inputs), f"eval {low_path.name}")

        def counted(fn):
            def run(x):
                bar.update(1)
                return fn(x)
            return run

        m32 = self.adapter.evaluate(counted(ref), data)
        mlow = self.adapter.evaluate(counted(low), data, reference_fn=ref)
        bar.close()
        out = {"eval_source": data.source, "eval_images": len(data.inputs),
               "eval_available": data.available or len(data.inputs), "eval_synthetic": data.source == "synthetic",
               "eval_skipped": data.skipped,
               "labelled": data.targets is not None, "fp32": m32, "low": mlow}
        for k in m32:
            if k in mlow and k not in ("n", "classes_predicted"):
                out[f"delta_{k}"] = mlow[k] - m32[k]
        return out

    def _accuracy_figure(self, acc: dict[str, Any]) -> str:
        low, ref = acc["low"], acc["fp32"]
        parts = []
        for k in low:
            if k in ("n", "classes_predicted"):
                continue
            parts.append(f"{k} {_fraction(low[k], k)}" + (f" (fp32 {_fraction(ref[k], k)})" if k in ref else ""))
        of = acc.get("eval_available", acc["eval_images"])
        return ", ".join(parts) + f" on {acc['eval_images']}" + (f" of {of}" if of != acc["eval_images"] else "") + \
            " held-out"

    def step_fp16(self, fp32_path: Path, base_key: str) -> Path:
        path = self.path(".fp16.onnx")
        opts = self.o
        key = _key("fp16", base_key, opts.fp16_io, opts.eval_data, opts.eval_images, opts.ignore_index,
                   self.adapter.fp16_op_block_list(opts))
        if self.reusable("fp16", key):
            self.record(self.report_prev("fp16"))
            return path
        import onnx

        from edgedeploy.export.fp16 import convert_fp16
        from edgedeploy.io import atomic_write_bytes

        if opts.fp16_io not in ("fp32", "fp16"):
            raise EdgeDeployError(f"--fp16-io {opts.fp16_io!r}: choose fp32 or fp16")
        t0 = time.perf_counter()
        in_ort = self._runs_in_ort()
        # convert_fp16 proves the result loads in ORT (or type-checks) before anything is written
        out, info = convert_fp16(onnx.load(str(fp32_path)), opts.fp16_io == "fp32", self.adapter.fp16_op_block_list(opts),
                                 runs_in_onnxruntime=in_ort)
        atomic_write_bytes(path, out.SerializeToString())
        if in_ort:
            try:
                acc = self._accuracy(fp32_path, path)
            except EdgeDeployError:
                path.unlink(missing_ok=True)
                raise
            except Exception as e:  # noqa: BLE001  (ORT failing on an FP16 graph is an export error)
                path.unlink(missing_ok=True)
                raise EdgeDeployError(f"the FP16 ONNX does not run in ONNX Runtime CPU: {type(e).__name__}: {e}; "
                                      "the FP32 ONNX is kept") from e
            figure, details = self._accuracy_figure(acc), {**info, "accuracy": acc}
        else:
            figure, details = "type-checked (plugin graph: not runnable in ONNX Runtime)", info
        self.write_onnx_sidecar(path, "fp16", "float32" if opts.fp16_io == "fp32" else "float16")
        self.record(Step("fp16", "ok", time.perf_counter() - t0, figure, details, key, [path.name]))
        return path

    def calibration_inputs(self) -> tuple[list[np.ndarray], int, str, int]:
        """(preprocessed inputs, corrupt files skipped, where they came from, images available there)."""
        n = self.o.calib_images
        if self.calib_files is None:
            imgs = self.adapter.synthetic_images(self.info, self.imgsz, n, self.rng(3))
            skipped, available = 0, len(imgs)
        else:
            from edgedeploy.export.calibration import read_image_files

            imgs, skipped = read_image_files(self.calib_files, n, self.calib_where)
            available = len(self.calib_files)
        return [self.adapter.preprocess(i, self.info, self.imgsz) for i in imgs], skipped, self.calib_where, available

    def step_int8(self, fp32_path: Path, base_key: str) -> Path:
        path = self.path(".int8.onnx")
        opts = self.o
        calib_sig = "synthetic" if self.calib_files is None else [(str(p), p.stat().st_size) for p in self.calib_files]
        key = _key("int8", base_key, calib_sig, opts.calib_images, opts.calib_method, opts.eval_data, opts.eval_images,
                   opts.ignore_index)
        if self.reusable("int8", key):
            self.record(self.report_prev("int8"))
            return path
        import onnx

        from edgedeploy.export.int8 import quantize_qdq, resolve_calib_method

        t0 = time.perf_counter()
        inputs, skipped, src, available = self.calibration_inputs()
        self.log(f"  calibration: {len(inputs)} of {available} images from {src}")
        model = onnx.load(str(fp32_path))
        excluded = self.adapter.int8_exclusions(model, opts)
        method, why = resolve_calib_method(opts.calib_method, fp32_path, len(inputs), self.adapter.auto_calib_method)
        bar = _progress(opts.progress, len(inputs), f"calibrate ({method})")
        try:
            facts = quantize_qdq(fp32_path, path, self.input_names[0], inputs, [n for n, _ in excluded], lambda: bar.update(1),
                                calib_method=method)
        finally:
            bar.close()
        facts["calibration_method_reason"] = why
        acc = self._accuracy(fp32_path, path)
        self.write_onnx_sidecar(path, "int8")
        details = {**facts, "calibration": {"source": opts.calib, "where": src, "images": len(inputs),
                                            "available": available, "skipped_corrupt": skipped,
                                            "synthetic": self.calib_files is None},
                   "kept_higher_precision": [{"node": n, "reason": r} for n, r in excluded]
                   + [{"node": "(op types) Relu, Clip, Sigmoid, HardSigmoid, HardSwish, Concat, Reshape, Softmax",
                       "reason": "not quantized: TensorRT fuses them into the neighbouring INT8 op or runs them in "
                                 "FP32 (ModelOpt placement)"}],
                   "accuracy": acc}
        fig = self._accuracy_figure(acc) + (f", {skipped} corrupt calib skipped" if skipped else "")
        self.record(Step("int8", "ok", time.perf_counter() - t0, fig, details, key, [path.name]))
        return path

    def step_engines(self, onnx_paths: dict[str, Path]) -> None:
        builder, reason = select_builder(self.o.builder)
        if builder == "none":
            self.report.engine_skipped = self.o.builder == "auto"
            self.report.engine_skip_reason = reason
            self.record(Step("engines", "skipped", 0.0, "no TensorRT builder" if self.report.engine_skipped else reason,
                             {"reason": reason}))
            return
        if self.nms_unbuildable:  # an explicit --nms this builder cannot build: keep the ONNX, say the fix
            reason = (f"{self.nms_unbuildable}. The ONNX files are kept. Fix: re-export with --nms none (decoded "
                      "boxes + scores; the runtime runs NMS)" + (" or build with TensorRT (--builder tensorrt)"
                                                                 if builder != "tensorrt" else ""))
            self.report.engine_skipped = True
            self.report.engine_skip_reason = reason
            self.record(Step("engines", "skipped", 0.0, f"{builder} cannot build --nms "
                             f"{self.o.task_options.get('nms')}", {"reason": reason, "builder": builder}))
            return
        from edgedeploy.engines.common import BuildRequest

        if builder == "tensorrt":
            from edgedeploy.engines.tensorrt_builder import build
        else:
            from edgedeploy.engines.rtx_builder import build
        failures = []
        timing_cache = Path(self.o.timing_cache) if self.o.timing_cache else self.out / "timing.cache"
        for precision, onnx_path in onnx_paths.items():
            engine = self.path(f".{precision}.engine")
            name = f"engine_{precision}"
            key = _key(name, builder, sha256_file(onnx_path), self.o.batch_shape, self.o.workspace_mb)
            if self.reusable(name, key):
                self.record(self.report_prev(name))
                continue
            src_meta = self.meta(precision)
            req = BuildRequest(onnx_path, engine, src_meta, self.o.batch_shape, self.o.workspace_mb,
                               timing_cache if builder == "tensorrt" else None)
            self.log(f"  {name:<20} building with {builder} (Ctrl-C cancels; nothing is written) ...")
            t0 = time.perf_counter()
            try:
                res = build(req)
            except EngineBuildError as e:
                failures.append(f"{precision}: {e}")
                self.record(Step(name, "failed", time.perf_counter() - t0, str(e).splitlines()[0][:90],
                                 {"builder": builder, "onnx": onnx_path.name, "error": str(e)}))
                continue
            self.record(Step(name, "ok", time.perf_counter() - t0,
                             f"{builder} {res.builder_version}: {res.engine_bytes / 1e6:.1f} MB",
                             {"builder": builder, "builder_version": res.builder_version, "onnx": onnx_path.name,
                              "engine_bytes": res.engine_bytes, "build_time_s": res.build_time_s,
                              "timing_cache": res.timing_cache, "warnings": res.warnings},
                             key, [engine.name, engine.name + ".json"]))
        if failures:
            raise EngineBuildError(f"{builder} could not build {len(failures)} engine(s):\n" + "\n".join(failures))

    # ----------------------------------------------------------------------------------------------- run
    def run(self) -> ExportReport:
        try:
            report = self._run()
        except BaseException as e:
            self._failed(e)
            raise
        (self.out / FAILED_REPORT_NAME).unlink(missing_ok=True)
        return report

    def _run(self) -> ExportReport:
        from tqdm import tqdm

        o = self.o
        if self.random_weights:
            self.log(RANDOM_WEIGHTS_LINE.format(seed=o.seed))
        self.log(f"export {self.name} ({self.info.task}) imgsz={self.imgsz} batch={o.batch_shape} -> {self.out}")
        if self.nms_choice:
            self.log(f"  nms: {self.nms_choice['reason']}")
            self.report.add(Step("nms_choice", "ok", 0.0, f"--nms none ({self.nms_choice['builder']} cannot build "
                                 f"--nms {self.nms_choice['default']})", dict(self.nms_choice)))
        planned = 5 + int(o.fp16) + int(o.int8)
        with tqdm(total=planned, desc=f"export {self.name}", unit="step", leave=False, disable=not o.progress) as bar:
            raw = self.step_onnx(); bar.update(1)
            onnx_key = self.report.step("onnx_export").key  # type: ignore[union-attr]
            self.step_parity("parity_raw", raw, _key("parity", onnx_key, self.rtol, self.atol, o.parity_inputs)); bar.update(1)
            fp32 = self.step_simplify(raw, onnx_key); bar.update(1)
            simp_key = self.report.step("simplify").key  # type: ignore[union-attr]
            self.step_parity("parity_simplified", fp32, _key("parity", simp_key, self.rtol, self.atol, o.parity_inputs)); bar.update(1)
            onnx_paths = {"fp32": fp32}
            if o.fp16:
                onnx_paths["fp16"] = self.step_fp16(fp32, simp_key); bar.update(1)
            if o.int8:
                onnx_paths["int8"] = self.step_int8(fp32, simp_key); bar.update(1)
            self.step_engines(onnx_paths); bar.update(1)
        self.report.write()
        return self.report


def export(model: str, log: Callable[[str], None] | None = None, **options: Any) -> ExportReport:
    """Export `model` (a registry name) with ExportOptions fields as keywords; returns the report.

    Raises ParityError (exit 4) on a parity mismatch, BuilderUnavailableError (exit 3) when an explicitly
    requested builder is missing, EngineBuildError / ExportError / CheckpointError (exit 1) otherwise.
    With builder "auto" and no builder installed the report has engine_skipped=True (CLI exit 3).
    """
    opts = ExportOptions(model=model, **options)
    return _Exporter(opts, log or (lambda s: None)).run()
