"""Memory readings and low-level freeing, at the OS and driver level.

A ``MemoryReading`` is a snapshot of memory at one instant: host RAM (psutil;
"used" is total minus available), this process's RSS, and, when there is a GPU,
device memory (NVML) and torch's own CUDA counters. ``SystemMemoryProbe`` takes
real readings and, on Linux, tracks the exact peak RSS (kernel VmHWM);
``_clear_cuda`` and ``_malloc_trim`` give cached CUDA blocks and freed heap
pages back to the driver and the OS. What the figures mean for a batch (the
thresholds and decisions) lives in ``voiceman_pipeline.resources.memory``.

torch is never imported here: CUDA figures and CUDA cleanup are used only when
some engine has already imported torch (``"torch" in sys.modules``) and has
already initialised CUDA, because initialising a CUDA context just to read or
clear it costs hundreds of MB of GPU memory and seconds of time. pynvml is
imported lazily, on the first GPU reading.

Units: MB means MiB (2**20 bytes) everywhere; percentages are 0-100.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import dagster as dg
import psutil

if TYPE_CHECKING:
    from voiceman_pipeline.resources.memory import FileMemoryStats

MB = 1024 * 1024


def _logger() -> logging.Logger:
    # Resolved per call: inside a step it is captured into the run's event log.
    return dg.get_dagster_logger()

# --- readings -----------------------------------------------------------------


@dataclass(frozen=True)
class MemoryReading:
    """Memory at one instant.

    system_used_mb is total minus *available* (memory a new allocation cannot
    get without swapping or evicting), so system_percent equals psutil's
    ``virtual_memory().percent``. GPU fields are None when there is no GPU (no
    NVML library, no driver, no visible device). torch_* fields are None unless
    torch is imported and has initialised CUDA in this process.
    """

    system_total_mb: float
    system_used_mb: float
    system_available_mb: float
    system_percent: float
    process_rss_mb: float  # this process only; child processes not included
    gpu_total_mb: float | None = None
    gpu_used_mb: float | None = None  # whole device, every process on it
    gpu_percent: float | None = None
    torch_allocated_mb: float | None = None  # live tensors of this process
    torch_reserved_mb: float | None = None  # held by torch's caching allocator
    torch_max_allocated_mb: float | None = None  # since the last peak reset

    @property
    def has_gpu(self) -> bool:
        return self.gpu_total_mb is not None


@runtime_checkable
class MemoryProbe(Protocol):
    """Anything that can take a MemoryReading (tests inject forced readings)."""

    def read(self) -> MemoryReading: ...


class _Nvml:
    """Process-wide, lazy, guarded NVML: initialised at most once.

    Any NVML failure (library missing, driver missing, no device, device not
    visible) means "no GPU" and is never raised to the caller.
    """

    _lock = threading.Lock()
    _tried = False
    _module: Any = None
    _handle: Any = None
    _why_not: str | None = None

    @classmethod
    def handle(cls) -> tuple[Any, Any]:
        with cls._lock:
            if not cls._tried:
                cls._tried = True
                cls._init()
            return cls._module, cls._handle

    @classmethod
    def why_not(cls) -> str | None:
        cls.handle()
        return cls._why_not

    @classmethod
    def _init(cls) -> None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None and visible.strip() in ("", "-1"):
            cls._why_not = "CUDA_VISIBLE_DEVICES hides every GPU"
            return
        try:
            with warnings.catch_warnings():
                # The "pynvml" shim package warns that nvidia-ml-py replaces it;
                # both install the same module.
                warnings.simplefilter("ignore", FutureWarning)
                import pynvml
        except ImportError as exc:
            cls._why_not = f"pynvml not installed ({exc})"
            return
        try:
            pynvml.nvmlInit()
            # NVML ignores CUDA_VISIBLE_DEVICES; map the first visible device
            # (what CUDA calls device 0) back to NVML's numbering.
            first = (visible or "0").split(",")[0].strip()
            if first.isdigit():
                handle = pynvml.nvmlDeviceGetHandleByIndex(int(first))
            else:
                handle = pynvml.nvmlDeviceGetHandleByUUID(first)
            pynvml.nvmlDeviceGetMemoryInfo(handle)  # fails now rather than later
        except Exception as exc:  # pynvml.NVMLError and ctypes errors alike
            cls._why_not = f"NVML unavailable: {type(exc).__name__}: {exc}"
            return
        cls._module, cls._handle = pynvml, handle


def _torch_cuda() -> Any:
    """torch.cuda if torch is already imported and CUDA is initialised, else None."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        cuda = torch.cuda
        # is_initialized(): reading or clearing must not create a CUDA context.
        if cuda.is_available() and cuda.is_initialized():
            return cuda
    except Exception:
        return None
    return None


