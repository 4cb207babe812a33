"""`deploy doctor`: what this machine can do, and what to install for what is missing.

Each probe runs in isolation: a failing import or a broken driver becomes a line in the report, never a crash.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""  # what to run when `ok` is False
    extra: dict = field(default_factory=dict)


def _version(module: str) -> str:
    mod = importlib.import_module(module)
    return str(getattr(mod, "__version__", "installed"))


def check_python() -> Check:
    ok = sys.version_info >= (3, 10)
    return Check("python", ok, platform.python_version(), "" if ok else "edgedeploy needs Python >= 3.10")


def check_torch() -> Check:
    import torch

    cuda = torch.cuda.is_available()
    detail = f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}, GPU available: {cuda}"
    extra = {"version": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": cuda}
    fix = "" if cuda else "for GPU training/inference install a CUDA build of torch and an NVIDIA driver (`nvidia-smi` must work)"
    return Check("torch", True, detail, fix, extra)


def check_gpu() -> Check:
    import torch

    if not torch.cuda.is_available():
        return Check("gpu", False, "no CUDA device visible", "run on a machine with an NVIDIA GPU; in Docker add `--gpus all` (x86) or `--runtime nvidia` (Jetson)")
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append({"index": i, "name": p.name, "compute_capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1)})
    detail = "; ".join(f"#{g['index']} {g['name']} (sm {g['compute_capability']}, {g['memory_gib']} GiB)" for g in gpus)
    return Check("gpu", True, detail, extra={"gpus": gpus})


def check_onnxruntime() -> Check:
    import onnxruntime as ort

    providers = ort.get_available_providers()
    gpu = any(p in providers for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider"))
    fix = "" if gpu else "GPU execution providers: `pip install onnxruntime-gpu` (replaces onnxruntime)"
    return Check("onnxruntime", True, f"{ort.__version__}, providers: {', '.join(providers)}", fix, {"providers": providers})


def check_tensorrt() -> Check:
    try:
        import tensorrt as trt
    except ImportError:
        return Check(
            "tensorrt",
            False,
            "not installed",
            "x86-64: `pip install tensorrt` (pulls NVIDIA's wheels) or use the container in docker/Dockerfile.x86; "
            "Jetson: TensorRT ships with JetPack (`apt install nvidia-tensorrt`, python3-libnvinfer)",
        )
    return Check("tensorrt", True, trt.__version__, extra={"version": trt.__version__})


def check_tensorrt_rtx() -> Check:
    try:
        import tensorrt_rtx_bindings as rtx
    except ImportError:
        return Check("tensorrt-rtx", False, "not installed", "`pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings` (ahead-of-time builds; runtime needs CC 8.0/8.6/8.9/12.x)")
    return Check("tensorrt-rtx", True, rtx.__version__, extra={"version": rtx.__version__})


def check_cuda_python() -> Check:
    try:
        from cuda.bindings import runtime
        import cuda.bindings as cb
    except ImportError:
        return Check("cuda-python", False, "not installed", "`pip install 'edgedeploy[cuda13]'` or `'edgedeploy[cuda12]'` "
                     "(the runtime's device buffers, streams and NVRTC; the cuda-line check says which)")
    err, count = runtime.cudaGetDeviceCount()
    detail = f"cuda-bindings {getattr(cb, '__version__', '?')}, devices: {count if int(err) == 0 else 'none (' + str(err) + ')'}"
    return Check("cuda-python", True, detail)


def check_nvrtc() -> Check:
    from cuda.bindings import nvrtc

    err, major, minor = nvrtc.nvrtcVersion()
    if int(err) != 0:
        return Check("nvrtc", False, str(err), "`pip install 'edgedeploy[cuda13]'` or `'edgedeploy[cuda12]'` (NVRTC "
                     "compiles the GPU preprocessing kernel at run time; the cuda-line check says which)")
    return Check("nvrtc", True, f"{major}.{minor}")


def cuda_line_check(driver: int | None, bindings: str | None, nvrtc: tuple[int, int] | None) -> Check:
    """Which CUDA line (pip extra) this machine's driver needs, and whether the installed one matches it.
    `driver` is cudaDriverGetVersion's number (12060 = CUDA 12.6), None without a driver."""
    from edgedeploy.runtime.cuda import cuda_line_problem, extra_for_driver, format_cuda_version

    if driver is None:
        return Check("cuda-line", False, "no NVIDIA driver: the GPU runtime cannot run here",
                     "install the NVIDIA driver (`nvidia-smi` must work); CPU inference (ONNX Runtime) still works")
    need = extra_for_driver(driver)
    detail = f"driver supports CUDA {format_cuda_version(driver)} -> needs `edgedeploy[{need}]`"
    extra = {"driver_cuda": format_cuda_version(driver), "extra": need, "cuda_bindings": bindings,
             "nvrtc": f"{nvrtc[0]}.{nvrtc[1]}" if nvrtc else None}
    installed = []
    if bindings:
        installed.append(f"cuda-bindings {bindings}")
    if nvrtc:
        installed.append(f"NVRTC {nvrtc[0]}.{nvrtc[1]}")
    if installed:
        detail += f"; installed: {', '.join(installed)}"
    problems = [p for p in (cuda_line_problem(driver, int(bindings.split('.')[0])) if bindings else None,
                            cuda_line_problem(driver, nvrtc[0]) if nvrtc else None) if p]
    if not bindings:
        return Check("cuda-line", False, detail, f"`pip install 'edgedeploy[{need}]'`", extra)
    if problems:
        return Check("cuda-line", False, detail + " (a newer CUDA line than the driver runs)",
                     f"`pip install 'edgedeploy[{need}]'` (replaces the installed line), or update the driver", extra)
    return Check("cuda-line", True, detail, extra=extra)


