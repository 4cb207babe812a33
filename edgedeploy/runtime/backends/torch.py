"""PyTorch eager backend (CUDA when present). Also the reference the other backends are compared with.

Besides the numpy `infer`, `infer_torch` keeps tensors on the model's device so the detector's NMS can run
on the GPU and only the final detections come back to the host. `probes` (submodules) add their outputs after
the model's, captured with forward hooks: the parity proof compares a detector's raw pre-decode outputs so.

On CUDA the engine also speaks the device I/O protocol of the GPU pipeline (`Capabilities.device_buffers`): the
input is a torch tensor per input shape whose address the NVRTC preprocessing kernel writes, the model runs on
the engine's own CUDA stream (`self.stream`, a cuda-python stream that torch sees as an `ExternalStream`, the
same stream the kernel is launched on), and its outputs are read in place. With `cuda_graph=True` each input
shape is captured once as a `torch.cuda.CUDAGraph` (static input tensor, static outputs) and replayed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgedeploy.errors import EdgeDeployError
from edgedeploy.runtime.engine import DYNAMIC, Capabilities, Engine, TensorSpec, Timing, select_device


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
        cuda_graph: bool = False,
        device_io: bool | None = None,
        probes: Sequence[Any] = (),
    ) -> None:
        """`device_io`: None = the device I/O protocol on CUDA only; True also on the CPU, where the "device"
        buffers are host tensors (how the emulated-GPU tests drive the GPU pipeline without a GPU).
        `probes`: submodules of `model` whose (first) outputs `infer`/`infer_torch` append, in order, to the
        model's; name them in `output_names` after the model's outputs."""
        super().__init__()
        import torch

        self.torch_device = select_device(device)
        self.device = str(self.torch_device)
        if self.torch_device.type == "cuda" and self.torch_device.index is None:
            self.torch_device = torch.device("cuda", torch.cuda.current_device())
        self.device_index = self.torch_device.index or 0
        on_gpu = self.torch_device.type == "cuda"
        self._device_io = on_gpu if device_io is None else bool(device_io)
        self.use_cuda_graph = bool(cuda_graph) and on_gpu
        self.graph_error: str | None = None
        self._static_in: dict[tuple[int, ...], Any] = {}  # input shape -> input tensor the kernel writes
        self._graphs: dict[tuple[int, ...], tuple[Any, dict[str, Any]]] = {}
        self._shape: tuple[int, ...] | None = None
        self._device_out: dict[str, Any] = {}
        self._stream: Any = None
        self.dtype = torch.float16 if half else torch.float32
        self.model = model.eval().to(self.torch_device, self.dtype)
        self.probes = list(probes)
        task = getattr(getattr(model, "model_info", None), "task", "")
        self._output_names = list(output_names or default_output_names(task))
        self.inputs = [TensorSpec(input_name, tuple(input_shape), np.dtype(np.float16 if half else np.float32))]
        # Output shapes are known only after a run; rank is what callers need.
        self.outputs = [TensorSpec(n, (), np.dtype(np.float32)) for n in self._output_names]

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, model: str | None = None, device: str | None = None,
                        imgsz: int | None = None, num_classes: int | None = None,
                        cuda_graph: bool = False) -> "TorchEngine":
        """Build the registry model `model` (else the one the checkpoint or its sidecar names) and load the
        checkpoint at `path` into it; class count and input size default to what the artifact records."""
        from edgedeploy.models.artifact import describe_artifact
        from edgedeploy.models.registry import create_model

        desc = describe_artifact(path, model=model, imgsz=imgsz, num_classes=num_classes)
        if not desc.model:
            raise EdgeDeployError(f"{Path(path).name}: a checkpoint needs --model NAME (no sidecar names the model)")
        net = create_model(desc.model, num_classes=desc.num_classes, weights=str(path))
        return cls(net, input_shape=(DYNAMIC, 3, desc.imgsz, desc.imgsz), device=device, cuda_graph=cuda_graph)

    # ---- device path ----------------------------------------------------------------------------------------
    def infer_torch(self, x) -> dict[str, Any]:
        """Tensor in (any device), tensors out on the model's device: no host copies of the outputs."""
        import torch

        captured: dict[int, Any] = {}
        handles = [m.register_forward_hook(lambda _m, _i, o, k=k: captured.setdefault(k, o))
                   for k, m in enumerate(self.probes)]
        try:
            with torch.inference_mode():
                out = self.model(x.to(self.torch_device, self.dtype, non_blocking=True))
        finally:
            for h in handles:
                h.remove()
        return self._named(out, [captured[k] for k in range(len(self.probes))])

    def _named(self, out: Any, extra: Sequence[Any] = ()) -> dict[str, Any]:
        import torch

        if isinstance(out, torch.Tensor):
            out = (out,)
        elif isinstance(out, dict):
            out = tuple(out.values())
        out = tuple(out) + tuple(extra)
        if len(out) != len(self._output_names):
            self._output_names = self._output_names[: len(out)] + [
                f"output{i}" for i in range(len(self._output_names), len(out))
            ]
        return dict(zip(self._output_names, out))

    # ---- device I/O protocol (GPU pipeline) ------------------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(device_buffers=self._device_io, stream=self._device_io, graph_capture=self.use_cuda_graph,
                            fp16_io=self.dtype != self._torch().float32, torch_io=True)

    @property
    def source_model(self) -> Any:
        return self.model

    @staticmethod
    def _torch():
        import torch

        return torch

    def _stream_ctx(self):
        """Run torch work on this engine's stream (the one the preprocessing kernel is launched on)."""
        import contextlib

        torch = self._torch()
        if self.torch_device.type != "cuda":
            return contextlib.nullcontext()
        return torch.cuda.stream(torch.cuda.ExternalStream(self.stream.ptr, device=self.torch_device))

    @property
    def stream(self) -> Any:
        """The cuda-python stream the GPU pipeline's kernel and this model share (created on first use; None
        without device I/O)."""
        if self._stream is None and self._device_io:
            from edgedeploy.runtime import cuda

            cuda.init(self.device_index)
            self._stream = cuda.Stream()
        return self._stream

    def device_input(self, shape: tuple[int, ...]) -> int:
        if not self._device_io:
            return super().device_input(shape)
        torch = self._torch()
        self.stream  # noqa: B018 - created before the first buffer: the kernel and the model share it
        shape = tuple(int(d) for d in shape)
        if shape not in self._static_in:
            if len(self._static_in) >= 8:  # a few batch sizes at most in practice; bound the memory all the same
                old = next(iter(self._static_in))
                self._static_in.pop(old)
                self._graphs.pop(old, None)
            with self._stream_ctx():
                self._static_in[shape] = torch.empty(shape, dtype=self.dtype, device=self.torch_device)
        self._shape = shape
        return int(self._static_in[shape].data_ptr())

    def execute(self) -> None:
        if self._shape is None:
            raise EdgeDeployError("execute() before device_input(shape): nothing to run on")
        torch = self._torch()
        x = self._static_in[self._shape]
        if self.torch_device.type != "cuda":  # the model runs on the host at once: the kernel queued on the
            self.stream.synchronize()          # stream must have written the input first (no stream order there)
        with self._stream_ctx(), torch.inference_mode():
            if self.use_cuda_graph:
                entry = self._graphs.get(self._shape) or self._capture(x)
                if entry is not None:
                    entry[0].replay()
                    self._device_out = entry[1]
                    return
            self._device_out = self._named(self.model(x))

    def _capture(self, x: Any) -> tuple[Any, dict[str, Any]] | None:
        """Capture the model on the static input `x` (on the engine's stream, after two warm-up runs, as
        torch's CUDA-graph notes require); None, and plain execution from then on, if capture fails."""
        torch = self._torch()
        stream = torch.cuda.current_stream(self.torch_device)
        try:
            for _ in range(2):  # cuDNN autotuning and lazy initialisation must happen outside the capture
                self.model(x)
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                out = self._named(self.model(x))
        except Exception as e:  # noqa: BLE001 - capture is best effort (data-dependent ops, host syncs)
            self.graph_error = f"{type(e).__name__}: {e}"
            self.use_cuda_graph = False
            return None
        self._graphs[self._shape] = (graph, out)
        return graph, out

    def device_outputs(self) -> dict[str, Any]:
        return dict(self._device_out)

    def fetch_outputs(self) -> dict[str, np.ndarray]:
        with self._stream_ctx():
            return {k: v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy()
                    for k, v in self._device_out.items()}

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
        self._graphs.clear()
        self._static_in.clear()
        self._device_out = {}
        if self._stream is not None:
            if self.torch_device.type == "cuda":
                self._stream.synchronize()
            self._stream.close()
            self._stream = None
        self.model = None
