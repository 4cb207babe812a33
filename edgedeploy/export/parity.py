"""The parity proof: exported outputs against PyTorch's, with stated tolerances and the figures behind them.

`numpy.testing.assert_allclose` decides (|onnx - torch| <= atol + rtol * |torch| element-wise); the max-abs,
max-relative and cosine figures are recorded either way so a report shows how close "passed" was.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

if TYPE_CHECKING:
    from edgedeploy.runtime.engine import Engine

Runner = Callable[[np.ndarray], list[np.ndarray]]  # one input batch -> the outputs in the artifact's order

PARITY_THREADS = 2  # ONNX Runtime intra-op threads of every proof (results must not depend on the machine's cores)


@dataclass
class OutputParity:
    name: str
    shape: list[int]
    max_abs: float
    max_rel: float  # max |diff| / (|ref| + 1e-6), over elements where |ref| > atol (else the noise floor rules)
    cosine: float  # cosine similarity of the flattened outputs
    mismatched: int  # elements outside atol + rtol * |ref|
    total: int
    passed: bool
    ref_std: float  # spread of the reference: near-zero outputs would make any comparison meaningless
    message: str = ""  # assert_allclose's text on failure
    spread: float | None = None  # how much the reference moves across the parity inputs (see `output_spread`)


@dataclass
class ParityResult:
    passed: bool
    rtol: float
    atol: float
    outputs: list[OutputParity] = field(default_factory=list)
    n_inputs: int = 0
    notes: list[str] = field(default_factory=list)
    # output name -> spread across the parity inputs (`output_spread`), for the outputs the check applies to
    spreads: dict[str, float] = field(default_factory=dict)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    @property
    def max_spread(self) -> float | None:
        return max(self.spreads.values()) if self.spreads else None

    @property
    def min_spread(self) -> float | None:
        """The smallest spread over the outputs the sensitivity check applies to (None: not measured)."""
        return min(self.spreads.values()) if self.spreads else None

    @property
    def min_cosine(self) -> float:
        return min((o.cosine for o in self.outputs), default=1.0)

    def merge(self, other: "ParityResult") -> "ParityResult":
        """Fold another batch's result into this one (worst figures win)."""
        if not self.outputs:
            return other if other.outputs else self
        merged = []
        for a, b in zip(self.outputs, other.outputs):
            merged.append(
                OutputParity(
                    name=a.name,
                    shape=a.shape,
                    max_abs=max(a.max_abs, b.max_abs),
                    max_rel=max(a.max_rel, b.max_rel),
                    cosine=min(a.cosine, b.cosine),
                    mismatched=a.mismatched + b.mismatched,
                    total=a.total + b.total,
                    passed=a.passed and b.passed,
                    ref_std=min(a.ref_std, b.ref_std),
                    message=a.message or b.message,
                    spread=a.spread if b.spread is None else b.spread if a.spread is None else min(a.spread, b.spread),
                )
            )
        return ParityResult(
            passed=self.passed and other.passed,
            rtol=self.rtol,
            atol=self.atol,
            outputs=merged,
            n_inputs=self.n_inputs + other.n_inputs,
            notes=self.notes + [n for n in other.notes if n not in self.notes],
        )

    def table(self) -> str:
        """A fixed-width diff table (printed on failure, stored in the report)."""
        head = (f"{'output':<16}{'shape':<22}{'max_abs':>11}{'max_rel':>11}{'cosine':>10}{'spread':>11}"
                f"{'mismatch':>14}  ok")
        rows = [head]
        for o in self.outputs:
            spread = "-" if o.spread is None else f"{o.spread:.3g}"
            rows.append(
                f"{o.name:<16}{str(o.shape):<22}{o.max_abs:>11.3g}{o.max_rel:>11.3g}{o.cosine:>10.6f}{spread:>11}"
                f"{f'{o.mismatched}/{o.total}':>14}  {'yes' if o.passed else 'NO'}"
            )
        rows.append(f"tolerance: rtol={self.rtol:g} atol={self.atol:g} over {self.n_inputs} input(s)")
        if self.spreads:
            rows.append("spread (std across the inputs, mean over elements; needs >= 100 x atol): "
                        + ", ".join(f"{n} {v:.3g}" for n, v in self.spreads.items()))
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["max_abs"] = self.max_abs
        d["min_cosine"] = self.min_cosine
        d["max_rel"] = self.max_rel
        d["min_spread"] = self.min_spread
        d["max_spread"] = self.max_spread
        return d


