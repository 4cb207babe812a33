"""torch -> ONNX with the TorchScript exporter (`dynamo=False`: robust for these CNNs, stable op naming),
then `onnx.checker`. A failed export names the innermost module that cannot be exported and the op.
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from edgedeploy.errors import ExportError

_OP_PATTERNS = (
    re.compile(r"operator '([\w:.]+)'"),
    re.compile(r"Unsupported: ONNX export of (?:operator )?([\w:. ]+?)(?:[,.]|$)", re.M),
    re.compile(r"(aten::\w+)"),
)


def _export_bytes(module, args: tuple, input_names, output_names, dynamic_axes, opset: int) -> bytes:
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer chatter
        torch.onnx.export(
            module,
            args,
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes or None,
            do_constant_folding=True,
        )
    return buf.getvalue()


def _failing_op(message: str) -> str:
    for pattern in _OP_PATTERNS:
        m = pattern.search(message)
        if m:
            return m.group(1).strip()
    return "unknown op"


def locate_export_failure(model, sample: Any, opset: int) -> str | None:
    """The dotted name (and type) of the deepest submodule that fails to export alone, or None.

    Records each submodule's first call inputs with forward hooks, then descends from the root into
    whichever child still fails. Only run after a failure: it re-exports subtrees.
    """
    import torch

    inputs: dict[str, tuple] = {}
    hooks = []
    for name, mod in model.named_modules():
        def hook(m, args, _name=name):
            inputs.setdefault(_name, args)

        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(sample)
    except Exception:
        pass  # eager failure: the export failure is then the eager one, reported by the caller
    finally:
        for h in hooks:
            h.remove()

    def fails(name: str, mod) -> bool:
        args = inputs.get(name)
        if args is None or not all(isinstance(a, torch.Tensor) for a in args):
            return False
        try:
            _export_bytes(mod, args, None, None, None, opset)
            return False
        except Exception:
            return True

    culprit = None
    prefix, current = "", model
    while True:
        nxt = None
        for child_name, child in current.named_children():
            full = f"{prefix}{child_name}"
            if fails(full, child):
                nxt = (full, child)
                break
        if nxt is None:
            break
        culprit = nxt
        prefix, current = nxt[0] + ".", nxt[1]
    return f"{culprit[0]} ({type(culprit[1]).__name__})" if culprit else None


def export_onnx(
    model,
    sample: np.ndarray,
    path: str | Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]] | None,
    opset: int = 17,
):
    """Export `model` (already in eval mode) to `path` atomically and check it; returns the onnx.ModelProto."""
    import onnx
    import torch

    from edgedeploy.io import atomic_write_bytes

    if opset < 17:
        raise ExportError(f"opset {opset} is too old: use --opset 17 or newer (LayerNormalization, per-channel Q/DQ)")
    x = torch.from_numpy(np.ascontiguousarray(sample))
    try:
        data = _export_bytes(model, (x,), input_names, output_names, dynamic_axes, opset)
    except Exception as e:  # noqa: BLE001  (any exporter failure becomes an actionable error)
        msg = f"{type(e).__name__}: {e}"
        op = _failing_op(msg)
        where = locate_export_failure(model, x, opset)
        first = msg.strip().splitlines()[0][:400] if msg.strip() else type(e).__name__
        raise ExportError(
            f"torch.onnx.export failed at module {where or '<top level>'} on op {op}: {first}\n"
            "Fix: replace that op with an exportable equivalent (e.g. a fixed-size pooling instead of "
            "adaptive_avg_pool2d with a non-dividing output size), or try another --opset."
        ) from e
    proto = onnx.load_from_string(data)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"onnx.checker rejected the exported model: {e}") from e
    atomic_write_bytes(path, data)
    return proto