def check_cuda_line() -> Check:
    from edgedeploy.runtime import cuda

    try:
        import cuda.bindings as cb

        bindings = str(getattr(cb, "__version__", "")) or None
    except ImportError:
        bindings = None
    driver = None
    if bindings:
        try:
            driver = cuda.driver_version()
        except cuda.CudaError:
            driver = None
    else:  # no cuda-python: ask the driver library directly
        import ctypes

        try:
            lib = ctypes.CDLL("libcuda.so.1")
            v = ctypes.c_int(0)
            driver = v.value if lib.cuDriverGetVersion(ctypes.byref(v)) == 0 else None
        except OSError:
            driver = None
    nvrtc = None
    if bindings:
        try:
            nvrtc = cuda.nvrtc_version()
        except cuda.CudaError:
            nvrtc = None
    return cuda_line_check(driver, bindings, nvrtc)


def check_opencv() -> Check:
    import cv2
    from cv2 import videoio_registry as vr

    backends = list(dict.fromkeys(vr.getBackendName(b) for b in vr.getBackends()))
    has_ffmpeg = "FFMPEG" in backends
    fix = "" if has_ffmpeg else "no FFMPEG backend: mp4/RTSP input needs an OpenCV build with FFmpeg (opencv-python-headless wheels have it)"
    return Check("opencv", True, f"{cv2.__version__}, video backends: {', '.join(backends)}", fix, {"backends": backends})


def check_onnx_tools() -> Check:
    parts = []
    for mod in ("onnx", "onnxslim", "onnxsim", "onnxconverter_common"):
        try:
            parts.append(f"{mod} {_version(mod)}")
        except Exception:
            parts.append(f"{mod} missing")
    ok = not any(p.startswith("onnx ") and "missing" in p for p in parts)
    return Check("onnx-tools", ok, ", ".join(parts), "" if ok else "`pip install onnx onnxsim onnxslim onnxconverter-common`")


CHECKS: list[Callable[[], Check]] = [
    check_python,
    check_torch,
    check_gpu,
    check_onnxruntime,
    check_onnx_tools,
    check_tensorrt,
    check_tensorrt_rtx,
    check_cuda_python,
    check_nvrtc,
    check_cuda_line,
    check_opencv,
]


def run_checks() -> list[Check]:
    results = []
    for fn in CHECKS:
        name = fn.__name__.removeprefix("check_").replace("_", "-")
        try:
            results.append(fn())
        except Exception as e:  # a broken library is a finding, not a crash
            results.append(Check(name, False, f"{type(e).__name__}: {e}", f"reinstall {name}"))
    return results


def capabilities(checks: list[Check]) -> dict[str, bool]:
    ok = {c.name: c.ok for c in checks}
    return {
        "export ONNX + parity": ok.get("onnxruntime", False) and ok.get("onnx-tools", False),
        "build TensorRT engines": ok.get("tensorrt", False),
        "build TensorRT-RTX engines (AOT)": ok.get("tensorrt-rtx", False),
        "GPU runtime (cuda-python)": ok.get("gpu", False) and ok.get("cuda-python", False),
        "GPU preprocessing (NVRTC)": ok.get("gpu", False) and ok.get("nvrtc", False) and ok.get("cuda-line", False),
    }


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    checks = run_checks()
    caps = capabilities(checks)
    if args.json:
        print(json.dumps({"checks": [asdict(c) for c in checks], "capabilities": caps}, indent=2))
        return 0
    width = max(len(c.name) for c in checks)
    print("edgedeploy doctor\n")
    for c in checks:
        print(f"  {'ok ' if c.ok else '-- '} {c.name:<{width}}  {c.detail}")
    print("\nWhat this machine can do:")
    for cap, ok in caps.items():
        print(f"  [{'x' if ok else ' '}] {cap}")
    fixes = [c for c in checks if c.fix]
    if fixes:
        print("\nTo enable more:")
        for c in fixes:
            print(f"  {c.name}: {c.fix}")
    return 0
