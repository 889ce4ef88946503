"""``voiceman pause`` / ``resume``: the CLI, ``dagster sensor list``, GraphQL (the
UI) and the sensor daemon agree on whether the inbox sensor runs."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dagster import DagsterInstance
from dagster._core.test_utils import load_remote_repo

from voiceman_pipeline.intake_control import PAUSED_LINE, SENSOR_NAME
from voiceman_pipeline_tests.conftest import POOL_OF_ONE_YAML, REPO, SAMPLE_WAVS, shipped_storage_yaml

BIN = Path(sys.executable).parent
# Runs the sensor requests are queued, never launched: no daemon dequeues them here.
QUEUED_YAML = POOL_OF_ONE_YAML + """\
run_coordinator:
  module: dagster._core.run_coordinator
  class: QueuedRunCoordinator
"""
SENSOR_QUERY = """
query ($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) { ... on Sensor { sensorState { status } } }
}
"""


@pytest.fixture
def env(tmp_path, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(shipped_storage_yaml(home) + QUEUED_YAML)
    data = tmp_path / "data"
    (data / "inbox").mkdir(parents=True)
    variables = {"DAGSTER_HOME": str(home), "VOICEMAN_DATA_DIR": str(data), "PYTHONPATH": str(REPO)}
    for name, value in variables.items():  # the daemon's code server inherits these
        monkeypatch.setenv(name, value)
    return {**os.environ, **variables}


def run(args, env):
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{args} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def listed_status(env) -> str:
    """The inbox sensor's status as `dagster sensor list -w workspace.yaml` prints it."""
    out = run([BIN / "dagster", "sensor", "list", "-w", "workspace.yaml"], env)
    line = next(line for line in out.splitlines() if f"Sensor: {SENSOR_NAME} " in line)
    return line.rsplit("[", 1)[1].rstrip("]")


def daemon_tick(context) -> None:
    """One pass of the sensor daemon over the workspace, in this process."""
    from dagster._daemon.sensor import execute_sensor_iteration

    for _ in execute_sensor_iteration(context, logging.getLogger("test"), None, None):
        pass


def ui_status(context) -> str:
    from dagster_graphql.test.utils import execute_dagster_graphql

    selector = {
        "repositoryLocationName": "voiceman_pipeline",
        "repositoryName": "__repository__",
        "sensorName": SENSOR_NAME,
    }
    result = execute_dagster_graphql(
        context.create_request_context(), SENSOR_QUERY, {"selector": selector}
    )
    assert not result.errors, result.errors
    return result.data["sensorOrError"]["sensorState"]["status"]


def inbox_ticks(instance, context) -> list:
    sensor = load_remote_repo(context, "__repository__").get_sensor(SENSOR_NAME)
    return instance.get_ticks(sensor.get_remote_origin_id(), sensor.selector_id)


def add_state_as_dagster_sensor_stop_without_w(instance):
    """The row `dagster sensor stop inbox_sensor` (no -w) writes on a fresh
    instance: pyproject's load target, whose working directory is absolute, so
    its origin id differs from workspace.yaml's ('.') and `dagster sensor list
    -w workspace.yaml` kept showing RUNNING (the users' report)."""
    from dagster._core.definitions.run_request import InstigatorType
    from dagster._core.definitions.sensor_definition import SensorType
    from dagster._core.remote_origin import (
        ManagedGrpcPythonEnvCodeLocationOrigin,
        RemoteInstigatorOrigin,
        RemoteRepositoryOrigin,
    )
    from dagster._core.scheduler.instigation import (
        InstigatorState,
        InstigatorStatus,
        SensorInstigatorData,
    )
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    location = ManagedGrpcPythonEnvCodeLocationOrigin(
        LoadableTargetOrigin(
            module_name="voiceman_pipeline.definitions", working_directory=str(REPO)
        ),
        location_name="voiceman_pipeline",
    )
    repository = RemoteRepositoryOrigin(
        code_location_origin=location, repository_name="__repository__"
    )
    origin = RemoteInstigatorOrigin(repository_origin=repository, instigator_name=SENSOR_NAME)
    data = SensorInstigatorData(min_interval=30, sensor_type=SensorType.STANDARD)
    return instance.add_instigator_state(
        InstigatorState(origin, InstigatorType.SENSOR, InstigatorStatus.STOPPED, data)
    )


def test_pause_and_resume_agree_everywhere_and_gate_the_daemon(env):
    from dagster._core.test_utils import create_test_daemon_workspace_context
    from dagster._core.workspace.load_target import WorkspaceFileTarget

    with DagsterInstance.get() as instance:
        stale = add_state_as_dagster_sensor_stop_without_w(instance)

    paused = subprocess.run([BIN / "voiceman", "pause"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert "STOPPED" in paused.stdout
    # The code server it starts for a moment logs at WARNING: no four coloured INFO lines.
    assert "dagster.code_server" not in paused.stdout + paused.stderr, paused.stdout + paused.stderr
    assert listed_status(env) == "STOPPED"
    assert PAUSED_LINE in run([BIN / "voiceman", "status"], env).splitlines()

    recording = Path(env["VOICEMAN_DATA_DIR"]) / "inbox" / "call.wav"
    recording.write_bytes(SAMPLE_WAVS[0].read_bytes())
    an_hour_ago = time.time() - 3600  # settled: the sensor takes it at its first look
    os.utime(recording, (an_hour_ago, an_hour_ago))

    with (
        DagsterInstance.get() as instance,
        create_test_daemon_workspace_context(
            WorkspaceFileTarget(paths=[str(REPO / "workspace.yaml")]), instance
        ) as context,
    ):
        assert ui_status(context) == "STOPPED"
        [state] = [s for s in instance.all_instigator_state() if s.selector_id == stale.selector_id]
        workspace_sensor = load_remote_repo(context, "__repository__").get_sensor(SENSOR_NAME)
        assert stale.selector_id == workspace_sensor.selector_id  # the same sensor to the daemon
        assert state.instigator_origin_id == workspace_sensor.get_remote_origin_id()  # adopted
        assert stale.instigator_origin_id != state.instigator_origin_id
        daemon_tick(context)
        assert inbox_ticks(instance, context) == []  # the daemon skipped it
        assert instance.get_dynamic_partitions("audio_files") == []
        assert instance.get_runs() == []

        assert "RUNNING" in run([BIN / "voiceman", "resume"], env)
        assert listed_status(env) == "RUNNING"
        assert ui_status(context) == "RUNNING"
        daemon_tick(context)
        assert instance.get_dynamic_partitions("audio_files") == ["call.wav"]
        [queued] = instance.get_runs()
        assert queued.tags.get("dagster/partition") == "call.wav"
        assert len(inbox_ticks(instance, context)) == 1
