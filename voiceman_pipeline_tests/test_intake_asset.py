"""The ``audio`` intake through Dagster, on real samples and on bad files."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import soundfile
from dagster import AssetKey, AssetPartitionStatus, DagsterEventType, materialize

from voiceman_pipeline.definitions import recording_analysis
from voiceman_pipeline.definitions import defs
from voiceman_pipeline.partitions import audio_files
from voiceman_pipeline_tests.conftest import SAMPLE_WAVS, drop
from voiceman_pipeline_tests.test_audio_io import BAD_FILES

AUDIO = AssetKey("audio")


def resources(store):
    return {**defs.resources, "store": store}


def run_audio(instance, store, keys):
    """Materialize only ``audio`` for ``keys`` in one run (a partition range)."""
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    return materialize(
        [recording_analysis],
        selection=[AUDIO],
        instance=instance,
        resources=resources(store),
        tags={ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]},
        raise_on_error=False,
    )


def test_intake_of_real_samples_records_duration_and_hash(instance, store):
    keys = [drop(store, path).name for path in SAMPLE_WAVS]
    instance.add_dynamic_partitions("audio_files", keys)
    result = run_audio(instance, store, keys)
    assert result.success
    for path in SAMPLE_WAVS:
        record = instance.fetch_materializations(AssetKey("audio"), limit=100).records
        meta = {r.partition_key: r.asset_materialization.metadata for r in record}[path.name]
        expected = soundfile.info(str(path)).duration
        assert math.isclose(meta["duration_s"].value, expected, rel_tol=0.01)
        assert meta["sha256"].value == hashlib.sha256(path.read_bytes()).hexdigest()
        assert meta["memory_peak_mb"].value >= meta["memory_start_mb"].value
        intake = json.loads(store.output_path(path.name, "audio.json").read_text())
        assert intake["sha256"] == meta["sha256"].value
        assert intake["codec"] == "pcm_s16le" and intake["channels"] == 1
        assert store.output_path(path.name, "audio_16k.npy").is_file()


def test_bad_files_fail_alone_without_retry(instance, store, tmp_path):
    good = drop(store, SAMPLE_WAVS[0]).name
    bad_keys = []
    for name, (make, _) in sorted(BAD_FILES.items()):
        make(store.inbox_dir / name)
        bad_keys.append(name)
    keys = [good] + bad_keys
    instance.add_dynamic_partitions("audio_files", keys)
    result = run_audio(instance, store, keys)
    assert not result.success
    status = instance.get_status_by_partition(AUDIO, keys, audio_files)
    assert status[good] == AssetPartitionStatus.MATERIALIZED
    assert {status[k] for k in bad_keys} == {AssetPartitionStatus.FAILED}
    # Permanent errors: one attempt, no step retry.
    records = instance.get_records_for_run(result.run_id).records
    types = [r.event_log_entry.dagster_event.event_type for r in records if r.event_log_entry.dagster_event]
    assert DagsterEventType.STEP_UP_FOR_RETRY not in types
    failure = result.get_step_failure_events()[0].step_failure_data.user_failure_data
    for name, (_, message) in BAD_FILES.items():
        assert name in failure.description
        assert message in failure.description  # each says what is wrong
    assert not store.output_path(bad_keys[0], "audio.json").exists()
    # Decoded straight to a temporary file: a refused recording leaves nothing,
    # not even a partial signal or its temporary file.
    for key in bad_keys:
        folder = store.file_dir(key)
        assert not (folder.exists() and list(folder.iterdir())), key
    assert np.load(store.output_path(good, "audio_16k.npy"), mmap_mode="r").dtype == np.float32
