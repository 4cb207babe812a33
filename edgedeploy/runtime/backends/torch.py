"""PyTorch eager backend (CUDA when present). Also the reference the other backends are compared with.

Besides the numpy `infer`, `infer_torch` keeps tensors on the model's device so the detector's NMS can run
on the GPU and only the final detections come back to the host.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgedeploy.errors import EdgeDeployError
from edgedeploy.runtime.engine import DYNAMIC, Engine, TensorSpec, Timing



def default_output_names(task: str) -> list[str]:
    return {"detect": ["boxes", "scores"], "classify": ["logits"], "segment": ["logits"]}.get(task, ["output0"])


class TorchEngine(Engine):
    backend = "torch"

    def __init__(
        self,
        model,
        *,
        input_shape: Sequence[int] = (DYNAMIC, 3, 224, 224),
        input_name: str = "images",
        output_names: Sequence[str] | None = None,
        device: str | None = None,
        half: bool = False,
    ) -> None:
        super().__init__()
        import torch

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise EdgeDeployError(f"device={device!r} requested but PyTorch sees no CUDA GPU; use --device cpu")
        self.device = device
        self.torch_device = torch.device(device)
        self.dtype = torch.float16 if half else torch.float32
        self.model = model.eval().to(self.torch_device, self.dtype)
        task = getattr(getattr(model, "model_info", None), "task", "")
        self._output_names = list(output_names or default_output_names(task))
        self.inputs = [TensorSpec(input_name, tuple(input_shape), np.dtype(np.float16 if half else np.float32))]
        # Output shapes are known only after a run; rank is what callers need.
        self.outputs = [TensorSpec(n, (), np.dtype(np.float32)) for n in self._output_names]

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, model: str | None = None, device: str | None = None,
                        imgsz: int | None = None, num_classes: int | None = None) -> "TorchEngine":
        """Build the registry model `model` (or the sidecar's) and load the checkpoint at `path` into it."""
        from edgedeploy.engines.sidecar import read_sidecar
        from edgedeploy.models.registry import create_model, get_model_info

        meta = read_sidecar(path, required=False)
        name = model or (meta.model if meta else None)
        if meta is None and str(path).endswith((".pt", ".pth")):
            # a `deploy train` checkpoint names its model, class count and input size itself
            from edgedeploy.models.checkpoint import read_checkpoint

            trained = read_checkpoint(path).get("meta") or {}
            name = name or trained.get("model_name")
            num_classes = num_classes if num_classes is not None else trained.get("num_classes")
            imgsz = imgsz or trained.get("imgsz")
        if not name:
            raise EdgeDeployError(f"{Path(path).name}: a checkpoint needs --model NAME (no sidecar names the model)")
        info = get_model_info(name)
        if num_classes is None and meta and meta.class_names:
            num_classes = len(meta.class_names)
        net = create_model(name, num_classes=num_classes, weights=str(path))
        size = imgsz or (int(meta.input_shape[-1]) if meta else info.imgsz)
        return cls(net, input_shape=(DYNAMIC, 3, size, size), device=device)

    # ---- device path ----------------------------------------------------------------------------------------
    def infer_torch(self, x) -> dict[str, Any]:
        """Tensor in (any device), tensors out on the model's device: no host copies of the outputs."""
        import torch

        with torch.inference_mode():
            out = self.model(x.to(self.torch_device, self.dtype, non_blocking=True))
        if isinstance(out, torch.Tensor):
            out = (out,)
        elif isinstance(out, dict):
            out = tuple(out.values())
        if len(out) != len(self._output_names):
            self._output_names = self._output_names[: len(out)] + [
                f"output{i}" for i in range(len(self._output_names), len(out))
            ]
        return dict(zip(self._output_names, out))

    def _sync(self) -> None:
        import torch

        if self.torch_device.type == "cuda":
            torch.cuda.synchronize(self.torch_device)

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        x_host = torch.from_numpy(next(iter(feed.values())))
        t0 = time.perf_counter()
        x = x_host.to(self.torch_device, non_blocking=False)
        self._sync()
        t1 = time.perf_counter()
        outs = self.infer_torch(x)
        t_enq = time.perf_counter()
        self._sync()
        t2 = time.perf_counter()
        result = {k: v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy() for k, v in outs.items()}
        t3 = time.perf_counter()
        on_gpu = self.torch_device.type == "cuda"
        self.last_timing = Timing(
            enqueue_ms=(t_enq - t1) * 1e3,
            h2d_ms=(t1 - t0) * 1e3 if on_gpu else None,
            compute_ms=(t2 - t1) * 1e3,
            d2h_ms=(t3 - t2) * 1e3 if on_gpu else None,
            latency_ms=(t3 - t0) * 1e3,
        )
        return result

    def close(self) -> None:
        self.model = None
