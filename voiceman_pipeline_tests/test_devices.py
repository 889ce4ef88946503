"""Which analysis steps are in the ``gpu`` pool (devices.py), and CPU runs side by side."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter

import pytest
from dagster import AssetKey, DagsterEventType, DagsterInstance

from voiceman_pipeline import devices
from voiceman_pipeline.assets.pipeline import build_recording_analysis
from voiceman_pipeline.assets.stages import STAGES, StageResources
from voiceman_pipeline.devices import analysis_pool, configured_pool, uses_gpu
from voiceman_pipeline.resources import configured_resources
from voiceman_pipeline.resources.memory_readings import nvml
from voiceman_pipeline.settings import Settings
from voiceman_pipeline_tests.conftest import POOL_OF_ONE_YAML, REPO, SAMPLE_WAVS, shipped_storage_yaml


def no_gpu() -> bool:
    return False


def a_gpu() -> bool:
    return True


def never_asked() -> bool:
    raise AssertionError("NVML asked although no engine's device is 'auto'")


@pytest.mark.parametrize(
    "stt_engine, stt_device, ser_model, ser_device, visible, pool",
    [
        # The shipped default: pocketsphinx, no emotion model: CPU only.
        ("pocketsphinx", "auto", "", "auto", never_asked, None),
        # pocketsphinx is CPU-only whatever its device says.
        ("pocketsphinx", "cuda", "", "cuda", never_asked, None),
        ("pocketsphinx", "cuda:1", "", "auto", never_asked, None),
        ("faster-whisper", "cpu", "", "auto", never_asked, None),
        ("faster-whisper", "cpu", "some/ser-model", "cpu", never_asked, None),
        ("faster-whisper", "cuda", "", "auto", never_asked, "gpu"),
        ("faster-whisper", "cuda:1", "", "cpu", never_asked, "gpu"),
        ("pocketsphinx", "auto", "some/ser-model", "cuda", never_asked, "gpu"),
        ("pocketsphinx", "auto", "some/ser-model", "cuda:0", never_asked, "gpu"),
        # 'auto' follows what is visible.
        ("faster-whisper", "auto", "", "auto", no_gpu, None),
        ("faster-whisper", "auto", "", "auto", a_gpu, "gpu"),
        ("pocketsphinx", "auto", "some/ser-model", "auto", no_gpu, None),
        ("pocketsphinx", "auto", "some/ser-model", "auto", a_gpu, "gpu"),
        ("faster-whisper", "cpu", "some/ser-model", "auto", a_gpu, "gpu"),
        # No model: nothing on the GPU, even with one visible.
        ("pocketsphinx", "auto", "  ", "auto", a_gpu, None),
    ],
)
def test_the_pool_follows_the_engines_devices(
    stt_engine, stt_device, ser_model, ser_device, visible, pool
):
    got = analysis_pool(
        stt_engine=stt_engine, stt_device=stt_device, ser_model=ser_model,
        ser_device=ser_device, visible=visible,
    )
    assert got == pool


@pytest.fixture
def fresh_nvml():
    """NVML probed anew in the test, and again by whatever runs after it."""
    nvml.cache_clear()
    yield
    nvml.cache_clear()


def test_auto_reads_no_gpu_when_cuda_visible_devices_hides_them(monkeypatch, fresh_nvml):
    """The real NVML probe, forced at its edge: no device is visible."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert devices.gpu_visible() is False
    assert "CUDA_VISIBLE_DEVICES" in (nvml()[2] or "")
    assert uses_gpu("auto") is False and uses_gpu("cpu") is False and uses_gpu("cuda:0")
    assert analysis_pool(
        stt_engine="faster-whisper", stt_device="auto", ser_model="m", ser_device="auto"
    ) is None


