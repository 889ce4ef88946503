"""MemoryManager: threshold decisions, real readings, tracking, cleanup, prediction.

Forced readings (ForcedProbe) stand in only for the edge that cannot be set up
for real: how full the machine's memory or GPU is. Everything else (psutil,
the kernel's peak RSS, gc, the Dagster event log) is real.
"""

import gc
import logging
import os
import subprocess
import sys
import time

import dagster as dg
import numpy as np
import psutil
import pytest

from voiceman_pipeline.engines.base import Engine
from voiceman_pipeline.errors import ResourceError
from voiceman_pipeline.resources.memory import (
    META_AUDIO_SECONDS,
    META_PEAK_DELTA_MB,
    MemoryManager,
    MemoryReading,
    MemoryModel,
    PressureLevel,
    SystemMemoryProbe,
    estimate_memory_model,
    memory_history_from_instance,
)
from voiceman_pipeline.results import EngineInfo

TOTAL_MB = 16_000.0
MB = 1024 * 1024


class ForcedProbe:
    """Readings of a machine whose fullness the test sets.

    ``engine_mb`` is memory the readings attribute to ``engine`` while it is
    loaded, so an emergency cleanup that really unloads it lowers the readings.
    """

    def __init__(self, percent: float, *, engine: Engine | None = None, engine_mb: float = 0.0,
                 gpu_total_mb: float | None = None, gpu_percent: float | None = None) -> None:
        self.percent = percent
        self.engine = engine
        self.engine_mb = engine_mb
        self.gpu_total_mb = gpu_total_mb
        self.gpu_percent = gpu_percent
        self.reads = 0

    def read(self) -> MemoryReading:
        self.reads += 1
        used = TOTAL_MB * self.percent / 100.0
        if self.engine is not None and not self.engine.loaded:
            used -= self.engine_mb
        gpu = {}
        if self.gpu_total_mb is not None:
            gpu_used = self.gpu_total_mb * self.gpu_percent / 100.0
            gpu = dict(gpu_total_mb=self.gpu_total_mb, gpu_used_mb=gpu_used,
                       gpu_percent=gpu_used / self.gpu_total_mb * 100.0)
        return MemoryReading(
            system_total_mb=TOTAL_MB,
            system_used_mb=used,
            system_available_mb=TOTAL_MB - used,
            system_percent=used / TOTAL_MB * 100.0,
            process_rss_mb=500.0,
            **gpu,
        )


