"""The shipped dagster.yaml: valid, storage under data/dagster/, GPU pool limited."""

from __future__ import annotations

import shutil

from dagster import DagsterInstance

from voiceman_pipeline.definitions import recording_analysis
from voiceman_pipeline_tests.conftest import REPO


def test_instance_config_loads_and_keeps_state_in_the_data_dir(tmp_path, monkeypatch):
    home = tmp_path / "repo"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.chdir(home)  # relative paths in dagster.yaml are taken from here
    with DagsterInstance.from_config(str(home)) as instance:
        assert str(home / "data" / "dagster" / "storage") in instance.run_storage._conn_string
        assert instance.run_monitoring_enabled
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 2
        pools = instance.get_concurrency_config().pool_config
        assert pools.default_pool_limit == 1
        assert not instance.telemetry_enabled
    assert (home / "data" / "dagster" / "storage").is_dir()


def test_the_analysis_step_is_in_the_gpu_pool():
    assert recording_analysis.op.pool == "gpu"
