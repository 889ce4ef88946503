"""Two ``voiceman run`` at once on the same inbox, in real processes."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance

from voiceman_pipeline_tests.conftest import REPO, SAMPLE_WAVS
from voiceman_pipeline_tests.test_cli import BIN, env  # noqa: F401  (the fixture)

STAGES = ["audio", "transcript", "forensic", "emotion", "report"]


@pytest.mark.timeout(300)
def test_two_runs_at_once_compute_each_result_once(env):  # noqa: F811
    inbox = Path(env["VOICEMAN_DATA_DIR"]) / "inbox"
    keys = [f"same{i}.wav" for i in range(6)]
    for i, key in enumerate(keys):
        (inbox / key).write_bytes(SAMPLE_WAVS[i % len(SAMPLE_WAVS)].read_bytes())
    command = [BIN / "voiceman", "run", "--settle", "0.2"]
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
