"""One inference abstraction: the backend table, engine capabilities, probes on the PyTorch engine, the parity
proof's ONNX Runtime engine, and the one TensorSpec / letterbox geometry / NMS every caller shares."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from edgedeploy.data.preprocess import letterbox, letterbox_geometry
from edgedeploy.errors import EdgeDeployError
from edgedeploy.export.parity import PARITY_THREADS, add_probe_outputs, engine_runner, onnx_engine, torch_engine
from edgedeploy.runtime.engine import Capabilities, TensorSpec
from edgedeploy.runtime.loader import BACKENDS, engine_kind


def test_backend_table_and_engine_interface_import_no_backend():
    assert set(BACKENDS) == {"tensorrt", "onnxruntime", "onnxruntime-cuda", "torch"}
    assert engine_kind("m.onnx") == "onnxruntime" and engine_kind("m.PLAN") == "tensorrt" and engine_kind("m.pt") == "torch"
    assert BACKENDS["onnxruntime"].available() and BACKENDS["torch"].engine_class().backend == "torch"
    with pytest.raises(EdgeDeployError, match="cannot tell the backend"):
        engine_kind("m.tflite")
    code = ("import sys, edgedeploy.runtime.engine; "
            "print(sorted(m for m in sys.modules if m.startswith('edgedeploy.runtime.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "backends" not in out and "loader" not in out, out


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).mean((2, 3))


def test_torch_engine_probes_follow_outputs_and_declare_torch_io(tmp_path):
    net = _Net()
    eng = torch_engine(net, output_names=["y", "a_out"], probes=[net.a])
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    y, a_out = engine_runner(eng)(x)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(a_out), net.a(torch.from_numpy(x)))
        torch.testing.assert_close(torch.from_numpy(y), net(torch.from_numpy(x)))
    assert not net.a._forward_hooks  # hooks removed after the run
    assert eng.capabilities.torch_io and eng.source_model is net


def test_parity_onnx_engine_settings_and_probe_outputs(tmp_path):
    net = _Net().eval()
    path, probed = tmp_path / "n.onnx", tmp_path / "p.onnx"
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    torch.onnx.export(net, torch.from_numpy(x), str(path), input_names=["images"], output_names=["y"], dynamo=False)
    missing = add_probe_outputs(path, [("a", net.a.weight.detach().numpy()), ("z", np.zeros((1, 1, 1, 1), np.float32))],
                                probed)
    assert missing == ["z"]
    eng = onnx_engine(probed)
    opts = eng.session.get_session_options()
    assert opts.intra_op_num_threads == PARITY_THREADS and opts.inter_op_num_threads == 1
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert eng.providers == ["CPUExecutionProvider"] and eng.capabilities == Capabilities()
    assert eng.source_model is None
    y, a_out = engine_runner(eng)(x.astype(np.float64))  # cast to the engine's input dtype, like an FP16 graph
    ref = engine_runner(torch_engine(net, output_names=["y", "a"], probes=[net.a]))(x)
    np.testing.assert_allclose(y, ref[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a_out, ref[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("align", ["center", "topleft"])
def test_one_letterbox_geometry_places_the_cpu_letterbox(align):
    img = np.full((50, 120, 3), 200, np.uint8)
    out, scale, pad = letterbox(img, (64, 96), pad_value=0, align=align)
    g_scale, g_pad, (nh, nw) = letterbox_geometry(50, 120, 64, 96, True, align)
    assert (scale, pad) == (g_scale, g_pad)
    rows, cols = np.nonzero(out[:, :, 0])
    assert (rows.min(), cols.min(), rows.max() + 1 - rows.min(), cols.max() + 1 - cols.min()) == (pad[1], pad[0], nh, nw)


def test_triton_describes_io_with_the_runtime_tensorspec(tmp_path):
    from edgedeploy.engines.triton import _io_block, triton_type

    spec = TensorSpec("images", (-1, 3, 64, 64), np.dtype(np.float16))
    assert triton_type(spec.dtype) == "TYPE_FP16" and triton_type(np.dtype(np.complex64)) == "TYPE_FP32"
    assert "dims: [ 3, 64, 64 ]" in _io_block("input", [spec], batched=True)


def test_one_device_parser_for_training_evaluation_and_the_torch_engine():
    import torch

    from edgedeploy.errors import EdgeDeployError
    from edgedeploy.runtime.backends.torch import TorchEngine
    from edgedeploy.runtime.engine import select_device

    assert select_device("cpu") == torch.device("cpu")
    assert select_device(None) == select_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(EdgeDeployError, match="expected auto, cpu, cuda, cuda:N or N"):
        select_device("tpu")
    if not torch.cuda.is_available():
        for bad in ("cuda", "cuda:1", "0"):
            with pytest.raises(EdgeDeployError, match="CUDA is not available here"):
                select_device(bad)
        with pytest.raises(EdgeDeployError, match="CUDA is not available here"):
            TorchEngine(torch.nn.Conv2d(3, 4, 3), input_shape=(1, 3, 8, 8), device="cuda")
    assert TorchEngine(torch.nn.Conv2d(3, 4, 3), input_shape=(1, 3, 8, 8), device="cpu").device == "cpu"
