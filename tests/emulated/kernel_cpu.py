"""The real NVRTC kernel source, compiled for the host with the system C++ compiler and the CUDA shim header.

`CpuKernels(source, entries)` builds a shared library whose `emu_launch_kernel(name, grid, block, args)` runs
every thread of the launch grid in turn (blockIdx/threadIdx set as CUDA would), with `args` laid out like
cuLaunchKernel's kernelParams. `launch(entry, grid, block, args)` takes the launcher's own (value, ctypes type)
list, so the tests feed the kernel exactly what `GpuPreprocessor` would hand the driver.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

SHIM = Path(__file__).with_name("shim.h")
_lock = threading.Lock()
_cache: dict[str, "CpuKernels"] = {}


def compiler() -> str | None:
    """The host C++ compiler (CXX, else g++, else clang++), or None."""
    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class CompileError(RuntimeError):
    pass


def _build(source: str, entries: Sequence[str]) -> Path:
    cxx = compiler()
    if cxx is None:
        raise CompileError("no C++ compiler (g++/clang++) on this machine")
    dispatch = "\n".join(
        f'    if (!strcmp(name, "{e}")) {{ emu_launch({e}, grid, block, args); return 0; }}' for e in entries
    )
    unit = (f'#include "{SHIM}"\n{source}\n'
            'extern "C" int emu_launch_kernel(const char* name, const unsigned* grid, const unsigned* block, '
            f'void** args) {{\n{dispatch}\n    return -1;\n}}\n')
    key = hashlib.sha256((unit + SHIM.read_text() + cxx).encode()).hexdigest()[:16]
    out_dir = Path(tempfile.gettempdir()) / "edgedeploy-emulated-kernels"
    out_dir.mkdir(exist_ok=True)
    lib = out_dir / f"k_{key}.so"
    if lib.exists():
        return lib
    src = out_dir / f"k_{key}.{os.getpid()}.cpp"
    src.write_text(unit)
    tmp = out_dir / f"k_{key}.{os.getpid()}.so"
    # -ffp-contract=off: no fused multiply-add, like the IEEE float arithmetic the comparison assumes
    cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-o", str(tmp), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    src.unlink(missing_ok=True)
    if r.returncode != 0:
        raise CompileError(f"{' '.join(cmd)} failed:\n{r.stderr[-4000:]}")
    os.replace(tmp, lib)
    return lib


class CpuKernels:
    def __init__(self, source: str, entries: Sequence[str]) -> None:
        self.entries = tuple(entries)
        self.path = _build(source, self.entries)
        self.lib = ctypes.CDLL(str(self.path))
        self.lib.emu_launch_kernel.restype = ctypes.c_int
        self.lib.emu_launch_kernel.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint),
                                               ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_void_p)]

    def launch(self, entry: str, grid: Sequence[int], block: Sequence[int], args: Sequence[tuple[Any, Any]]) -> None:
        values = [t(v) for v, t in args]  # each parameter in its C type, kept alive for the call
        argv = (ctypes.c_void_p * max(len(values), 1))(*[ctypes.addressof(v) for v in values])
        g = (ctypes.c_uint * 3)(*[int(x) for x in grid])
        b = (ctypes.c_uint * 3)(*[int(x) for x in block])
        if self.lib.emu_launch_kernel(entry.encode(), g, b, argv) != 0:
            raise KeyError(f"no kernel entry {entry!r} (have {', '.join(self.entries)})")


def cpu_kernels(source: str, entries: Sequence[str]) -> CpuKernels:
    """Cached per (source, entries) in this process; the shared library is cached on disk by content hash."""
    key = hashlib.sha256((source + "|" + ",".join(entries)).encode()).hexdigest()
    with _lock:
        if key not in _cache:
            _cache[key] = CpuKernels(source, entries)
        return _cache[key]


def preprocess_kernels(source: str | None = None) -> CpuKernels:
    from edgedeploy.runtime.kernels import PREPROCESS_ENTRIES, PREPROCESS_SOURCE

    return cpu_kernels(PREPROCESS_SOURCE if source is None else source, PREPROCESS_ENTRIES)
