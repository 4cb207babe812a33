"""A thin, checked layer over cuda-python (`cuda.bindings`): streams, events, device and pinned buffers,
CUDA graphs and NVRTC-compiled kernels.

Every CUDA call goes through `check(...)`, which raises `CudaError` naming the call that failed and the
driver's error string -- errors are surfaced where they happen, never swallowed.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any, Sequence

import numpy as np

from edgedeploy.errors import EdgeDeployError


class CudaError(EdgeDeployError):
    """A CUDA driver/runtime/NVRTC call failed; the message names the call and CUDA's error string."""


def _bindings():
    try:
        from cuda.bindings import driver, nvrtc, runtime
    except ImportError as e:  # pragma: no cover - depends on the install
        raise EdgeDeployError(
            "cuda-python is not installed: on the GPU machine `pip install 'edgedeploy[cuda13]'` (NVIDIA driver r580 "
            "or newer) or `pip install 'edgedeploy[cuda12]'` (CUDA 12 drivers, JetPack 6); `deploy doctor` says which"
        ) from e
    return driver, runtime, nvrtc


def _error_string(err: Any) -> str:
    driver, runtime, nvrtc = _bindings()
    try:
        if isinstance(err, driver.CUresult):
            _, s = driver.cuGetErrorString(err)
            return s.decode() if isinstance(s, bytes) else str(s)
        if isinstance(err, runtime.cudaError_t):
            _, s = runtime.cudaGetErrorString(err)
            return s.decode() if isinstance(s, bytes) else str(s)
        if isinstance(err, nvrtc.nvrtcResult):
            _, s = nvrtc.nvrtcGetErrorString(err)
            return s.decode() if isinstance(s, bytes) else str(s)
    except Exception:
        pass
    return str(err)


def _is_success(err: Any) -> bool:
    return int(err) == 0  # CUDA_SUCCESS, cudaSuccess and NVRTC_SUCCESS are all 0


def check(result: Any, call: str) -> Any:
    """Unpack a cuda-python return tuple `(err, *values)`; raise `CudaError(call, ...)` when err != success."""
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if not _is_success(err):
        raise CudaError(f"{call} failed: {getattr(err, 'name', err)} ({_error_string(err)})")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def bindings_major() -> int:
    """The CUDA line of the installed cuda-python (`cuda.bindings.__version__` 13.x -> 13)."""
    import cuda.bindings as cb

    return int(str(getattr(cb, "__version__", "0")).split(".")[0] or 0)


def extra_for_driver(driver_version: int) -> str:
    """The pip extra matching a driver's CUDA version (`cudaDriverGetVersion`: 12060 = CUDA 12.6)."""
    return "cuda13" if driver_version >= 13000 else "cuda12"


def format_cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def cuda_line_problem(driver_version: int, line: int) -> str | None:
    """None when a driver supporting CUDA `driver_version` can run the CUDA `line` (major) libraries; otherwise
    the message saying which extra to install. CUDA's minor-version compatibility holds within one major line
    only: a CUDA 12 driver refuses the CUDA 13 runtime and NVRTC 13's PTX (`.version 9.x`)."""
    if driver_version <= 0:
        return "no NVIDIA driver answered (cuDriverGetVersion gave 0): install the NVIDIA driver (`nvidia-smi` must work)"
    if driver_version // 1000 >= line:
        return None
    need = extra_for_driver(driver_version)
    return (f"the NVIDIA driver supports CUDA {format_cuda_version(driver_version)}, but the installed cuda-python/"
            f"NVRTC are the CUDA {line} line, which this driver cannot run. Install the matching line: "
            f"`pip install 'edgedeploy[{need}]'` (or upgrade the driver to r580+ for CUDA 13)")