def built(monkeypatch, **env: str):
    """The analysis multi-asset as definitions.py builds it, under ``env``."""
    for name in ("VOICEMAN_STT_ENGINE", "VOICEMAN_STT_DEVICE", "VOICEMAN_SER_MODEL",
                 "VOICEMAN_SER_DEVICE", "VOICEMAN_ANALYSIS_POOL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    resources = configured_resources(Settings.from_env())
    return build_recording_analysis(
        2, StageResources(**{name: resources[name] for name in ("store", "stt", "ser", "acoustic")})
    )


def test_the_built_analysis_step_is_in_the_pool_its_engines_need(monkeypatch, tmp_path):
    monkeypatch.setenv("VOICEMAN_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(devices, "gpu_visible", no_gpu)  # 'auto' below: no GPU
    assert built(monkeypatch).op.pool is None  # the shipped defaults
    assert built(monkeypatch, VOICEMAN_STT_DEVICE="cuda").op.pool is None  # pocketsphinx
    assert built(monkeypatch, VOICEMAN_STT_ENGINE="faster-whisper").op.pool is None
    assert built(
        monkeypatch, VOICEMAN_STT_ENGINE="faster-whisper", VOICEMAN_STT_DEVICE="cuda"
    ).op.pool == "gpu"
    assert built(
        monkeypatch, VOICEMAN_SER_MODEL="some/ser-model", VOICEMAN_SER_DEVICE="cuda:0"
    ).op.pool == "gpu"
    # The override, for an operator (or a test) who wants the step queued anyway.
    assert built(monkeypatch, VOICEMAN_ANALYSIS_POOL="gpu").op.pool == "gpu"
    assert built(
        monkeypatch, VOICEMAN_STT_ENGINE="faster-whisper", VOICEMAN_STT_DEVICE="cuda",
        VOICEMAN_ANALYSIS_POOL="none",
    ).op.pool is None


def test_configured_pool_reads_the_resources(monkeypatch):
    from voiceman_pipeline.resources.engines import EmotionModel, SpeechToText

    monkeypatch.delenv("VOICEMAN_ANALYSIS_POOL", raising=False)
    cpu = SpeechToText(engine="faster-whisper", device="cpu")
    assert configured_pool(cpu, EmotionModel(model="", device="cuda"), never_asked) is None
    assert configured_pool(cpu, EmotionModel(model="m", device="auto"), a_gpu) == "gpu"


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
def test_auto_on_a_machine_with_a_gpu_is_in_the_gpu_pool(monkeypatch, fresh_nvml):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert devices.gpu_visible(), nvml()[2]
    assert analysis_pool(
        stt_engine="faster-whisper", stt_device="auto", ser_model="", ser_device="auto"
    ) == "gpu"
    assert analysis_pool(
        stt_engine="pocketsphinx", stt_device="auto", ser_model="m", ser_device="auto"
    ) == "gpu"


def test_max_concurrent_runs_follows_the_environment(monkeypatch):
    from voiceman_pipeline.errors import ConfigurationError

    monkeypatch.delenv("VOICEMAN_MAX_CONCURRENT_RUNS", raising=False)
    for name in ("VOICEMAN_ANALYSIS_POOL", "VOICEMAN_STT_ENGINE", "VOICEMAN_SER_MODEL"):
        monkeypatch.delenv(name, raising=False)  # the shipped CPU engines
    # One run per usable core with CPU engines, as `voiceman run` has workers
    # (the machine's cores: the one thing forced here).
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)))
    assert devices.max_concurrent_runs() == 16
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0})
    assert devices.max_concurrent_runs() == 2  # at least 2: a summary run can pass
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)))
    monkeypatch.setenv("VOICEMAN_ANALYSIS_POOL", "gpu")  # GPU engines: the rest would wait for the pool
    assert devices.max_concurrent_runs() == devices.GPU_MAX_CONCURRENT_RUNS == 2
    monkeypatch.setenv("VOICEMAN_MAX_CONCURRENT_RUNS", "6")
    assert devices.max_concurrent_runs() == 6
    monkeypatch.setenv("VOICEMAN_MAX_CONCURRENT_RUNS", "-1")
    assert devices.max_concurrent_runs() == -1
    for bad in ("two", "-3"):
        monkeypatch.setenv("VOICEMAN_MAX_CONCURRENT_RUNS", bad)
        with pytest.raises(ConfigurationError, match="VOICEMAN_MAX_CONCURRENT_RUNS"):
            devices.max_concurrent_runs()


