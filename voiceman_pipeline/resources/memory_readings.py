"""Memory readings and low-level freeing (OS and driver); imports nothing of ``memory``.

Never imports torch: CUDA is read or cleared only once an engine has imported
torch and initialised CUDA (a context made just to read it costs hundreds of
MB). pynvml is imported on the first GPU reading.
"""

import ctypes
import ctypes.util
import logging
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Protocol

import dagster as dg
import psutil

MB = 1024 * 1024


def logger() -> logging.Logger:
    return dg.get_dagster_logger()  # per call: inside a step it goes to the run's event log


@dataclass(frozen=True)
class MemoryReading:
    """Memory at one instant; GPU fields None without a visible GPU."""

    system_total_mb: float
    system_used_mb: float  # total minus available: what a new allocation cannot get
    process_rss_mb: float  # this process only
    gpu_total_mb: float | None = None
    gpu_used_mb: float | None = None  # the whole device, every process on it

    @property
    def system_percent(self) -> float:
        return 100.0 * self.system_used_mb / self.system_total_mb if self.system_total_mb else 100.0

    @property
    def gpu_percent(self) -> float | None:
        if not self.gpu_total_mb or self.gpu_used_mb is None:
            return None
        return 100.0 * self.gpu_used_mb / self.gpu_total_mb


class MemoryProbe(Protocol):
    """Where readings come from: the machine, or (in tests) readings forced at this edge."""

    def read(self) -> MemoryReading: ...


class _Nvml:
    """Process-wide lazy NVML, initialised at most once; any failure means "no GPU"."""

    _lock = threading.Lock()
    _tried = False
    _module: Any = None
    _handle: Any = None
    _why_not: str | None = None

    @classmethod
    def handle(cls) -> tuple[Any, Any]:
        with cls._lock:
            if not cls._tried:
                cls._tried, cls._why_not = True, cls._init()
            return cls._module, cls._handle

    @classmethod
    def why_not(cls) -> str | None:
        cls.handle()
        return cls._why_not

    @classmethod
    def _init(cls) -> str | None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None and visible.strip() in ("", "-1"):
            return "CUDA_VISIBLE_DEVICES hides every GPU"
        try:
            with warnings.catch_warnings():  # the "pynvml" shim warns it is replaced
                warnings.simplefilter("ignore", FutureWarning)
                import pynvml
        except ImportError as exc:
            return f"pynvml not installed ({exc})"
        try:
            pynvml.nvmlInit()
            # NVML ignores CUDA_VISIBLE_DEVICES: map CUDA's device 0 back to NVML's numbering.
            first = (visible or "0").split(",")[0].strip()
            get = pynvml.nvmlDeviceGetHandleByIndex if first.isdigit() else pynvml.nvmlDeviceGetHandleByUUID
            handle = get(int(first) if first.isdigit() else first)
            pynvml.nvmlDeviceGetMemoryInfo(handle)  # fail now rather than mid-file
        except Exception as exc:  # NVMLError and ctypes errors alike
            return f"NVML unavailable: {type(exc).__name__}: {exc}"
        cls._module, cls._handle = pynvml, handle
        return None


def torch_cuda() -> Any:
    """torch.cuda if torch is already imported and CUDA initialised, else None."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cuda
    except Exception:
        pass
    return None


class SystemMemoryProbe:
    """Real readings: psutil for host and process, NVML (else torch.cuda) for the GPU."""

    def read(self) -> MemoryReading:
        vm = psutil.virtual_memory()
        gpu_total = gpu_used = None
        nvml, handle = _Nvml.handle()
        cuda = torch_cuda()
        try:
            if handle is not None:
                info = nvml.nvmlDeviceGetMemoryInfo(handle)
                gpu_total, gpu_used = info.total / MB, info.used / MB
            elif cuda is not None:  # no NVML (some containers): torch still knows
                free, total = cuda.mem_get_info()
                gpu_total, gpu_used = total / MB, (total - free) / MB
        except Exception:
            pass  # a device lost mid-run: no GPU figures rather than a failed file
        # psutil.Process() per call: Dagster may run steps in forked children.
        rss = psutil.Process().memory_info().rss / MB
        return MemoryReading(vm.total / MB, (vm.total - vm.available) / MB, rss, gpu_total, gpu_used)


class KernelPeak:
    """This process's exact peak RSS over a block, from the kernel (Linux >= 4.0).

    Native calls that hold the GIL (pocketsphinx, Praat) stop any sampling
    thread while they run, so only the kernel sees their peak: writing "5" to
    /proc/self/clear_refs resets VmHWM (/proc/self/status) to the current RSS.
    The reset is process-wide, so each one first folds the peak so far into
    every open block (nested blocks keep their own peaks). ``start`` gives None
    where the reset is impossible (no /proc, no permission).
    """

    _lock = threading.Lock()
    _open: list[list[float]] = []  # [peak MB] of each block in progress
    works: bool | None = None  # None: not tried yet

    @staticmethod
    def _hwm_mb() -> float | None:
        try:
            with open("/proc/self/status", "rb") as fh:
                line = next(line for line in fh if line.startswith(b"VmHWM:"))
            return int(line.split()[1]) / 1024.0  # kB
        except (OSError, ValueError, IndexError, StopIteration):
            return None

    @classmethod
    def _fold(cls) -> None:
        hwm = cls._hwm_mb() or 0.0
        for block in cls._open:
            block[0] = max(block[0], hwm)

    @classmethod
    def start(cls) -> list[float] | None:
        """Open a block: [baseline MB], raised to the block's peak by ``finish``."""
        with cls._lock:
            if cls.works is False:
                return None
            cls._fold()
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")
                baseline = cls._hwm_mb()
            except OSError:
                baseline = None
            cls.works = baseline is not None
            cls._open += [[baseline]] if baseline is not None else []
            return cls._open[-1] if baseline is not None else None

    @classmethod
    def finish(cls, block: list[float]) -> float:
        """Close a block; its peak RSS in MB."""
        with cls._lock:
            cls._fold()
            cls._open[:] = [b for b in cls._open if b is not block]
            return block[0]


def clear_cuda() -> bool:
    """Synchronise, empty torch's CUDA cache and collect IPC memory, if CUDA is in use."""
    try:
        if (cuda := torch_cuda()) is not None:
            cuda.synchronize()  # kernels still running may hold blocks
            cuda.empty_cache()
            cuda.ipc_collect()
            return True
    except Exception as exc:
        logger().warning(f"CUDA cache cleanup failed: {type(exc).__name__}: {exc}")
    return False


_LIBC: Any = None


def malloc_trim() -> None:
    """Return freed heap pages to the OS (glibc). Without it, memory freed in small
    blocks stays mapped: RSS would not drop after a cleanup, and the next file
    would reuse it unseen by the peak counter (its peak would under-read)."""
    global _LIBC
    try:
        if sys.platform.startswith("linux"):
            _LIBC = _LIBC or ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim(0)
    except (OSError, AttributeError):  # musl has no malloc_trim
        pass