def driver_version() -> int:
    """The CUDA version the installed driver supports (12060 = 12.6); raises CudaError without a driver."""
    driver, _, _ = _bindings()
    try:
        result = driver.cuDriverGetVersion()
    except Exception as e:  # cuda-bindings raises when libcuda.so itself is missing
        raise CudaError(f"no NVIDIA driver on this machine: libcuda could not be loaded ({e})") from e
    return int(check(result, "cuDriverGetVersion"))


_init_lock = threading.Lock()
_initialised = False
_thread = threading.local()


def init(device: int = 0) -> None:
    """Initialise the driver once, and make the device's primary context current on the calling thread.

    Driver-API calls (kernel launches) need a current context; a new thread (the camera's inference thread) has
    none until a runtime-API call sets it, so every entry point that may run first on a thread calls this.
    """
    global _initialised
    driver, runtime, _ = _bindings()
    with _init_lock:
        if not _initialised:
            try:
                result = driver.cuInit(0)
            except Exception as e:  # cuda-bindings raises when libcuda.so itself is missing
                raise CudaError(f"cuInit failed: no NVIDIA driver on this machine ({e})") from e
            if int(result[0] if isinstance(result, tuple) else result) == int(driver.CUresult.CUDA_ERROR_NO_DEVICE):
                raise CudaError("cuInit failed: CUDA_ERROR_NO_DEVICE: the NVIDIA driver sees no GPU (in Docker add "
                                "`--gpus all`, on Jetson `--runtime nvidia`)")
            check(result, "cuInit")
            problem = cuda_line_problem(driver_version(), bindings_major())
            if problem:
                raise CudaError(problem)
            _initialised = True
    if getattr(_thread, "device", None) != device:
        check(runtime.cudaSetDevice(device), f"cudaSetDevice({device})")
        check(runtime.cudaFree(0), "cudaFree(0) [context creation]")
        _thread.device = device


def compute_capability(device: int = 0) -> str:
    """'8.6' for an RTX 30xx, '9.0' for an H100."""
    _, runtime, _ = _bindings()
    init(device)
    major = check(
        runtime.cudaDeviceGetAttribute(runtime.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, device),
        "cudaDeviceGetAttribute(major)",
    )
    minor = check(
        runtime.cudaDeviceGetAttribute(runtime.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, device),
        "cudaDeviceGetAttribute(minor)",
    )
    return f"{major}.{minor}"


class Stream:
    """A non-blocking CUDA stream (graph capture needs a non-default stream)."""

    def __init__(self) -> None:
        _, runtime, _ = _bindings()
        self._rt = runtime
        self.handle = check(runtime.cudaStreamCreateWithFlags(runtime.cudaStreamNonBlocking), "cudaStreamCreate")

    @property
    def ptr(self) -> int:
        return int(self.handle)

    def synchronize(self) -> None:
        check(self._rt.cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def wait_for(self, producer: int) -> None:
        """Order this stream after the work queued so far on another stream (a raw handle, as in
        `__cuda_array_interface__['stream']`: 1 = legacy default, 2 = per-thread default), without blocking the host."""
        rt = self._rt
        if getattr(self, "_wait_event", None) is None:
            self._wait_event = check(rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming), "cudaEventCreateWithFlags")
        check(rt.cudaEventRecord(self._wait_event, rt.cudaStream_t(int(producer))), "cudaEventRecord(producer stream)")
        check(rt.cudaStreamWaitEvent(self.handle, self._wait_event, 0), "cudaStreamWaitEvent")

    def close(self) -> None:
        if getattr(self, "_wait_event", None) is not None:
            ev, self._wait_event = self._wait_event, None
            check(self._rt.cudaEventDestroy(ev), "cudaEventDestroy")
        if self.handle is not None:
            check(self._rt.cudaStreamDestroy(self.handle), "cudaStreamDestroy")
            self.handle = None


