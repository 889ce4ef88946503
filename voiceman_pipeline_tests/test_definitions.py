"""The code location loads, cheaply, with every asset, sensor and partition set."""

from __future__ import annotations

import subprocess
import sys

from dagster import AssetKey, DynamicPartitionsDefinition

from voiceman_pipeline.definitions import defs


def test_every_asset_sensor_job_and_partition_set_is_defined():
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert {"audio", "transcript", "forensic", "emotion", "report", "summary"} <= keys
    for name in ("audio", "transcript", "forensic", "emotion", "report"):
        partitions = graph.get(AssetKey(name)).partitions_def
        assert isinstance(partitions, DynamicPartitionsDefinition)
        assert partitions.name == "audio_files"
    assert graph.get(AssetKey("summary")).partitions_def is None
    assert {sensor.name for sensor in defs.sensors} == {
        "inbox_sensor", "dead_cli_runs_sensor", "failure_brake_sensor", "summary_sensor"}
    assert {job.name for job in defs.jobs} == {"analysis_job", "summary_job"}
    # The sensor's runs go through analysis_job, whose assets are the five stages.
    assert [t.job_name for t in defs.resolve_sensor_def("inbox_sensor").targets] == ["analysis_job"]
    job_keys = {k.to_user_string() for k in defs.resolve_job_def("analysis_job").asset_layer.executable_asset_keys}
    assert job_keys == {"audio", "transcript", "forensic", "emotion", "report"}
    assert set(defs.resources) >= {"store", "stt", "ser", "acoustic", "memory"}


def test_loading_the_code_location_loads_no_model():
    # A fresh interpreter: importing the definitions must not import the
    # speech engines' heavy libraries, let alone load a model.
    code = (
        "import sys, voiceman_pipeline.definitions\n"
        "heavy = {'torch', 'transformers', 'faster_whisper', 'ctranslate2', 'pocketsphinx', 'parselmouth'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
