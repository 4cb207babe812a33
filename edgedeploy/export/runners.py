"""Runners with one calling convention: `runner(x: np.ndarray) -> list[np.ndarray]` (outputs in name order)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class OrtRunner:
    """ONNX Runtime CPU session; FP16-input models get their input cast automatically."""

    def __init__(self, model_path: str | Path, threads: int = 2, spin: bool = False):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        if not spin:  # busy-waiting threads waste a shared CPU; benchmarks keep ORT's default (spin)
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_dtype = np.float16 if "float16" in inp.type else np.float32
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        outs = self.session.run(None, {self.input_name: x.astype(self.input_dtype, copy=False)})
        return [np.asarray(o) for o in outs]


class TorchRunner:
    def __init__(self, module):
        self.module = module.eval()

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        import torch

        with torch.no_grad():
            out = self.module(torch.from_numpy(np.ascontiguousarray(x)))
        if isinstance(out, torch.Tensor):
            out = (out,)
        elif isinstance(out, dict):
            out = tuple(out.values())
        return [o.detach().cpu().numpy() for o in out]