class Event:
    def __init__(self) -> None:
        _, runtime, _ = _bindings()
        self._rt = runtime
        self.handle = check(runtime.cudaEventCreate(), "cudaEventCreate")

    def record(self, stream: Stream) -> None:
        check(self._rt.cudaEventRecord(self.handle, stream.handle), "cudaEventRecord")

    def synchronize(self) -> None:
        check(self._rt.cudaEventSynchronize(self.handle), "cudaEventSynchronize")

    def elapsed_ms(self, start: "Event") -> float:
        check(self._rt.cudaEventSynchronize(self.handle), "cudaEventSynchronize")
        return float(check(self._rt.cudaEventElapsedTime(start.handle, self.handle), "cudaEventElapsedTime"))

    def close(self) -> None:
        if self.handle is not None:
            check(self._rt.cudaEventDestroy(self.handle), "cudaEventDestroy")
            self.handle = None


class DeviceBuffer:
    """Device memory. Exposes `__cuda_array_interface__` so torch/cupy can view it without a copy."""

    def __init__(self, nbytes: int, shape: Sequence[int] = (), dtype: Any = np.uint8) -> None:
        _, runtime, _ = _bindings()
        self._rt = runtime
        self.nbytes = max(int(nbytes), 1)
        self.shape = tuple(int(s) for s in shape) or (self.nbytes,)
        self.dtype = np.dtype(dtype)
        self.ptr = int(check(runtime.cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes})"))

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False), "version": 3}

    def view(self, shape: Sequence[int], dtype: Any) -> "DeviceBuffer":
        """Re-describe the same memory (no allocation), e.g. the current dynamic-batch shape."""
        need = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if need > self.nbytes:
            raise EdgeDeployError(f"view of {need} bytes on a {self.nbytes}-byte device buffer")
        v = object.__new__(DeviceBuffer)
        v._rt, v.nbytes, v.ptr = self._rt, need, self.ptr
        v.shape, v.dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        v._owner = self  # keep the allocation alive
        return v

    def copy_from_host(self, host: np.ndarray, stream: Stream) -> None:
        _copy(self._rt, self.ptr, host.ctypes.data, host.nbytes, self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
              stream, "cudaMemcpyAsync(H2D)")

    def copy_to_host(self, host: np.ndarray, stream: Stream) -> None:
        _copy(self._rt, host.ctypes.data, self.ptr, host.nbytes, self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
              stream, "cudaMemcpyAsync(D2H)")

    def free(self) -> None:
        if getattr(self, "_owner", None) is None and self.ptr:
            check(self._rt.cudaFree(self.ptr), "cudaFree")
        self.ptr = 0


def _copy(rt, dst: int, src: int, nbytes: int, kind, stream: Stream, call: str) -> None:
    check(rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream.handle), call)


class PinnedBuffer:
    """Page-locked host memory viewed as a numpy array: async copies need it to overlap with compute."""

    def __init__(self, shape: Sequence[int], dtype: Any) -> None:
        _, runtime, _ = _bindings()
        self._rt = runtime
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        self.nbytes = max(int(np.prod(self.shape)) * self.dtype.itemsize, 1)
        self.ptr = int(check(runtime.cudaMallocHost(self.nbytes), f"cudaMallocHost({self.nbytes})"))
        raw = (ctypes.c_byte * self.nbytes).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=np.uint8)[: int(np.prod(self.shape)) * self.dtype.itemsize].view(
            self.dtype).reshape(self.shape)

    def free(self) -> None:
        if self.ptr:
            self.array = None  # type: ignore[assignment]
            check(self._rt.cudaFreeHost(self.ptr), "cudaFreeHost")
            self.ptr = 0


