"""CUDA through cuda-python: every status becomes an exception here, nowhere else.

Imported only by GPU backends; nothing here runs at import time. What it allocates or creates (device and
pinned memory, streams, events) goes back by ``free()``, or else when collected (not at interpreter exit: the
driver takes it back with the process): a process that opens and drops pipelines (a server reloading a model, a
benchmark) does not leak.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
import weakref
from contextlib import contextmanager
from functools import lru_cache

import numpy as np

from .errors import BackendError

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def bindings():
    """(driver, runtime, nvrtc) modules of cuda-python 12.x or 13.x."""
    try:
        from cuda.bindings import driver, nvrtc, runtime
    except ImportError:
        try:
            from cuda import cuda as driver
            from cuda import cudart as runtime
            from cuda import nvrtc
        except ImportError as e:
            raise BackendError(
                "cuda-python is not installed: pip install 'sdturbo[cuda]' (or [tensorrt], [tensorrt-rtx])"
            ) from e
    return driver, runtime, nvrtc


def _failed(status) -> bool:
    return int(getattr(status, "value", status)) != 0


def _status_text(status) -> str:
    """A failed status in the library's words: its name, and for the runtime's errors what it means
    ("cudaErrorNoDevice: no CUDA-capable device is detected"); its repr where it has no name."""
    name = getattr(status, "name", None)
    if name is None:
        return repr(status)
    if type(status).__name__ != "cudaError_t":  # (the driver's and NVRTC's codes number other errors)
        return name
    try:
        why = bindings()[1].cudaGetErrorString(status)[1]
        why = why.decode(errors="replace") if isinstance(why, bytes) else str(why)
    except Exception:  # (a runtime without it: the name alone)
        why = ""
    return f"{name}: {why}" if why else name


def check(result, what: str = "CUDA call"):
    """Unpack a cuda-python ``(status, *values)`` result; raise BackendError unless the status is success."""
    status, *values = result if isinstance(result, tuple) else (result,)
    if _failed(status):
        raise BackendError(f"{what} failed: {_status_text(status)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def current_compute_capability(device: int = 0) -> int:
    _, rt, _ = bindings()
    try:
        major = check(rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, device))
        minor = check(rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, device))
    except BackendError as e:
        raise BackendError(
            f"no usable CUDA GPU: {_failure(e)}; with --trt tensorrt-rtx, pass --compute-capability "
            f"to build for a GPU ahead of time"
        ) from e
    return major * 10 + minor


def device_summary(device: int = 0) -> str:
    """``device``'s name, compute capability and the driver's CUDA version, e.g. "NVIDIA H100 80GB HBM3 (SM90,
    driver CUDA 13.0)"; what of it cannot be read says so (for logs and records, never for a decision)."""
    _, rt, _ = bindings()
    try:
        name = check(rt.cudaGetDeviceProperties(device)).name
        name = name.split(b"\0")[0].decode(errors="replace") if isinstance(name, bytes) else str(name)
    except BackendError:
        name = f"GPU {device}"
    try:
        cc = f"SM{current_compute_capability(device)}"
    except BackendError:
        cc = "SM?"
    try:
        v = check(rt.cudaDriverGetVersion())
        driver = f"{v // 1000}.{v % 1000 // 10}"
    except BackendError:
        driver = "?"
    return f"{name} ({cc}, driver CUDA {driver})"


_CONTEXTS: set[int] = set()


def ensure_context(device: int = 0) -> None:
    """Make ``device``'s primary context current on this thread. Runtime-API calls such as
    cudaDeviceGetAttribute do not create one, but driver-API calls (cuModuleLoadData) and TensorRT-RTX's
    runtime cache need it. cudaSetDevice makes the primary context current; cudaFree(0) initialises it."""
    _, rt, _ = bindings()
    try:
        check(rt.cudaSetDevice(device), f"cudaSetDevice({device})")
        if device not in _CONTEXTS:
            check(rt.cudaFree(0), "cudaFree(0) (CUDA context initialisation)")
            _CONTEXTS.add(device)
    except BackendError as e:
        raise BackendError(_failure(e)) from e


DRIVER_LIBRARY = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"  # the NVIDIA driver's CUDA library


