"""``inbox_sensor`` through build_sensor_context with a real test instance."""

from __future__ import annotations

import dataclasses
import os

import pytest

from dagster import SensorResult, build_sensor_context

from voiceman_pipeline.inbox import partition_key_for
from voiceman_pipeline.resources.outputs import RecordingStore
from voiceman_pipeline.sensors import build_inbox_sensor
from voiceman_pipeline.settings import Settings
from voiceman_pipeline.validate import validate_inbox
from voiceman_pipeline_tests.conftest import drop

# One run per file keeps these assertions simple; batching has its own test.
SETTINGS = dataclasses.replace(Settings.from_env(), max_new_per_tick=100, batch_size=1)


def tick(instance, store, cursor=None, settings=SETTINGS) -> SensorResult:
    """One sensor evaluation; partition requests applied as the daemon would."""
    sensor = build_inbox_sensor(settings)
    context = build_sensor_context(instance=instance, cursor=cursor, resources={"store": store})
    result = sensor(context)
    assert isinstance(result, SensorResult)
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def settled_tick(instance, store, cursor=None):
    """Two ticks: the first notes sizes, the second finds them unchanged."""
    first = tick(instance, store, cursor)
    return tick(instance, store, first.cursor)


def run_keys(result: SensorResult) -> list[str]:
    return [r.partition_key for r in result.run_requests or []]


def test_new_file_is_registered_and_requested(instance, store):
    drop(store, "cards_001.wav")
    first = tick(instance, store)
    assert not first.run_requests  # seen once: might still be growing
    second = tick(instance, store, first.cursor)
    assert run_keys(second) == ["cards_001.wav"]
    request = second.run_requests[0]
    assert request.run_key.startswith("cards_001.wav:")
    assert instance.get_dynamic_partitions("audio_files") == ["cards_001.wav"]
    again = tick(instance, store, second.cursor)
    assert not again.run_requests  # nothing new


def test_growing_file_is_not_picked_up(instance, store):
    path = drop(store, "cards_002.wav")
    cursor = None
    for _ in range(3):
        result = tick(instance, store, cursor)
        assert not result.run_requests
        with open(path, "ab") as handle:  # a copy still in progress
            handle.write(b"\0" * 4096)
        cursor = result.cursor
    assert instance.get_dynamic_partitions("audio_files") == []
    # Writing stopped: the next look notes the final size, the one after agrees.
    assert run_keys(settled_tick(instance, store, cursor)) == ["cards_002.wav"]


def test_changed_content_reruns_but_identical_redrop_does_not(instance, store):
    path = drop(store, "cards_001.wav", "call.wav")
    done = settled_tick(instance, store)
    original_run_key = done.run_requests[0].run_key

    # Identical bytes dropped again (new mtime): re-hashed, not re-run.
    drop(store, "cards_001.wav", "call.wav")
    os.utime(path, ns=(1, 1))
    same = settled_tick(instance, store, done.cursor)
    assert not same.run_requests

    # Different content under the same name: the same key, a new run.
    drop(store, "cards_002.wav", "call.wav")
    changed = settled_tick(instance, store, same.cursor)
    assert run_keys(changed) == ["call.wav"]
    assert changed.run_requests[0].run_key != original_run_key
    assert not any(r.partition_keys for r in changed.dynamic_partitions_requests if r.partition_keys)


def test_symlink_escaping_the_inbox_is_rejected(instance, store, tmp_path):
    outside = tmp_path / "elsewhere.wav"
    outside.write_bytes((store.inbox_dir.parent / "x").as_posix().encode())
    os.symlink(outside, store.inbox_dir / "escape.wav")
    drop(store, "cards_001.wav")
    result = settled_tick(instance, store)
    assert run_keys(result) == ["cards_001.wav"]


def test_oversized_file_is_skipped(instance, store):
    small = RecordingStore(data_dir=store.data_dir, max_file_bytes=40_000)
    drop(small, "cards_001.wav")  # 35 kB
    drop(small, "cards_002.wav")  # 63 kB: over the limit
    result = settled_tick(instance, small)
    assert run_keys(result) == ["cards_001.wav"]


