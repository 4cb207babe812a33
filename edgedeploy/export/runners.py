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


def add_probe_outputs(onnx_path: str | Path, probe_weights: list[tuple[str, np.ndarray]], out_path: str | Path) -> list[str]:
    """Write a copy of the ONNX whose graph also outputs, for each probe, the output of the Conv whose weight
    initializer equals the probe's weight (a detector's prediction convs: their outputs are the raw network
    outputs, before the decode). Returns the probes with no such Conv (their weights differ in the ONNX)."""
    import onnx
    from onnx import numpy_helper

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
    from edgedeploy.io import atomic_write_bytes

    atomic_write_bytes(out_path, model.SerializeToString())
    return missing


class TorchRunner:
    """`probes`: modules whose outputs are appended, in order, to the model's (forward hooks)."""

    def __init__(self, module, probes=()):
        self.module = module.eval()
        self.probes = list(probes)

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        import torch

        captured: dict[int, torch.Tensor] = {}
        handles = [m.register_forward_hook(lambda _m, _i, o, k=k: captured.setdefault(k, o))
                   for k, m in enumerate(self.probes)]
        try:
            with torch.no_grad():
                out = self.module(torch.from_numpy(np.ascontiguousarray(x)))
        finally:
            for h in handles:
                h.remove()
        if isinstance(out, torch.Tensor):
            out = (out,)
        elif isinstance(out, dict):
            out = tuple(out.values())
        out = tuple(out) + tuple(captured[k] for k in range(len(self.probes)))
        return [o.detach().cpu().numpy() for o in out]