def compare_output(name: str, ref: np.ndarray, got: np.ndarray, rtol: float, atol: "float | np.ndarray") -> OutputParity:
    """Compare one output array against its reference. `atol` may be an array broadcastable to the output's
    shape (e.g. a per-box tolerance), which `assert_allclose` applies element-wise."""
    ref = np.asarray(ref)
    got = np.asarray(got)
    if ref.shape != got.shape:
        return OutputParity(name, list(ref.shape), float("inf"), float("inf"), 0.0, ref.size, ref.size, False,
                            float(np.std(ref)) if ref.size else 0.0,
                            f"shape mismatch: torch {tuple(ref.shape)} vs exported {tuple(got.shape)}")
    r = ref.astype(np.float64).ravel()
    g = got.astype(np.float64).ravel()
    if r.size == 0:
        return OutputParity(name, list(ref.shape), 0.0, 0.0, 1.0, 0, 0, True, 0.0)
    diff = np.abs(r - g)
    atol_full = np.broadcast_to(np.asarray(atol, np.float64), ref.shape).ravel()
    significant = np.abs(r) > atol_full
    max_rel = float((diff[significant] / np.abs(r[significant])).max()) if significant.any() else 0.0
    denom = np.linalg.norm(r) * np.linalg.norm(g)
    cosine = float(r @ g / denom) if denom > 0 else float(np.array_equal(r, g))
    bad = int((diff > atol_full + rtol * np.abs(r)).sum()) if np.isfinite(g).all() else r.size
    message = ""
    try:
        if np.ndim(atol) == 0:
            np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol, err_msg=f"output {name!r}")
        else:  # |g - r| <= a + rtol |r|  <=>  |g/a - r/a| <= 1 + rtol |r/a|  (a > 0): assert_allclose decides
            a = np.broadcast_to(np.asarray(atol, np.float64), ref.shape)
            np.testing.assert_allclose(got / a, ref / a, rtol=rtol, atol=1.0,
                                       err_msg=f"output {name!r} (values in units of their own atol)")
        passed = True
    except AssertionError as e:
        passed = False
        message = str(e).strip()
    return OutputParity(name, list(ref.shape), float(diff.max()), max_rel, cosine, bad, r.size, passed,
                        float(r.std()), message)


def compare_outputs(
    names: Sequence[str],
    ref: Sequence[np.ndarray],
    got: Sequence[np.ndarray],
    rtol: float,
    atol: float,
    n_inputs: int = 1,
) -> ParityResult:
    """Compare every named output; passes only if all do."""
    if len(ref) != len(got):
        return ParityResult(False, rtol, atol, [], n_inputs,
                            [f"output count differs: torch {len(ref)} vs exported {len(got)}"])
    outs = [compare_output(n, r, g, rtol, atol) for n, r, g in zip(names, ref, got)]
    return ParityResult(all(o.passed for o in outs), rtol, atol, outs, n_inputs)


SPREAD_FACTOR = 100.0  # a proof needs outputs whose spread across its inputs is >= SPREAD_FACTOR x atol


def output_spread(per_input: Any) -> float:
    """How much an output moves across inputs: the standard deviation over the inputs (axis 0) of each output
    element, averaged over the elements. A network that ignores its input scores ~0 whatever its magnitude."""
    a = np.asarray(per_input, dtype=np.float64)
    if a.ndim == 0 or a.shape[0] < 2 or a.size == 0:
        return 0.0
    return float(a.reshape(a.shape[0], -1).std(axis=0).mean())


def check_spread(result: ParityResult, names: Sequence[str], per_input: Sequence[np.ndarray],
                 atol: float, factor: float = SPREAD_FACTOR, every: bool = True) -> list[str]:
    """Record each output's spread across the parity inputs in `result`; return the outputs that move too little.

    Floating-point outputs must each have spread >= factor x atol (below that an exported graph that ignored
    part of its input could still match within atol). Integer outputs (NMS counts, class ids, argmax masks)
    are recorded; when a model has only integer outputs, they must at least change across the inputs.
    `every=False`: one floating-point output moving that much is enough (a detector's raw head levels)."""
    by_name = {o.name: o for o in result.outputs}
    spreads = {}
    for name, arr in zip(names, per_input):
        spreads[name] = (output_spread(arr), np.asarray(arr).dtype.kind == "f")
        if name in by_name:
            by_name[name].spread = spreads[name][0]
    floats = {n: s for n, (s, is_float) in spreads.items() if is_float}
    result.spreads = floats or {n: s for n, (s, _) in spreads.items()}
    if floats:
        low = [f"{n} (spread {s:.3g} < {factor:g} x atol {atol:g})" for n, s in floats.items() if s < factor * atol]
        return low if every or len(low) == len(floats) else []
    if spreads and all(s == 0.0 for s, _ in spreads.values()):
        return [f"{n} (identical for every input)" for n in spreads]
    return []


