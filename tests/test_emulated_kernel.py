"""The real NVRTC preprocessing kernel, executed on the CPU (`emulated_gpu`).

The kernel source in `edgedeploy.runtime.kernels` is compiled with the host C++ compiler and a shim header for the
CUDA built-ins (tests/emulated/shim.h), and launched over the grid `gpu_preprocess.launch_config` computes with the
arguments `gpu_preprocess.kernel_args` builds -- what `GpuPreprocessor` hands the driver. Every layout and option is
compared with the OpenCV reference `edgedeploy.data.preprocess.to_input_tensor` (within 1/255 before
normalisation), and kernels with a planted bug (index arithmetic, letterbox pad, channel order, FP16 store) are
shown to fail the same comparison.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgedeploy.data.preprocess import LETTERBOX_PAD, to_input_tensor
from edgedeploy.data.preprocess import letterbox_geometry
from edgedeploy.runtime.gpu_preprocess import kernel_args, launch_config
from edgedeploy.runtime.kernels import PREPROCESS_SOURCE
from emulated.kernel_cpu import compiler, preprocess_kernels

pytestmark = [pytest.mark.emulated_gpu,
              pytest.mark.skipif(compiler() is None, reason="no C++ compiler (g++/clang++) to build the kernel for the CPU")]

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def run_kernel(frame: np.ndarray, dst_hw, letterbox: bool, fp16: bool = False, *, source: str | None = None,
               roi: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Launch the CPU-compiled kernel on `frame` (or its region `roi` = x, y, w, h read in place through the
    parent's pitch); the output buffer starts as NaN so any pixel left unwritten shows."""
    k = preprocess_kernels(source)
    dst_h, dst_w = dst_hw
    c = 1 if frame.ndim == 2 else frame.shape[2]
    pitch = frame.strides[0]
    src = frame.ctypes.data
    h, w = frame.shape[:2]
    if roi is not None:
        x0, y0, w, h = roi
        src += y0 * pitch + x0 * c
    _, pad, new_hw = letterbox_geometry(h, w, dst_h, dst_w, letterbox)
    out = np.full((1, 3, dst_h, dst_w), np.nan, np.float16 if fp16 else np.float32)
    grid, block = launch_config(dst_h, dst_w)
    args = kernel_args(src, h, w, pitch, c, out.ctypes.data, dst_h, dst_w, new_hw, pad,
                       LETTERBOX_PAD if letterbox else 0, MEAN, [1 / s for s in STD])
    k.launch("preprocess_f16" if fp16 else "preprocess_f32", grid, block, args)
    return out


def diff_255(out: np.ndarray, ref: np.ndarray) -> float:
    """Largest difference in 0..255 pixel units, after undoing the normalisation (NaN when a pixel is unwritten)."""
    s, m = np.asarray(STD, np.float32)[:, None, None], np.asarray(MEAN, np.float32)[:, None, None]
    a = (out[0].astype(np.float32) * s + m) * 255
    b = (ref[0].astype(np.float32) * s + m) * 255
    return float(np.max(np.abs(a - b)))


