"""Graph simplification (onnxsim, falling back to onnxslim), recording node counts before and after.

Simplification is an optimisation, not a requirement: if both tools fail the raw ONNX is used and the
report says why. The simplified graph still has to pass its own parity proof.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field

from edgedeploy.errors import ExportError


@dataclass
class SimplifyResult:
    tool: str  # "onnxsim" | "onnxslim" | "none"
    nodes_before: int
    nodes_after: int
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    error: str = ""


def op_histogram(model) -> dict[str, int]:
    return dict(Counter(n.op_type for n in model.graph.node).most_common())


def simplify_model(model, prefer: str = "onnxsim"):
    """Return (simplified ModelProto, SimplifyResult). Never raises for a tool failure; returns the input."""
    import onnx

    before = len(model.graph.node)
    errors = []
    order = ["onnxsim", "onnxslim"] if prefer == "onnxsim" else ["onnxslim", "onnxsim"]
    for tool in order:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if tool == "onnxsim":
                    import onnxsim

                    out, ok = onnxsim.simplify(model)
                    if not ok:
                        raise ExportError("onnxsim could not validate the simplified model")
                else:
                    import onnxslim

                    out = onnxslim.slim(model)
            onnx.checker.check_model(out)
            return out, SimplifyResult(tool, before, len(out.graph.node), op_histogram(model), op_histogram(out))
        except Exception as e:  # noqa: BLE001  (fall through to the next tool)
            errors.append(f"{tool}: {type(e).__name__}: {str(e)[:200]}")
    return model, SimplifyResult("none", before, before, op_histogram(model), op_histogram(model), "; ".join(errors))
