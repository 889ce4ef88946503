"""Two ``voiceman run`` at once on the same inbox, in real processes."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance

from voiceman_pipeline_tests.conftest import REPO, SAMPLE_WAVS
from voiceman_pipeline_tests.test_cli import BIN

STAGES = ["audio", "transcript", "forensic", "emotion", "report"]


@pytest.mark.timeout(300)
def test_two_runs_at_once_compute_each_result_once(env):
    """Each command with two workers (two batches side by side): four runs at
    once over the same recordings."""
    inbox = Path(env["VOICEMAN_DATA_DIR"]) / "inbox"
    keys = [f"same{i}.wav" for i in range(6)]
    for i, key in enumerate(keys):
        (inbox / key).write_bytes(SAMPLE_WAVS[i % len(SAMPLE_WAVS)].read_bytes())
    command = [BIN / "voiceman", "run", "--settle", "0.2", "--workers", "2", "--batch-size", "3"]
    first, second = (
        subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    )
    outputs = [process.communicate(timeout=240) for process in (first, second)]
    for process, (out, err) in zip((first, second), outputs):
        assert process.returncode == 0, out + err
        assert "Traceback" not in out + err
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        assert sorted(instance.get_dynamic_partitions("audio_files")) == keys
        counts: Counter = Counter()
        for stage in STAGES:
            for record in instance.fetch_materializations(AssetKey(stage), limit=1000).records:
                counts[(stage, record.partition_key)] += 1
    assert len(counts) == len(keys) * len(STAGES)
    assert set(counts.values()) == {1}, counts  # nothing computed twice


@pytest.mark.timeout(300)
def test_voiceman_run_beside_the_sensors_run_computes_each_result_once(tmp_path, monkeypatch):
    """The sensor's run (executed here as the daemon would, in a thread) and
    ``voiceman run`` (a process) on the same new recordings, at the same time,
    on an instance configured as the shipped dagster.yaml (``gpu`` pool of 1)."""
    import dataclasses
    import os
    import threading

    from dagster import build_sensor_context, materialize

    from voiceman_pipeline.definitions import defs, recording_analysis
    from voiceman_pipeline.resources.outputs import RecordingStore
    from voiceman_pipeline.sensors import build_inbox_sensor
    from voiceman_pipeline.settings import Settings
    from voiceman_pipeline_tests.conftest import POOL_OF_ONE_YAML, shipped_storage_yaml

    home, data = tmp_path / "home", tmp_path / "data"
    home.mkdir()
    (home / "dagster.yaml").write_text(shipped_storage_yaml(home) + POOL_OF_ONE_YAML)
    (data / "inbox").mkdir(parents=True)
    keys = [f"both{i}.wav" for i in range(6)]
    for i, key in enumerate(keys):
        (data / "inbox" / key).write_bytes(SAMPLE_WAVS[i % len(SAMPLE_WAVS)].read_bytes())
    store = RecordingStore(data_dir=str(data))
    sensor = build_inbox_sensor(dataclasses.replace(Settings.from_env(), batch_size=8))
    monkeypatch.setattr("voiceman_pipeline.sensors.analysis_slots", lambda instance, settings: 1)  # one run of all six
    env = {**os.environ, "DAGSTER_HOME": str(home), "VOICEMAN_DATA_DIR": str(data), "PYTHONPATH": str(REPO)}

    with DagsterInstance.from_config(str(home)) as instance:
        cursor = None
        for _ in range(2):  # two ticks: the files are stable, registered and requested
            result = sensor(build_sensor_context(instance=instance, cursor=cursor, resources={"store": store}))
            for request in result.dynamic_partitions_requests or []:
                instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
            cursor = result.cursor
        (request,) = result.run_requests

        outcome = {}

        def daemon_run():
            outcome["sensor"] = materialize(
                [recording_analysis], instance=instance, tags=request.tags,
                resources={**defs.resources, "store": store}, raise_on_error=False,
            ).success

        thread = threading.Thread(target=daemon_run)
        thread.start()
        cli = subprocess.run(
            [BIN / "voiceman", "run", "--settle", "0.2"], cwd=REPO, env=env,
            capture_output=True, text=True, timeout=240,
        )
        thread.join(240)
        assert outcome["sensor"] and cli.returncode == 0, cli.stdout + cli.stderr
        assert "Traceback" not in cli.stdout + cli.stderr
        counts: Counter = Counter()
        for stage in STAGES:
            for record in instance.fetch_materializations(AssetKey(stage), limit=1000).records:
                counts[(stage, record.partition_key)] += 1
    assert len(counts) == len(keys) * len(STAGES)
    assert set(counts.values()) == {1}, counts