def frames(hw, layout: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    f = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    f[hw[0] // 3 : hw[0] // 2, hw[1] // 4 : hw[1] // 2] = (255, 0, 40)  # a saturated blue patch: channel order shows
    if layout == "gray":
        return np.ascontiguousarray(f[:, :, 1])
    if layout == "bgra":
        return np.concatenate([f, rng.integers(0, 256, (*hw, 1), dtype=np.uint8)], axis=2)
    return f


CASES = [((333, 517), (320, 416)), ((720, 1280), (384, 640)), ((97, 61), (64, 96)), ((64, 64), (64, 64))]


@pytest.mark.parametrize("layout", ["bgr", "gray", "bgra"])
@pytest.mark.parametrize("letterbox", [True, False], ids=["letterbox", "resize"])
@pytest.mark.parametrize("hw, dst", CASES, ids=[f"{a[0]}x{a[1]}-{b[0]}x{b[1]}" for a, b in CASES])
def test_kernel_matches_opencv_reference(layout, letterbox, hw, dst):
    frame = frames(hw, layout)
    out = run_kernel(frame, dst, letterbox)
    ref, _, _ = to_input_tensor(frame, dst, MEAN, STD, letterboxed=letterbox)
    assert diff_255(out, ref) <= 1.0 + 1e-3
    # the differences are rounding (OpenCV's fixed-point weights vs the kernel's float), not a shift: rare, +-1
    s = np.asarray(STD, np.float32)[:, None, None]
    assert float(np.mean(np.abs(out[0] - ref[0]) * s * 255)) < 0.2


@pytest.mark.parametrize("letterbox", [True, False], ids=["letterbox", "resize"])
def test_fp16_output_is_the_fp32_output_rounded_to_half(letterbox):
    frame = frames((333, 517), "bgr", seed=3)
    f32 = run_kernel(frame, (320, 416), letterbox)
    f16 = run_kernel(frame, (320, 416), letterbox, fp16=True)
    assert f16.dtype == np.float16
    np.testing.assert_array_equal(f16, f32.astype(np.float16))  # round-to-nearest-even, bit for bit


def test_pitched_region_of_interest_is_read_in_place():
    parent = frames((400, 600), "bgr", seed=5)
    x0, y0, w, h = 37, 51, 301, 199  # odd offset and size inside a wider frame: the pitch is the parent's row
    out = run_kernel(parent, (160, 224), True, roi=(x0, y0, w, h))
    ref, _, _ = to_input_tensor(np.ascontiguousarray(parent[y0 : y0 + h, x0 : x0 + w]), (160, 224), MEAN, STD,
                                letterboxed=True)
    assert diff_255(out, ref) <= 1.0 + 1e-3


def test_letterbox_border_is_the_pad_value_and_every_pixel_is_written():
    frame = frames((100, 300), "bgr", seed=7)  # wide frame: bands above and below
    out = run_kernel(frame, (128, 128), True)
    assert not np.isnan(out).any()
    _, (px, py), (nh, nw) = letterbox_geometry(100, 300, 128, 128, True)
    assert py > 0 and px == 0
    pad = (LETTERBOX_PAD / 255 - np.asarray(MEAN)) / np.asarray(STD)
    np.testing.assert_allclose(out[0, :, :py, :].mean(axis=(1, 2)), pad, atol=1e-5)
    np.testing.assert_allclose(out[0, :, py + nh :, :].mean(axis=(1, 2)), pad, atol=1e-5)


# ---- planted bugs: the comparison must catch each of them --------------------------------------------------------
PLANTED = {
    "index arithmetic": ("int y = blockIdx.y * blockDim.y + threadIdx.y;", "int y = blockIdx.y * blockDim.x + threadIdx.y;"),
    "letterbox pad": ("int ix = x - pad_x, iy = y - pad_y;", "int ix = x - pad_y, iy = y - pad_x;"),
    "channel order": ("int sc = src_c == 1 ? 0 : (bgr ? c : 2 - c);", "int sc = src_c == 1 ? 0 : (bgr ? 2 - c : c);"),
    "pad value": ("rgb[0] = rgb[1] = rgb[2] = pad_value;", "rgb[0] = rgb[1] = rgb[2] = 0.f;"),
}


@pytest.mark.parametrize("bug", list(PLANTED))
def test_a_planted_kernel_bug_fails_the_comparison(bug):
    old, new = PLANTED[bug]
    assert PREPROCESS_SOURCE.count(old) == 1, f"kernel changed: update the planted '{bug}'"
    broken = PREPROCESS_SOURCE.replace(old, new)
    frame = frames((333, 517), "bgr", seed=11)
    ref, _, _ = to_input_tensor(frame, (320, 416), MEAN, STD, letterboxed=True)
    assert diff_255(run_kernel(frame, (320, 416), True), ref) <= 1.0 + 1e-3  # the real kernel passes
    d = diff_255(run_kernel(frame, (320, 416), True, source=broken), ref)
    assert not d <= 1.0 + 1e-3, f"planted '{bug}' went unnoticed (max diff {d})"