class BufferEngine(Engine):
    """A real engine whose "model" is a numpy buffer of ``mb`` MB."""

    def __init__(self, mb: int = 50, fail_unload: bool = False) -> None:
        self.mb = mb
        self.fail_unload = fail_unload
        self.model: np.ndarray | None = None

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(name="buffer", model=f"{self.mb}MB")

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def load(self) -> None:
        if self.model is None:
            self.model = np.ones(self.mb * MB // 8)  # ones(): pages really touched

    def unload(self) -> None:
        if self.fail_unload:
            raise RuntimeError("driver refused to free the model")
        self.model = None


def loaded_engine(mb: int = 50, **kw) -> BufferEngine:
    engine = BufferEngine(mb, **kw)
    engine.load()
    return engine


# --- pre-allocation decisions ------------------------------------------------


def test_ok_below_threshold_predicts_with_margin():
    mm = MemoryManager().with_probe(ForcedProbe(50.0))
    decision = mm.check_before("batch 1", files=5, mb_per_file=100.0)
    assert decision.level is PressureLevel.OK
    assert decision.files_allowed == 5 and not decision.reduced
    # 8000 MB used + 5 x 100 MB x 1.30
    assert decision.predicted_mb == pytest.approx(8000 + 650)
    assert decision.predicted_percent == pytest.approx(8650 / TOTAL_MB * 100)
    assert decision.cleanup is None
    assert decision.gpu_predicted_percent is None  # no GPU reading


def test_warning_between_threshold_and_critical_proceeds_and_logs(caplog):
    mm = MemoryManager().with_probe(ForcedProbe(86.0))
    engine = loaded_engine()
    mm.register(engine)
    with caplog.at_level(logging.WARNING):
        decision = mm.check_before("batch 2", files=2, mb_per_file=10.0)
    assert decision.level is PressureLevel.WARNING
    assert decision.files_allowed == 2
    assert decision.cleanup is None and engine.loaded  # no cleanup at warning
    assert "86.2%" in decision.message and "warning" in decision.message
    assert any("batch 2" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_critical_runs_emergency_cleanup_then_reduces_files():
    # 96% with a 3000 MB model loaded; unloading it brings the machine to 77.25%.
    engine = loaded_engine()
    probe = ForcedProbe(96.0, engine=engine, engine_mb=3000.0)
    mm = MemoryManager().with_probe(probe)
    mm.register(engine)
    decision = mm.check_before("batch 3", files=20, mb_per_file=200.0)

    assert not engine.loaded  # the emergency cleanup really unloaded it
    assert decision.cleanup is not None and decision.cleanup.reason == "emergency"
    assert decision.cleanup.services_cleaned == ["BufferEngine"]
    # (0.95 x 16000 - 12360) / (200 x 1.3) = 10.9 -> 10 files fit under 95%
    assert decision.level is PressureLevel.CRITICAL
    assert decision.files_requested == 20 and decision.files_allowed == 10
    assert decision.reduced
    assert decision.predicted_percent <= 95.0
    assert "only 10 of 20 files fit" in decision.message


def test_critical_after_cleanup_all_fit_gives_plain_level():
    engine = loaded_engine()
    mm = MemoryManager().with_probe(ForcedProbe(96.0, engine=engine, engine_mb=3000.0))
    mm.register(engine)
    decision = mm.check_before("batch 4", files=2, mb_per_file=200.0)
    assert decision.cleanup is not None and not engine.loaded
    assert decision.files_allowed == 2 and not decision.reduced
    assert decision.level is PressureLevel.OK  # 12360 + 520 MB = 80.5%
    assert "emergency cleanup" in decision.message


def test_critical_now_after_cleanup_requests_retry_with_explanation():
    # Memory already past critical (others hold it): only waiting can help.
    engine = loaded_engine()  # unloading it frees nothing the readings see
    mm = MemoryManager(max_wait_retries=4, wait_seconds=30.0).with_probe(ForcedProbe(96.0))
    mm.register(engine)
    with pytest.raises(dg.RetryRequested) as info:
        mm.check_before("batch 5", files=3, mb_per_file=100.0)
    retry = info.value
    assert retry.max_retries == 4 and retry.seconds_to_wait == 30.0
    message = str(retry)
    for fragment in ("batch 5", "memory is critical before starting", "96.0%", "critical is 95%",
                     "warning 85%", "Waiting for other processes", "retrying the step in 30 s"):
        assert fragment in message, fragment
    assert isinstance(retry.__cause__, ResourceError)
    assert not engine.loaded  # emergency cleanup ran before giving up


def test_exactly_at_critical_now_also_waits():
    mm = MemoryManager().with_probe(ForcedProbe(95.0))
    with pytest.raises(dg.RetryRequested):
        mm.check_before("batch 5b", files=1, mb_per_file=10.0)


def test_idle_machine_runs_one_file_alone_however_big_its_prediction(caplog):
    # 20% used, but one file is predicted at 17 GB (a polluted history): waiting
    # cannot help, refusing would fail the file; it runs alone, with a warning.
    mm = MemoryManager().with_probe(ForcedProbe(20.0))
    with caplog.at_level(logging.WARNING):
        decision = mm.check_before("batch 6", files=3, mb_per_file=17_000.0)
    assert decision.files_requested == 3 and decision.files_allowed == 1 and decision.reduced
    assert decision.level is PressureLevel.CRITICAL
    assert decision.cleanup is not None and decision.cleanup.reason == "emergency"
    # 3200 MB used + 17000 x 1.3 = 25300 MB: past critical, and said so.
    assert decision.predicted_mb == pytest.approx(3200 + 22_100)
    for fragment in ("predicted 22100 MB for one file", "exceeds the 12000 MB left on the host",
                     "running it alone", "an out-of-memory error will be retried with cleanup",
                     "Running 1 of 3 files"):
        assert fragment in decision.message, fragment
    assert any("running it alone" in r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING)

    # A single file asked for: allowed, never 0.
    single = mm.check_before("batch 7", files=1, mb_per_file=17_000.0)
    assert single.files_allowed == 1 and not single.reduced
    assert single.level is PressureLevel.CRITICAL and "running it alone" in single.message


def test_gpu_pressure_is_checked_against_gpu_threshold():
    probe = ForcedProbe(50.0, gpu_total_mb=80_000.0, gpu_percent=91.0)
    mm = MemoryManager().with_probe(probe)
    decision = mm.check_before("gpu batch", files=2, mb_per_file=10.0, gpu_mb_per_file=100.0)
    assert decision.level is PressureLevel.WARNING  # host at 50%, GPU 91.3% > 90%
    assert decision.gpu_predicted_percent == pytest.approx((72_800 + 260) / 800)

    # GPU predicted past 95%: only what fits under critical on the GPU runs.
    decision = mm.check_before("gpu batch", files=10, mb_per_file=10.0, gpu_mb_per_file=1000.0)
    # (0.95 x 80000 - 72800) / 1300 = 2.46 -> 2
    assert decision.files_allowed == 2 and decision.level is PressureLevel.CRITICAL
    assert decision.cleanup is not None


def test_gpu_critical_now_waits_only_for_work_that_needs_the_gpu():
    probe = ForcedProbe(50.0, gpu_total_mb=80_000.0, gpu_percent=97.0)  # others filled it
    mm = MemoryManager().with_probe(probe)
    with pytest.raises(dg.RetryRequested, match=r"GPU 77600 of 80000 MB \(97.0%\)"):
        mm.check_before("gpu stage", files=1, mb_per_file=10.0, gpu_mb_per_file=100.0)
    # CPU-only work (no GPU memory declared) is not held back by a full GPU.
    decision = mm.check_before("cpu stage", files=4, mb_per_file=10.0)
    assert decision.files_allowed == 4


def test_gpu_prediction_past_critical_runs_one_file_alone():
    probe = ForcedProbe(50.0, gpu_total_mb=80_000.0, gpu_percent=10.0)
    mm = MemoryManager().with_probe(probe)
    decision = mm.check_before("gpu stage", files=2, mb_per_file=10.0, gpu_mb_per_file=100_000.0)
    assert decision.files_allowed == 1 and decision.level is PressureLevel.CRITICAL
    assert "left on the GPU" in decision.message and "running it alone" in decision.message


def test_invalid_thresholds_are_rejected():
    mm = MemoryManager(system_threshold_pct=97.0).with_probe(ForcedProbe(10.0))
    with pytest.raises(dg.DagsterInvalidConfigError, match="thresholds"):
        mm.check_before("x", files=1, mb_per_file=1.0)


# --- real readings -------------------------------------------------------------


def test_real_readings_are_sane():
    reading = SystemMemoryProbe().read()
    vm = psutil.virtual_memory()
    assert 0 < reading.system_percent < 100
    assert reading.system_total_mb == pytest.approx(vm.total / MB)
    assert 0 < reading.system_available_mb <= reading.system_total_mb
    assert reading.system_used_mb == pytest.approx(
        reading.system_total_mb - reading.system_available_mb)
    rss = psutil.Process().memory_info().rss / MB
    assert reading.process_rss_mb > 0
    assert reading.process_rss_mb == pytest.approx(rss, rel=0.2)


def test_memory_module_does_not_import_torch_or_nvml_eagerly():
    code = ("import sys, voiceman_pipeline.resources.memory, voiceman_pipeline.error_policy;"
            "print('torch' in sys.modules, 'pynvml' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(_cuda_available(), reason="this machine has a GPU")
def test_no_gpu_gives_none_without_error():
    reading = SystemMemoryProbe().read()
    assert reading.gpu_total_mb is None and reading.gpu_used_mb is None
    assert reading.gpu_percent is None and not reading.has_gpu
    assert reading.torch_allocated_mb is None


@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU")
def test_real_gpu_figures_tracking_and_cleanup():
    import torch

    torch.cuda.init()
    free, total = torch.cuda.mem_get_info()
    mm = MemoryManager()
    before = mm.read()
    assert before.has_gpu
    assert before.gpu_total_mb == pytest.approx(total / MB, rel=0.01)
    assert 0 < before.gpu_percent < 100

    with mm.track_file("gpu-file", "stage", 1.0, 10.0) as stats:
        x = torch.ones(256 * MB // 4, device="cuda")  # 256 MB of float32
        torch.cuda.synchronize()
        time.sleep(0.2)
        during = mm.read()
        del x
    assert during.torch_allocated_mb >= 256
    assert stats.torch_peak_allocated_mb >= 256
    assert stats.gpu_peak_mb >= stats.gpu_start_mb + 200
    assert "memory_gpu_peak_mb" in stats.to_metadata()

    assert mm.read().torch_reserved_mb >= 256  # freed tensor, still cached
    report = mm.cleanup("test")
    assert report.cuda_cache_cleared
    assert mm.read().torch_reserved_mb < 256
    assert report.gpu_freed_mb is not None and report.gpu_freed_mb >= 200


# --- per-file tracking ---------------------------------------------------------


def _spike(mb: int, hold_s: float) -> None:
    block = np.ones(mb * MB // 8)
    time.sleep(hold_s)
    del block


class SampledOnlyProbe:
    """The real probe without the kernel's peak: only the watchdog finds peaks."""

    def __init__(self) -> None:
        self._real = SystemMemoryProbe()

    def read(self) -> MemoryReading:
        return self._real.read()


def test_watchdog_sees_a_spike_that_start_and_end_miss():
    mm = MemoryManager(watchdog_interval_s=0.02).with_probe(SampledOnlyProbe())
    with mm.track_file("p1", "stt", file_size_mb=1.5, audio_seconds=30.0, engine="test") as stats:
        _spike(300, hold_s=0.3)
    assert stats.success and stats.error is None
    assert stats.samples >= 5
    assert stats.peak_memory_mb >= max(stats.start_memory_mb, stats.end_memory_mb)
    assert stats.peak_delta_mb >= 250
    assert stats.delta_mb < 100  # the 300 MB went back (large blocks are unmapped)
    md = stats.to_metadata()
    assert md[META_PEAK_DELTA_MB] == pytest.approx(stats.peak_delta_mb, abs=0.01)
    assert md[META_AUDIO_SECONDS] == 30.0
    assert md["memory_engine"] == "test" and md["memory_stage"] == "stt"
    assert all(isinstance(v, (int, float, str, bool)) for v in md.values())


@pytest.mark.skipif(
    SystemMemoryProbe().peak_rss is None or not os.access("/proc/self/clear_refs", os.W_OK),
    reason="needs Linux /proc peak-RSS reset",
)
def test_kernel_peak_catches_what_the_watchdog_cannot_sample():
    # The watchdog would first read after 10 s: only the kernel's VmHWM can see
    # a spike this short (as with a native call holding the GIL).
    mm = MemoryManager(watchdog_interval_s=10.0)
    with mm.track_file("p2", "forensic", 1.0, 10.0) as stats:
        _spike(300, hold_s=0.0)
    assert stats.samples == 1  # only the end reading
    assert stats.peak_delta_mb >= 250
    assert stats.delta_mb < 100


def test_nested_tracking_keeps_the_outer_peak():
    # The inner block resets the kernel peak; the outer must still see its own spike.
    mm = MemoryManager(watchdog_interval_s=10.0)
    with mm.track_file("outer", "batch", 1.0, 10.0) as outer:
        _spike(300, hold_s=0.0)
        with mm.track_file("inner", "stt", 1.0, 10.0) as inner:
            _spike(50, hold_s=0.0)
    assert outer.peak_delta_mb >= 250
    assert inner.peak_delta_mb < 250


def test_watchdog_flags_critical_pressure_live():
    probe = ForcedProbe(50.0)
    mm = MemoryManager(watchdog_interval_s=0.01).with_probe(probe)
    with mm.track_file("p3", "emotion", 1.0, 10.0) as stats:
        probe.percent = 97.0
        deadline = time.monotonic() + 2.0
        while not stats.critical_reached and time.monotonic() < deadline:
            time.sleep(0.01)
        seen_live = stats.critical_reached
        probe.percent = 50.0  # back to normal before the end reading
    assert seen_live
    assert stats.pressure_peak_pct == pytest.approx(97.0)
    assert stats.to_metadata()["memory_critical_reached"] is True


def test_failed_body_is_recorded_and_reraised():
    mm = MemoryManager()
    with pytest.raises(ValueError, match="bad frame"):
        with mm.track_file("p4", "stt", 1.0, 10.0) as stats:
            raise ValueError("bad frame")
    assert stats.success is False and stats.error == "ValueError"
    assert stats.processing_time_sec >= 0 and stats.end_memory_mb > 0
    md = stats.to_metadata()
    assert md["memory_success"] is False and md["memory_error"] == "ValueError"


# --- cleanup -------------------------------------------------------------------


def test_cleanup_unloads_engines_collects_garbage_and_reports():
    mm = MemoryManager()
    big = loaded_engine(200)
    idle = BufferEngine(10)  # registered but never loaded: nothing to clean
    broken = loaded_engine(10, fail_unload=True)
    for engine in (big, idle, broken, big):  # registering twice is harmless
        mm.register(engine)
    assert len(mm.registered) == 3

    gc.disable()  # keep the cycles for cleanup() to find
    try:
        for _ in range(2000):
            node: list = []
            node.append(node)
        del node
        report = mm.cleanup("between batches")
    finally:
        gc.enable()

    assert report.reason == "between batches"
    assert report.services_cleaned == ["BufferEngine"]  # big only; broken raised
    assert not big.loaded and broken.loaded
    assert len(report.errors) == 1 and "driver refused" in report.errors[0]
    assert report.objects_collected >= 2000
    assert report.freed_mb >= 0
    assert report.rss_before_mb > 0 and report.rss_after_mb > 0
    assert report.gpu_freed_mb is None and not report.cuda_cache_cleared  # no CUDA here
    # Engines stay registered: the next batch loads them lazily again.
    assert len(mm.registered) == 3


def test_resource_in_a_run_uses_forced_probe_and_teardown_cleans_up():
    engine = loaded_engine()

    @dg.asset
    def uses_memory(context: dg.AssetExecutionContext, memory: MemoryManager) -> None:
        memory.register(engine)
        assert memory.read().system_percent == pytest.approx(42.0)

    manager = MemoryManager().with_probe(ForcedProbe(42.0))
    with dg.instance_for_test() as instance:
        result = dg.materialize([uses_memory], resources={"memory": manager}, instance=instance)
    assert result.success
    assert not engine.loaded  # teardown_after_execution ran cleanup("teardown")


# --- prediction ----------------------------------------------------------------


def line(fixed: float, rate: float, seconds) -> list[tuple[float, float]]:
    """History of files that needed exactly fixed + rate x seconds."""
    return [(fixed + rate * s, float(s)) for s in seconds]


def test_estimate_without_usable_history_is_the_default():
    assert estimate_memory_model([], 1.5) == MemoryModel(0.0, 1.5, 0)
    assert estimate_memory_model([(100.0, 0.0), (float("nan"), 10.0)], 1.5) == MemoryModel(0.0, 1.5, 0)


def test_estimate_fits_fixed_part_and_rate():
    model = estimate_memory_model(line(20.0, 1.2, [5, 10, 30, 60, 120, 300]), 1.5)
    assert model.fixed_mb == pytest.approx(20.0) and model.mb_per_second == pytest.approx(1.2)
    assert model.samples == 6
    assert model.mb_for(200.0) == pytest.approx(260.0)


def test_one_short_outlier_does_not_set_the_estimate():
    # The review case: a first file whose peak included the model load
    # (95 MB for 1.09 s = 87 MB/s), newest first, among 20 MB + 1.2 MB/s files.
    # As a maximum ratio it predicted 17 GB for a 200 s file.
    history = [(95.0, 1.09)] + line(20.0, 1.2, [5, 10, 30, 60, 120])
    mm = MemoryManager()
    assert mm.per_file_estimate_mb(200.0, history) == pytest.approx(260.0, rel=0.30)
    # With only two ordinary files besides it (too few to fit a line): the
    # conservative line through zero, 56 MB / 30 s -> 373 MB, still not 17 GB.
    few = [(95.0, 1.09)] + line(20.0, 1.2, [30, 60])
    assert 260.0 <= mm.per_file_estimate_mb(200.0, few) <= 2 * 260.0


def test_one_long_outlier_is_outvoted_by_the_median():
    # A 30 s first file with a 500 MB model load in its peak.
    history = [(20.0 + 1.2 * 30 + 500.0, 30.0)] + line(20.0, 1.2, [5, 10, 20, 60, 120, 300])
    model = estimate_memory_model(history, 1.5)
    assert model.mb_for(200.0) == pytest.approx(260.0, rel=0.30)


def test_scarce_or_same_length_history_is_a_conservative_line_through_zero():
    # All files about 30 s long: the rate cannot be told from the fixed part,
    # so the highest peak per second is used (it over-predicts longer files).
    model = estimate_memory_model([(56.0, 30.0), (60.0, 30.5), (50.0, 29.0)], 1.5)
    assert model.fixed_mb == 0.0 and model.mb_per_second == pytest.approx(60.0 / 30.5)
    # One file only.
    assert estimate_memory_model([(120.0, 30.0)], 1.5) == MemoryModel(0.0, 4.0, 1)
    # Ten files at 1..9 MB/s and one at 100 MB/s: the 90th percentile leaves it out.
    history = [(float(r * 10), 10.0) for r in range(1, 10)] + [(1000.0, 10.0)]
    assert estimate_memory_model(history, 1.5).mb_per_second == 9.0


def test_only_short_clips_give_the_default_rate_plus_their_fixed_cost():
    model = estimate_memory_model([(95.0, 1.0), (45.0, 1.0), (40.0, 0.5)], 1.5)
    assert model.mb_per_second == 1.5
    assert model.fixed_mb == pytest.approx(45.0 - 1.5)  # median excess


def test_only_recent_files_count():
    history = line(0.0, 1.0, [10, 20, 40]) + [(5000.0, 10.0)]
    assert estimate_memory_model(history, 1.5, recent=3).mb_for(100.0) == pytest.approx(100.0)


def test_history_from_event_log_drives_the_estimate():
    files = dg.DynamicPartitionsDefinition(name="audio_files")
    rate = 4.0  # MB per audio second the "engine" below really allocates
    seconds = {"call-a": 10.0, "call-b": 20.0, "call-c": 30.0, "call-d": 40.0}

    @dg.asset(partitions_def=files)
    def transcript(context: dg.AssetExecutionContext, memory: MemoryManager) -> None:
        key = context.partition_key
        engine = "other" if key == "call-x" else "fake-stt"
        with memory.track_file(key, "transcript", 1.0, seconds.get(key, 10.0), engine=engine) as stats:
            work = np.ones(int(rate * seconds.get(key, 10.0) * MB) // 8)
            del work
        context.log_event(dg.AssetMaterialization(
            asset_key=context.asset_key, partition=key, metadata=stats.to_metadata()))

    manager = MemoryManager()
    with dg.instance_for_test() as instance:
        assert memory_history_from_instance(instance, "transcript") == []
        instance.add_dynamic_partitions("audio_files", [*seconds, "call-x"])
        for key in [*seconds, "call-x"]:
            result = dg.materialize([transcript], instance=instance, partition_key=key,
                                    resources={"memory": manager})
            assert result.success
        everything = memory_history_from_instance(instance, "transcript")
        history = memory_history_from_instance(instance, dg.AssetKey("transcript"),
                                               engine_name="fake-stt")
        limited = memory_history_from_instance(instance, "transcript", limit=2)

    # The run's own (metadata-less) materializations are skipped; newest first.
    assert len(everything) == 5
    assert [s for _, s in history] == [40.0, 30.0, 20.0, 10.0]
    assert [s for _, s in limited] == [10.0, 40.0]
    for peak_delta, secs in history:
        assert peak_delta >= rate * secs * 0.9

    model = estimate_memory_model(history, manager.default_mb_per_audio_second)
    assert model.samples == 4
    assert rate * 0.9 <= model.mb_per_second <= rate * 1.5
    assert manager.per_file_estimate_mb(100.0, history) == pytest.approx(model.mb_for(100.0))
    assert rate * 100.0 * 0.9 <= model.mb_for(100.0) <= rate * 100.0 * 1.5
    # Without history: the configured default, with its floor for tiny files.
    assert manager.per_file_estimate_mb(100.0, []) == pytest.approx(150.0)
    assert manager.per_file_estimate_mb(1.0, []) == manager.min_mb_per_file


def test_long_files_beyond_the_history_use_at_least_the_default_rate():
    # Five short clips whose peaks barely grow with length: the fitted slope
    # is tiny. A 240 s call must not be promised that slope.
    history = [(22.0 + 0.1 * s, s) for s in (3.0, 4.0, 5.0, 6.0, 7.0)]
    mm = MemoryManager()
    near = mm.per_file_estimate_mb(7.0, history)
    far = mm.per_file_estimate_mb(240.0, history)
    assert near < 40  # within the history: the fit
    assert far >= mm.default_mb_per_audio_second * 240  # beyond it: the default rate at least


def test_emergency_cleanup_keeps_the_engine_in_use():
    in_use, previous = loaded_engine(mb=5), loaded_engine(mb=5)
    mm = MemoryManager().with_probe(ForcedProbe(94.75))
    mm.register(previous)
    mm.register(in_use)
    decision = mm.check_before("transcript of x.wav", files=2, mb_per_file=20.0, keep=in_use)
    assert decision.cleanup is not None  # critical: an emergency cleanup ran ...
    assert in_use.loaded and not previous.loaded  # ... and left the model in use loaded
    assert decision.cleanup.services_cleaned == ["BufferEngine"]  # just the one