def test_awkward_names_become_safe_unique_partitions(instance, store):
    names = ["call one.wav", "통화.wav", "a,b.wav", "a..b.wav", "call_one.wav", "x" * 240 + ".wav"]
    for name in names:
        drop(store, "cards_001.wav", name)
    result = settled_tick(instance, store)
    keys = run_keys(result)
    assert sorted(keys) == sorted(partition_key_for(n) for n in names)
    assert len(set(keys)) == len(names)
    assert sorted(instance.get_dynamic_partitions("audio_files")) == sorted(keys)


def test_new_partitions_per_tick_are_capped(instance, store):
    for i in range(5):
        drop(store, "cards_001.wav", f"call{i}.wav")
    capped = dataclasses.replace(SETTINGS, max_new_per_tick=2)
    first = tick(instance, store, settings=capped)
    second = tick(instance, store, first.cursor, settings=capped)
    third = tick(instance, store, second.cursor, settings=capped)
    assert len(second.run_requests) == 2 and len(third.run_requests) == 2
    assert len(instance.get_dynamic_partitions("audio_files")) == 4


@pytest.mark.storage
def test_ready_files_are_batched_into_partition_range_runs(instance, store, monkeypatch):
    from dagster import AssetKey, AssetPartitionStatus, materialize

    from voiceman_pipeline.definitions import recording_analysis
    from voiceman_pipeline.definitions import defs
    from voiceman_pipeline.partitions import audio_files

    for i in range(5):
        drop(store, "cards_001.wav", f"call{i}.wav")
    batched = dataclasses.replace(SETTINGS, batch_size=2)
    # One run at a time (the test instance's queue would allow 10: test_devices reads it).
    monkeypatch.setattr("voiceman_pipeline.sensors.analysis_slots", lambda instance, settings: 1)
    first = tick(instance, store, settings=batched)
    result = tick(instance, store, first.cursor, settings=batched)
    ranges = [
        (r.partition_key,) if r.partition_key else
        (r.tags["dagster/asset_partition_range_start"], r.tags["dagster/asset_partition_range_end"])
        for r in result.run_requests
    ]
    assert ranges == [("call0.wav", "call1.wav"), ("call2.wav", "call3.wav"), ("call4.wav",)]
    assert len({r.run_key for r in result.run_requests}) == 3

    # The request's tags make one run over exactly its range.
    run = materialize(
        [recording_analysis],
        selection=[AssetKey("audio")],
        instance=instance,
        resources={**defs.resources, "store": store},
        tags=result.run_requests[1].tags,
    )
    keys = [f"call{i}.wav" for i in range(5)]
    status = instance.get_status_by_partition(AssetKey("audio"), keys, audio_files)
    assert run.success
    assert [k for k in keys if status[k] == AssetPartitionStatus.MATERIALIZED] == ["call2.wav", "call3.wav"]


def test_ready_files_are_shared_evenly_among_the_runs_the_queue_lets_go_at_once(instance, store, monkeypatch):
    """Six calls, batches of up to 8, a run queue of two runs at a time (its limit,
    ``devices.analysis_slots``, is read in test_devices): two runs of 3, so both run
    slots work, not one run of 6."""
    for i in range(6):
        drop(store, "cards_001.wav", f"call{i}.wav")
    batched = dataclasses.replace(SETTINGS, batch_size=8)
    monkeypatch.setattr("voiceman_pipeline.sensors.analysis_slots", lambda instance, settings: 2)
    result = tick(instance, store, tick(instance, store, settings=batched).cursor, settings=batched)
    ranges = [(r.tags["dagster/asset_partition_range_start"], r.tags["dagster/asset_partition_range_end"])
              for r in result.run_requests]
    assert ranges == [("call0.wav", "call2.wav"), ("call3.wav", "call5.wav")]


