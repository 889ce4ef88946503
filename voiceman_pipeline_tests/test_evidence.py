"""Evidence kept: real runs of the chain on sample recordings, then the
recording or its results changed behind the pipeline's back."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys

from pathlib import Path

import pandas as pd
from dagster import AssetKey, AssetMaterialization, MetadataValue, materialize
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from voiceman_pipeline.audio_io import sha256_file
from voiceman_pipeline.evidence import (
    RESULT_FILES,
    dagster_command,
    keep_earlier_results,
    repair_commands,
    verify_all,
    verify_command,
)
from voiceman_pipeline.resources.engines import SpeechToText
from voiceman_pipeline.retire import retire
from voiceman_pipeline_tests.conftest import SAMPLE_WAVS, drop
from voiceman_pipeline_tests.test_pipeline import (
    STAGES,
    latest_metadata,
    materialization_count,
    recording_analysis,
    resources,
    run_batch,
    run_logs,
)
from voiceman_pipeline_tests.test_summary import summary_metadata

CHAINED_JSON = ("transcript.json", "forensic.json", "emotion.json", "report.json")


def snapshot(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in RESULT_FILES}


def test_verify_names_each_recording_and_result_that_changed_after_it_was_recorded(
    instance, store, capsys
):
    keys = ["call.wav", "other.wav", "gone.wav"]
    paths = [drop(store, SAMPLE_WAVS[i % 2], key) for i, key in enumerate(keys)]
    instance.add_dynamic_partitions("audio_files", keys)
    assert run_batch(instance, store, keys).success
    assert verify_all(instance, store) == []
    assert verify_command(instance, store) == 0
    assert capsys.readouterr().out == "all 3 recordings and their results match what was recorded\n"

    # Other bytes, same size and modification time: only re-hashing notices.
    path, stat = paths[0], paths[0].stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    forensic = store.output_path("other.wav", "forensic.json")
    forensic.write_text(forensic.read_text().replace('"risk_level": "', '"risk_level": "x'))
    store.output_path("call.wav", "report.png").unlink()
    paths[2].unlink()

    recorded_png = latest_metadata(instance, "report", "call.wav")["output_sha256"]["report.png"]
    mismatches = {(m.key, m.what): m for m in verify_all(instance, store)}
    assert set(mismatches) == {
        ("call.wav", "recording"),
        ("call.wav", "report/report.png"),
        ("other.wav", "forensic/forensic.json"),
        ("gone.wav", "recording"),
    }
    call = mismatches["call.wav", "recording"]
    assert (call.expected, call.found) == (sha256_file(SAMPLE_WAVS[0]), sha256_file(path))
    png = mismatches["call.wav", "report/report.png"]
    assert (png.expected, png.found) == (recorded_png, "missing")
    assert mismatches["other.wav", "forensic/forensic.json"].found == sha256_file(forensic)
    assert mismatches["gone.wav", "recording"].found == "gone from the inbox"
    # `voiceman status`: still done (its results stand), with the loss in its custody column.
    from voiceman_pipeline.cli import print_status

    capsys.readouterr()
    print_status(instance, store, ["gone.wav", "other.wav"])
    gone_row, other_row = capsys.readouterr().out.splitlines()[2:]
    assert " done " in gone_row and gone_row.rstrip().endswith("RECORDING GONE FROM INBOX: see voiceman verify")
    assert "GONE" not in other_row and other_row.rstrip().endswith(" -")

    assert verify_command(instance, store) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 + 4
    gone = f"gone.wav: recording: recorded {sha256_file(SAMPLE_WAVS[0])}, found gone from the inbox"
    assert gone in lines
    # The dagster beside this Python (a .venv's bin is often not on PATH), with the home.
    dagster = dagster_command()
    assert dagster.endswith(str(Path(sys.executable).parent / "dagster"))
    assert dagster.startswith(f"DAGSTER_HOME={os.environ['DAGSTER_HOME']} ")
    materialize_cli = f"{dagster} asset materialize -m voiceman_pipeline.definitions --select"
    assert lines[4:] == [  # call.wav's damaged report goes with its new intake
        f"to take in call.wav's changed recording and compute its results again: {materialize_cli}"
        " audio --partition call.wav",
        "gone.wav's recording is gone from the inbox: put it back as it was, or, if it is gone for"
        ' good, set it aside: voiceman retire gone.wav --reason "..."',
        f"to compute other.wav's results again: {materialize_cli} forensic --partition other.wav",
        "then `voiceman run` brings the summary up to date",
    ]
    # What those commands run puts each right: the damaged result alone; the
    # changed recording (same size and mtime) with every result computed from it.
    emotion_before = store.output_path("other.wav", "emotion.json").stat().st_mtime_ns
    assert run_batch(instance, store, ["other.wav"], selection=[AssetKey("forensic")]).success
    assert ("other.wav", "forensic/forensic.json") not in {(m.key, m.what) for m in verify_all(instance, store)}
    assert store.output_path("other.wav", "emotion.json").stat().st_mtime_ns == emotion_before
    assert run_batch(instance, store, ["call.wav"], selection=[AssetKey("audio")]).success
    assert {m.key for m in verify_all(instance, store)} == {"gone.wav"}
    assert [materialization_count(instance, s, "call.wav") for s in STAGES] == [2, 2, 2, 2, 2]
    # What the advice says for the deleted one: retired, it is set aside, not checked.
    retire(instance, store, ["gone.wav"], "deleted at the client's request")
    capsys.readouterr()
    assert verify_command(instance, store) == 0
    assert capsys.readouterr().out.splitlines() == [
        "all 2 recordings and their results match what was recorded",
        "1 retired recording(s) not checked (voiceman status lists them)"]


def test_a_result_that_records_no_inputs_is_named_as_such_and_computed_again(instance, store):
    """A report as an earlier version wrote it, naming no upstream files it was
    computed from (recorded with its digest as it is): verify says so in words,
    and the next run that selects it computes it again, saying why."""
    drop(store, SAMPLE_WAVS[0], "call.wav")
    instance.add_dynamic_partitions("audio_files", ["call.wav"])
    assert run_batch(instance, store, ["call.wav"]).success
    report = store.output_path("call.wav", "report.json")
    data = json.loads(report.read_bytes())
    del data["inputs"]
    report.write_text(json.dumps(data))
    digests = {**latest_metadata(instance, "report", "call.wav")["output_sha256"], "report.json": sha256_file(report)}
    (latest,) = instance.fetch_materializations(AssetKey("report"), limit=1).records
    instance.report_runless_asset_event(AssetMaterialization(
        asset_key="report", partition="call.wav",
        metadata={"output_sha256": MetadataValue.json(digests)}, tags=latest.asset_materialization.tags,
    ))

    (mismatch,) = verify_all(instance, store)
    assert str(mismatch) == ("call.wav: report/report.json inputs: recorded a list of the upstream "
                             "files it read, found none in the file")
    result = run_batch(instance, store, ["call.wav"], selection=[AssetKey("report")])
    assert result.success
    assert [materialization_count(instance, s, "call.wav") for s in STAGES] == [1, 1, 1, 1, 3]
    assert "inputs" in json.loads(report.read_bytes())
    assert verify_all(instance, store) == []
    assert ("report of call.wav: it does not record which upstream files it was computed from (an earlier "
            "version wrote it); computing it again from the upstream results there now"
            ) in run_logs(instance, result.run_id)


def test_verify_names_a_result_computed_from_an_upstream_file_no_longer_there(instance, store, capsys):
    """An emotion result rewritten and recorded (as by a version of this
    pipeline that did not compute what reads it again): its own digest
    matches, but the report names the earlier emotion.json among its inputs."""
    drop(store, SAMPLE_WAVS[0], "call.wav")
    instance.add_dynamic_partitions("audio_files", ["call.wav"])
    assert run_batch(instance, store, ["call.wav"]).success
    emotion = store.output_path("call.wav", "emotion.json")
    earlier = sha256_file(emotion)
    data = json.loads(emotion.read_bytes())
    data["timings"]["process_s"] += 1.0
    emotion.write_text(json.dumps(data))
    (latest,) = instance.fetch_materializations(AssetKey("emotion"), limit=1).records
    instance.report_runless_asset_event(AssetMaterialization(
        asset_key="emotion", partition="call.wav",
        metadata={"output_sha256": MetadataValue.json({"emotion.json": sha256_file(emotion)})},
        tags=latest.asset_materialization.tags,
    ))

    (mismatch,) = verify_all(instance, store)
    assert (mismatch.key, mismatch.what) == ("call.wav", "report/report.json input emotion.json")
    assert (mismatch.expected, mismatch.found) == (earlier, sha256_file(emotion))
    assert verify_command(instance, store) == 1
    assert capsys.readouterr().out.splitlines()[-2:] == [
        f"to compute call.wav's results again: {dagster_command()} asset materialize -m "
        "voiceman_pipeline.definitions --select report --partition call.wav",
        "then `voiceman run` brings the summary up to date"]
    # What that command runs computes the report again (it is not current), and only it.
    assert run_batch(instance, store, ["call.wav"], selection=[AssetKey("report")]).success
    assert [materialization_count(instance, s, "call.wav") for s in STAGES] == [1, 1, 1, 2, 2]
    assert verify_all(instance, store) == []


def test_reprocessing_a_changed_recording_keeps_the_earlier_results(instance, store):
    path = drop(store, SAMPLE_WAVS[0], "call.wav")
    instance.add_dynamic_partitions("audio_files", ["call.wav"])
    assert run_batch(instance, store, ["call.wav"]).success
    folder = store.file_dir("call.wav")
    before = snapshot(folder)
    old, new = sha256_file(SAMPLE_WAVS[0]), sha256_file(SAMPLE_WAVS[1])

    path.write_bytes(SAMPLE_WAVS[1].read_bytes())  # the same name, another recording
    # First a run that takes the new recording in but cannot transcribe it:
    # the later stages' latest results are still the earlier ones, kept aside.
    no_model = SpeechToText(engine="faster-whisper", model=str(store.outputs_dir / "no-model"))
    result = run_batch(instance, store, ["call.wav"], stt=no_model)
    assert not result.success
    kept = folder / "superseded" / old[:16]
    assert snapshot(kept) == before  # byte for byte what was reported about the original
    left = sorted(p.name for p in folder.iterdir())
    assert left == ["audio.json", "audio_16k.npy", "superseded"]  # the new intake only
    assert verify_all(instance, store) == []

    result = run_batch(instance, store, ["call.wav"])
    assert result.success
    assert snapshot(kept) == before
    note = json.loads((kept / "superseded.json").read_text())
    assert (note["old_sha256"], note["new_sha256"]) == (old, new)
    assert sorted(note["files"]) == sorted(RESULT_FILES) and note["superseded_at"]
    assert json.loads((folder / "audio.json").read_text())["sha256"] == new
    for name in CHAINED_JSON:  # the whole chain computed again, from the new recording
        assert json.loads((folder / name).read_text())["source_sha256"] == new
    meta = latest_metadata(instance, "audio", "call.wav")  # the intake that moved them
    assert meta["supersedes"] == old and meta["superseded_results"] == str(kept)
    warnings = [  # logged by the run that moved them
        e.user_message
        for run in instance.get_runs()
        for e in instance.all_logs(run.run_id)
        if e.level == logging.WARNING and "kept in" in e.user_message
    ]
    assert len(warnings) == 1 and old[:16] in warnings[0] and new[:16] in warnings[0]
    assert verify_all(instance, store) == []
    # Said in the status and in the summary, not only in the run's log.
    from voiceman_pipeline.assets.summary import summary
    from voiceman_pipeline.status import recording_statuses

    (row,) = recording_statuses(instance, store, ["call.wav"])
    assert row.status == "done" and row.replaced == 1
    assert materialize([summary], instance=instance, resources={"store": store}).success
    table = pd.read_csv(store.outputs_dir / "summary.csv")
    assert table.loc[0, "replaced_contents"] == old
    (shown,) = summary_metadata(instance)["recordings"].records  # the UI's table says it too
    assert shown.data["replaced_contents"] == old

    # What each kept file held is recorded (the decoded signal's as its intake had it),
    # and verify checks them: a tester edited a kept forensic.json and verify saw nothing.
    assert note["sha256"] == {name: sha256_file(kept / name) for name in note["files"]}
    forensic = kept / "forensic.json"
    forensic.write_text(forensic.read_text().replace('"risk_score": ', '"risk_score": 9'))
    (mismatch,) = verify_all(instance, store)
    assert (mismatch.key, mismatch.what) == ("call.wav", f"superseded/{old[:16]}/forensic.json")
    assert (mismatch.expected, mismatch.found) == (note["sha256"]["forensic.json"], sha256_file(forensic))
    (advice,) = repair_commands([mismatch])  # nothing to compute it from: the recording is gone
    assert "cannot be computed again" in advice and "restore it from a backup" in advice


def test_a_rerun_or_recompute_with_unchanged_content_moves_nothing(instance, store):
    drop(store, SAMPLE_WAVS[0], "call.wav")
    instance.add_dynamic_partitions("audio_files", ["call.wav"])
    assert run_batch(instance, store, ["call.wav"]).success
    folder = store.file_dir("call.wav")
    before = snapshot(folder)

    assert run_batch(instance, store, ["call.wav"]).success  # everything current
    assert [materialization_count(instance, s, "call.wav") for s in STAGES] == [1] * 5
    # Intake forced to run again on the same content: still nothing moved aside.
    recompute = materialize(
        [recording_analysis],
        selection=[AssetKey("audio")],
        instance=instance,
        resources=resources(store),
        run_config={"ops": {"recording_analysis": {"config": {"recompute": True}}}},
        tags={
            ASSET_PARTITION_RANGE_START_TAG: "call.wav",
            ASSET_PARTITION_RANGE_END_TAG: "call.wav",
        },
    )
    assert recompute.success
    assert materialization_count(instance, "audio", "call.wav") == 2
    assert "supersedes" not in latest_metadata(instance, "audio", "call.wav")
    assert not (folder / "superseded").exists() and not (folder / "altered").exists()
    # The recomputed audio.json differs in its timings; what was computed from
    # the earlier one is computed again, so every result names the files there.
    assert snapshot(folder)["audio.json"] != before["audio.json"]
    assert [materialization_count(instance, s, "call.wav") for s in STAGES] == [2] * 5
    report = json.loads((folder / "report.json").read_bytes())
    assert report["inputs"]["audio.json"] == hashlib.sha256(snapshot(folder)["audio.json"]).hexdigest()
    assert verify_all(instance, store) == []


def test_a_recompute_keeps_an_edited_result_aside_before_writing_over_it(instance, store):
    drop(store, SAMPLE_WAVS[0], "call.wav")
    instance.add_dynamic_partitions("audio_files", ["call.wav"])
    assert run_batch(instance, store, ["call.wav"]).success
    emotion = store.output_path("call.wav", "emotion.json")
    edited = emotion.read_text() + " "
    emotion.write_text(edited)
    recompute = materialize(
        [recording_analysis], selection=[AssetKey("emotion")], instance=instance, resources=resources(store),
        run_config={"ops": {"recording_analysis": {"config": {"recompute": True}}}},
        tags={ASSET_PARTITION_RANGE_START_TAG: "call.wav", ASSET_PARTITION_RANGE_END_TAG: "call.wav"},
    )
    assert recompute.success
    (kept,) = (store.file_dir("call.wav") / "altered").glob("*-emotion/emotion.json")
    assert kept.read_text() == edited and emotion.read_text() != edited
    assert verify_all(instance, store) == []


def test_content_superseded_again_gets_its_own_folder_and_a_half_done_move_is_finished(store):
    """The folder rule on its own (no run): a kept file is never renamed over."""
    folder = store.file_dir("k.wav")
    folder.mkdir()
    a, b = "a" * 64, "b" * 64

    def results_of(sha: str) -> None:
        (folder / "audio.json").write_text(json.dumps({"sha256": sha}))
        (folder / "forensic.json").write_text(json.dumps({"source_sha256": sha, "n": 1}))

    results_of(a)
    assert keep_earlier_results(store, "k.wav", b)["supersedes"] == a
    results_of(a)  # a came back and was superseded again
    kept = keep_earlier_results(store, "k.wav", b)["superseded_results"].path
    assert kept.endswith(f"superseded/{a[:16]}-2")
    assert (folder / "superseded" / a[:16] / "audio.json").is_file()

    results_of(b)  # a move interrupted after forensic.json: audio.json still names b
    (folder / "superseded" / b[:16]).mkdir()
    os.rename(folder / "forensic.json", folder / "superseded" / b[:16] / "forensic.json")
    assert keep_earlier_results(store, "k.wav", a)["superseded_results"].path.endswith(b[:16])
    assert sorted(p.name for p in (folder / "superseded" / b[:16]).iterdir()) == [
        "audio.json", "forensic.json", "superseded.json"
    ]
    assert not any(folder.glob("*.json")) and keep_earlier_results(store, "k.wav", a) == {}


def test_a_damaged_result_file_is_named_not_a_traceback(instance, store, capsys):
    """A tester appended a byte to a done recording's forensic.json: `voiceman
    status`, `run` and `retry-failed` ended in a JSONDecodeError traceback. Now
    the status table names the file and the summary still builds."""
    from voiceman_pipeline.assets.summary import summary
    from voiceman_pipeline.cli import print_status

    keys = ["call.wav", "other.wav"]
    for i, key in enumerate(keys):
        drop(store, SAMPLE_WAVS[i], key)
    instance.add_dynamic_partitions("audio_files", keys)
    assert run_batch(instance, store, keys).success
    with open(store.output_path("call.wav", "forensic.json"), "a") as damaged:
        damaged.write("x")
    store.output_path("other.wav", "audio.json").write_bytes(b"\xff\xfe not json")
    capsys.readouterr()
    print_status(instance, store, keys)
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert "UNREADABLE forensic.json: see voiceman verify" in rows["call.wav"]
    assert "UNREADABLE audio.json: see voiceman verify" in rows["other.wav"]
    assert materialize([summary], instance=instance, resources={"store": store}).success
    table = pd.read_csv(store.outputs_dir / "summary.csv").set_index("partition_key")
    assert table[["risk_score", "word_count"]].isna().all().all()  # no figure from a damaged file
    assert {(m.key, m.what) for m in verify_all(instance, store)} >= {
        ("call.wav", "forensic/forensic.json"), ("other.wav", "audio/audio.json")}
