"""Memory policy for batches of recordings: check, track, clean up, predict.

Readings and low-level freeing (``MemoryReading``, ``SystemMemoryProbe``, NVML,
torch.cuda, peak RSS, CUDA cache and heap trimming) live in ``memory_readings``;
the public names are re-exported here. This module decides what they mean:

- ``MemoryManager`` (a Dagster resource):
  - ``check_before``: before a batch, predict memory use and decide whether the
    batch fits (ok / warning / critical -> emergency cleanup, then fewer files;
    ``RetryRequested`` only when memory is already critical after the cleanup);
  - ``track_file``: per file, start/end RSS and the true peak, sampled by a
    background watchdog thread, as ``FileMemoryStats`` (and Dagster metadata);
  - ``register`` / ``cleanup``: unload every registered model engine, free the
    CUDA cache, run the garbage collector, and report what was freed;
  - ``per_file_estimate_mb``: per-file memory from recorded history
    (``estimate_memory_model``: fixed MB + MB per audio second, fitted robustly).
- ``memory_history_from_instance``: that history, read back from the Dagster
  event log (the metadata ``FileMemoryStats.to_metadata`` writes).

torch is never imported here (see ``memory_readings``).

Units: MB means MiB (2**20 bytes) everywhere; percentages are 0-100.
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any

import dagster as dg
from pydantic import Field, PrivateAttr

from voiceman_pipeline.errors import ResourceError
# Re-exported: callers and tests import MB, MemoryReading, MemoryProbe and
# SystemMemoryProbe from here.
from voiceman_pipeline.resources.memory_readings import (
    MB,
    MemoryProbe,
    MemoryReading,
    SystemMemoryProbe,
    _clear_cuda,
    _logger,
    _malloc_trim,
    _Nvml,
    _PeakRss,
    _torch_cuda,
)

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

# History files shorter than this (seconds of audio) do not set the per-second
# rate: their peak is mostly fixed buffers and one-off costs, and as a ratio a
# 1 s clip whose peak included a model load (95 MB) claims 87 MB per second.
MIN_HISTORY_SECONDS = 2.0


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


@dataclass
class PreallocationDecision:
    """Whether a batch fits in memory, and how many of its files do.

    predicted_* is current use plus files x per-file estimate x (1 + margin),
    for the files allowed (the full request when it fits). files_allowed is
    the batch size to run, never 0 when files were requested; it is less than
    files_requested only at critical. At critical with files_allowed == 1 the
    prediction for that one file may itself exceed critical (it runs alone).
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


# --- prediction ---------------------------------------------------------------


@dataclass(frozen=True)
class MemoryModel:
    """Per-file memory as a line: ``fixed_mb + mb_per_second x audio seconds``."""

    fixed_mb: float  # per file, whatever its length (buffers, decoder state)
    mb_per_second: float  # growth per second of audio
    samples: int = 0  # history files it was learnt from; 0: the default rate

    def mb_for(self, audio_seconds: float) -> float:
        return self.fixed_mb + self.mb_per_second * max(0.0, audio_seconds)


def _nearest_rank(values: Sequence[float], percentile: float) -> float:
    ordered = sorted(values)
    rank = math.ceil(percentile / 100.0 * len(ordered))  # 1-based
    return ordered[min(max(rank, 1), len(ordered)) - 1]


