"""ONNX Runtime on CUDA with I/O binding: the GPU pipeline writes the input into a device buffer, ONNX Runtime
reads it in place and leaves its outputs on the device; nothing round-trips through the host.

Needs the `onnxruntime-gpu` package (`pip install 'edgedeploy[ort-gpu]'`) *instead of* the CPU `onnxruntime`
package: both install the same `onnxruntime` module, and with both present whichever was installed last wins.
The CUDA execution provider runs on this engine's own stream (`user_compute_stream`), the same stream the
preprocessing kernel is launched on, so the kernel's writes are ordered before ONNX Runtime's reads.
"""

from __future__ import annotations

import os
from importlib import metadata
from typing import Any, Iterable

import numpy as np

from edgedeploy.errors import EdgeDeployError
from edgedeploy.runtime import cuda
from edgedeploy.runtime.backends.onnxruntime import _ORT_TYPES, OnnxRuntimeEngine
from edgedeploy.runtime.engine import Capabilities

REINSTALL = ("pip uninstall -y onnxruntime onnxruntime-gpu && pip install --force-reinstall "
             "'onnxruntime-gpu>=1.20'")


class OrtGpuInstallError(EdgeDeployError):
    """onnxruntime-gpu missing, shadowed by the CPU package, or unable to load CUDA/cuDNN."""


def _ort_distributions(dists: Iterable[Any] | None = None) -> set[str]:
    names = set()
    for d in dists if dists is not None else metadata.distributions():
        name = (d.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith("onnxruntime"):
            names.add(name)
    return names


def check_ort_gpu_install(available_providers: Iterable[str], dists: Iterable[Any] | None = None) -> None:
    """Raise `OrtGpuInstallError` naming the fix when ONNX Runtime cannot run on CUDA here."""
    names = _ort_distributions(dists)
    gpu = sorted(n for n in names if n.startswith("onnxruntime-gpu"))
    if gpu and "onnxruntime" in names:
        raise OrtGpuInstallError(
            f"both the CPU package `onnxruntime` and `{gpu[0]}` are installed; they provide the same `onnxruntime` "
            f"module, so one shadows the other. Keep only the GPU one: `{REINSTALL}`"
        )
    if "CUDAExecutionProvider" not in set(available_providers):
        if not gpu:
            raise OrtGpuInstallError(
                "ONNX Runtime on CUDA needs the `onnxruntime-gpu` package; this environment has only "
                f"{sorted(names) or ['no onnxruntime']}. Install it with `pip install 'edgedeploy[ort-gpu]'` and "
                f"remove the CPU package: `{REINSTALL}`"
            )
        raise OrtGpuInstallError(
            f"{gpu[0]} is installed but offers no CUDAExecutionProvider (a broken install). Reinstall: `{REINSTALL}`"
        )


def cuda_provider_failed_message(version: str) -> str:
    return (
        f"onnxruntime-gpu {version} could not start its CUDA execution provider, so ONNX Runtime fell back to the "
        "CPU: the CUDA or cuDNN libraries it links against are missing or of another major version (onnxruntime-gpu "
        "1.19+ on PyPI needs CUDA 12.x and cuDNN 9; the CUDA 13 builds need CUDA 13). Fix: "
        "`pip install 'onnxruntime-gpu[cuda,cudnn]'` (pulls the NVIDIA CUDA/cuDNN wheels), or import torch before "
        "onnxruntime / call `onnxruntime.preload_dlls()` to reuse PyTorch's; check with "
        "`python -c 'import onnxruntime as o; o.preload_dlls(); o.print_debug_info()'`. Or run with --device cpu."
    )


class _OrtDeviceArray:
    """An output OrtValue left on the GPU, seen by torch/cupy through `__cuda_array_interface__` (zero-copy)."""

    def __init__(self, value: Any) -> None:
        self._value = value  # keeps the ORT allocation alive
        self.shape = tuple(int(d) for d in value.shape())
        self.dtype = np.dtype(_ORT_TYPES[value.data_type()])

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (int(self._value.data_ptr()), False),
                "version": 3}


