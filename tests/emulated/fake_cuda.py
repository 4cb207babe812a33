"""A CPU stand-in for `edgedeploy.runtime.cuda`, so the code above it (GpuPreprocessor, TensorRTEngine, the
pipelines' GPU branch) runs unchanged on a machine without a GPU.

What it keeps of CUDA's semantics, because that is where GPU code goes wrong:
- device memory is host memory pre-filled with `MARKER` (0xFF: NaN in FP32/FP16), so an output nobody wrote shows;
  every pointer a kernel or copy touches must lie inside a live allocation;
- work on a stream is queued and runs only when the stream (or an event on it) is synchronised, so reading a
  result without synchronising reads stale memory; `Stream.wait_for` orders a stream after another one;
- CUDA-graph capture records the queued operations with the arguments and addresses they had, and `launch`
  replays exactly those;
- kernels are the real NVRTC source compiled for the host (`kernel_cpu`), launched over the launcher's grid;
- a ledger counts what was created and destroyed (streams, events, modules, allocations, graphs) for leak checks.

`install(monkeypatch, compute_capability="8.7", driver=13000)` puts the stand-ins on the real module.
"""

from __future__ import annotations

import ctypes
import itertools
import time
from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np

from edgedeploy.runtime import cuda as real_cuda
from edgedeploy.runtime.cuda import CudaError

MARKER = 0xFF
_handles = itertools.count(0x1000)


class Ledger:
    def __init__(self) -> None:
        self.created: Counter = Counter()
        self.destroyed: Counter = Counter()
        self.allocations: dict[int, "DeviceBuffer"] = {}
        self.streams: dict[int, "Stream"] = {}
        self.launches: Counter = Counter()

    def live(self) -> dict[str, int]:
        return {k: self.created[k] - self.destroyed[k] for k in self.created if self.created[k] != self.destroyed[k]}

    def memory(self, ptr: int, nbytes: int, what: str) -> np.ndarray:
        """A uint8 view of device memory [ptr, ptr+nbytes); CudaError when it is not inside one live allocation."""
        for base, buf in self.allocations.items():
            if base <= ptr and ptr + nbytes <= base + buf.nbytes:
                off = ptr - base
                return buf._mem[off : off + nbytes]
        raise CudaError(f"{what}: [{ptr:#x}, +{nbytes}) is not inside a live device allocation "
                        "(cudaErrorIllegalAddress)")


LEDGER = Ledger()


def _stream_of(handle: Any) -> "Stream":
    h = int(handle)
    if h in (0, 1, 2):  # legacy / per-thread default streams
        if h not in LEDGER.streams:
            LEDGER.streams[h] = Stream(_handle=h)
        return LEDGER.streams[h]
    try:
        return LEDGER.streams[h]
    except KeyError:
        raise CudaError(f"stream handle {h:#x} is not a live stream (cudaErrorInvalidResourceHandle)") from None


# ---- context ---------------------------------------------------------------------------------------------------------
class _State:
    compute_capability = "8.7"
    driver = 13000
    nvrtc = (13, 0)
    nvrtc_archs = [75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121]


def init(device: int = 0) -> None:
    problem = real_cuda.cuda_line_problem(_State.driver, _State.nvrtc[0])
    if problem:
        raise CudaError(problem)


def compute_capability(device: int = 0) -> str:
    return _State.compute_capability


def driver_version() -> int:
    return _State.driver


def nvrtc_version() -> tuple[int, int]:
    return _State.nvrtc


def nvrtc_supported_archs() -> list[int]:
    return list(_State.nvrtc_archs)


# ---- streams and events ----------------------------------------------------------------------------------------------
class Stream:
    def __init__(self, _handle: int | None = None) -> None:
        self.handle = next(_handles) if _handle is None else _handle
        self._queue: list[Callable[[], None]] = []
        self._capture: list[Callable[[], None]] | None = None
        LEDGER.streams[self.handle] = self
        LEDGER.created["stream"] += 1

    @property
    def ptr(self) -> int:
        return int(self.handle)

    def _alive(self) -> None:
        if self.handle is None:
            raise CudaError("use of a destroyed stream (cudaErrorInvalidResourceHandle)")

    def enqueue(self, op: Callable[[], None]) -> None:
        self._alive()
        (self._capture if self._capture is not None else self._queue).append(op)

    def synchronize(self) -> None:
        self._alive()
        if self._capture is not None:
            raise CudaError("cudaStreamSynchronize during capture (cudaErrorStreamCaptureUnsupported)")
        while self._queue:
            self._queue.pop(0)()

    def wait_for(self, producer: int) -> None:
        other = _stream_of(producer)
        self.enqueue(other.synchronize)

    def close(self) -> None:
        if self.handle is None:
            return
        self.synchronize()  # cudaStreamDestroy lets queued work finish
        LEDGER.streams.pop(self.handle, None)
        self.handle = None
        LEDGER.destroyed["stream"] += 1