def gpu_problem() -> str | None:
    """Why this process cannot use a CUDA GPU (no cuda-python, no driver, no device), in one line; None if it can.
    Without a driver at all the runtime says "CUDA driver version is insufficient": this says there is none."""
    try:
        _, rt, _ = bindings()
    except BackendError as e:  # no cuda-python: how to install it
        return str(e)
    try:
        count = check(rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
    except BackendError as e:
        return _failure(e)
    return None if count > 0 else "the CUDA driver finds no device"


def _failure(e: BackendError) -> str:
    """A CUDA call's failure in one line: where the NVIDIA driver cannot be loaded at all, that (the runtime says
    "CUDA driver version is insufficient", which sends a user to upgrade a driver that is not there)."""
    why = driver_unloadable()
    return str(e) if why is None else f"no NVIDIA driver can be loaded here ({why})"


def driver_unloadable() -> str | None:
    """Why the NVIDIA driver's library does not load (absent, or a broken install), or None if it does."""
    try:
        ctypes.CDLL(DRIVER_LIBRARY)
    except OSError as e:
        return str(e) or f"{DRIVER_LIBRARY} cannot be loaded"
    return None


def gpu_available() -> bool:
    return gpu_problem() is None


_captures = 0  # captures under way in this process (callers hold device_pipeline.CAPTURE_LOCK)
_held_back: list[tuple] = []  # (release, handle) collected during one, given back at its end
# Held by a release from its check for captures to its end, and by a capture's start: a collection on one thread
# never frees into a capture another thread begins meanwhile (a capture's start only waits for a release under way)
_releasing = threading.RLock()


def _give_back(release, handle) -> None:
    """A finalizer: ``release(handle)``, never raising (at interpreter exit the bindings may be gone first, and
    a stream in error has nothing left to give). During a capture it waits for the capture's end: freeing
    memory or destroying a stream there would invalidate the capture."""
    with _releasing:
        if _captures:
            _held_back.append((release, handle))
            return
        try:  # noqa: SIM105 (not contextlib.suppress: late in interpreter exit, this module's globals may be gone)
            release(handle)
        except Exception:  # nothing to do about it: what was held is lost either way
            pass


@contextmanager
def capturing():
    """What is collected in this block is given back at its end, not during a capture it holds (a collection
    can run anywhere, and a pipeline dropped in a reference cycle is freed by one)."""
    global _captures
    with _releasing:
        _captures += 1
    try:
        yield
    finally:
        with _releasing:
            _captures -= 1
            while not _captures and _held_back:
                _give_back(*_held_back.pop())


def on_collect(owner, release, handle) -> weakref.finalize:
    """``release(handle)`` once ``owner`` is collected (as ``_give_back``: never during a capture, never
    raising), or when the finalizer returned is called; not at interpreter exit: a daemon thread (the server's
    batcher) may still be running on what is held then, and the driver takes everything back when the
    process ends anyway. Neither ``release`` nor ``handle`` may refer to ``owner``: it would never be collected."""
    finalizer = weakref.finalize(owner, _give_back, release, handle)
    finalizer.atexit = False
    return finalizer


class _Held:
    """Something CUDA gave this process, given back once: by ``free()``, or by a finalizer when ``owner`` is
    collected. The finalizer holds the runtime's release function and the handle, never the object."""

    runtime = None  # cuda-python's runtime module where None (tests/engine/emulated_gpu.py sets its own)

    @classmethod
    def _runtime(cls):
        return cls.runtime if cls.runtime is not None else bindings()[1]

    def _hold(self, owner, release, handle) -> None:
        self._finalizer = on_collect(owner, release, handle)

    def free(self) -> None:
        """Give it back now; a second call, and the collection after, give nothing back again."""
        held = self._finalizer.detach()
        if held is not None:
            _, _, (release, handle), _ = held
            check(release(handle), getattr(release, "__name__", "CUDA release"))


class DeviceBuffer(_Held):
    """``nbytes`` of device memory, allocated once."""

    def __init__(self, nbytes: int):
        rt = self._runtime()
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(rt.cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes})"))
        self._hold(self, rt.cudaFree, self.ptr)

    def free(self) -> None:
        super().free()
        self.ptr = 0


class PinnedArray(_Held):
    """A page-locked host array, so copies to and from the device are asynchronous.

    ``array`` is a view of the pinned memory, for the owner's own use: what leaves the owner is a copy, as
    nothing may use the view (or a view of it) past ``free()``, after which ``array`` raises. Collected, the
    memory goes back once every view of it is gone too (the finalizer watches the buffer they all share)."""

    def __init__(self, shape, dtype):
        rt = self._runtime()
        self.dtype = np.dtype(dtype)
        self.nbytes = max(int(np.prod(shape)) * self.dtype.itemsize, 1)
        self.ptr = int(check(rt.cudaMallocHost(self.nbytes), "cudaMallocHost"))
        raw = (ctypes.c_byte * self.nbytes).from_address(self.ptr)
        self._hold(raw, rt.cudaFreeHost, self.ptr)
        self._array = np.frombuffer(raw, dtype=self.dtype, count=int(np.prod(shape))).reshape(shape)

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            raise BackendError("this pinned host array was freed (its pipeline was closed)")
        return self._array

    def free(self) -> None:
        super().free()
        self.ptr, self._array = 0, None


