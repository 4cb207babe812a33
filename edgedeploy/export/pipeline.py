"""The export pipeline behind `deploy export` and `edgedeploy.export.export()`.

torch -> ONNX (+checker) -> parity (raw) -> simplify -> parity (simplified) -> FP16 ONNX -> INT8 Q/DQ ONNX ->
engines. Each step is recorded in export_report.json with a reuse key: re-running with the same inputs reuses
every artifact whose key and file are unchanged (`force=True` rebuilds all).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgedeploy.engines.sidecar import ArtifactMeta, write_sidecar
from edgedeploy.errors import BuilderUnavailableError, EdgeDeployError, EngineBuildError, ParityError
from edgedeploy.export.options import BUILDERS, ExportOptions
from edgedeploy.export.report import ExportReport, Step, load_report
from edgedeploy.export.tasks.base import EvalData, TaskAdapter, get_task_adapter
from edgedeploy.io import sha256_file

_CODE_FILES = ("onnx_export.py", "simplify.py", "parity.py", "fp16.py", "int8.py", "weights.py", "pipeline.py")


def code_version() -> str:
    """edgedeploy version + a hash of the export code: a code change invalidates reused artifacts."""
    from edgedeploy import __version__

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


def _short_reason(why: str) -> str:
    """The telling part of a builder's log line ("nms_0 has no runners that implement it")."""
    import re

    m = re.search(r"\S+ has no runners that implement it|Plugin not found[^\"]*", why)
    return m.group(0) if m else why[:200]


def _progress(enabled: bool, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False, disable=not enabled)