def test_rejected_files_are_logged_with_their_reason(instance, store, tmp_path):
    import logging

    outside = tmp_path / "elsewhere.wav"
    outside.write_bytes(b"RIFF")
    os.symlink(outside, store.inbox_dir / "escape.wav")
    small = RecordingStore(data_dir=store.data_dir, max_file_bytes=40_000)
    drop(small, "cards_002.wav")  # 63 kB: over the limit

    class Collect(logging.Handler):
        messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    context = build_sensor_context(instance=instance, resources={"store": small})
    context.log.addHandler(Collect())  # the sensor's logger does not propagate
    first = build_inbox_sensor(SETTINGS)(context)
    logged = "\n".join(Collect.messages)
    assert "skipped 'escape.wav': is a symbolic link" in logged
    assert "skipped 'cards_002.wav': is 61.3 KiB, over the 39.1 KiB limit (VOICEMAN_MAX_FILE_MB" in logged
    # Refused, not waiting to settle: later looks register and run neither.
    later = settled_tick(instance, small, first.cursor)
    assert not later.run_requests and not later.dynamic_partitions_requests
    assert instance.get_dynamic_partitions("audio_files") == []


def test_a_missing_inbox_is_a_warning_and_keeps_the_cursor(instance, store):
    """An unmounted share or a wrong VOICEMAN_DATA_DIR once read "no new or changed
    recordings": a quiet day. Files waiting to settle still count once it is back."""
    import logging

    drop(store, "cards_001.wav")
    first = build_inbox_sensor(SETTINGS)(build_sensor_context(instance=instance, resources={"store": store}))
    assert first.cursor  # cards_001.wav seen once, waiting for a second look
    store.inbox_dir.rename(store.data_dir + "/unmounted")

    class Collect(logging.Handler):
        messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    context = build_sensor_context(instance=instance, resources={"store": store}, cursor=first.cursor)
    context.log.addHandler(Collect())
    result = build_inbox_sensor(SETTINGS)(context)
    assert f"the inbox {str(store.inbox_dir)!r} is not there" in result.skip_reason.skip_message
    assert any("mount it, or check VOICEMAN_DATA_DIR" in m for m in Collect.messages)
    assert result.cursor == first.cursor and not result.run_requests


def test_a_pipe_a_linked_folder_and_a_name_not_utf8_are_refused_and_the_rest_taken_in(
    instance, store, tmp_path
):
    """Each is refused with its reason on every tick, and the recordings beside
    them are registered and run (a pipe in the inbox once failed every tick)."""
    inbox = store.inbox_dir
    os.mkfifo(inbox / "pipe.wav")  # reading it to hash it would block the tick
    (tmp_path / "elsewhere").mkdir()
    drop(store, "cards_002.wav").rename(tmp_path / "elsewhere" / "inside_link.wav")
    os.symlink(tmp_path / "elsewhere", inbox / "linked")
    not_utf8 = os.fsdecode(b"caf\xe9 latin-1.wav")  # a name written by a Latin-1 system
    drop(store, "cards_001.wav").rename(inbox / not_utf8)
    drop(store, "cards_001.wav")
    first = tick(instance, store)
    assert not first.run_requests
    second = tick(instance, store, first.cursor)
    assert run_keys(second) == ["cards_001.wav"]
    assert instance.get_dynamic_partitions("audio_files") == ["cards_001.wav"]
    validation = validate_inbox(store)
    assert {f.relative_path: f.reason for f in validation.failures} == {
        "pipe.wav": "is not a regular file (a pipe, socket or device); copy the recording into the inbox",
        "linked": "is a symbolic link to a folder, whose recordings are not taken in; copy them "
                  "into the inbox",
        "caf\\xe9 latin-1.wav": "its name is not valid UTF-8 (shown with \\x escapes); rename the file",
    }


def test_a_file_that_cannot_be_read_when_hashed_is_refused_not_fatal(instance, store, monkeypatch):
    """A file that changes under the scan (deleted, swapped for a pipe) between
    its listing and its hashing is refused for this tick; the others go on."""
    from voiceman_pipeline import inbox as inbox_module

    drop(store, "cards_001.wav")
    drop(store, "cards_002.wav")
    first = tick(instance, store)
    real_hash = inbox_module.sha256_file

    def hash_after_deleting(path):
        if path.name == "cards_002.wav":
            path.unlink()  # gone between the scan and the hash
        return real_hash(path)

    monkeypatch.setattr(inbox_module, "sha256_file", hash_after_deleting)
    second = tick(instance, store, first.cursor)
    assert run_keys(second) == ["cards_001.wav"]
