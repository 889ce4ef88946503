"""``voiceman retire``: recordings set aside for good, kept for the record."""

from __future__ import annotations

from pathlib import Path

from dagster import AssetKey

from voiceman_pipeline.cli import retry_failed, unfinished_recordings
from voiceman_pipeline.retire import retire_command, retirements
from voiceman_pipeline.sensors import plan_for_inbox
from voiceman_pipeline.status import recording_statuses
from voiceman_pipeline_tests.conftest import SAMPLE_WAVS, drop
from voiceman_pipeline_tests.test_pipeline import run_batch


def statuses(instance, store, keys):
    return {row.key: row.status for row in recording_statuses(instance, store, keys)}


def audio_events(instance, event_type) -> int:
    records = instance.fetch_materializations if event_type == "m" else instance.fetch_observations
    return len(records(AssetKey("audio"), limit=1000).records)


def test_retired_recordings_are_left_alone_until_undone_or_replaced(instance, store, capsys):
    (store.inbox_dir / "bad.wav").write_bytes(b"garbage" * 100)  # corrupt: fails intake
    drop(store, SAMPLE_WAVS[0], "later.wav")  # registered, never run ("pending")
    keys = ["bad.wav", "later.wav"]
    instance.add_dynamic_partitions("audio_files", keys)
    assert not run_batch(instance, store, ["bad.wav"]).success
    before = statuses(instance, store, keys)
    assert before["bad.wav"].startswith("failed at audio: ") and before["later.wav"] == "pending"

    # Unknown keys: an error, and nothing retired.
    assert retire_command(instance, store, ["bad.wav", "nope.wav"], "x", undo=False) == 2
    assert "unknown recording(s): nope.wav" in capsys.readouterr().err
    assert retirements(instance, keys) == {}
    assert retire_command(instance, store, ["bad.wav"], None, undo=False) == 2  # no reason

    assert retire_command(instance, store, keys, "deleted at the client's request", undo=False) == 0
    assert statuses(instance, store, keys) == dict.fromkeys(keys, "retired: deleted at the client's request")

    # Nothing picks them up again: not retry-failed, not `run`'s unfinished
    # recordings, not the inbox sensor (their files are unchanged).
    runs, materializations = len(instance.get_runs()), audio_events(instance, "m")
    assert retry_failed(instance, store, 8, {}) == 0
    assert "No failed recordings." in capsys.readouterr().out
    assert unfinished_recordings(instance, keys, failed_too=keys) == []
    plan, _, _ = plan_for_inbox(instance, store, None, max_new=100, settled_after_s=0)
    assert plan.ready == []
    assert (len(instance.get_runs()), audio_events(instance, "m")) == (runs, materializations)
    # A run launched for them anyway (the UI still lists bad.wav among the
    # failed partitions) skips both: no new intake attempt, still retired.
    observed = audio_events(instance, "o")
    assert run_batch(instance, store, keys).success
    assert (audio_events(instance, "m"), audio_events(instance, "o")) == (materializations, observed)
    assert statuses(instance, store, keys) == dict.fromkeys(keys, "retired: deleted at the client's request")
    # Kept for the record: the failure and the retirement are both in Dagster's history.
    observations = instance.fetch_observations(AssetKey("audio"), limit=100).records
    assert any("error" in r.asset_observation.metadata for r in observations)

    # Undone: back as they were, the failure's reason included.
    assert retire_command(instance, store, keys, None, undo=True) == 0
    assert statuses(instance, store, keys) == before
    assert unfinished_recordings(instance, keys) == ["later.wav"]

    # Retired again, then the file is replaced by a good recording and taken
    # in: the new intake un-retires it.
    assert retire_command(instance, store, ["bad.wav"], "corrupt", undo=False) == 0
    drop(store, SAMPLE_WAVS[0], "bad.wav")
    plan, _, _ = plan_for_inbox(instance, store, None, max_new=100, settled_after_s=0)
    assert [ready.file.key for ready in plan.ready] == ["bad.wav"]
    assert run_batch(instance, store, ["bad.wav"], selection=[AssetKey("audio")]).success
    assert retirements(instance, keys) == {}
    assert statuses(instance, store, ["bad.wav"])["bad.wav"] != "retired: corrupt"


def test_voiceman_retire_command(env):
    import pandas as pd

    from voiceman_pipeline_tests.test_cli import BIN, run

    data = Path(env["VOICEMAN_DATA_DIR"])
    (data / "inbox" / "bad.wav").write_bytes(b"garbage" * 100)
    run([BIN / "voiceman", "ingest", "--settle", "0"], env)  # registered, not run
    unknown = run([BIN / "voiceman", "retire", "bad.wav", "nope.wav", "--reason", "x"], env, check=False)
    assert unknown.returncode == 2 and "unknown recording(s): nope.wav" in unknown.stderr
    out = run([BIN / "voiceman", "retire", "bad.wav", "--reason", "not audio"], env)
    assert "bad.wav: retired: not audio" in out.stdout
    # The summary was refreshed: the recording is listed as retired.
    summary = pd.read_csv(data / "outputs" / "summary.csv")
    assert summary.to_dict("list")["status"] == ["retired: not audio"]
