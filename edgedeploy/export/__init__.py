"""PyTorch -> ONNX (parity-proved, simplified) -> FP16 / INT8 Q/DQ ONNX -> TensorRT / TensorRT-RTX engines.

`export(model_name, **options)` is the Python API of `deploy export`; see docs/EXPORT.md.
"""

from __future__ import annotations

from edgedeploy.export.options import ExportOptions

__all__ = ["ExportOptions", "export"]


def export(model: str, **options):
    """Run the export pipeline; returns the ExportReport (also written to <out>/<model>/export_report.json)."""
    from edgedeploy.export.pipeline import export as _export

    return _export(model, **options)
