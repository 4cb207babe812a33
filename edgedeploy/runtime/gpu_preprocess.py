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

from edgedeploy.data.preprocess import LETTERBOX_PAD
from edgedeploy.errors import InputError
from edgedeploy.runtime import cuda
from edgedeploy.runtime.kernels import PREPROCESS_SOURCE


def letterbox_geometry(src_h: int, src_w: int, dst_h: int, dst_w: int, letterbox: bool):
    """(scale, (pad_x, pad_y), (new_h, new_w)) exactly as the CPU reference computes them.

    Without letterbox the frame is stretched to the input size; the "scale" is then per axis and returned as
    (sx, sy) so boxes can still be mapped back.
    """
    if not letterbox:
        return (dst_w / src_w, dst_h / src_h), (0, 0), (dst_h, dst_w)
    scale = min(dst_h / src_h, dst_w / src_w)
    new_h, new_w = int(round(src_h * scale)), int(round(src_w * scale))
    return scale, ((dst_w - new_w) // 2, (dst_h - new_h) // 2), (new_h, new_w)


@functools.lru_cache(maxsize=8)
def compile_preprocess_ptx(arch: str) -> bytes:
    """PTX for `arch` ('compute_86'); cached per process (NVRTC takes ~0.1-0.3 s)."""
    return cuda.nvrtc_compile(PREPROCESS_SOURCE, "preprocess.cu", arch)


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
        self.stream = stream or cuda.Stream()
        cc = cuda.compute_capability(device).replace(".", "")
        self.kernel = cuda.Kernel(compile_preprocess_ptx(f"compute_{cc}"), "preprocess_f16" if fp16 else "preprocess_f32")
        self._staging_host: cuda.PinnedBuffer | None = None
        self._staging_dev: cuda.DeviceBuffer | None = None
        self._staged = cuda.Event()  # recorded after each H2D copy out of the pinned staging buffer

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
            if cai.get("stream") is not None:  # the producer (e.g. torch) may still be writing the frame
                self.stream.wait_for(cai["stream"])
        else:
            frame = np.asarray(frame)
            h, w, c = _frame_layout(frame.shape, frame.dtype)
            pitch = w * c
            src_ptr = self._stage(frame)
        scale, (pad_x, pad_y), (new_h, new_w) = letterbox_geometry(h, w, self.dst_h, self.dst_w, self.letterbox)
        if self.topleft:
            pad_x = pad_y = 0
        out_ptr = dst_ptr + batch_index * 3 * self.dst_h * self.dst_w * self.out_itemsize
        block = (32, 8, 1)
        grid = ((self.dst_w + 31) // 32, (self.dst_h + 7) // 8, 1)
        i32, f32, ptr = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
        args = [
            (src_ptr, ptr), (h, i32), (w, i32), (pitch, i32), (c, i32),
            (out_ptr, ptr), (self.dst_h, i32), (self.dst_w, i32),
            (new_h, i32), (new_w, i32), (pad_x, i32), (pad_y, i32),
            (self.pad_value if self.letterbox else 0.0, f32),
            *[(m, f32) for m in self.mean], *[(s, f32) for s in self.inv_std], (int(self.bgr), i32),
        ]
        self.kernel.launch(grid, block, args, self.stream)
        return scale, (pad_x, pad_y)

    def close_staging(self) -> None:
        if self._staging_host is not None:
            self._staging_host.free()
        if self._staging_dev is not None:
            self._staging_dev.free()
        self._staging_host = self._staging_dev = None

    def close(self) -> None:
        self.stream.synchronize()
        self.close_staging()
        self._staged.close()
