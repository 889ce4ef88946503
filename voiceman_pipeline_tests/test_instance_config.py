"""The shipped dagster.yaml: valid, storage under data/dagster/, GPU pool limited,
run queue following VOICEMAN_MAX_CONCURRENT_RUNS."""

from __future__ import annotations

import os
import shutil

from dagster import DagsterInstance

from voiceman_pipeline.definitions import recording_analysis, resources
from voiceman_pipeline.devices import RunCoordinator
from voiceman_pipeline_tests.conftest import REPO


def test_instance_config_loads_and_keeps_state_in_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("VOICEMAN_MAX_CONCURRENT_RUNS", raising=False)
    home = tmp_path / "repo"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    # Relative paths in dagster.yaml are taken from DAGSTER_HOME, not from the current
    # folder (`dagster` commands run from the repository root with a home elsewhere).
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    with DagsterInstance.from_config(str(home)) as instance:
        assert str(home / "data" / "dagster" / "storage") in instance.run_storage._conn_string
        assert instance.compute_log_manager._base_dir == str(home / "data" / "dagster" / "compute_logs")
        assert instance.root_directory == str(home / "data" / "dagster")  # local artifact storage
        assert instance.run_monitoring_enabled
        # Every 10 s, not 120: a dead run's pool slot is freed that much sooner (bench/crash_recovery.py).
        assert instance.run_monitoring_poll_interval_seconds == 10
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 2
        pools = instance.get_concurrency_config().pool_config
        assert pools.default_pool_limit == 1
        assert isinstance(instance.run_coordinator, RunCoordinator)
        # Queued runs are looked for every second and launched at once, not every 5 s one
        # after another (Dagster's defaults): bench/sensor_burst.py measures what that saves.
        assert instance.run_coordinator.dequeue_interval_seconds == 1
        assert instance.run_coordinator.dequeue_use_threads
        # CPU engines (the shipped ones): one run per usable core, at least 2.
        cores = len(os.sched_getaffinity(0))
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == max(2, cores)
        assert not instance.telemetry_enabled
    assert (home / "data" / "dagster" / "storage").is_dir()


def test_the_run_queue_follows_voiceman_max_concurrent_runs(tmp_path, monkeypatch):
    home = tmp_path / "repo"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))  # where its relative paths are taken from
    monkeypatch.setenv("VOICEMAN_MAX_CONCURRENT_RUNS", "5")
    with DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 5
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1


def test_the_shipped_engines_put_the_analysis_step_in_no_pool():
    """The shipped engines (pocketsphinx, no emotion model) are CPU-only: the
    analysis step is in no pool, GPU or not, so runs go side by side
    (test_devices.py covers each other configuration, "gpu" included)."""
    assert (resources["stt"].engine, resources["ser"].model) == ("pocketsphinx", "")
    assert recording_analysis.op.pool is None