class CudaGraph:
    """Capture whatever `enqueue(stream)` launches into a graph and replay it with one launch.

    Capture is fragile (data-dependent shapes, plugins, allocation during enqueue): `capture` returns False and
    leaves the graph empty instead of raising, so the caller falls back to plain enqueue.
    """

    def __init__(self) -> None:
        _, runtime, _ = _bindings()
        self._rt = runtime
        self.graph = None
        self.exec = None
        self.error: str | None = None

    def capture(self, stream: Stream, enqueue) -> bool:
        rt = self._rt
        self.reset()
        try:
            check(rt.cudaStreamBeginCapture(stream.handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
                  "cudaStreamBeginCapture")
            try:
                ok = enqueue(stream)
            finally:
                self.graph = check(rt.cudaStreamEndCapture(stream.handle), "cudaStreamEndCapture")
            if ok is False:
                raise CudaError("enqueue reported failure during capture")
            self.exec = check(rt.cudaGraphInstantiate(self.graph, 0), "cudaGraphInstantiate")
            return True
        except CudaError as e:
            self.error = str(e)
            rt.cudaGetLastError()  # clear the sticky capture error so the plain path can run
            try:
                self.reset()
            except CudaError as e2:  # keep the first error; the second is reported alongside it
                self.error += f"; then {e2}"
            return False

    def launch(self, stream: Stream) -> None:
        check(self._rt.cudaGraphLaunch(self.exec, stream.handle), "cudaGraphLaunch")

    @property
    def ready(self) -> bool:
        return self.exec is not None

    def reset(self) -> None:
        exec_, graph = self.exec, self.graph
        self.graph = self.exec = None  # cleared first: a failed destroy is reported once, never retried
        if exec_ is not None:
            check(self._rt.cudaGraphExecDestroy(exec_), "cudaGraphExecDestroy")
        if graph is not None:
            check(self._rt.cudaGraphDestroy(graph), "cudaGraphDestroy")


# ---- NVRTC ----------------------------------------------------------------------------------------------------
def _nvrtc():
    """The NVRTC bindings, with a clear message when libnvrtc itself cannot be loaded."""
    _, _, nvrtc = _bindings()
    try:
        err = nvrtc.nvrtcVersion()[0]
    except Exception as e:  # cuda-bindings raises when libnvrtc.so is missing
        raise CudaError(
            f"NVRTC (the run-time CUDA compiler) could not be loaded ({e}). Install it with the CUDA line of your "
            "driver: `pip install 'edgedeploy[cuda13]'` or `'edgedeploy[cuda12]'` (`deploy doctor` says which)"
        ) from e
    check(err, "nvrtcVersion")
    return nvrtc


def nvrtc_version() -> tuple[int, int]:
    nvrtc = _nvrtc()
    major, minor = check(nvrtc.nvrtcVersion(), "nvrtcVersion")
    return int(major), int(minor)


def nvrtc_supported_archs() -> list[int]:
    """Real architectures this NVRTC can compile for (e.g. [75, 80, ..., 120]); CUDA 13 dropped 72 (Xavier)."""
    nvrtc = _nvrtc()
    return [int(a) for a in check(nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs")]


def nvrtc_compile(source: str, name: str, arch: str, options: Sequence[str] = ()) -> bytes:
    """Compile CUDA C++ with NVRTC. `arch` 'compute_86' gives PTX, 'sm_86' a cubin (machine code for exactly that
    GPU: no PTX JIT in the driver, so no PTX-version constraint). Raises `CudaError` carrying NVRTC's log."""
    nvrtc = _nvrtc()
    prog = check(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []), "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17", b"-default-device"] + [o.encode() for o in options]
        err = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
        if not _is_success(err):
            size = check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * size
            check(nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
            raise CudaError(f"nvrtcCompileProgram({name}, {arch}) failed:\n{log.decode(errors='replace').strip()}")
        if arch.startswith("sm_"):
            size = check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
            image = b" " * size
            check(nvrtc.nvrtcGetCUBIN(prog, image), "nvrtcGetCUBIN")
        else:
            size = check(nvrtc.nvrtcGetPTXSize(prog), "nvrtcGetPTXSize")
            image = b" " * size
            check(nvrtc.nvrtcGetPTX(prog, image), "nvrtcGetPTX")
    except BaseException:
        nvrtc.nvrtcDestroyProgram(prog)  # the first error is the one to report
        raise
    check(nvrtc.nvrtcDestroyProgram(prog), "nvrtcDestroyProgram")
    return image


def target_for_device(cc: str, supported: Sequence[int], nvrtc: tuple[int, int] | int, driver_cuda: int) -> str:
    """The NVRTC target for a GPU of compute capability `cc` ('8.7'): a cubin 'sm_87' when this NVRTC knows the
    architecture (a cubin runs on any driver of the same CUDA major line); otherwise PTX for the newest architecture
    below it (the driver JIT-compiles PTX forward), whose PTX ISA version only a driver at least as new as NVRTC
    accepts (CUDA_ERROR_UNSUPPORTED_PTX_VERSION otherwise). Raises CudaError with the fix when neither works."""
    nvrtc_major, nvrtc_minor = (nvrtc, 0) if isinstance(nvrtc, int) else (int(nvrtc[0]), int(nvrtc[1]))
    want = int(cc.replace(".", ""))
    if want in supported:
        return f"sm_{want}"
    lower = [a for a in supported if a < want]
    if not lower:
        need = "cuda12" if nvrtc_major >= 13 else "an older CUDA line"
        raise CudaError(
            f"this NVRTC (CUDA {nvrtc_major}) cannot compile for compute capability {cc} (it supports "
            f"{', '.join(map(str, supported))}); install `edgedeploy[{need}]` for this GPU"
        )
    if driver_cuda // 1000 < nvrtc_major:
        raise CudaError(cuda_line_problem(driver_cuda, nvrtc_major) or "driver too old for this NVRTC's PTX")
    if driver_cuda < nvrtc_major * 1000 + nvrtc_minor * 10:
        raise CudaError(
            f"compute capability {cc} is newer than this NVRTC {nvrtc_major}.{nvrtc_minor} knows, so the kernel must "
            f"be PTX, and the driver (CUDA {format_cuda_version(driver_cuda)}) cannot JIT PTX from a newer NVRTC. "
            f"Install an NVRTC no newer than the driver (`pip install 'nvidia-cuda-nvrtc"
            f"{'-cu12' if nvrtc_major == 12 else ''}<={format_cuda_version(driver_cuda)}.999'`) or update the driver"
        )
    return f"compute_{max(lower)}"


class Kernel:
    """A function from an NVRTC-compiled module (cubin or PTX), launched with the driver API on a stream.
    `close()` unloads the module."""

    def __init__(self, image: bytes, function: str) -> None:
        driver, _, _ = _bindings()
        self._drv = driver
        self.module = None
        if not image.startswith(b"\x7fELF") and not image.endswith(b"\0"):
            image = image + b"\0"  # PTX is loaded as a NUL-terminated string; a cubin (ELF) as is
        buf = np.frombuffer(image, dtype=np.uint8)
        self.module = check(driver.cuModuleLoadData(buf.ctypes.data), "cuModuleLoadData")
        try:
            self.function = check(driver.cuModuleGetFunction(self.module, function.encode()),
                                  f"cuModuleGetFunction({function})")
        except CudaError:
            self.close()
            raise
        self.name = function

    def close(self) -> None:
        if self.module is not None:
            module, self.module = self.module, None
            check(self._drv.cuModuleUnload(module), "cuModuleUnload")

    def launch(self, grid: tuple[int, int, int], block: tuple[int, int, int], args: Sequence[tuple[Any, Any]],
               stream: Stream) -> None:
        """`args` is a list of (value, ctypes type) in the kernel's parameter order."""
        values = tuple(a for a, _ in args)
        types = tuple(t for _, t in args)
        check(
            self._drv.cuLaunchKernel(self.function, *grid, *block, 0, stream.handle, (values, types), 0),
            f"cuLaunchKernel({self.name})",
        )