class Event:
    def __init__(self) -> None:
        self.handle: Any = object()
        self._stream: Stream | None = None
        self.t: float | None = None
        LEDGER.created["event"] += 1

    def record(self, stream: Stream) -> None:
        self._stream = stream
        stream.enqueue(lambda: setattr(self, "t", time.perf_counter()))

    def synchronize(self) -> None:
        if self._stream is not None and self._stream.handle is not None:
            self._stream.synchronize()

    def elapsed_ms(self, start: "Event") -> float:
        self.synchronize()
        start.synchronize()
        if self.t is None or start.t is None:
            raise CudaError("cudaEventElapsedTime on an event that never completed (cudaErrorInvalidResourceHandle)")
        return (self.t - start.t) * 1e3

    def close(self) -> None:
        if self.handle is not None:
            self.handle = None
            LEDGER.destroyed["event"] += 1


# ---- memory ------------------------------------------------------------------------------------------------------------
class DeviceBuffer:
    def __init__(self, nbytes: int, shape: Sequence[int] = (), dtype: Any = np.uint8) -> None:
        self.nbytes = max(int(nbytes), 1)
        self.shape = tuple(int(s) for s in shape) or (self.nbytes,)
        self.dtype = np.dtype(dtype)
        self._mem = np.full(self.nbytes, MARKER, np.uint8)
        self.ptr = int(self._mem.ctypes.data)
        self._owner = None
        LEDGER.allocations[self.ptr] = self
        LEDGER.created["device_alloc"] += 1

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False), "version": 3}

    def view(self, shape: Sequence[int], dtype: Any) -> "DeviceBuffer":
        need = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if need > self.nbytes:
            raise real_cuda.EdgeDeployError(f"view of {need} bytes on a {self.nbytes}-byte device buffer")
        v = object.__new__(DeviceBuffer)
        v.nbytes, v.ptr, v._mem = need, self.ptr, self._mem
        v.shape, v.dtype, v._owner = tuple(int(s) for s in shape), np.dtype(dtype), self
        return v

    def copy_from_host(self, host: np.ndarray, stream: Stream) -> None:
        ptr, n = self.ptr, host.nbytes

        def op() -> None:  # reads the host memory when it runs, as an async copy from pinned memory does
            LEDGER.memory(ptr, n, "cudaMemcpyAsync(H2D)")[:] = np.frombuffer(host.tobytes(), np.uint8)

        stream.enqueue(op)

    def copy_to_host(self, host: np.ndarray, stream: Stream) -> None:
        ptr, n = self.ptr, host.nbytes
        raw = (ctypes.c_uint8 * n).from_address(host.ctypes.data)

        def op() -> None:
            np.frombuffer(raw, np.uint8)[:] = LEDGER.memory(ptr, n, "cudaMemcpyAsync(D2H)")

        stream.enqueue(op)

    def host_view(self) -> np.ndarray:
        """Test helper: the buffer's current content at its shape/dtype (no synchronisation)."""
        return LEDGER.memory(self.ptr, self.nbytes, "host_view")[: int(np.prod(self.shape)) * self.dtype.itemsize] \
            .view(self.dtype).reshape(self.shape)

    def free(self) -> None:
        if self._owner is None and self.ptr:
            if LEDGER.allocations.pop(self.ptr, None) is None:
                raise CudaError("cudaFree of a pointer that is not allocated (cudaErrorInvalidValue)")
            LEDGER.destroyed["device_alloc"] += 1
        self.ptr = 0


class PinnedBuffer:
    def __init__(self, shape: Sequence[int], dtype: Any) -> None:
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        self.nbytes = max(int(np.prod(self.shape)) * self.dtype.itemsize, 1)
        self._mem = np.full(self.nbytes, MARKER, np.uint8)
        self.ptr = int(self._mem.ctypes.data)
        self.array = self._mem[: int(np.prod(self.shape)) * self.dtype.itemsize].view(self.dtype).reshape(self.shape)
        LEDGER.created["pinned_alloc"] += 1

    def free(self) -> None:
        if self.ptr:
            self.array = None  # type: ignore[assignment]
            self.ptr = 0
            LEDGER.destroyed["pinned_alloc"] += 1


def adopt(mem: np.ndarray) -> None:
    """Register host memory that another allocator owns (a CPU torch tensor standing in for memory from torch's CUDA
    caching allocator) as live device memory, pre-filled with MARKER. Not counted in the leak ledger: its owner
    frees it."""
    mem = mem.reshape(-1).view(np.uint8)
    mem[:] = MARKER
    LEDGER.allocations[int(mem.ctypes.data)] = _Adopted(mem)  # type: ignore[assignment]


class _Adopted:
    def __init__(self, mem: np.ndarray) -> None:
        self._mem, self.nbytes = mem, mem.nbytes