def test_analysis_slots_read_the_run_queue_limit_and_are_one_behind_the_gpu_pool(monkeypatch, tmp_path):
    """``analysis_slots`` (how many runs the inbox sensor shares a drop among): the
    instance's run queue limit, dagster.yaml's own value first (the shipped file
    leaves it to VOICEMAN_MAX_CONCURRENT_RUNS); one when the analysis step is in
    a pool, where smaller runs would only load the models more often."""
    monkeypatch.setenv("VOICEMAN_MAX_CONCURRENT_RUNS", "6")
    for name in ("VOICEMAN_ANALYSIS_POOL", "VOICEMAN_STT_ENGINE", "VOICEMAN_SER_MODEL"):
        monkeypatch.delenv(name, raising=False)  # the shipped CPU engines
    home = tmp_path / "home"
    home.mkdir()
    shipped = "run_coordinator:\n  module: voiceman_pipeline.devices\n  class: RunCoordinator\n"
    (home / "dagster.yaml").write_text(shipped_storage_yaml(home) + shipped)
    with DagsterInstance.from_config(str(home)) as instance:
        assert devices.analysis_slots(instance) == 6
        monkeypatch.setenv("VOICEMAN_ANALYSIS_POOL", "gpu")  # as with GPU engines
        assert devices.analysis_slots(instance) == 1
        monkeypatch.delenv("VOICEMAN_ANALYSIS_POOL")
    limited = shipped + "  config:\n    max_concurrent_runs: 3\n"
    (home / "dagster.yaml").write_text(shipped_storage_yaml(home) + limited)
    with DagsterInstance.from_config(str(home)) as instance:
        assert devices.analysis_slots(instance) == 3


# One analysis run over the recordings named on the command line, in this
# process, once the other worker is ready too (so both runs start together).
WORKER = """
import sys, time
from pathlib import Path
from dagster import DagsterInstance, materialize
from voiceman_pipeline.definitions import defs, recording_analysis
from voiceman_pipeline.partitions import range_tags

ready, other, keys = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
assert recording_analysis.op.pool is None, recording_analysis.op.pool
ready.touch()
deadline = time.monotonic() + 60
while not other.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
with DagsterInstance.get() as instance:
    result = materialize(
        [recording_analysis], instance=instance, resources=defs.resources,
        tags=range_tags(keys), raise_on_error=False,
        run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
    )
print(result.run_id)
sys.exit(0 if result.success else 1)
"""


@pytest.mark.timeout(120)
def test_two_cpu_runs_over_disjoint_recordings_run_at_the_same_time(tmp_path):
    """On an instance whose ``gpu`` pool allows one step (as shipped), two
    CPU-only analysis runs in two processes overlap, and each result is
    computed exactly once."""
    home, data = tmp_path / "home", tmp_path / "data"
    home.mkdir()
    (home / "dagster.yaml").write_text(shipped_storage_yaml(home) + POOL_OF_ONE_YAML)
    (data / "inbox").mkdir(parents=True)
    shortest = SAMPLE_WAVS[:2]  # cards_001 (1.1 s) and cards_002 (2.0 s)
    keys = ["a0.wav", "a1.wav", "b0.wav", "b1.wav"]
    for i, key in enumerate(keys):
        (data / "inbox" / key).write_bytes(shortest[i % 2].read_bytes())
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "VOICEMAN_DATA_DIR": str(data),
        "PYTHONPATH": str(REPO),
        "VOICEMAN_STT_ENGINE": "pocketsphinx",
        "VOICEMAN_SER_MODEL": "",
    }
    env.pop("VOICEMAN_ANALYSIS_POOL", None)
    with DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("audio_files", keys)

    ready = [tmp_path / "ready0", tmp_path / "ready1"]
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(ready[i]), str(ready[1 - i]), *batch],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i, batch in enumerate((keys[:2], keys[2:]))
    ]
    began = time.monotonic()
    outputs = [worker.communicate(timeout=100) for worker in workers]
    print(f"two runs of two recordings each: {time.monotonic() - began:.1f} s")
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, out + err
    run_ids = [out.split()[-1] for out, _ in outputs]

    with DagsterInstance.from_config(str(home)) as instance:
        windows = []
        for run_id in run_ids:
            records = instance.get_records_for_run(run_id).records
            starts = [r.timestamp for r in records
                      if r.event_log_entry.dagster_event_type == DagsterEventType.STEP_START]
            ends = [r.timestamp for r in records
                    if r.event_log_entry.dagster_event_type == DagsterEventType.STEP_SUCCESS]
            assert len(starts) == 1 and len(ends) == 1, run_id
            windows.append((starts[0], ends[0]))
        counts: Counter = Counter()
        for stage in STAGES:
            for record in instance.fetch_materializations(AssetKey(stage.name), limit=1000).records:
                counts[(stage.name, record.partition_key)] += 1
    (first_start, first_end), (second_start, second_end) = windows
    overlap = min(first_end, second_end) - max(first_start, second_start)
    print(f"analysis steps: {windows}; overlap {overlap:.2f} s")
    assert overlap > 0, windows  # each step started before the other ended
    assert len(counts) == len(keys) * len(STAGES)
    assert set(counts.values()) == {1}, counts