class _PeakRss:
    """Exact peak RSS of this process from the kernel's high-water mark (Linux).

    Why: the watchdog is a Python thread, and native calls that hold the GIL
    (pocketsphinx decoding, Praat analyses) stop it for their whole duration,
    so sampling alone misses the peak of exactly the calls that matter. The
    kernel keeps VmHWM (peak RSS) in /proc/<pid>/status, and writing "5" to
    /proc/<pid>/clear_refs resets it to the current RSS (Linux >= 4.0). That
    reset is process-wide (it also lowers ``getrusage().ru_maxrss``), so every
    reset first folds the peak so far into every file still being tracked;
    overlapping ``track_file`` blocks therefore each get their own true peak.
    Without reset permission, a peak is known only when the high-water mark
    rose during the file (it is then the file's peak).
    """

    _lock = threading.Lock()
    _active: list[FileMemoryStats] = []

    def __init__(self, pid: int) -> None:
        self._status = f"/proc/{pid}/status"
        self._clear_refs = f"/proc/{pid}/clear_refs"
        self.can_reset = True

    def hwm_mb(self) -> float | None:
        try:
            with open(self._status, "rb") as fh:
                for line in fh:
                    if line.startswith(b"VmHWM:"):
                        return int(line.split()[1]) / 1024.0  # kB
        except (OSError, ValueError, IndexError):
            return None
        return None

    def _fold(self, hwm: float | None) -> None:
        if hwm is None:
            return
        for stats in self._active:
            if hwm > stats.peak_memory_mb:
                stats.peak_memory_mb = hwm

    def begin(self, stats: FileMemoryStats) -> float | None:
        """Start tracking ``stats``; returns the high-water mark after any reset."""
        with self._lock:
            self._fold(self.hwm_mb())
            if self.can_reset:
                try:
                    with open(self._clear_refs, "w") as fh:
                        fh.write("5")
                except OSError:
                    self.can_reset = False
            self._active.append(stats)
            return self.hwm_mb()

    def end(self, stats: FileMemoryStats, hwm_at_begin: float | None) -> None:
        with self._lock:
            hwm = self.hwm_mb()
            if self.can_reset:
                self._fold(hwm)
            elif hwm is not None and hwm_at_begin is not None and hwm > hwm_at_begin:
                # Not reset: a rise of the lifetime peak happened during this file.
                stats.peak_memory_mb = max(stats.peak_memory_mb, hwm)
            self._active[:] = [s for s in self._active if s is not stats]


class SystemMemoryProbe:
    """Real readings: psutil for host and process, NVML and torch.cuda for GPU."""

    def __init__(self) -> None:
        self._pid = -1
        self._process: psutil.Process | None = None
        self._peak: _PeakRss | None = None

    def _proc(self) -> psutil.Process:
        # Re-bind after fork: Dagster's multiprocess executor runs steps in
        # child processes, and a Process bound to the parent reads the parent.
        if self._process is None or self._pid != os.getpid():
            self._pid = os.getpid()
            self._process = psutil.Process(self._pid)
            self._peak = _PeakRss(self._pid) if os.path.exists(f"/proc/{self._pid}/status") else None
        return self._process

    @property
    def peak_rss(self) -> _PeakRss | None:
        """Kernel peak-RSS tracking for track_file; None where /proc is absent."""
        self._proc()
        return self._peak

    def read(self) -> MemoryReading:
        vm = psutil.virtual_memory()
        total = vm.total / MB
        used = (vm.total - vm.available) / MB
        values: dict[str, Any] = dict(
            system_total_mb=total,
            system_used_mb=used,
            system_available_mb=vm.available / MB,
            system_percent=used / total * 100.0,
            process_rss_mb=self._proc().memory_info().rss / MB,
        )
        values.update(self.read_gpu())
        return MemoryReading(**values)

    @staticmethod
    def read_gpu() -> dict[str, float]:
        """GPU fields of a reading; empty when there is no GPU."""
        out: dict[str, float] = {}
        nvml, handle = _Nvml.handle()
        if handle is not None:
            try:
                info = nvml.nvmlDeviceGetMemoryInfo(handle)
                out["gpu_total_mb"] = info.total / MB
                out["gpu_used_mb"] = info.used / MB
                out["gpu_percent"] = info.used / info.total * 100.0 if info.total else 0.0
            except Exception:
                # A device lost mid-run (Xid error, reset): report no GPU
                # figures rather than failing the file being measured.
                pass
        cuda = _torch_cuda()
        if cuda is not None:
            try:
                out["torch_allocated_mb"] = cuda.memory_allocated() / MB
                out["torch_reserved_mb"] = cuda.memory_reserved() / MB
                out["torch_max_allocated_mb"] = cuda.max_memory_allocated() / MB
                if "gpu_total_mb" not in out:
                    # No NVML (e.g. some containers): torch can still say how
                    # full the device is.
                    free, total = cuda.mem_get_info()
                    out["gpu_total_mb"] = total / MB
                    out["gpu_used_mb"] = (total - free) / MB
                    out["gpu_percent"] = (total - free) / total * 100.0
            except Exception:
                pass
        return out


# --- cleanup helpers ----------------------------------------------------------


def _clear_cuda() -> bool:
    """Synchronise, empty torch's CUDA cache and collect IPC memory, if in use."""
    cuda = _torch_cuda()
    if cuda is None:
        return False
    try:
        cuda.synchronize()  # kernels still running may hold blocks
        cuda.empty_cache()  # give cached, unused blocks back to the driver
        cuda.ipc_collect()  # free memory shared with processes that have exited
        return True
    except Exception as exc:
        _logger().warning(f"CUDA cache cleanup failed: {type(exc).__name__}: {exc}")
        return False


_LIBC: Any = None


def _malloc_trim() -> None:
    """Return freed heap pages to the OS (glibc only).

    Blocks below glibc's mmap threshold (Python objects, small arrays, many
    native-library buffers) go back to glibc's heap when freed, which keeps
    them mapped: without a trim, RSS after cleanup can stay high although the
    memory is free, and "MB freed" would under-report.
    """
    global _LIBC
    if not sys.platform.startswith("linux"):
        return
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):  # musl has no malloc_trim
        pass