# ---- graphs ------------------------------------------------------------------------------------------------------------
class CudaGraph:
    def __init__(self) -> None:
        self.graph: list[Callable[[], None]] | None = None
        self.exec: list[Callable[[], None]] | None = None
        self.error: str | None = None
        self.captures = 0
        self.replays = 0

    def capture(self, stream: Stream, enqueue) -> bool:
        self.reset()
        stream._capture = []
        try:
            ok = enqueue(stream)
        finally:
            ops, stream._capture = stream._capture, None
        if ok is False:
            self.error = "enqueue reported failure during capture"
            return False
        self.graph = self.exec = ops
        self.captures += 1
        LEDGER.created["graph"] += 1
        return True

    def launch(self, stream: Stream) -> None:
        if self.exec is None:
            raise CudaError("cudaGraphLaunch without an instantiated graph (cudaErrorInvalidValue)")
        self.replays += 1
        for op in self.exec:
            stream.enqueue(op)

    @property
    def ready(self) -> bool:
        return self.exec is not None

    def reset(self) -> None:
        if self.exec is not None:
            LEDGER.destroyed["graph"] += 1
        self.graph = self.exec = None


# ---- NVRTC and kernels -----------------------------------------------------------------------------------------------
_EMU = b"EMULATED-NVRTC\0"


def nvrtc_compile(source: str, name: str, arch: str, options: Sequence[str] = ()) -> bytes:
    """'Compiles' by carrying the source to `Kernel`, which builds it for the host; records the target asked for."""
    if not (arch.startswith("sm_") or arch.startswith("compute_")):
        raise CudaError(f"nvrtcCompileProgram({name}, {arch}) failed: invalid --gpu-architecture")
    LEDGER.launches[f"compile:{arch}"] += 1
    return _EMU + source.encode()


class Kernel:
    def __init__(self, image: bytes, function: str) -> None:
        from emulated.kernel_cpu import cpu_kernels

        if not image.startswith(_EMU):
            raise CudaError("cuModuleLoadData failed: CUDA_ERROR_INVALID_IMAGE (not an emulated module)")
        source = image[len(_EMU):].decode()
        import re

        entries = re.findall(r"^PREPROCESS_ENTRY\((\w+),", source, re.M) or [function]
        self.lib = cpu_kernels(source, entries)
        if function not in entries:
            raise CudaError(f"cuModuleGetFunction({function}) failed: CUDA_ERROR_NOT_FOUND")
        self.name = function
        self.module: Any = object()
        LEDGER.created["module"] += 1

    def launch(self, grid, block, args, stream: Stream) -> None:
        args = list(args)
        for value, ctype in args:  # a pointer argument must point into device memory
            if ctype is ctypes.c_void_p:
                LEDGER.memory(int(value), 1, f"cuLaunchKernel({self.name}) pointer argument")
        name, lib = self.name, self.lib
        LEDGER.launches[name] += 1
        stream.enqueue(lambda: lib.launch(name, grid, block, args))

    def close(self) -> None:
        if self.module is not None:
            self.module = None
            LEDGER.destroyed["module"] += 1


_NAMES = ("init", "compute_capability", "driver_version", "nvrtc_version", "nvrtc_supported_archs", "nvrtc_compile",
          "Stream", "Event", "DeviceBuffer", "PinnedBuffer", "CudaGraph", "Kernel")


def install(monkeypatch, *, compute_capability: str = "8.7", driver: int = 13000,
            nvrtc: tuple[int, int] = (13, 0), nvrtc_archs: Sequence[int] | None = None) -> Ledger:
    """Replace `edgedeploy.runtime.cuda`'s device layer by these stand-ins for one test; returns a fresh ledger."""
    import sys

    from edgedeploy.runtime import gpu_preprocess

    global LEDGER
    LEDGER = Ledger()
    monkeypatch.setattr(_State, "compute_capability", compute_capability)
    monkeypatch.setattr(_State, "driver", driver)
    monkeypatch.setattr(_State, "nvrtc", tuple(nvrtc))
    if nvrtc_archs is not None:
        monkeypatch.setattr(_State, "nvrtc_archs", list(nvrtc_archs))
    module = sys.modules[__name__]
    for name in _NAMES:
        monkeypatch.setattr(real_cuda, name, getattr(module, name))
    gpu_preprocess.compile_preprocess_ptx.cache_clear()  # a real NVRTC result cached earlier must not leak in
    monkeypatch.setattr(gpu_preprocess, "compile_preprocess_ptx", _uncached_compile)
    return LEDGER


def _uncached_compile(arch: str) -> bytes:
    from edgedeploy.runtime import gpu_preprocess  # its PREPROCESS_SOURCE: a test may plant a broken kernel there

    return real_cuda.nvrtc_compile(gpu_preprocess.PREPROCESS_SOURCE, "preprocess.cu", arch)
