"""The parity proof: exported outputs against PyTorch's, with stated tolerances and the figures behind them.

`numpy.testing.assert_allclose` decides (|onnx - torch| <= atol + rtol * |torch| element-wise); the max-abs,
max-relative and cosine figures are recorded either way so a report shows how close "passed" was.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np


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


@dataclass
class ParityResult:
    passed: bool
    rtol: float
    atol: float
    outputs: list[OutputParity] = field(default_factory=list)
    n_inputs: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

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
        head = f"{'output':<16}{'shape':<22}{'max_abs':>11}{'max_rel':>11}{'cosine':>10}{'mismatch':>14}  ok"
        rows = [head]
        for o in self.outputs:
            rows.append(
                f"{o.name:<16}{str(o.shape):<22}{o.max_abs:>11.3g}{o.max_rel:>11.3g}{o.cosine:>10.6f}"
                f"{f'{o.mismatched}/{o.total}':>14}  {'yes' if o.passed else 'NO'}"
            )
        rows.append(f"tolerance: rtol={self.rtol:g} atol={self.atol:g} over {self.n_inputs} input(s)")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["max_abs"] = self.max_abs
        d["min_cosine"] = self.min_cosine
        return d


def compare_output(name: str, ref: np.ndarray, got: np.ndarray, rtol: float, atol: float) -> OutputParity:
    """Compare one output array against its reference."""
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
    significant = np.abs(r) > atol
    max_rel = float((diff[significant] / np.abs(r[significant])).max()) if significant.any() else 0.0
    denom = np.linalg.norm(r) * np.linalg.norm(g)
    cosine = float(r @ g / denom) if denom > 0 else float(np.array_equal(r, g))
    bad = int((diff > atol + rtol * np.abs(r)).sum()) if np.isfinite(g).all() else r.size
    message = ""
    try:
        np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol, err_msg=f"output {name!r}")
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
