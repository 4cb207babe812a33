"""Engine backends: TensorRT (`tensorrt`), ONNX Runtime (`onnxruntime`, and `onnxruntime-cuda` with I/O binding),
PyTorch eager (`torch`)."""

from __future__ import annotations

import importlib.util

GPU_BACKENDS = ("tensorrt", "torch-cuda", "onnxruntime-cuda")


def gpu_backend_status() -> dict[str, str | None]:
    """For each GPU backend, None when it can run here, else why not ("not installed: ...", "no GPU: ...").
    Cheap and never raises: `deploy bench --compare` and benchmarks/runtime_targets.py list every GPU backend."""
    status: dict[str, str | None] = {}
    try:
        import torch

        cuda_build = torch.version.cuda is not None
        gpu = cuda_build and torch.cuda.is_available()
    except ImportError:
        cuda_build = gpu = False
    if not cuda_build:
        status["torch-cuda"] = "not installed: this PyTorch is a CPU-only build"
    else:
        status["torch-cuda"] = None if gpu else "no GPU: PyTorch sees no CUDA device"
    if importlib.util.find_spec("tensorrt") is None:
        status["tensorrt"] = "not installed: `import tensorrt` fails (JetPack ships it; x86: NVIDIA's pip index)"
    else:
        status["tensorrt"] = None if gpu else "no GPU: no CUDA device visible"
    try:
        import onnxruntime as ort

        has_cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:
        has_cuda_ep = False
    if not has_cuda_ep:
        status["onnxruntime-cuda"] = "not installed: onnxruntime-gpu (`pip install 'edgedeploy[ort-gpu]'`)"
    else:
        status["onnxruntime-cuda"] = None if gpu else "no GPU: no CUDA device visible"
    return {k: status[k] for k in GPU_BACKENDS}
