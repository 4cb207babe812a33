"""GPU preprocessing: one NVRTC-compiled kernel letterboxes/resizes, converts BGR->RGB, normalises and writes
NCHW FP32/FP16 straight into an engine's input buffer.

A host frame is staged through pinned memory (one async H2D copy of the raw uint8 frame -- 3x smaller than
the float tensor). A frame already on the GPU (anything exposing `__cuda_array_interface__`: torch, cupy,
`DeviceBuffer`) is read in place, without a copy.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any, Sequence

import numpy as np

from edgedeploy.data.preprocess import LETTERBOX_PAD, letterbox_geometry
from edgedeploy.errors import InputError
from edgedeploy.runtime import cuda
from edgedeploy.runtime.kernels import PREPROCESS_SOURCE


@functools.lru_cache(maxsize=8)
def compile_preprocess_ptx(arch: str) -> bytes:
    """The kernel compiled for `arch` ('compute_86' PTX, 'sm_86' cubin); cached per process (NVRTC ~0.1-0.3 s)."""
    return cuda.nvrtc_compile(PREPROCESS_SOURCE, "preprocess.cu", arch)


def compile_for_device(device: int = 0) -> bytes:
    """The kernel for this GPU: a cubin for its exact architecture when this NVRTC knows it, else PTX this
    driver's JIT accepts (`cuda.target_for_device` says why not, with the fix, when neither is possible)."""
    cc = cuda.compute_capability(device)
    target = cuda.target_for_device(cc, cuda.nvrtc_supported_archs(), cuda.nvrtc_version(), cuda.driver_version())
    return compile_preprocess_ptx(target)


BLOCK = (32, 8, 1)


