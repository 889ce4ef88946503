"""What memory readings mean for the work: check, measure, predict, clean up.

A stage runs its recordings one after another once its model is loaded, so each needs its
own peak above what the process held when it started (the pre-file baseline): ``predict``
(from ``memory_history``: this stage, engine and machine), ``MemoryManager.check`` it,
``track`` it, and ``cleanup`` after. MB means MiB; percentages are 0-100.
"""

import contextlib
import gc
import math
import os
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple

import dagster as dg
from pydantic import Field, PrivateAttr

from voiceman_pipeline.errors import ResourceError
from voiceman_pipeline.resources.memory_readings import (MB, KernelPeak, MemoryReading, SystemMemoryProbe,
                                                          malloc_trim, nvml, torch_cuda)

logger = dg.get_dagster_logger  # called per use: inside a step it goes to the run's event log

# Metadata keys of every computed result (``FileMemory.to_metadata``), read back by ``memory_history``.
MEMORY_KEY_PREFIX = "memory_"  # every key this module writes starts with it
PEAK_KEY = "memory_peak_delta_mb"  # peak RSS above the pre-file baseline
GPU_PEAK_KEY = "memory_gpu_peak_delta_mb"  # GPU peak above the GPU use at file start
SECONDS_KEY = "memory_audio_seconds"
ENGINE_KEY = "memory_engine"
HOST_KEY = "memory_host"  # machine it ran on: another machine's peaks are not this one's
PREDICTED_MB_KEY = "memory_predicted_mb"  # host need predicted before the file (no margin)
PREDICTED_GPU_MB_KEY = "memory_predicted_gpu_mb"
ERROR_PCT_KEY = "memory_prediction_error_pct"  # (predicted - peak) / peak x 100
# A process's first recording of a stage (and engine) also pays for what is done once
# (imports on first use, caches, allocator pools), as does the first after its model was
# loaded again (``model_loaded``): such rows are learnt apart (``predict``).
FIRST_KEY = "memory_first_in_process"
# Seconds of signal the loaded model had already grown its buffers for before the
# recording (pocketsphinx: its longest utterance since it loaded), where the engine says:
# a call goes on growing them only past that (``within``).
GROWN_KEY = "memory_model_grown_s"

# The longest stretch of signal the default engines hold at once (Praat's windows,
# pocketsphinx's utterances, the emotion and plot blocks): peaks grow with the call up to
# it, and at the stage's long-call rate past it, not along a line learnt on short calls.
WINDOW_S = 60.0
# Shorter history files set no per-second rate: mostly fixed cost (a 1 s clip at 95 MB would claim 87 MB/s).
MIN_HISTORY_SECONDS = 2.0
# The newest results set the line's fixed part: a process's peaks drift up as it ages.
# (docs/memory.md has the measurements behind these constants.)
RECENT_ROWS = 5


class HistoryRow(NamedTuple):
    """One earlier result of a stage: its audio seconds, and its peaks above its
    pre-file baseline (MB; GPU None where it had none)."""
    seconds: float
    host_mb: float
    gpu_mb: float | None
    first: bool = False  # first of its stage and engine in its process or since its model loaded (FIRST_KEY)
    grown_s: float | None = None  # GROWN_KEY; None where the engine does not say


# (process id, stage, engine) of every recording ``track`` has measured in this
# process: the process id, because a forked child starts with its parent's set.
_TRACKED: set[tuple[int, str, str | None]] = set()


def first_in_process(stage: str, engine: str | None) -> bool:
    """Whether no recording of ``stage`` by ``engine`` was measured in this process yet,
    or since its model was last loaded."""
    return (os.getpid(), stage, engine) not in _TRACKED


def model_loaded(stage: str, engine: str | None) -> None:
    """``stage``'s model was loaded (again) in this process, as each run of a `voiceman run`
    loads it: its next recording is a first again."""
    _TRACKED.discard((os.getpid(), stage, engine))


