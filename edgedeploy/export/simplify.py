"""Graph simplification: onnxsim, then onnxslim, then none, recording node counts and why a tool was passed over.

Simplification is an optimisation, not a requirement. A tool that crashes, reports failure, or returns a model
that fails the ONNX checker (full check, strict type inference) or that ONNX Runtime cannot load is passed over
for the next one; if every tool fails the raw ONNX is used. The report records each tool tried and its error.
The simplified graph still has to pass its own parity proof.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from edgedeploy.errors import ExportError

SIMPLIFIERS = ("onnxsim", "onnxslim")
CHOICES = ("auto",) + SIMPLIFIERS + ("none",)


@dataclass
class SimplifyResult:
    tool: str  # "onnxsim" | "onnxslim" | "none"
    nodes_before: int
    nodes_after: int
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    error: str = ""  # why the tools before `tool` were passed over ("; "-joined), or why none ran
    tried: list[str] = field(default_factory=list)  # tools attempted, in order


def op_histogram(model) -> dict[str, int]:
    return dict(Counter(n.op_type for n in model.graph.node).most_common())


def tool_order(choice: str = "auto") -> list[str]:
    """The tools to try for `--simplifier`: auto = onnxsim then onnxslim; a named tool alone (then none)."""
    if choice not in CHOICES:
        raise ExportError(f"--simplifier {choice!r}: choose one of {', '.join(CHOICES)}")
    if choice == "auto":
        return list(SIMPLIFIERS)
    return [] if choice == "none" else [choice]


def _run_onnxsim(model):
    import onnxsim

    out, ok = onnxsim.simplify(model)
    if not ok:
        raise ExportError("onnxsim could not validate the simplified model")
    return out


def _run_onnxslim(model):
    import onnxslim

    return onnxslim.slim(model)


TOOLS: dict[str, Callable] = {"onnxsim": _run_onnxsim, "onnxslim": _run_onnxslim}


def validate(model, check_runtime: bool = True) -> None:
    """Raise if `model` fails the ONNX checker (full check) or, with `check_runtime`, ONNX Runtime CPU loading."""
    import onnx

    onnx.checker.check_model(model, full_check=True)
    if check_runtime:
        import onnxruntime as ort

        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def simplify_model(model, choice: str = "auto", check_runtime: bool = True):
    """Return (simplified ModelProto, SimplifyResult). Never raises for a tool failure; returns the input.

    `check_runtime=False` for graphs ONNX Runtime cannot load anyway (a TensorRT plugin node)."""
    before = len(model.graph.node)
    errors: list[str] = []
    tried: list[str] = []
    for tool in tool_order(choice):
        tried.append(tool)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = TOOLS[tool](model)
            validate(out, check_runtime)
            return out, SimplifyResult(tool, before, len(out.graph.node), op_histogram(model), op_histogram(out),
                                       "; ".join(errors), tried)
        except Exception as e:  # noqa: BLE001  (fall through to the next tool)
            errors.append(f"{tool}: {type(e).__name__}: {str(e).strip()[:200]}")
    if not tried:
        errors.append("disabled (--simplifier none)")
    return model, SimplifyResult("none", before, before, op_histogram(model), op_histogram(model), "; ".join(errors),
                                 tried)