def estimate_memory_model(
    history: Sequence[tuple[float, float]],
    default_mb_per_second: float,
    *,
    recent: int = 50,
    min_seconds: float = MIN_HISTORY_SECONDS,
    min_fit_samples: int = 3,
) -> MemoryModel:
    """Peak memory growth of one file as fixed MB + MB per audio second.

    history: (peak_delta_mb, audio_seconds) per processed file, newest first
    (as ``memory_history_from_instance`` returns it); only the first
    ``recent`` count, so the model follows changes of engine or model. Files
    with no duration or non-finite figures are ignored; negative deltas count
    as 0. Then:

    1. Files shorter than ``min_seconds`` are set aside when longer ones exist:
       their peak is mostly fixed cost, and a one-off (a first file whose peak
       included a model load: 95 MB for a 1.09 s clip) would claim 87 MB/s.
    2. With at least ``min_fit_samples`` files and durations that differ
       (pairs at least ``min_seconds`` and 1.5x apart), a Theil-Sen fit of
       ``peak = a + b x seconds``: b = median of the pairwise slopes, a =
       median of ``peak - b x seconds`` (both floored at 0). Medians: one
       freak file among many moves neither (breakdown point ~29%). The fit is
       the typical file; ``check_before``'s safety margin covers the spread.
    3. Too few files, or all of about one length: a line through 0 whose
       slope is the 90th-percentile (nearest-rank; the maximum below 10 files)
       of peak / seconds. It folds the fixed part into the rate, so it
       over-predicts longer files: conservative while data is scarce.
    4. Only short clips: the default rate, with their median excess over it
       as the fixed part.

    No usable file: ``MemoryModel(0, default_mb_per_second)``.
    """
    usable: list[tuple[float, float]] = []
    for peak_delta_mb, audio_seconds in list(history)[:recent]:
        if not (math.isfinite(peak_delta_mb) and math.isfinite(audio_seconds)):
            continue
        if audio_seconds <= 0:
            continue
        usable.append((max(0.0, peak_delta_mb), audio_seconds))
    if not usable:
        return MemoryModel(0.0, default_mb_per_second, 0)

    long = [(p, s) for p, s in usable if s >= min_seconds]
    if not long:
        fixed = statistics.median(p - default_mb_per_second * s for p, s in usable)
        return MemoryModel(max(0.0, fixed), default_mb_per_second, len(usable))

    slopes = []
    if len(long) >= min_fit_samples:
        for i, (p_i, s_i) in enumerate(long):
            for p_j, s_j in long[i + 1 :]:
                lo, hi = min(s_i, s_j), max(s_i, s_j)
                if hi - lo >= min_seconds and hi >= 1.5 * lo:
                    slopes.append((p_j - p_i) / (s_j - s_i))
    if slopes:
        rate = max(0.0, statistics.median(slopes))
        fixed = max(0.0, statistics.median(p - rate * s for p, s in long))
        return MemoryModel(fixed, rate, len(long))

    return MemoryModel(0.0, _nearest_rank([p / s for p, s in long], 90.0), len(long))


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


def _engine_name(engine: Any) -> str:
    return type(engine).__name__


# --- the resource -------------------------------------------------------------