def _mb(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


class Level(str, Enum):
    OK = "ok"
    WARNING = "warning"  # at/above the warning threshold: logged, work proceeds
    CRITICAL = "critical"  # above critical_threshold_pct: emergency cleanup


@dataclass
class CleanupReport:
    """What one cleanup did. freed_mb: drop of this process's RSS (never negative)."""
    reason: str  # "emergency: ..." for cleanups forced by memory pressure or an OOM
    services_cleaned: list[str]  # engines (class names) that were loaded and unloaded
    objects_collected: int  # unreachable objects gc found
    freed_mb: float
    gpu_freed_mb: float | None  # device used before - after; None without GPU
    seconds: float
    errors: list[str] = field(default_factory=list)  # engines whose unload raised

    @property
    def emergency(self) -> bool:
        return self.reason.startswith("emergency")

    def to_metadata(self) -> dict[str, Any]:
        md = {"memory_cleanup_reason": self.reason,
              "memory_cleanup_services": ", ".join(self.services_cleaned) or "none",
              "memory_cleanup_objects": self.objects_collected, "memory_cleanup_freed_mb": _mb(self.freed_mb),
              "memory_cleanup_gpu_freed_mb": _mb(self.gpu_freed_mb)}
        return {k: v for k, v in md.items() if v is not None}


@dataclass(frozen=True)
class Need:
    """Predicted peak above the baseline of one recording (or one model load), MB."""
    host_mb: float
    gpu_mb: float = 0.0


@dataclass
class Check:
    """The outcome of ``check``; ``cleanup`` is set when an emergency cleanup ran."""
    level: Level
    message: str
    cleanup: CleanupReport | None = None


@dataclass
class FileMemory:
    """One recording through one stage (MB of this process's RSS), filled in when ``track`` exits."""
    stage: str
    audio_seconds: float
    engine: str | None
    need: Need | None  # what was predicted before it ran
    first_in_process: bool = False  # see FIRST_KEY
    grown_s: float | None = None  # see GROWN_KEY
    start_mb: float = 0.0  # the pre-file baseline
    peak_mb: float = 0.0
    end_mb: float = 0.0
    peak_source: str = "kernel"  # "sampled" (watchdog) where the kernel counter cannot be reset
    gpu_peak_delta_mb: float | None = None  # None without a GPU
    pressure_peak_pct: float = 0.0  # highest host or GPU use seen
    critical_reached: bool = False  # the watchdog saw critical pressure
    seconds: float = 0.0

    @property
    def peak_delta_mb(self) -> float:
        return max(0.0, self.peak_mb - self.start_mb)

    def to_metadata(self) -> dict[str, Any]:
        need, peak, gpu = self.need, self.peak_delta_mb, self.gpu_peak_delta_mb
        md = {  # predicted, measured and their error first: the UI lists them in this order
            PREDICTED_MB_KEY: _mb(need.host_mb if need else None), PEAK_KEY: _mb(peak),
            ERROR_PCT_KEY: _mb(100 * (need.host_mb / peak - 1)) if need and peak > 0 else None,
            PREDICTED_GPU_MB_KEY: _mb(need.gpu_mb) if need and gpu is not None else None,
            GPU_PEAK_KEY: _mb(gpu),
            SECONDS_KEY: round(self.audio_seconds, 3), HOST_KEY: socket.gethostname(),
            ENGINE_KEY: self.engine, "memory_start_mb": _mb(self.start_mb),
            "memory_peak_mb": _mb(self.peak_mb), "memory_end_mb": _mb(self.end_mb),
            "memory_peak_source": self.peak_source, "memory_critical_reached": self.critical_reached,
            "memory_pressure_peak_pct": _mb(self.pressure_peak_pct),
            "memory_processing_time_s": round(self.seconds, 3), FIRST_KEY: self.first_in_process,
            GROWN_KEY: None if self.grown_s is None else round(self.grown_s, 3),
        }
        return {k: v for k, v in md.items() if v is not None}  # no engine, prediction, GPU: no key


def fit_line(points: Sequence[tuple[float, float]], default_rate: float) -> tuple[float, float]:
    """(fixed MB, MB/s) of peak = fixed + rate x seconds, from (seconds, peak MB): Theil-Sen
    (median pairwise slope, median residual: one freak file moves neither) over files >=
    ``MIN_HISTORY_SECONDS``, pairs 1.5x and 2 s apart. Under 3 such files or no such pair:
    the default rate plus the median excess."""
    usable = [(s, max(0.0, p)) for s, p in points if s > 0 and math.isfinite(s) and math.isfinite(p)]
    if not usable:
        return 0.0, default_rate
    long = [(s, p) for s, p in usable if s >= MIN_HISTORY_SECONDS] or usable
    slopes = [(p2 - p1) / (s2 - s1) for i, (s1, p1) in enumerate(long) for s2, p2 in long[i + 1 :]
              if abs(s2 - s1) >= MIN_HISTORY_SECONDS and max(s1, s2) >= 1.5 * min(s1, s2)]
    rate = max(0.0, statistics.median(slopes)) if len(long) >= 3 and slopes else default_rate
    return max(0.0, statistics.median(p - rate * s for s, p in long)), rate


def within(seconds: float, grown_s: float | None = None) -> float:
    """The seconds a peak grows with inside the window: the call up to WINDOW_S, and,
    where the engine says how long a stretch its loaded model has grown for (GROWN_KEY),
    that part of it again which goes past it (its buffers grow anew: bench/transcript_order.py)."""
    inside = min(seconds, WINDOW_S)
    return inside if grown_s is None else inside + max(0.0, inside - grown_s)


def window_line(points: Sequence[tuple[float, float | None, float]],
                rate_past: float) -> Callable[[float, float | None], float]:
    """Peak MB by (seconds of audio, grown_s), from (seconds, grown_s, peak MB) newest first:
    ``fit_line``'s slope in ``within`` seconds, where a point past WINDOW_S counts less what
    ``rate_past`` adds past it, and ``rate_past`` beyond; the fixed part from the
    RECENT_ROWS newest points (once there are)."""
    def past(s: float) -> float:
        return rate_past * max(0.0, s - WINDOW_S)

    folded = [(within(s, g), p - past(s)) for s, g, p in points]
    fixed, rate = fit_line(folded, rate_past)
    recent = [p - rate * s for s, p in folded if s >= MIN_HISTORY_SECONDS][:RECENT_ROWS]
    if len(recent) == RECENT_ROWS:
        fixed = max(0.0, statistics.median(recent))
    return lambda s, g=None: fixed + rate * within(s, g) + past(s)


def predict(audio_seconds: float, history: Sequence[HistoryRow], default: tuple[float, float],
            first: bool = False, grown_s: float | None = None) -> Need:
    """A recording's peak above its baseline, host and GPU, before the safety margin,
    from ``history`` (``memory_history``'s rows, newest first); without history, from
    ``default`` (fixed MB, MB per audio second: ``Stage.memory_default``). The line
    (``window_line``; the default rate past the window, none on the GPU) is learnt from
    the rows not first (FIRST_KEY; from all, where every one was). With ``first``, the
    median excess of the first rows over it is added. ``grown_s``: what the loaded
    model has grown for (GROWN_KEY), where its engine says: then rows that do not say
    (recorded before GROWN_KEY existed) are left out once 3 do."""
    default_fixed, default_rate = default
    seconds = max(0.0, audio_seconds)
    if grown_s is not None:
        said = [r for r in history if r.grown_s is not None]
        history = said if len(said) >= 3 else history  # a line's slope needs 3 (fit_line)
    if not history:
        return Need(default_fixed + default_rate * seconds, 0.0)
    firsts, steady = [r for r in history if r.first], [r for r in history if not r.first]
    line = steady or firsts
    host_at = window_line([(r.seconds, r.grown_s, r.host_mb) for r in line], default_rate)
    gpu_at = window_line([(r.seconds, r.grown_s, r.gpu_mb) for r in line if r.gpu_mb is not None], 0.0)
    host, gpu = host_at(seconds, grown_s), gpu_at(seconds, grown_s)
    if first and firsts and steady:
        host += max(0.0, statistics.median(r.host_mb - host_at(r.seconds, r.grown_s) for r in firsts))
        gpu_firsts = [r.gpu_mb - gpu_at(r.seconds, r.grown_s) for r in firsts if r.gpu_mb is not None]
        gpu += max(0.0, statistics.median(gpu_firsts)) if gpu_firsts else 0.0
    return Need(host, gpu)


def memory_history(instance: dg.DagsterInstance, asset_key: dg.AssetKey | str, engine: str | None,
                   limit: int = 50) -> list[HistoryRow]:
    """The latest ``limit`` results of this stage by ``engine`` on this machine, newest
    first (from the event log: among its latest 10 x limit materializations). Results
    recorded before FIRST_KEY existed count as not first."""
    host, out = socket.gethostname(), []
    key, cursor, scanned = dg.AssetKey.from_coercible(asset_key), None, 0
    # A page at a time: each record is built whole (a report's embeds its plot), and where
    # one engine runs on one machine the first page is all it takes (bench/history_read.py).
    while len(out) < limit and scanned < 10 * limit:
        page = instance.fetch_materializations(key, limit=limit, cursor=cursor)
        for record in page.records:
            mat = record.asset_materialization
            md = {k: getattr(v, "value", v) for k, v in (mat.metadata if mat else {}).items()}
            if PEAK_KEY in md and md.get(ENGINE_KEY) == engine and md.get(HOST_KEY) == host:
                gpu, grown = md.get(GPU_PEAK_KEY), md.get(GROWN_KEY)
                out.append(HistoryRow(float(md[SECONDS_KEY]), float(md[PEAK_KEY]),
                                      None if gpu is None else float(gpu), bool(md.get(FIRST_KEY, False)),
                                      None if grown is None else float(grown)))
        scanned += len(page.records)
        if not page.has_more:
            break
        cursor = page.cursor
    return out[:limit]


class MemoryManager(dg.ConfigurableResource):
    """Keeps each model load and each recording inside memory limits (host RAM and
    GPU): checked before, measured during, cleaned up after."""

    system_threshold_pct: float = Field(85.0, description="Predicted host use (%) that logs a warning.")
    gpu_threshold_pct: float = Field(90.0, description="Predicted GPU use (%) that logs a warning.")
    critical_threshold_pct: float = Field(
        95.0, description="Predicted use (%) above which an emergency cleanup runs first; use"
        " already at/above it after the cleanup makes the step wait and retry.")
    safety_margin: float = Field(0.30, description="Fraction added to every prediction.")
    watchdog_interval_s: float = Field(0.05, description="Seconds between watchdog readings.")
    max_wait_retries: int = Field(3, description="Step retries while memory stays critical.")
    wait_seconds: float = Field(60.0, description="Seconds before such a retry.")
    # Where readings come from (anything with ``read() -> MemoryReading``); None: this
    # machine. Tests inject one that forces how full the machine is (an edge they cannot set up).
    probe: dg.ResourceDependency[Any] = None
    _engines: dict[int, Any] = PrivateAttr(default_factory=dict)  # by id(): engines need not hash
    _reports: list[CleanupReport] = PrivateAttr(default_factory=list)
    _froze: bool = PrivateAttr(default=False)  # gc.freeze() at setup, undone at teardown

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        got = (self.system_threshold_pct, self.gpu_threshold_pct, self.critical_threshold_pct,
               self.safety_margin, self.watchdog_interval_s)
        warn, gpu, critical, margin, interval = got
        if not (all(0 < p <= critical for p in (warn, gpu)) and critical <= 100 and margin >= 0 and interval > 0):
            raise dg.DagsterInvalidConfigError(
                "MemoryManager: need 0 < system_threshold_pct, gpu_threshold_pct <= critical_threshold_pct"
                f" <= 100, safety_margin >= 0, watchdog_interval_s > 0; got {got}", [], None)
        r = self.read()
        no_gpu = f", no GPU ({nvml()[2]})" if r.gpu_percent is None and self.probe is None else ""
        # One line (each is an event-log write, in every run).
        logger().info(f"MemoryManager: {r.describe()}, RSS {r.process_rss_mb:.0f} MB{no_gpu}")
        # What exists before the work (Dagster, imports) is set aside from gc until teardown:
        # a cleanup between stages scans only what the work created (~0.01 s, not ~0.2 s).
        gc.freeze()
        self._froze = True

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        # Still frozen: the final cleanup collects what the run created (a pass
        # over everything took 0.15 s per run); then gc sees it all again.
        self.cleanup("teardown")
        if self._froze:
            gc.unfreeze()
            self._froze = False
        self._engines.clear()

    def read(self) -> MemoryReading:
        return (self.probe or SystemMemoryProbe()).read()

    def level_of(self, r: MemoryReading) -> Level:
        """Level of a (current or predicted) host and GPU use."""
        levels = [(r.system_percent, self.system_threshold_pct),
                  (r.gpu_percent or 0.0, self.gpu_threshold_pct)]
        if any(p > self.critical_threshold_pct for p, _ in levels):
            return Level.CRITICAL
        return Level.WARNING if any(p >= t for p, t in levels) else Level.OK

    def check(self, what: str, need: Need, keep: Any = None) -> Check:
        """Whether ``need`` (one recording or one model load) fits now: used now + need x
        (1 + safety_margin), host, and GPU when the work needs any. Ok or warning: proceed.
        Critical: emergency cleanup (``keep``, the engine in use, stays loaded), then read
        again: use still at/above critical raises ``RetryRequested`` (only other processes
        can free memory); else the work runs with a warning (nothing smaller to run than
        one recording or one model; an actual out-of-memory error is retried)."""
        result = self._predicted(what, need, self.read())
        if result.level is not Level.CRITICAL:
            if result.level is Level.WARNING:
                logger().warning(result.message)
            return result
        report = self.cleanup(f"emergency: {what} predicted past critical", keep=keep)
        now = self.read()
        gpu_now = (now.gpu_percent or 0.0) if need.gpu_mb > 0 else 0.0
        if max(now.system_percent, gpu_now) >= self.critical_threshold_pct:
            message = (
                f"{what}: memory is critical before starting: {now.describe()} after an emergency cleanup"
                f" (freed {report.freed_mb:.0f} MB); critical is {self.critical_threshold_pct:g}%. The step"
                f" is retried in {self.wait_seconds:g} s, at most {self.max_wait_retries} times, then fails. To fix:"
                " stop other memory-hungry processes, run fewer runs at once, or use a smaller model.")
            logger().error(message)
            retry = dg.RetryRequested(max_retries=self.max_wait_retries, seconds_to_wait=self.wait_seconds)
            retry.args = (message,)  # RetryRequested carries no message of its own
            raise retry from ResourceError(message)
        result = self._predicted(what, need, now)
        result.cleanup = report
        result.message += f" after an emergency cleanup freed {report.freed_mb:.0f} MB; running it anyway"
        logger().warning(result.message)
        return result

    def _predicted(self, what: str, need: Need, r: MemoryReading) -> Check:
        """The use after ``need`` x (1 + safety_margin), host and, if it needs any, GPU."""
        m = 1.0 + self.safety_margin
        gpu_total = r.gpu_total_mb if need.gpu_mb > 0 else None
        after = MemoryReading(r.system_total_mb, r.system_used_mb + need.host_mb * m, r.process_rss_mb,
                              gpu_total, (r.gpu_used_mb or 0.0) + need.gpu_mb * m)
        level = self.level_of(after)
        message = f"{what}: {need.host_mb:.0f} MB (+{self.safety_margin:.0%}) -> {after.describe()}"
        return Check(level, f"{message}: {level.value}")

    @contextlib.contextmanager
    def track(self, stage: str, audio_seconds: float, engine: str | None = None,
              need: Need | None = None, grown_s: float | None = None) -> Iterator[FileMemory]:
        """Measure one recording through one stage; the FileMemory is filled in on exit (also
        when the body raises, which propagates). Peak: the kernel's (``KernelPeak``), else the
        highest RSS the watchdog sampled, which also flags critical pressure meanwhile.
        ``grown_s`` is recorded with it (GROWN_KEY)."""
        malloc_trim()  # freed heap back to the OS first: reusing it would hide this file's growth
        fm = FileMemory(stage, audio_seconds, engine, need, first_in_process(stage, engine), grown_s)
        start, cuda = self.read(), torch_cuda()
        gpu_seen = [start.gpu_used_mb] if start.gpu_used_mb is not None and cuda is None else []
        if cuda is not None:  # torch's own counters: exact, and this process only
            with contextlib.suppress(Exception):
                cuda.reset_peak_memory_stats()
                gpu_seen = [cuda.memory_allocated() / MB]
        baseline = KernelPeak.start()
        kernel = baseline is not None
        fm.start_mb = fm.peak_mb = baseline if kernel else start.process_rss_mb
        fm.peak_source = "kernel" if kernel else "sampled"
        stop = threading.Event()

        def sample() -> None:
            with contextlib.suppress(Exception):  # a failed reading must not break the file
                r = self.read()
                fm.peak_mb = fm.peak_mb if kernel else max(fm.peak_mb, r.process_rss_mb)
                fm.pressure_peak_pct = max(fm.pressure_peak_pct, r.system_percent, r.gpu_percent or 0.0)
                if r.gpu_used_mb is not None and cuda is None:
                    gpu_seen.append(r.gpu_used_mb)
                if not fm.critical_reached and self.level_of(r) is Level.CRITICAL:
                    fm.critical_reached = True
                    logger().warning(f"{stage}: memory critical while processing"
                                     f" ({r.system_percent:.1f}% host)")

        def watch() -> None:  # from the start, then every interval
            sample()
            while not stop.wait(self.watchdog_interval_s):
                sample()

        watchdog = threading.Thread(target=watch, name=f"memory-watchdog-{stage}", daemon=True)
        t0 = time.perf_counter()
        try:
            watchdog.start()
            yield fm
        finally:
            # First, so that nothing below can leave the kernel's counter held for good.
            kernel_peak = KernelPeak.finish() if kernel else None
            _TRACKED.add((os.getpid(), stage, fm.engine))  # the body may set another (a CPU twin)
            stop.set()
            if watchdog.ident is not None:  # started
                watchdog.join()
            fm.seconds = time.perf_counter() - t0
            sample()
            fm.end_mb = self.read().process_rss_mb
            fm.peak_mb = max(kernel_peak or fm.peak_mb, fm.end_mb)
            if cuda is not None and gpu_seen:
                with contextlib.suppress(Exception):
                    gpu_seen.append(cuda.max_memory_allocated() / MB)
            if gpu_seen:
                fm.gpu_peak_delta_mb = max(0.0, max(gpu_seen) - gpu_seen[0])

    def register(self, engine: Any) -> None:
        """Have ``cleanup`` unload this engine (anything with ``loaded``/``unload()``)."""
        self._engines[id(engine)] = engine

    def cleanup(self, reason: str, keep: Any = None) -> CleanupReport:
        """Unload every loaded engine but ``keep`` (the one in use), then gc, torch's CUDA cache
        (and IPC memory), heap trim (in that order: models must be dropped before gc can free
        them, and freed before CUDA can take their blocks back); report what was freed. Engines
        reload lazily; a failing unload is reported."""
        t0, before = time.perf_counter(), self.read()
        services, errors = [], []
        for engine in [e for e in self._engines.values() if e is not keep]:
            try:
                if engine.loaded:
                    engine.unload()
                    services.append(type(engine).__name__)
            except Exception as exc:
                errors.append(f"{type(engine).__name__}: {type(exc).__name__}: {exc}")
        # One pass (a second found next to nothing). During a run (see setup) it
        # skips what existed before the run; an emergency looks at everything.
        thaw = self._froze and reason.startswith("emergency")
        if thaw:
            gc.unfreeze()
        collected = gc.collect()
        if thaw:
            gc.freeze()
        try:
            if (cuda := torch_cuda()) is not None:
                cuda.synchronize()  # kernels still running may hold blocks
                cuda.empty_cache()
                cuda.ipc_collect()
        except Exception as exc:
            logger().warning(f"CUDA cache cleanup failed: {type(exc).__name__}: {exc}")
        malloc_trim()
        after = self.read()
        gpu_before, gpu_after = before.gpu_used_mb, after.gpu_used_mb
        gpu = None if gpu_before is None or gpu_after is None else gpu_before - gpu_after
        freed = max(0.0, before.process_rss_mb - after.process_rss_mb)
        report = CleanupReport(reason, services, collected, freed, gpu, time.perf_counter() - t0, errors)
        logger().info(f"Cleanup ({reason}): {len(services)} services, {collected} GC objects,"
                      f" {freed:.1f} MB freed in {report.seconds:.2f}s")
        if errors:
            logger().warning(f"Cleanup ({reason}): unload failed: {'; '.join(errors)}")
        self._reports.append(report)
        return report

    @property
    def cleanup_reports(self) -> list[CleanupReport]:
        """Every cleanup this manager ran, oldest first (Dagster builds it per run)."""
        return list(self._reports)