class _Exporter:
    def __init__(self, options: ExportOptions, log: Callable[[str], None]):
        from edgedeploy.models.registry import get_model_info

        self.o = options
        self.log = log
        self.info = get_model_info(options.model)
        self.adapter: TaskAdapter = get_task_adapter(self.info.task)
        self.imgsz = int(options.imgsz or self._checkpoint_meta(options.weights).get("imgsz") or self.info.imgsz)
        multiple = self.adapter.imgsz_multiple
        if self.imgsz < 32 or self.imgsz % multiple:
            rule = f"a multiple of {multiple}, " if multiple > 1 else ""
            raise EdgeDeployError(f"--imgsz {self.imgsz}: {self.info.task} models need {rule}at least 32")
        if options.dynamic_batch:
            mn, opt, mx = options.dynamic_batch
            if not (1 <= mn <= opt <= mx):
                raise EdgeDeployError(f"--dynamic-batch {mn}:{opt}:{mx}: need 1 <= MIN <= OPT <= MAX")
        elif options.batch < 1:
            raise EdgeDeployError(f"--batch {options.batch}: must be >= 1")
        self.name = self.info.name
        self.ckpt_meta = self._checkpoint_meta(options.weights)
        self._class_names = [str(c) for c in self.ckpt_meta.get("class_names") or []]
        self._resolve_data_sources()
        self.out = Path(options.out) / self.name
        _check_writable(self.out)
        self.previous = None if options.force else load_report(self.out)
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
        self.nms_choice, self.nms_unbuildable = self._choose_nms()
        if options.int8 and not self._runs_in_ort():
            raise EdgeDeployError("--int8 needs ONNX Runtime to calibrate the FP32 graph, and it cannot run the "
                                  "EfficientNMS_TRT plugin node of --nms trt: export with --nms onnx or --nms none")
        self.input_names = self.adapter.input_names(options)
        self.output_names = self.adapter.output_names(options)
        rtol, atol = self.adapter.parity_tolerance("fp32")
        self.rtol = options.rtol if options.rtol is not None else rtol
        self.atol = options.atol if options.atol is not None else atol
        self._model = None

    # ----------------------------------------------------------------------------------------------- helpers
    def _resolve_data_sources(self) -> None:
        """Unset --calib/--eval-data: a checkpoint from `deploy train` records its dataset; its train images
        calibrate INT8 and its val split measures FP16/INT8 (labelled top-1 for classifiers; detection agreement
        on the detector's own val images). Otherwise the synthetic renderer. Calibrating a detector on images
        that are not its own is what costs INT8 most: measured on yolox_nano, 3-class synthetic renders gave
        mAP@.5:.95 0.025 against 0.326 with its training images (FP32 0.368)."""
        o = self.o
        calib_dir, eval_root = None, None
        if self.info.task == "classify":
            data = self.ckpt_meta.get("data")
            root = Path(data) if data and Path(data).is_dir() else None
            if root is not None:
                calib_dir = root / "train" if (root / "train").is_dir() else None
                eval_root = root
        elif self.info.task == "detect":
            root = self._detect_data_root()
            if root is not None:
                calib_dir = root / "images" / "train" if (root / "images" / "train").is_dir() else None
                eval_root = root / "images" / "val" if (root / "images" / "val").is_dir() else None
        if o.calib is None:
            o.calib = str(calib_dir) if calib_dir is not None else "synthetic"
        if o.eval_data is None:
            o.eval_data = str(eval_root) if eval_root is not None else "synthetic"

    def _choose_nms(self) -> tuple[dict[str, str] | None, str]:
        """A detector's in-graph NMS mode, fitted to the builder that will run (TensorRT-RTX 1.7 cannot build ONNX
        NonMaxSuppression: "has no runners"). Defaulted NMS the builder cannot build -> decoded boxes + scores and
        the runtime's NMS (`--nms none`), recorded; an explicit `--nms` it cannot build -> (None, reason): the
        ONNX files are still written and the engines are skipped with exit 3."""
        if self.info.task != "detect":
            return None, ""
        from edgedeploy.export.tasks.detect import detect_options

        try:
            builder, _ = select_builder(self.o.builder)
        except BuilderUnavailableError:
            return None, ""  # reported by step_engines
        if builder == "none":
            return None, ""
        if builder == "tensorrt":
            from edgedeploy.engines.tensorrt_builder import supported_nms
        else:
            from edgedeploy.engines.rtx_builder import supported_nms
        support = supported_nms()
        mode = detect_options(self.o)["nms"]
        why = support.get(mode, "")
        if not why:
            return None, ""
        if "nms" in self.o.task_options:  # asked for explicitly: keep it, skip the engines (exit 3)
            return None, f"{builder} cannot build --nms {mode}: {why}"
        self.o.task_options = {**self.o.task_options, "nms": "none"}
        self.report.options["task_options"] = dict(self.o.task_options)
        choice = {"nms": "none", "default": mode, "builder": builder, "builder_reason": why,
                  "reason": f"{builder} cannot build the default --nms {mode} ({_short_reason(why)}); exported decoded boxes + "
                            "scores (--nms none): the runtime runs NMS (deploy run/bench, the Triton ensemble)"}
        return choice, ""

    def _detect_data_root(self) -> Path | None:
        """The YOLO-layout folder a detector checkpoint was trained on (the synthetic set is regenerated from
        the parameters the checkpoint records, as `deploy eval` does)."""
        data = self.ckpt_meta.get("data")
        if str(data).lower() == "synthetic" and isinstance(self.ckpt_meta.get("synthetic"), dict):
            from edgedeploy.data.synthetic_detect import synthetic_detection_dataset

            return Path(synthetic_detection_dataset(**self.ckpt_meta["synthetic"]))
        root = Path(data) if data else None
        return root if root is not None and (root / "images").is_dir() else None

    @staticmethod
    def _checkpoint_meta(weights: str | None) -> dict[str, Any]:
        """Our training checkpoints record num_classes, class_names and imgsz: use them as defaults."""
        if not weights:
            return {}
        from edgedeploy.models.checkpoint import read_checkpoint

        meta = read_checkpoint(weights).get("meta")
        return dict(meta) if isinstance(meta, dict) else {}

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
        self.report.write()
        self.log(f"  {step.name:<20} {step.status:<7} {step.time_s:6.1f}s  {step.figure}")
        return step

    def meta(self, precision: str, input_dtype: str = "float32") -> ArtifactMeta:
        mn, opt, mx = self.o.batch_shape
        return ArtifactMeta(
            model=self.name,
            task=self.info.task,
            input_name=self.input_names[0],
            input_shape=["batch" if self.o.dynamic_batch else opt, 3, self.imgsz, self.imgsz],
            input_dtype=input_dtype,
            output_names=self.output_names,
            mean=list(self.info.mean),
            std=list(self.info.std),
            letterbox=self.info.letterbox,
            class_names=self._class_names,
            precision=precision,
            batch={"min": mn, "opt": opt, "max": mx},
            postprocess={**self.adapter.sidecar_postprocess(self.o),
                         **({"nms_choice": self.nms_choice["reason"]} if self.nms_choice else {})},
            builder="torch.onnx",
            builder_version=self.report.environment.get("torch", ""),
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )

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
                             weights=self.o.weights).eval()
        wrapped = self.adapter.wrap_for_export(model, self.o).eval()
        reinit = self.o.reinit if self.o.reinit is not None else not self.o.weights
        self.reinit_info = {"reinitialised": bool(reinit)}
        if reinit:
            from edgedeploy.export.weights import reinitialise_for_parity

            sample = np.concatenate(self.adapter.sample_inputs(self.info, self.imgsz, 4, self.rng(9)))
            reinit_fn = getattr(self.adapter, "reinitialise_for_parity", reinitialise_for_parity)  # task-specific if any
            self.reinit_info.update(reinit_fn(wrapped, sample, seed=self.o.seed))
        self._model = wrapped
        return wrapped

    def parity_batches(self) -> list[np.ndarray]:
        """Parity inputs grouped into the batch sizes the artifact accepts (dynamic: max batch and 1)."""
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

    def _runs_in_ort(self) -> bool:
        return bool(getattr(self.adapter, "runs_in_onnxruntime", lambda _o: True)(self.o))

    def step_parity(self, name: str, onnx_path: Path, key: str) -> None:
        if not self._runs_in_ort():  # e.g. a TensorRT plugin node
            self.record(Step(name, "skipped", 0.0, "graph has a TensorRT plugin op: not runnable in ONNX Runtime",
                             {"reason": "not runnable in ONNX Runtime"}))
            return
        if self.reusable(name, key):
            self.record(self.report_prev(name))
            return
        from edgedeploy.export.runners import OrtRunner, TorchRunner

        t0 = time.perf_counter()
        ort_run = OrtRunner(onnx_path)
        if not hasattr(self, "_parity_ref"):  # torch outputs are shared by the raw and simplified proofs
            torch_run = TorchRunner(self.model())
            batches = self.parity_batches()
            self._parity_ref = [(x, torch_run(x)) for x in batches]
        result = None
        batches = [x for x, _ in self._parity_ref]
        for x, ref in self._parity_ref:
            r = self.adapter.compare(self.output_names, ref, ort_run(x), self.rtol, self.atol)
            r.n_inputs = x.shape[0]
            result = r if result is None else result.merge(r)
        assert result is not None
        result.notes.append(f"batches: {[int(b.shape[0]) for b in batches]}")
        low = [o.name for o in result.outputs if o.ref_std < 0.1 and o.total > 1]
        if low:
            result.notes.append(f"outputs with reference std < 0.1 (weak evidence): {low}")
        step = Step(name, "ok" if result.passed else "failed", time.perf_counter() - t0,
                    f"max_abs {result.max_abs:.2e}, cos {result.min_cosine:.6f} (rtol {self.rtol:g}, atol {self.atol:g})",
                    {**result.to_dict(), "table": result.table()}, key if result.passed else "", [])
        self.record(step)
        if not result.passed:
            raise ParityError(
                f"{onnx_path.name} disagrees with PyTorch beyond rtol={self.rtol:g}, atol={self.atol:g}:\n{result.table()}\n"
                f"details in {self.out / 'export_report.json'}"
            )

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
        from edgedeploy.export.runners import OrtRunner

        data = self.eval_data()
        low = OrtRunner(low_path)
        if not hasattr(self, "_fp32_outputs"):  # FP32 outputs on the eval set, shared by the FP16 and INT8 steps
            self._fp32_runner = OrtRunner(fp32_path)
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
        out = {"eval_source": data.source, "eval_images": len(data.inputs), "eval_skipped": data.skipped,
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
            parts.append(f"{k} {low[k]:.3f}" + (f" (fp32 {ref[k]:.3f})" if k in ref else ""))
        return ", ".join(parts) + f" on {acc['eval_images']} held-out"

    def step_fp16(self, fp32_path: Path, base_key: str) -> Path:
        path = self.path(".fp16.onnx")
        opts = self.o
        key = _key("fp16", base_key, opts.fp16_io, opts.eval_data, opts.eval_images, self.adapter.fp16_op_block_list(opts))
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

    def calibration_inputs(self) -> tuple[list[np.ndarray], int, str]:
        src, n = self.o.calib, self.o.calib_images
        if src == "synthetic":
            imgs = self.adapter.synthetic_images(self.info, self.imgsz, n, self.rng(3))
            skipped = 0
        else:
            from edgedeploy.export.calibration import read_image_dir

            imgs, skipped = read_image_dir(src, n)
        return [self.adapter.preprocess(i, self.info, self.imgsz) for i in imgs], skipped, src

    def step_int8(self, fp32_path: Path, base_key: str) -> Path:
        path = self.path(".int8.onnx")
        opts = self.o
        calib_sig = opts.calib if opts.calib == "synthetic" else sorted(
            (str(p.relative_to(opts.calib)), p.stat().st_size) for p in Path(opts.calib).rglob("*") if p.is_file()
        ) if Path(opts.calib).is_dir() else opts.calib
        key = _key("int8", base_key, calib_sig, opts.calib_images, opts.calib_method, opts.eval_data, opts.eval_images)
        if self.reusable("int8", key):
            self.record(self.report_prev("int8"))
            return path
        import onnx

        from edgedeploy.export.int8 import quantize_qdq, resolve_calib_method

        t0 = time.perf_counter()
        inputs, skipped, src = self.calibration_inputs()
        model = onnx.load(str(fp32_path))
        excluded = self.adapter.int8_exclusions(model, opts)
        method, why = resolve_calib_method(opts.calib_method, fp32_path, len(inputs), self.info.task)
        bar = _progress(opts.progress, len(inputs), f"calibrate ({method})")
        try:
            facts = quantize_qdq(fp32_path, path, self.input_names[0], inputs, [n for n, _ in excluded], lambda: bar.update(1),
                                calib_method=method)
        finally:
            bar.close()
        facts["calibration_method_reason"] = why
        acc = self._accuracy(fp32_path, path)
        self.write_onnx_sidecar(path, "int8")
        details = {**facts, "calibration": {"source": src, "images": len(inputs), "skipped_corrupt": skipped},
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
        from tqdm import tqdm

        o = self.o
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