def prove(compare: Callable[..., ParityResult], names: Sequence[str],
          pairs: Sequence[tuple[np.ndarray, list[np.ndarray]]], run: Callable[[np.ndarray], list[np.ndarray]],
          rtol: float, atol: float, probe_names: Sequence[str] = (),
          missing_probes: Sequence[str] = ()) -> tuple[ParityResult, list[str]]:
    """The proof, shared by `deploy export` and `deploy verify`: `run` (the exported artifact) against the
    PyTorch outputs in `pairs` [(input batch, torch outputs)], the outputs compared by `compare` (the task
    adapter's). With `probe_names`, both sides also return raw network outputs (a detector's pre-decode
    logits) after the outputs; those are compared element-wise at the strict tolerance, and the input-spread
    check applies to them (sorted post-NMS scores move little across images even from a sound network): at
    least one of them must move by >= 100 x atol.
    Returns the merged result and the outputs whose spread across the inputs is too small to prove anything."""
    k = len(names)
    result: ParityResult | None = None
    for x, ref in pairs:
        got = run(x)
        r = compare(names, ref[:k], got[:k], rtol, atol)
        if probe_names:
            raw = compare_outputs(probe_names, ref[k:], got[k:], rtol, atol)
            r = ParityResult(r.passed and raw.passed, rtol, atol, r.outputs + raw.outputs, notes=r.notes + raw.notes)
        r.n_inputs = int(x.shape[0])
        result = r if result is None else result.merge(r)
    if result is None:
        raise ValueError("no parity inputs")
    for name in missing_probes:
        result.passed = False
        result.outputs.append(OutputParity(name, [], float("inf"), float("inf"), 0.0, 1, 1, False, 0.0,
                                           "no Conv with this layer's weights in the exported graph"))
    result.notes.append(f"batches: {[int(x.shape[0]) for x, _ in pairs]}")
    all_names = list(names) + list(probe_names)
    per_output = [np.concatenate([np.asarray(ref[i]) for _, ref in pairs]) for i in range(len(all_names))]
    if probe_names:
        final = {n: output_spread(a) for n, a in zip(names, per_output[:k]) if a.dtype.kind == "f"}
        result.notes.append("spread of the final outputs: " + ", ".join(f"{n} {v:.3g}" for n, v in final.items()))
        flat = check_spread(result, probe_names, per_output[k:], atol, every=False)
    else:
        flat = check_spread(result, names, per_output, atol)
    return result, flat


def onnx_engine(path: str | Path, threads: int = PARITY_THREADS) -> "Engine":
    """The ONNX Runtime engine a proof runs an ONNX on: CPU only, `threads` intra-op threads, no spinning,
    errors only in ORT's log."""
    from edgedeploy.runtime.backends.onnxruntime import OnnxRuntimeEngine

    return OnnxRuntimeEngine(path, providers=["CPUExecutionProvider"], threads=threads, spin=False, quiet=True)


def torch_engine(model: Any, input_name: str = "images", output_names: Sequence[str] | None = None,
                 probes: Sequence[Any] = ()) -> "Engine":
    """The PyTorch engine a proof's reference runs on: `model` on the CPU in FP32, any NCHW input size;
    `probes` (submodules) append their outputs after the model's (name them last in `output_names`)."""
    from edgedeploy.runtime.backends.torch import TorchEngine
    from edgedeploy.runtime.engine import DYNAMIC

    return TorchEngine(model, input_shape=(DYNAMIC,) * 4, input_name=input_name, output_names=output_names,
                       device="cpu", probes=probes)


def engine_runner(engine: "Engine") -> Runner:
    """`engine` as a proof's runner: `eval.predictors.run_engine` (the batch cast to the engine's input dtype, an
    FP16 graph takes FP16), the outputs as a list in the engine's order."""
    from edgedeploy.eval.predictors import run_engine

    run = run_engine(engine)
    return lambda x: list(run(x).values())


def add_probe_outputs(onnx_path: str | Path, probe_weights: list[tuple[str, np.ndarray]], out_path: str | Path) -> list[str]:
    """Write a copy of the ONNX whose graph also outputs, for each probe, the output of the Conv whose weight
    initializer equals the probe's weight (a detector's prediction convs: their outputs are the raw network
    outputs, before the decode). Returns the probes with no such Conv (their weights differ in the ONNX)."""
    import onnx
    from onnx import numpy_helper

    from edgedeploy.io import atomic_write_bytes

    model = onnx.load(str(onnx_path))
    inits = {i.name: i for i in model.graph.initializer}
    convs = [(n, numpy_helper.to_array(inits[n.input[1]])) for n in model.graph.node
             if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in inits]
    missing = []
    for name, w in probe_weights:
        node = next((n for n, cw in convs if cw.shape == w.shape and np.array_equal(cw, w)), None)
        if node is None:
            missing.append(name)
            continue
        model.graph.output.append(onnx.ValueInfoProto(name=node.output[0]))
    atomic_write_bytes(out_path, model.SerializeToString())
    return missing


def figure(result: ParityResult) -> str:
    """The one-line summary shown on screen and in the report table."""
    s = f"max_abs {result.max_abs:.2e}, max_rel {result.max_rel:.2e}"
    if result.spreads:
        lo, hi = min(result.spreads.values()), max(result.spreads.values())
        text = f"{lo:.2e}" if lo == hi else f"{lo:.2e}..{hi:.2e}"
        ratio = f"{lo / result.atol:.3g}" if lo == hi else f"{lo / result.atol:.3g}..{hi / result.atol:.3g}"
        s += f", spread {text} ({ratio}x atol)" if result.atol > 0 else f", spread {text}"
    return s + f", cos {result.min_cosine:.6f} (rtol {result.rtol:g}, atol {result.atol:g})"
