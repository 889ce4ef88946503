"""Memory management for batches of recordings: check, track, clean up, predict.

What this module gives the pipeline:

- ``SystemMemoryProbe``: one reading of host memory (psutil), this process's
  RSS, and, when there is a GPU, device memory (NVML) and torch's own counters.
- ``MemoryManager`` (a Dagster resource):
  - ``check_before``: before a batch, predict memory use and decide whether the
    batch fits (ok / warning / critical -> emergency cleanup, fewer files, or
    ``RetryRequested`` when nothing fits);
  - ``track_file``: per file, start/end RSS and the true peak, sampled by a
    background watchdog thread, as ``FileMemoryStats`` (and Dagster metadata);
  - ``register`` / ``cleanup``: unload every registered model engine, free the
    CUDA cache, run the garbage collector, and report what was freed;
  - ``per_file_estimate_mb``: per-file memory from recorded history.
- ``memory_history_from_instance``: that history, read back from the Dagster
  event log (the metadata ``FileMemoryStats.to_metadata`` writes).

torch is never imported here: CUDA figures and CUDA cleanup are used only when
some engine has already imported torch (``"torch" in sys.modules``) and has
already initialised CUDA, because initialising a CUDA context just to read or
clear it costs hundreds of MB of GPU memory and seconds of time.

Units: MB means MiB (2**20 bytes) everywhere; percentages are 0-100.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Protocol, runtime_checkable

import dagster as dg
import psutil
from pydantic import Field, PrivateAttr

from voiceman_pipeline.errors import ResourceError

MB = 1024 * 1024

# Metadata keys written by FileMemoryStats.to_metadata() and read back by
# memory_history_from_instance(). Other modules should use these names.
META_PEAK_DELTA_MB = "memory_peak_delta_mb"  # peak RSS minus RSS at file start
META_AUDIO_SECONDS = "memory_audio_seconds"  # duration of the recording
META_ENGINE = "memory_engine"  # engine that processed the file (optional)
META_SUCCESS = "memory_success"  # False: the body raised; skipped by history

# Per-file estimate basis when there is no history yet: MB of peak RSS growth
# per second of audio for one file through pocketsphinx STT (16-bit PCM) and
# parselmouth (pitch, jitter, shimmer, HNR, formants), models already loaded.
# Measured with track_file on the 2-core CPU machine this was written on, with
# 5/30/120/300/600 s recordings tiled from data/samples: exact (VmHWM) peaks
# of 7/33/130/361/665 MB, i.e. 1.1-1.2 MB/s for 30 s and longer (1.4 at 5 s,
# where fixed buffers dominate; min_mb_per_file covers those). 1.5 adds ~25%
# for other engines and call audio before the safety margin is applied.
DEFAULT_MB_PER_AUDIO_SECOND = 1.5


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


# --- decisions and reports ----------------------------------------------------


class PressureLevel(str, Enum):
    """How full memory is (or is predicted to be) against the thresholds."""

    OK = "ok"  # below system_threshold_pct (and gpu_threshold_pct)
    WARNING = "warning"  # at/above the threshold, not above critical
    CRITICAL = "critical"  # above critical_threshold_pct

    @property
    def rank(self) -> int:
        return ("ok", "warning", "critical").index(self.value)


@dataclass
class CleanupReport:
    """What one cleanup did. freed_mb = max(0, RSS before - RSS after)."""

    reason: str
    services_cleaned: list[str]  # class names of engines that were loaded and unloaded
    objects_collected: int  # unreachable objects found by gc, all passes
    rss_before_mb: float
    rss_after_mb: float
    freed_mb: float
    gpu_freed_mb: float | None  # device used before - after; None without GPU
    cuda_cache_cleared: bool
    seconds: float
    errors: list[str] = field(default_factory=list)  # engines whose unload raised

    def to_metadata(self) -> dict[str, float | int | str]:
        md: dict[str, float | int | str] = {
            "cleanup_reason": self.reason,
            "cleanup_services": len(self.services_cleaned),
            "cleanup_objects_collected": self.objects_collected,
            "cleanup_freed_mb": round(self.freed_mb, 1),
            "cleanup_seconds": round(self.seconds, 3),
        }
        if self.gpu_freed_mb is not None:
            md["cleanup_gpu_freed_mb"] = round(self.gpu_freed_mb, 1)
        return md


@dataclass
class PreallocationDecision:
    """Whether a batch fits in memory, and how many of its files do.

    predicted_* is current use plus files x per-file estimate x (1 + margin),
    for the files allowed (the full request when it fits). files_allowed is
    the batch size to run; it is less than files_requested only at critical.
    """

    what: str
    level: PressureLevel
    files_requested: int
    files_allowed: int
    mb_per_file: float
    predicted_mb: float
    predicted_percent: float
    message: str
    gpu_predicted_mb: float | None = None
    gpu_predicted_percent: float | None = None
    cleanup: CleanupReport | None = None  # set when an emergency cleanup ran

    @property
    def reduced(self) -> bool:
        return self.files_allowed < self.files_requested


@dataclass
class FileMemoryStats:
    """Memory of one file through one stage (RSS of this process, in MB).

    peak_memory_mb is the highest RSS during the block: on Linux the kernel's
    exact high-water mark (VmHWM, see _PeakRss); elsewhere, and with a forced
    probe, the highest watchdog reading (every watchdog_interval_s, plus the
    readings at start and end), which can miss short spikes and anything
    inside a native call that holds the GIL. peak_delta_mb = peak - start is
    what the file needed on top of what was already held: the figure the
    per-file prediction learns from. delta_mb = end - start is what it left
    behind (a leak if it keeps growing). Filled in when the block exits.
    """

    partition_key: str
    stage: str
    file_size_mb: float
    audio_seconds: float
    engine: str | None = None
    start_memory_mb: float = 0.0
    end_memory_mb: float = 0.0
    peak_memory_mb: float = 0.0
    delta_mb: float = 0.0
    peak_delta_mb: float = 0.0
    processing_time_sec: float = 0.0
    success: bool = False
    error: str | None = None  # exception class name when success is False
    timestamp: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    pressure_peak_pct: float = 0.0  # highest system memory percent seen
    critical_reached: bool = False  # system or GPU above critical during the file
    gpu_start_mb: float | None = None  # device used (all processes) at start
    gpu_peak_mb: float | None = None  # highest device used seen
    torch_peak_allocated_mb: float | None = None  # exact torch peak, if torch on CUDA
    samples: int = 0  # watchdog readings taken

    def to_metadata(self) -> dict[str, float | int | str | bool]:
        """Flat Dagster metadata. Keys are stable: history is read back by them."""
        md: dict[str, float | int | str | bool] = {
            "memory_stage": self.stage,
            "memory_start_mb": round(self.start_memory_mb, 2),
            "memory_end_mb": round(self.end_memory_mb, 2),
            "memory_peak_mb": round(self.peak_memory_mb, 2),
            "memory_delta_mb": round(self.delta_mb, 2),
            META_PEAK_DELTA_MB: round(self.peak_delta_mb, 2),
            META_AUDIO_SECONDS: round(self.audio_seconds, 3),
            "memory_file_size_mb": round(self.file_size_mb, 3),
            "memory_processing_time_s": round(self.processing_time_sec, 3),
            "memory_pressure_peak_pct": round(self.pressure_peak_pct, 1),
            "memory_critical_reached": self.critical_reached,
            "memory_watchdog_samples": self.samples,
            META_SUCCESS: self.success,
            "memory_timestamp": self.timestamp.isoformat(),
        }
        if self.engine is not None:
            md[META_ENGINE] = self.engine
        if self.error is not None:
            md["memory_error"] = self.error
        if self.gpu_peak_mb is not None:
            md["memory_gpu_start_mb"] = round(self.gpu_start_mb or 0.0, 2)
            md["memory_gpu_peak_mb"] = round(self.gpu_peak_mb, 2)
        if self.torch_peak_allocated_mb is not None:
            md["memory_torch_peak_allocated_mb"] = round(self.torch_peak_allocated_mb, 2)
        return md

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["timestamp"] = self.timestamp.isoformat()
        return d


# --- prediction ---------------------------------------------------------------


def estimate_mb_per_audio_second(
    history: Sequence[tuple[float, float]],
    default: float,
    *,
    recent: int = 50,
    percentile: float = 90.0,
    min_samples_for_percentile: int = 5,
) -> float:
    """MB of peak memory growth per second of audio, learnt from history.

    history: (peak_delta_mb, audio_seconds) per processed file, newest first
    (as memory_history_from_instance returns it). Only the first ``recent``
    are used, so the estimate follows changes of engine or model. Files with
    no duration (or non-finite figures) are ignored; negative deltas count as
    0. With fewer than ``min_samples_for_percentile`` usable files the maximum
    ratio is used (little data: be conservative); otherwise the nearest-rank
    ``percentile`` (90th by default), so one freak file (say, a first file that
    also loaded the model) does not set the estimate for everything after it.
    ``default`` when nothing is usable.
    """
    ratios = []
    for peak_delta_mb, audio_seconds in list(history)[:recent]:
        if not (math.isfinite(peak_delta_mb) and math.isfinite(audio_seconds)):
            continue
        if audio_seconds <= 0:
            continue
        ratios.append(max(0.0, peak_delta_mb) / audio_seconds)
    if not ratios:
        return default
    ratios.sort()
    if len(ratios) < min_samples_for_percentile:
        return ratios[-1]
    rank = math.ceil(percentile / 100.0 * len(ratios))  # nearest-rank, 1-based
    return ratios[min(max(rank, 1), len(ratios)) - 1]


def memory_history_from_instance(
    instance: dg.DagsterInstance,
    asset_key: dg.AssetKey | str | Sequence[str],
    engine_name: str | None = None,
    limit: int = 50,
) -> list[tuple[float, float]]:
    """(peak_delta_mb, audio_seconds) of recent materializations, newest first.

    Reads ``instance.fetch_materializations(asset_key, limit, cursor)`` (the
    event-log API in dagster 1.13) and, from each materialization's metadata,
    the keys ``memory_peak_delta_mb`` and ``memory_audio_seconds`` (written by
    ``FileMemoryStats.to_metadata``). Materializations without both keys are
    skipped, as are those with ``memory_success`` False. With ``engine_name``,
    only those whose ``memory_engine`` equals it are kept. Pages back through
    at most 10 x limit materializations to find ``limit`` matching ones.
    """
    key = dg.AssetKey.from_coercible(asset_key)
    out: list[tuple[float, float]] = []
    cursor: str | None = None
    scanned = 0
    while len(out) < limit and scanned < 10 * limit:
        page = instance.fetch_materializations(key, limit=limit, cursor=cursor)
        for record in page.records:
            scanned += 1
            mat = record.asset_materialization
            if mat is None:
                continue
            md = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
            if META_PEAK_DELTA_MB not in md or META_AUDIO_SECONDS not in md:
                continue
            if md.get(META_SUCCESS) is False:
                continue
            if engine_name is not None and md.get(META_ENGINE) != engine_name:
                continue
            try:
                out.append((float(md[META_PEAK_DELTA_MB]), float(md[META_AUDIO_SECONDS])))
            except (TypeError, ValueError):
                continue
            if len(out) >= limit:
                break
        if not page.has_more:
            break
        cursor = page.cursor
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


def _engine_name(engine: Any) -> str:
    return type(engine).__name__


# --- the resource -------------------------------------------------------------


class MemoryManager(dg.ConfigurableResource):
    """Keeps batches of recordings inside memory limits (host RAM and GPU).

    Use one per run: ``check_before`` a batch, ``track_file`` around each file,
    ``register`` each model engine once, ``cleanup`` between batches. Teardown
    cleans up. A test can force readings with ``with_probe``.
    """

    system_threshold_pct: float = Field(
        default=85.0,
        description="Predicted host memory use (%) at which a batch is logged as a warning.",
    )
    gpu_threshold_pct: float = Field(
        default=90.0,
        description="Predicted GPU memory use (%) at which a batch is logged as a warning.",
    )
    critical_threshold_pct: float = Field(
        default=95.0,
        description=(
            "Predicted memory use (%) above which an emergency cleanup runs and the"
            " batch is cut to what fits below it (host and GPU)."
        ),
    )
    safety_margin: float = Field(
        default=0.30,
        description="Fraction added to every per-file estimate (0.30 = 30% headroom).",
    )
    default_mb_per_audio_second: float = Field(
        default=DEFAULT_MB_PER_AUDIO_SECOND,
        description=(
            "Per-file estimate basis without history: MB of peak RSS growth per"
            " second of audio (measured 1.1-1.2 for pocketsphinx + parselmouth"
            " on CPU; 1.5 leaves headroom)."
        ),
    )
    min_mb_per_file: float = Field(
        default=20.0,
        description="Floor of the per-file estimate: even a 1 s clip costs buffers.",
    )
    watchdog_interval_s: float = Field(
        default=0.05,
        description="Seconds between watchdog readings while a file is processed.",
    )
    max_wait_retries: int = Field(
        default=3,
        description="Step retries requested when not even one file fits after cleanup.",
    )
    wait_seconds: float = Field(
        default=60.0,
        description="Seconds Dagster waits before such a retry (memory may free up).",
    )

    _probe: MemoryProbe | None = PrivateAttr(default=None)
    _engines: list[Any] = PrivateAttr(default_factory=list)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    # -- lifecycle --

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._check_config()
        reading = self.read()
        gpu = (
            f", GPU {reading.gpu_used_mb:.0f}/{reading.gpu_total_mb:.0f} MB"
            if reading.has_gpu
            else f", no GPU ({_Nvml.why_not()})"
            if isinstance(self.probe, SystemMemoryProbe)
            else ""
        )
        _logger().info(
            f"MemoryManager: host {reading.system_used_mb:.0f}/{reading.system_total_mb:.0f} MB"
            f" ({reading.system_percent:.1f}%), RSS {reading.process_rss_mb:.0f} MB{gpu}"
        )

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.cleanup("teardown")
        with self._lock:
            self._engines.clear()

    def _check_config(self) -> None:
        if not (
            0 < self.system_threshold_pct <= self.critical_threshold_pct <= 100
            and 0 < self.gpu_threshold_pct <= self.critical_threshold_pct
        ):
            raise dg.DagsterInvalidConfigError(
                "MemoryManager thresholds must satisfy 0 < system_threshold_pct,"
                " gpu_threshold_pct <= critical_threshold_pct <= 100; got"
                f" system={self.system_threshold_pct}, gpu={self.gpu_threshold_pct},"
                f" critical={self.critical_threshold_pct}",
                [],
                None,
            )
        if self.safety_margin < 0 or self.watchdog_interval_s <= 0:
            raise dg.DagsterInvalidConfigError(
                "MemoryManager: safety_margin must be >= 0 and watchdog_interval_s > 0",
                [],
                None,
            )

    # -- readings --

    @property
    def probe(self) -> MemoryProbe:
        if self._probe is None:
            self._probe = self.make_probe()
        return self._probe

    def make_probe(self) -> MemoryProbe:
        """The source of readings: the real system unless ``with_probe`` forced one."""
        return SystemMemoryProbe()

    def with_probe(self, probe: MemoryProbe) -> MemoryManager:
        """A copy of this manager that reads ``probe`` (tests force readings so).

        Dagster rebuilds a resource from its class and config for each run
        (``self.__class__(**config)``), dropping private attributes, so the
        probe rides on a subclass instead; it survives ``materialize(...,
        resources={"memory": manager.with_probe(p)})``.
        """
        base = type(self)
        forced = type(
            f"{base.__name__}WithProbe",
            (base,),
            {"make_probe": lambda _self: probe, "__module__": base.__module__},
        )
        return forced(**self._get_non_default_public_field_values())

    def read(self) -> MemoryReading:
        return self.probe.read()

    def level_of(self, system_percent: float, gpu_percent: float | None = None) -> PressureLevel:
        """Pressure level of a (current or predicted) system and GPU percent."""
        level = self._level(system_percent, self.system_threshold_pct)
        if gpu_percent is not None:
            gpu_level = self._level(gpu_percent, self.gpu_threshold_pct)
            if gpu_level.rank > level.rank:
                level = gpu_level
        return level

    def _level(self, percent: float, threshold: float) -> PressureLevel:
        if percent > self.critical_threshold_pct:
            return PressureLevel.CRITICAL
        if percent >= threshold:
            return PressureLevel.WARNING
        return PressureLevel.OK

    # -- pre-allocation check --

    def check_before(
        self, what: str, files: int, mb_per_file: float, gpu_mb_per_file: float = 0.0
    ) -> PreallocationDecision:
        """Decide whether ``files`` more files of ``mb_per_file`` each fit.

        predicted = used now + files x mb_per_file x (1 + safety_margin), as a
        share of total; the same for GPU with ``gpu_mb_per_file`` when a GPU
        reading exists. Below the thresholds: ok. Up to critical: warning
        (logged), all files. Above critical: emergency cleanup, read again,
        then as many files as fit under critical (fewer than asked, logged);
        if none fits, raises ``dagster.RetryRequested`` (its message and its
        ``ResourceError`` cause say what was predicted and what to do).
        """
        self._check_config()
        if files < 0 or mb_per_file < 0 or gpu_mb_per_file < 0:
            raise ValueError(f"check_before({what!r}): files and sizes must be >= 0")
        per_file = mb_per_file * (1.0 + self.safety_margin)
        gpu_per_file = gpu_mb_per_file * (1.0 + self.safety_margin)

        reading = self.read()
        decision = self._decide(what, files, mb_per_file, per_file, gpu_per_file, reading)
        if files == 0:
            return decision  # nothing to run: nothing to clean up or wait for
        if decision.level is not PressureLevel.CRITICAL:
            if decision.level is PressureLevel.WARNING:
                _logger().warning(decision.message)
            return decision

        report = self.emergency_cleanup()
        reading = self.read()
        fit = self._files_that_fit(reading, per_file, gpu_per_file)
        allowed = min(files, fit)
        if allowed >= 1:
            decision = self._decide(what, allowed, mb_per_file, per_file, gpu_per_file, reading)
            decision.files_requested = files
            decision.cleanup = report
            if allowed < files:
                decision.level = PressureLevel.CRITICAL
                decision.message = (
                    f"{what}: memory critical; after emergency cleanup (freed"
                    f" {report.freed_mb:.0f} MB) only {allowed} of {files} files fit under"
                    f" {self.critical_threshold_pct:g}%: running {allowed}."
                    f" {decision.message}"
                )
                _logger().warning(decision.message)
            else:
                decision.message = (
                    f"{what}: emergency cleanup freed {report.freed_mb:.0f} MB;"
                    f" all {files} files fit. {decision.message}"
                )
                _logger().warning(decision.message)
            return decision

        message = (
            f"{what}: not even one file fits in memory."
            f" Host {reading.system_used_mb:.0f} of {reading.system_total_mb:.0f} MB used"
            f" ({reading.system_percent:.1f}%) after emergency cleanup (freed"
            f" {report.freed_mb:.0f} MB); one file is estimated at {mb_per_file:.0f} MB"
            f" + {self.safety_margin:.0%} margin"
            f" = {per_file:.0f} MB, predicted {self._pct(reading.system_used_mb + per_file, reading.system_total_mb):.1f}%"
        )
        if reading.has_gpu and gpu_per_file > 0:
            message += (
                f"; GPU {reading.gpu_used_mb:.0f} of {reading.gpu_total_mb:.0f} MB used,"
                f" one file {gpu_per_file:.0f} MB"
            )
        message += (
            f". Thresholds: warning {self.system_threshold_pct:g}% (GPU"
            f" {self.gpu_threshold_pct:g}%), critical {self.critical_threshold_pct:g}%."
            f" Retrying the step in {self.wait_seconds:g} s (at most"
            f" {self.max_wait_retries} times). To fix: stop other memory-hungry"
            " processes, run fewer steps at once (pool or run concurrency), or use a"
            " smaller model."
        )
        _logger().error(message)
        retry = dg.RetryRequested(max_retries=self.max_wait_retries, seconds_to_wait=self.wait_seconds)
        retry.args = (message,)  # RetryRequested carries no message of its own
        raise retry from ResourceError(message)

    @staticmethod
    def _pct(used: float, total: float) -> float:
        return used / total * 100.0 if total > 0 else 100.0

    def _files_that_fit(self, r: MemoryReading, per_file: float, gpu_per_file: float) -> int:
        """Largest number of files keeping host and GPU at or under critical."""
        limit = self.critical_threshold_pct / 100.0
        fit = math.inf
        if per_file > 0:
            fit = math.floor((limit * r.system_total_mb - r.system_used_mb) / per_file)
        if r.has_gpu and gpu_per_file > 0:
            gpu_fit = math.floor((limit * r.gpu_total_mb - r.gpu_used_mb) / gpu_per_file)
            fit = min(fit, gpu_fit)
        if fit == math.inf:
            # Nothing to add: the files fit iff memory is not already past critical.
            return sys.maxsize if r.system_percent <= self.critical_threshold_pct else 0
        return max(0, int(fit))

    def _decide(
        self,
        what: str,
        files: int,
        mb_per_file: float,
        per_file: float,
        gpu_per_file: float,
        r: MemoryReading,
    ) -> PreallocationDecision:
        predicted_mb = r.system_used_mb + files * per_file
        predicted_pct = self._pct(predicted_mb, r.system_total_mb)
        gpu_mb = gpu_pct = None
        if r.has_gpu:
            gpu_mb = r.gpu_used_mb + files * gpu_per_file
            gpu_pct = self._pct(gpu_mb, r.gpu_total_mb)
        level = self.level_of(predicted_pct, gpu_pct)
        message = (
            f"{what}: {files} file(s) x {mb_per_file:.0f} MB (+{self.safety_margin:.0%})"
            f" -> predicted host {predicted_mb:.0f}/{r.system_total_mb:.0f} MB"
            f" ({predicted_pct:.1f}%)"
        )
        if gpu_pct is not None:
            message += f", GPU {gpu_mb:.0f}/{r.gpu_total_mb:.0f} MB ({gpu_pct:.1f}%)"
        message += f": {level.value}"
        if level is PressureLevel.WARNING:
            message += (
                f" (above {self.system_threshold_pct:g}% host / {self.gpu_threshold_pct:g}% GPU;"
                " proceeding)"
            )
        return PreallocationDecision(
            what=what,
            level=level,
            files_requested=files,
            files_allowed=files,
            mb_per_file=mb_per_file,
            predicted_mb=predicted_mb,
            predicted_percent=predicted_pct,
            message=message,
            gpu_predicted_mb=gpu_mb,
            gpu_predicted_percent=gpu_pct,
        )

    # -- per-file tracking --

    @contextlib.contextmanager
    def track_file(
        self,
        partition_key: str,
        stage: str,
        file_size_mb: float,
        audio_seconds: float,
        engine: str | None = None,
    ) -> Iterator[FileMemoryStats]:
        """Measure one file through one stage; yields stats filled on exit.

        A watchdog thread reads the probe every ``watchdog_interval_s`` for
        pressure (and the peak where the kernel's is unavailable);
        ``stats.critical_reached`` is updated live, so a batch runner can stop
        before the next file. The watchdog only observes: it cannot unload a
        model the file is using, and it is paused while a native call holds
        the GIL. Exceptions propagate (with ``success`` False in the stats).
        """
        stats = FileMemoryStats(
            partition_key=partition_key,
            stage=stage,
            file_size_mb=file_size_mb,
            audio_seconds=audio_seconds,
            engine=engine,
        )
        probe = self.probe
        start = probe.read()
        stats.start_memory_mb = stats.peak_memory_mb = start.process_rss_mb
        # Only the real probe has a kernel peak; forced readings are left alone.
        peak_rss: _PeakRss | None = getattr(probe, "peak_rss", None)
        hwm_at_begin = peak_rss.begin(stats) if peak_rss is not None else None
        stats.pressure_peak_pct = start.system_percent
        stats.gpu_start_mb = stats.gpu_peak_mb = start.gpu_used_mb
        self._note_pressure(stats, start)
        cuda = _torch_cuda()
        if cuda is not None:
            with contextlib.suppress(Exception):
                # Exact torch peak for this file (resets torch's process-wide peak).
                cuda.reset_peak_memory_stats()

        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(self.watchdog_interval_s):
                try:
                    self._sample(stats, probe.read())
                except Exception:
                    # A failing reading must never break the file being processed.
                    continue

        watchdog = threading.Thread(target=watch, name=f"memory-watchdog-{stage}", daemon=True)
        t0 = time.perf_counter()
        watchdog.start()
        try:
            yield stats
            stats.success = True
        except BaseException as exc:
            stats.success = False
            stats.error = type(exc).__name__
            raise
        finally:
            stop.set()
            watchdog.join()
            stats.processing_time_sec = time.perf_counter() - t0
            end = probe.read()
            self._sample(stats, end)
            if peak_rss is not None:
                peak_rss.end(stats, hwm_at_begin)
            stats.end_memory_mb = end.process_rss_mb
            stats.delta_mb = stats.end_memory_mb - stats.start_memory_mb
            stats.peak_delta_mb = stats.peak_memory_mb - stats.start_memory_mb
            if cuda is not None:
                with contextlib.suppress(Exception):
                    stats.torch_peak_allocated_mb = cuda.max_memory_allocated() / MB
            _logger().debug(
                f"{partition_key}/{stage}: RSS {stats.start_memory_mb:.0f} -> peak"
                f" {stats.peak_memory_mb:.0f} -> {stats.end_memory_mb:.0f} MB in"
                f" {stats.processing_time_sec:.2f}s ({stats.samples} samples)"
            )

    def _sample(self, stats: FileMemoryStats, r: MemoryReading) -> None:
        stats.samples += 1
        if r.process_rss_mb > stats.peak_memory_mb:
            stats.peak_memory_mb = r.process_rss_mb
        if r.system_percent > stats.pressure_peak_pct:
            stats.pressure_peak_pct = r.system_percent
        if r.gpu_used_mb is not None and (stats.gpu_peak_mb is None or r.gpu_used_mb > stats.gpu_peak_mb):
            stats.gpu_peak_mb = r.gpu_used_mb
        self._note_pressure(stats, r)

    def _note_pressure(self, stats: FileMemoryStats, r: MemoryReading) -> None:
        if stats.critical_reached:
            return
        if self.level_of(r.system_percent, r.gpu_percent) is PressureLevel.CRITICAL:
            stats.critical_reached = True
            gpu = f", GPU {r.gpu_percent:.1f}%" if r.gpu_percent is not None else ""
            _logger().warning(
                f"{stats.partition_key}/{stats.stage}: memory critical while processing"
                f" (host {r.system_percent:.1f}%{gpu} > {self.critical_threshold_pct:g}%)"
            )

    # -- cleanup --

    def register(self, engine: Any) -> None:
        """Have ``cleanup`` unload this engine (anything with loaded/unload())."""
        with self._lock:
            if not any(e is engine for e in self._engines):
                self._engines.append(engine)

    def unregister(self, engine: Any) -> None:
        with self._lock:
            self._engines[:] = [e for e in self._engines if e is not engine]

    @property
    def registered(self) -> list[Any]:
        with self._lock:
            return list(self._engines)

    def cleanup(self, reason: str) -> CleanupReport:
        """Unload every loaded engine, collect garbage, clear the CUDA cache.

        Order matters: models are dropped first so gc can free them, and only
        then can the CUDA allocator hand their blocks back to the driver.
        Engines stay registered (they reload lazily on next use). One engine
        failing to unload is logged and reported, not raised.
        """
        t0 = time.perf_counter()
        before = self.read()
        services: list[str] = []
        errors: list[str] = []
        for engine in self.registered:
            name = _engine_name(engine)
            try:
                if engine.loaded:
                    engine.unload()
                    services.append(name)
            except Exception as exc:
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
        collected = 0
        for generation in (2, 1, 0):
            collected += gc.collect(generation)
        collected += gc.collect()  # finalizers of the first passes may free more
        cuda_cleared = _clear_cuda()
        _malloc_trim()
        after = self.read()
        gpu_freed = None
        if before.gpu_used_mb is not None and after.gpu_used_mb is not None:
            gpu_freed = before.gpu_used_mb - after.gpu_used_mb
        report = CleanupReport(
            reason=reason,
            services_cleaned=services,
            objects_collected=collected,
            rss_before_mb=before.process_rss_mb,
            rss_after_mb=after.process_rss_mb,
            freed_mb=max(0.0, before.process_rss_mb - after.process_rss_mb),
            gpu_freed_mb=gpu_freed,
            cuda_cache_cleared=cuda_cleared,
            seconds=time.perf_counter() - t0,
            errors=errors,
        )
        gpu = f", GPU {gpu_freed:.0f} MB freed" if gpu_freed is not None else ""
        _logger().info(
            f"Cleanup ({reason}): {len(services)} services, {collected} GC objects,"
            f" {report.freed_mb:.1f} MB freed{gpu} in {report.seconds:.2f}s"
        )
        for err in errors:
            _logger().warning(f"Cleanup ({reason}): unload failed: {err}")
        return report

    def emergency_cleanup(self) -> CleanupReport:
        return self.cleanup("emergency")

    # -- prediction --

    def per_file_estimate_mb(
        self, audio_seconds: float, history: Sequence[tuple[float, float]] = ()
    ) -> float:
        """MB one file of ``audio_seconds`` is expected to need (before margin).

        Rate from ``estimate_mb_per_audio_second(history, default)``; never
        below ``min_mb_per_file``.
        """
        rate = estimate_mb_per_audio_second(history, self.default_mb_per_audio_second)
        return max(self.min_mb_per_file, rate * max(0.0, audio_seconds))