def launch_config(dst_h: int, dst_w: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(grid, block) of one launch: one thread per output pixel, one frame per launch."""
    return ((dst_w + BLOCK[0] - 1) // BLOCK[0], (dst_h + BLOCK[1] - 1) // BLOCK[1], 1), BLOCK


def kernel_args(src_ptr: int, h: int, w: int, pitch: int, c: int, out_ptr: int, dst_h: int, dst_w: int,
                new_hw: tuple[int, int], pad: tuple[int, int], pad_value: float, mean: Sequence[float],
                inv_std: Sequence[float], bgr: bool = False) -> list[tuple[Any, Any]]:
    """The kernel's parameters as (value, ctypes type), in `PREPROCESS_SOURCE`'s order. `bgr` keeps the frame's
    channel order (models trained on BGR input); otherwise the kernel writes RGB."""
    i32, f32, ptr = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    return [
        (src_ptr, ptr), (h, i32), (w, i32), (pitch, i32), (c, i32),
        (out_ptr, ptr), (dst_h, i32), (dst_w, i32),
        (new_hw[0], i32), (new_hw[1], i32), (pad[0], i32), (pad[1], i32),
        (float(pad_value), f32),
        *[(float(m), f32) for m in mean], *[(float(s), f32) for s in inv_std], (int(bool(bgr)), i32),
    ]


class GpuPreprocessFallbackWarning(RuntimeWarning):
    """GPU preprocessing could not start on this machine; the pipeline preprocesses on the CPU instead."""


def _torch_stream(frame: Any) -> Any:
    """torch's current stream on the frame's device when `frame` is a CUDA torch tensor, else None."""
    if type(frame).__module__.split(".")[0] != "torch" or not getattr(frame, "is_cuda", False):
        return None
    import torch

    return torch.cuda.current_stream(frame.device)


def producer_stream(frame: Any, cai: dict) -> int | None:
    """The raw stream handle whose queued work may still be writing `frame`, or None when nothing to wait for.

    `__cuda_array_interface__` v3 (CuPy, Numba) names it in "stream" (1 = legacy default, 2 = per-thread default).
    torch exports v2 without that key: its producer is torch's current stream on the frame's device."""
    stream = cai.get("stream")
    if stream is not None:
        return int(stream)
    ts = _torch_stream(frame)
    return int(ts.cuda_stream) if ts is not None else None


def _frame_layout(shape: Sequence[int], dtype: Any) -> tuple[int, int, int]:
    if np.dtype(dtype) != np.uint8:
        raise InputError(f"GPU preprocessing takes uint8 frames, got {np.dtype(dtype)}")
    if len(shape) == 2:
        return int(shape[0]), int(shape[1]), 1
    if len(shape) == 3 and shape[2] in (1, 3, 4):
        return int(shape[0]), int(shape[1]), int(shape[2])
    raise InputError(f"frame of shape {tuple(shape)}: expected HxW (gray), HxWx3 (BGR) or HxWx4 (BGRA)")


class GpuPreprocessor:
    """Callable writing one preprocessed frame into a device input buffer on `stream`."""

    def __init__(
        self,
        dst_hw: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        *,
        letterbox: bool,
        fp16: bool = False,
        stream: cuda.Stream | None = None,
        device: int = 0,
        channel_order: str = "rgb",
        scale: float = 1 / 255,
        letterbox_align: str = "center",
        pad_value: int = LETTERBOX_PAD,
    ) -> None:
        cuda.init(device)
        self.device = device
        self.dst_h, self.dst_w = dst_hw
        k = float(scale) * 255.0  # the kernel divides by 255: fold the model's pixel scale into mean/std
        self.mean = [float(m) / k for m in mean]
        self.inv_std = [k / float(s) for s in std]
        self.letterbox = letterbox
        self.bgr = channel_order == "bgr"
        self.topleft = letterbox_align == "topleft"
        self.pad_value = float(pad_value)
        self.fp16 = fp16
        self.kernel: Any = None
        self._staged: Any = None
        self._own_stream = stream is None
        self.stream = stream or cuda.Stream()
        self._staging_host: cuda.PinnedBuffer | None = None
        self._staging_dev: cuda.DeviceBuffer | None = None
        self._torch_consumer: Any = None  # our stream as a torch stream, for `record_stream`
        try:
            self.kernel = cuda.Kernel(compile_for_device(device), "preprocess_f16" if fp16 else "preprocess_f32")
            self._staged = cuda.Event()  # recorded after each H2D copy out of the pinned staging buffer
        except BaseException:
            self.close()  # nothing half-made stays behind: module unloaded, own stream destroyed
            raise

    @property
    def out_itemsize(self) -> int:
        return 2 if self.fp16 else 4

    def _stage(self, frame: np.ndarray) -> int:
        """Copy a host frame to the device through pinned memory; buffers grow to the largest frame seen."""
        if self._staging_host is None or self._staging_host.nbytes < frame.nbytes:
            self.stream.synchronize()  # in-flight copies/kernels may still use the old buffers
            self.close_staging()
            self._staging_host = cuda.PinnedBuffer((frame.nbytes,), np.uint8)
            self._staging_dev = cuda.DeviceBuffer(frame.nbytes)
        else:
            self._staged.synchronize()  # the previous frame's H2D copy must have left the pinned buffer
        host = self._staging_host.array[: frame.nbytes]
        host[:] = np.ascontiguousarray(frame).reshape(-1)
        assert self._staging_dev is not None
        self._staging_dev.copy_from_host(host, self.stream)
        self._staged.record(self.stream)
        return self._staging_dev.ptr

    def __call__(self, frame: Any, dst_ptr: int, batch_index: int = 0):
        """Preprocess `frame` into image `batch_index` of the NCHW buffer at `dst_ptr`; returns (scale, pad)."""
        cuda.init(self.device)  # this thread may not have the context current yet
        cai = getattr(frame, "__cuda_array_interface__", None)
        if cai is not None:
            h, w, c = _frame_layout(cai["shape"], np.dtype(cai["typestr"]))
            strides = cai.get("strides")
            pitch = int(strides[0]) if strides else w * c
            if strides and len(strides) == 3 and strides[1:] != (c, 1):
                raise InputError("GPU frame must be contiguous within each row (HWC, channels last)")
            src_ptr = int(cai["data"][0])
            producer = producer_stream(frame, cai)
            if producer is not None:  # the producer (torch, CuPy, a decoder) may still be writing the frame
                self.stream.wait_for(producer)
        else:
            frame = np.asarray(frame)
            h, w, c = _frame_layout(frame.shape, frame.dtype)
            pitch = w * c
            src_ptr = self._stage(frame)
        scale, (pad_x, pad_y), (new_h, new_w) = letterbox_geometry(h, w, self.dst_h, self.dst_w, self.letterbox,
                                                                    "topleft" if self.topleft else "center")
        out_ptr = dst_ptr + batch_index * 3 * self.dst_h * self.dst_w * self.out_itemsize
        grid, block = launch_config(self.dst_h, self.dst_w)
        args = kernel_args(src_ptr, h, w, pitch, c, out_ptr, self.dst_h, self.dst_w, (new_h, new_w), (pad_x, pad_y),
                           self.pad_value if self.letterbox else 0.0, self.mean, self.inv_std, bgr=self.bgr)
        self.kernel.launch(grid, block, args, self.stream)
        if cai is not None:
            self._keep_alive(frame)
        return scale, (pad_x, pad_y)

    def _keep_alive(self, frame: Any) -> None:
        """Tell torch's caching allocator that our stream uses the frame, so its memory is not handed out again
        before the kernel has read it (the frame may be freed by the caller right after this call)."""
        if _torch_stream(frame) is None:
            return
        import torch

        if self._torch_consumer is None:
            self._torch_consumer = torch.cuda.ExternalStream(self.stream.ptr, device=frame.device)
        frame.record_stream(self._torch_consumer)

    def close_staging(self) -> None:
        if self._staging_host is not None:
            self._staging_host.free()
        if self._staging_dev is not None:
            self._staging_dev.free()
        self._staging_host = self._staging_dev = None

    def close(self) -> None:
        """Wait for queued work, then free the staging buffers, the event, the kernel's module and, when this
        preprocessor created it, the stream. Safe to call twice."""
        if self.stream is None:
            return
        self.stream.synchronize()
        self.close_staging()
        if self._staged is not None:
            self._staged.close()
            self._staged = None
        if self.kernel is not None:
            self.kernel.close()
            self.kernel = None
        if self._own_stream:
            self.stream.close()
        self.stream = None