class Stream(_Held):
    """A non-blocking CUDA stream; ``free()`` destroys it."""

    def __init__(self):
        rt = self._rt = self._runtime()
        self.handle = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreate")
        self._hold(self, rt.cudaStreamDestroy, self.handle)

    @property
    def ptr(self) -> int:
        return int(self.handle)

    def copy_in(self, dst: int, src: PinnedArray, nbytes: int) -> None:
        rt = self._rt
        check(rt.cudaMemcpyAsync(dst, src.ptr, nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.handle), "H2D")

    def copy_out(self, dst: PinnedArray, src: int, nbytes: int) -> None:
        rt = self._rt
        check(rt.cudaMemcpyAsync(dst.ptr, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.handle), "D2H")

    def copy_d2d(self, dst: int, src: int, nbytes: int) -> None:
        rt = self._rt
        check(rt.cudaMemcpyAsync(dst, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self.handle), "D2D")

    def copy_2d(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, rows: int) -> None:
        """Device to device: ``rows`` rows of ``width`` bytes (a concatenation along the last axis is one)."""
        rt = self._rt
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        check(rt.cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, rows, kind, self.handle), "D2D 2D copy")

    def fill(self, dst: int, byte: int, nbytes: int) -> None:
        """Set ``nbytes`` of device memory at ``dst`` to ``byte``."""
        check(self._rt.cudaMemsetAsync(dst, byte, nbytes, self.handle), "cudaMemsetAsync")

    def enqueue(self, fn) -> None:
        """Call ``fn``, which enqueues work on this stream from the host (an ONNX Runtime run on it)."""
        fn()

    def synchronize(self) -> None:
        check(self._rt.cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def end_capture(self) -> None:
        """End a capture left open on this stream (a library's run that failed under its own capture), and
        drop what it recorded; nothing when none is open."""
        rt = self._rt
        status = check(rt.cudaStreamIsCapturing(self.handle), "cudaStreamIsCapturing")
        if status != rt.cudaStreamCaptureStatus.cudaStreamCaptureStatusNone:
            err, graph = rt.cudaStreamEndCapture(self.handle)
            if not _failed(err):
                rt.cudaGraphDestroy(graph)
        rt.cudaGetLastError()  # reset this runtime's last error for the thread (later calls start clean)


class Event(_Held):
    """A CUDA event with timing, recorded on a stream (the benchmark's per-stage times); ``free()`` destroys it."""

    def __init__(self):
        rt = self._rt = self._runtime()
        self.handle = check(rt.cudaEventCreate(), "cudaEventCreate")
        self._hold(self, rt.cudaEventDestroy, self.handle)

    def record(self, stream: Stream) -> None:
        check(self._rt.cudaEventRecord(self.handle, stream.handle), "cudaEventRecord")

    def ms_since(self, start: Event) -> float:
        """Milliseconds from ``start`` to this event (both recorded and complete)."""
        return float(check(self._rt.cudaEventElapsedTime(start.handle, self.handle), "cudaEventElapsedTime"))


def node_types(graph) -> dict[str, int] | None:
    """How many nodes of each type (Kernel, Memcpy, Memset, Host, MemAlloc, ...) a captured graph has; None
    where they cannot be read (the check that uses them is then skipped, not failed)."""
    _, rt, _ = bindings()
    try:
        count = check(rt.cudaGraphGetNodes(graph, 0), "cudaGraphGetNodes")[1]
        nodes = check(rt.cudaGraphGetNodes(graph, count), "cudaGraphGetNodes")[0] if count else []
        out: dict[str, int] = {}
        for node in nodes:
            name = check(rt.cudaGraphNodeGetType(node), "cudaGraphNodeGetType").name.removeprefix("cudaGraphNodeType")
            out[name] = out.get(name, 0) + 1
        return out
    except Exception as e:  # (an API that differs from this cuda-python's: no inspection)
        log.warning("cannot list the captured graph's nodes: %s", str(e))  # (a record holding e would hold the frames)
        return None


class Graph:
    """One captured CUDA graph: ``capture(fn)`` records what ``fn`` enqueues on the stream; ``launch`` replays it."""

    def __init__(self, stream: Stream, fn):
        _, rt, _ = bindings()
        self._rt, self._stream = rt, stream
        check(
            rt.cudaStreamBeginCapture(stream.handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
            "cudaStreamBeginCapture",
        )
        try:
            fn()
        except BaseException:
            rt.cudaStreamEndCapture(stream.handle)  # end the broken capture; the error that broke it is the one raised
            rt.cudaGetLastError()  # and reset this runtime's last error for the thread (later calls start clean)
            raise
        graph = check(rt.cudaStreamEndCapture(stream.handle), "cudaStreamEndCapture")
        self._graph = graph
        self.node_types = node_types(graph)
        self._exec = check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        # a graph dropped (its tier turned off, its pipeline closed) gives both back; as for memory, never during
        # another capture (a collection can run in one) and not at interpreter exit
        on_collect(self, _destroy_graph, (rt, self._exec, graph))

    def launch(self) -> None:
        check(self._rt.cudaGraphLaunch(self._exec, self._stream.handle), "cudaGraphLaunch")


def _destroy_graph(held) -> None:
    rt, executable, graph = held
    rt.cudaGraphExecDestroy(executable)
    rt.cudaGraphDestroy(graph)