class OnnxRuntimeCudaEngine(OnnxRuntimeEngine):
    backend = "onnxruntime-cuda"

    def __init__(self, path: str | os.PathLike, *, device_index: int = 0, io_device: str = "cuda",
                 threads: int | None = None) -> None:
        """`io_device`: where the bound buffers live: 'cuda' normally; 'cpu' runs the same I/O-binding code on
        the CPU provider with host-memory buffers (how the emulated-GPU tests drive this backend)."""
        import onnxruntime as ort

        self.device_index = device_index
        self.io_device = io_device
        self.stream = None
        if io_device == "cuda":
            check_ort_gpu_install(ort.get_available_providers())
            cuda.init(device_index)
            self.stream = cuda.Stream()
            providers: list[Any] = [
                ("CUDAExecutionProvider", {"device_id": device_index, "user_compute_stream": str(self.stream.ptr)}),
                "CPUExecutionProvider",
            ]
        else:
            self.stream = cuda.Stream()
            providers = ["CPUExecutionProvider"]
        try:
            super().__init__(path, providers=providers, threads=threads)
        except EdgeDeployError:
            self.stream.close()
            raise
        if io_device == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            self.close()
            raise OrtGpuInstallError(cuda_provider_failed_message(ort.__version__))
        self.device = f"cuda:{device_index}" if io_device == "cuda" else "cpu"
        self.binding = self.session.io_binding()
        self._in_buf: cuda.DeviceBuffer | None = None
        self._outputs: dict[str, Any] = {}

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(device_buffers=True, stream=True, graph_capture=False,
                            fp16_io=self.inputs[0].dtype == np.float16)

    def device_input(self, shape: tuple[int, ...]) -> int:
        spec = self.inputs[0]
        shape = tuple(int(d) for d in shape)
        nbytes = int(np.prod(shape)) * spec.dtype.itemsize
        if self._in_buf is None or self._in_buf.nbytes < nbytes:
            if self._in_buf is not None:
                self.stream.synchronize()  # the previous run may still read the old buffer
                self._in_buf.free()
            self._in_buf = cuda.DeviceBuffer(nbytes, shape, spec.dtype)
        self.binding.bind_input(spec.name, self.io_device, self.device_index, spec.dtype, list(shape),
                                self._in_buf.ptr)
        return self._in_buf.ptr

    def execute(self) -> None:
        if self._in_buf is None:
            raise EdgeDeployError("execute() before device_input(shape): nothing to run on")
        if self.io_device != "cuda":  # the CPU provider runs at once: what is queued on the stream (the
            self.stream.synchronize()  # preprocessing kernel) must have written the input first
        for spec in self.outputs:  # ONNX Runtime allocates each output on the device at its run-time shape
            self.binding.bind_output(spec.name, self.io_device, self.device_index)
        try:
            self.session.run_with_iobinding(self.binding)
        except Exception as e:
            raise EdgeDeployError(f"ONNX Runtime failed running {self.path.name}: {e}") from e
        self._outputs = dict(zip(self._output_names, self.binding.get_outputs()))

    def device_outputs(self) -> dict[str, Any]:
        if self.io_device == "cuda":
            return {k: _OrtDeviceArray(v) for k, v in self._outputs.items()}
        return {k: v.numpy() for k, v in self._outputs.items()}

    def fetch_outputs(self) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self._outputs.items()}

    def close(self) -> None:
        self._outputs = {}
        if getattr(self, "binding", None) is not None:
            self.binding.clear_binding_inputs()
            self.binding.clear_binding_outputs()
            self.binding = None
        if getattr(self, "_in_buf", None) is not None:
            self._in_buf.free()
            self._in_buf = None
        super().close()
        if getattr(self, "stream", None) is not None:
            self.stream.close()
            self.stream = None
