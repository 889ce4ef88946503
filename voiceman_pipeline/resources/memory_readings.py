"""Memory readings (psutil, NVML, the kernel's peak) and heap trimming; imports nothing of ``memory``.

Never imports torch: CUDA is read or cleared (``torch_cuda``) only once an engine has imported
torch and initialised CUDA (a context made just to read it costs hundreds of MB). pynvml is
imported on the first GPU reading.
"""

import contextlib
import ctypes.util
import functools
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any

import psutil

MB = 1024 * 1024


@dataclass(frozen=True)
class MemoryReading:
    """Memory at one instant; GPU fields None without a visible GPU. Tests inject
    a probe (anything with ``read() -> MemoryReading``) in place of the machine."""
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
        has_gpu = self.gpu_total_mb and self.gpu_used_mb is not None
        return 100.0 * self.gpu_used_mb / self.gpu_total_mb if has_gpu else None

    def describe(self) -> str:
        """'host used/total MB (%)', then the GPU's the same way where there is one."""
        text = f"host {self.system_used_mb:.0f}/{self.system_total_mb:.0f} MB ({self.system_percent:.1f}%)"
        if (gpu := self.gpu_percent) is not None:
            text += f", GPU {self.gpu_used_mb:.0f}/{self.gpu_total_mb:.0f} MB ({gpu:.1f}%)"
        return text


@functools.cache
def nvml() -> tuple[Any, Any, str | None]:
    """(pynvml, handle of CUDA's device 0, None), or (None, None, why there is no
    GPU): NVML initialised once per process; any failure means "no GPU"."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return None, None, "CUDA_VISIBLE_DEVICES hides every GPU"
    try:
        import pynvml  # from nvidia-ml-py
    except ImportError as exc:
        return None, None, f"pynvml not installed ({exc})"
    try:
        pynvml.nvmlInit()
        # NVML ignores CUDA_VISIBLE_DEVICES: map CUDA's device 0 back to NVML's numbering.
        first = (visible or "0").split(",")[0].strip()
        get = pynvml.nvmlDeviceGetHandleByIndex if first.isdigit() else pynvml.nvmlDeviceGetHandleByUUID
        handle = get(int(first) if first.isdigit() else first)
        pynvml.nvmlDeviceGetMemoryInfo(handle)  # fail now rather than mid-file
    except Exception as exc:  # NVMLError and ctypes errors alike
        return None, None, f"NVML unavailable: {type(exc).__name__}: {exc}"
    return pynvml, handle, None


def torch_cuda() -> Any:
    """torch.cuda if torch is already imported and CUDA initialised, else None."""
    with contextlib.suppress(Exception):  # KeyError: torch not imported
        cuda = sys.modules["torch"].cuda
        return cuda if cuda.is_available() and cuda.is_initialized() else None
    return None


class SystemMemoryProbe:
    """Real readings: psutil for host and process, NVML (else torch.cuda) for the GPU."""

    def read(self) -> MemoryReading:
        vm, (pynvml, handle, _), cuda = psutil.virtual_memory(), nvml(), torch_cuda()
        gpu = (None, None)  # (total, used) MB
        with contextlib.suppress(Exception):  # a device lost mid-run: no GPU figures, not a failed file
            if handle is not None:
                info = pynvml.nvmlDeviceGetMemoryInfo(handle)
                gpu = (info.total / MB, info.used / MB)
            elif cuda is not None:  # no NVML (some containers): torch still knows
                free, total = cuda.mem_get_info()
                gpu = (total / MB, (total - free) / MB)
        # psutil.Process() per call: Dagster may run steps in forked children.
        rss = psutil.Process().memory_info().rss / MB
        return MemoryReading(vm.total / MB, (vm.total - vm.available) / MB, rss, *gpu)


class KernelPeak:
    """This process's exact peak RSS over a block, from the kernel (Linux >= 4.0).

    Native calls that hold the GIL (pocketsphinx, Praat) stop any sampling thread while
    they run, so only the kernel sees their peak: writing "5" to /proc/self/clear_refs
    resets VmHWM (/proc/self/status) to the current RSS. The reset is process-wide, so one
    block is open at a time (a process runs one recording at a time: Dagster runs its
    steps one after another, workers are processes). ``start`` gives None while another
    block is open, and where the reset is impossible (no /proc, no permission).
    """

    works: bool | None = None  # None: not tried yet
    _open = threading.Lock()  # held from ``start`` to ``finish``

    @staticmethod
    def _hwm() -> float | None:
        """VmHWM in MB; None where unreadable."""
        try:
            with open("/proc/self/status", "rb") as fh:
                line = next(line for line in fh if line.startswith(b"VmHWM:"))
            return int(line.split()[1]) / 1024.0  # kB
        except (OSError, ValueError, IndexError, StopIteration):
            return None

    @classmethod
    def start(cls) -> float | None:
        """Open a block: the RSS now (MB), or None (see above)."""
        if cls.works is False or not cls._open.acquire(blocking=False):
            return None
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            baseline = cls._hwm()
        except OSError:
            baseline = None
        cls.works = baseline is not None
        if baseline is None:
            cls._open.release()
        return baseline

    @classmethod
    def finish(cls) -> float | None:
        """Close the open block: its peak RSS (MB), None where unreadable."""
        try:
            return cls._hwm()
        finally:
            cls._open.release()


_libc = functools.cache(lambda: ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"))


def malloc_trim() -> None:
    """Return freed heap pages to the OS (glibc). Without it, memory freed in small blocks
    stays mapped: RSS would not drop after a cleanup, and the next file would reuse it
    unseen by the peak counter (its peak would under-read)."""
    with contextlib.suppress(OSError, AttributeError):  # musl has no malloc_trim
        if sys.platform.startswith("linux"):
            _libc().malloc_trim(0)