class MemoryManager(dg.ConfigurableResource):
    """Keeps batches of recordings inside memory limits (host RAM and GPU).

    One per run: memory is checked before each batch, model load and file,
    tracked per file, and cleaned up (models, GPU cache, gc) between stages
    and at teardown. (Plain text: Dagster shows this in the UI as written.)
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
            " batch is cut to what fits below it (at least one file); memory already"
            " at/above it after the cleanup makes the step wait and retry."
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
        description="Step retries requested when memory is already critical after cleanup.",
    )
    wait_seconds: float = Field(
        default=60.0,
        description="Seconds Dagster waits before such a retry (others may free memory).",
    )

    _probe: MemoryProbe | None = PrivateAttr(default=None)
    _engines: list[Any] = PrivateAttr(default_factory=list)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    # Every cleanup's report, in order: a run's report sums them (see cleanup_reports).
    _reports: list[CleanupReport] = PrivateAttr(default_factory=list)

    # -- lifecycle --

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._check_config()
        reading = self.read()
        gpu = f", GPU {reading.gpu_used_mb:.0f}/{reading.gpu_total_mb:.0f} MB" if reading.has_gpu else ""
        if not reading.has_gpu and isinstance(self.probe, SystemMemoryProbe):
            # Expected on a CPU machine: said once, at DEBUG, not on every run.
            _logger().debug(f"MemoryManager: no GPU ({_Nvml.why_not()})")
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
        self,
        what: str,
        files: int,
        mb_per_file: float,
        gpu_mb_per_file: float = 0.0,
        keep: Any = None,
    ) -> PreallocationDecision:
        """Decide how many of ``files`` more files of ``mb_per_file`` each to run.

        predicted = used now + files x mb_per_file x (1 + safety_margin), as a
        share of total; the same for GPU with ``gpu_mb_per_file`` when a GPU
        reading exists. Below the thresholds: ok. Up to critical: warning
        (logged), all files. Above critical: emergency cleanup, read again, then:

        - memory already at/above critical now (host; GPU too when
          ``gpu_mb_per_file`` > 0): raises ``dagster.RetryRequested`` (its
          message and its ``ResourceError`` cause say what was measured and
          what to do). Only others freeing memory can help, so wait;
        - otherwise as many files as fit under critical, and never fewer than
          one: when even one file is predicted past critical, it runs alone
          (level critical, a warning). The prediction can be far off, and
          waiting cannot make an idle machine bigger; if the file really runs
          out of memory, that error is retried after a cleanup.

        A GPU filled by other processes does not hold back work that declares
        no GPU memory (``gpu_mb_per_file`` 0): CPU-only stages keep running.
        ``keep``: an engine the emergency cleanup leaves loaded (the one the
        caller is using: unloading it would only make it reload at once).
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

        report = self.emergency_cleanup(keep=keep)
        reading = self.read()
        if self._critical_now(reading, gpu_per_file):
            self._wait_for_memory(what, reading, report)

        fit = self._files_that_fit(reading, per_file, gpu_per_file)
        allowed = max(1, min(files, fit))
        decision = self._decide(what, allowed, mb_per_file, per_file, gpu_per_file, reading)
        decision.files_requested = files
        decision.cleanup = report
        if fit < 1:
            decision.level = PressureLevel.CRITICAL
            decision.message = (
                f"{what}: predicted {per_file:.0f} MB for one file ({mb_per_file:.0f} MB"
                f" + {self.safety_margin:.0%} margin) exceeds"
                f" {self._headroom(reading, per_file, gpu_per_file)};"
                " running it alone; an out-of-memory error will be retried with cleanup."
                + (f" Running 1 of {files} files." if files > 1 else "")
                + f" Emergency cleanup freed {report.freed_mb:.0f} MB. {decision.message}"
            )
        elif allowed < files:
            decision.level = PressureLevel.CRITICAL
            decision.message = (
                f"{what}: memory critical; after emergency cleanup (freed"
                f" {report.freed_mb:.0f} MB) only {allowed} of {files} files fit under"
                f" {self.critical_threshold_pct:g}%: running {allowed}."
                f" {decision.message}"
            )
        else:
            decision.message = (
                f"{what}: emergency cleanup freed {report.freed_mb:.0f} MB;"
                f" all {files} files fit. {decision.message}"
            )
        _logger().warning(decision.message)
        return decision

    def _critical_now(self, r: MemoryReading, gpu_per_file: float) -> bool:
        """Current use (not a prediction) at/above critical, where the work needs it."""
        if r.system_percent >= self.critical_threshold_pct:
            return True
        return bool(
            r.has_gpu and gpu_per_file > 0 and (r.gpu_percent or 0.0) >= self.critical_threshold_pct
        )

    def _headroom(self, r: MemoryReading, per_file: float, gpu_per_file: float) -> str:
        """What is left under critical, for whichever of host and GPU one file overflows."""
        limit = self.critical_threshold_pct / 100.0
        parts = []
        host_left = limit * r.system_total_mb - r.system_used_mb
        if per_file > host_left:
            parts.append(
                f"the {host_left:.0f} MB left on the host under critical"
                f" {self.critical_threshold_pct:g}% ({r.system_used_mb:.0f} of"
                f" {r.system_total_mb:.0f} MB used now, {r.system_percent:.1f}%)"
            )
        if r.has_gpu and gpu_per_file > 0:
            gpu_left = limit * r.gpu_total_mb - r.gpu_used_mb
            if gpu_per_file > gpu_left:
                parts.append(
                    f"the {gpu_left:.0f} MB left on the GPU ({gpu_per_file:.0f} MB predicted;"
                    f" {r.gpu_used_mb:.0f} of {r.gpu_total_mb:.0f} MB used now)"
                )
        return " and ".join(parts) or f"what is left under critical {self.critical_threshold_pct:g}%"

    def _wait_for_memory(self, what: str, r: MemoryReading, report: CleanupReport) -> None:
        """Raise RetryRequested: memory is critical before this step adds anything."""
        message = (
            f"{what}: memory is critical before starting: host {r.system_used_mb:.0f} of"
            f" {r.system_total_mb:.0f} MB used ({r.system_percent:.1f}%)"
        )
        if r.has_gpu:
            message += f", GPU {r.gpu_used_mb:.0f} of {r.gpu_total_mb:.0f} MB ({r.gpu_percent:.1f}%)"
        message += (
            f" after emergency cleanup (freed {report.freed_mb:.0f} MB); critical is"
            f" {self.critical_threshold_pct:g}% (warning {self.system_threshold_pct:g}%, GPU"
            f" {self.gpu_threshold_pct:g}%). Waiting for other processes to free memory:"
            f" retrying the step in {self.wait_seconds:g} s (at most"
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
        """Largest number of files keeping host and GPU at or under critical (may be 0)."""
        limit = self.critical_threshold_pct / 100.0
        fit = math.inf
        if per_file > 0:
            fit = math.floor((limit * r.system_total_mb - r.system_used_mb) / per_file)
        if r.has_gpu and gpu_per_file > 0:
            gpu_fit = math.floor((limit * r.gpu_total_mb - r.gpu_used_mb) / gpu_per_file)
            fit = min(fit, gpu_fit)
        if fit == math.inf:
            return sys.maxsize  # nothing to add (current use is checked before)
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

    @property
    def registered(self) -> list[Any]:
        with self._lock:
            return list(self._engines)

    def cleanup(self, reason: str, keep: Any = None) -> CleanupReport:
        """Unload every loaded engine (but ``keep``, the one in use), collect
        garbage, clear the CUDA cache.

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
            if engine is keep:
                continue
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
        with self._lock:
            self._reports.append(report)
        return report

    def emergency_cleanup(self, keep: Any = None) -> CleanupReport:
        return self.cleanup("emergency", keep=keep)

    @property
    def cleanup_reports(self) -> list[CleanupReport]:
        """The reports of every cleanup this manager ran, oldest first (reason
        "emergency": after an out-of-memory error or a critical reading or
        prediction). Dagster builds the resource per run, so: this run's."""
        with self._lock:
            return list(self._reports)

    # -- prediction --

    def per_file_estimate_mb(
        self, audio_seconds: float, history: Sequence[tuple[float, float]] = ()
    ) -> float:
        """MB one file of ``audio_seconds`` is expected to need (before margin).

        ``estimate_memory_model(history, default_mb_per_audio_second)``: fixed
        MB + MB per second of audio; never below ``min_mb_per_file``. For a
        file more than twice as long as the longest in the history, the rate is
        at least the default (extrapolating from short clips under-predicts).
        """
        model = estimate_memory_model(history, self.default_mb_per_audio_second)
        longest = max((seconds for _, seconds in history), default=0.0)
        if audio_seconds > 2 * longest:
            # Far beyond anything measured, a slope learnt from short clips is
            # noise; do not let it promise less than the measured default rate.
            model = MemoryModel(
                model.fixed_mb, max(model.mb_per_second, self.default_mb_per_audio_second), model.samples
            )
        return max(self.min_mb_per_file, model.mb_for(audio_seconds))
