"""``summary``: every registered recording with its status, results where done."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta

import pandas as pd
from dagster import (
    AssetKey,
    AssetMaterialization,
    DagsterRunStatus,
    RunsFilter,
    SensorResult,
    TableMetadataValue,
    build_sensor_context,
    materialize,
)
from dagster._core.storage.tags import PRIORITY_TAG
from dagster._core.test_utils import create_run_for_test

from voiceman_pipeline.assets.summary import RESULTS_THROUGH_KEY, newest_result_event, summary
from voiceman_pipeline.cli import summary_behind
from voiceman_pipeline.definitions import defs
from voiceman_pipeline.jobs import SOURCE_TAG
from voiceman_pipeline.retire import retire
from voiceman_pipeline.sensors import SUMMARY_WHILE_BUSY_S, summary_sensor
from voiceman_pipeline_tests.conftest import SAMPLE_WAVS, drop
from voiceman_pipeline_tests.test_pipeline import run_batch

SUMMARY = AssetKey("summary")


def summary_metadata(instance) -> dict:
    (record,) = instance.fetch_materializations(SUMMARY, limit=1).records
    return record.asset_materialization.metadata


def done_in_summary(store) -> list[str]:
    table = pd.read_csv(store.outputs_dir / "summary.csv")
    return list(table[table["status"] == "done"]["partition_key"])


def test_summary_lists_done_failed_pending_and_retired_recordings(instance, store):
    drop(store, SAMPLE_WAVS[0], "good.wav")
    (store.inbox_dir / "bad.wav").write_bytes(b"garbage" * 100)  # corrupt: fails intake
    (store.inbox_dir / "gone.wav").write_bytes(b"rubbish" * 100)  # corrupt, then retired
    drop(store, SAMPLE_WAVS[1], "later.wav")  # registered, never run
    instance.add_dynamic_partitions("audio_files", ["good.wav", "bad.wav", "gone.wav", "later.wav"])

    # The summary sensor asks for a rebuild when a recording newly fails, not
    # only on a new report.
    asked, cursor = summary_tick(instance)
    assert not asked  # nothing to show yet
    assert not run_batch(instance, store, ["bad.wav", "gone.wav"]).success  # no report made
    asked, cursor = summary_tick(instance, cursor)
    assert asked
    assert run_batch(instance, store, ["good.wav"]).success

    retire(instance, store, ["gone.wav"], "not a recording")
    by_hand = materialize([summary], instance=instance, resources={"store": store})
    assert by_hand.success
    # Launched by hand (like the UI or `dagster asset materialize`): its run says so.
    assert instance.get_run_by_id(by_hand.run_id).tags[SOURCE_TAG] == "ui"

    table = pd.read_csv(store.outputs_dir / "summary.csv")
    assert list(table["partition_key"]) == ["bad.wav", "gone.wav", "good.wav", "later.wav"]
    rows = table.set_index("partition_key")
    assert rows.loc["good.wav", "status"] == "done"
    assert rows.loc["bad.wav", "status"].startswith("failed at audio: ")
    assert rows.loc["gone.wav", "status"] == "retired: not a recording"
    assert rows.loc["later.wav", "status"] == "pending"
    # Results only where done.
    assert rows.loc["good.wav", "risk_level"] in {"minimal", "low", "moderate", "high", "critical"}
    assert rows.loc["good.wav", "word_count"] > 0
    assert rows.drop(index="good.wav")[["risk_score", "risk_level", "word_count"]].isna().all().all()
    # A file received but not decodable is still identified: the SHA-256 its failed
    # intake recorded (also once retired); one never taken in has none.
    for key in ("bad.wav", "gone.wav"):
        assert rows.loc[key, "sha256"] == hashlib.sha256((store.inbox_dir / key).read_bytes()).hexdigest()
    assert pd.isna(rows.loc["later.wav", "sha256"])
    # Every row names its file, failed and pending ones too (from the inbox): a made-up
    # key is traced back to it.
    assert {key: rows.loc[key, "source"] for key in rows.index} == {
        key: str(store.inbox_dir / key) for key in rows.index}
    parquet = pd.read_parquet(store.outputs_dir / "summary.parquet")
    assert list(parquet["status"]) == list(table["status"])
    # Counts are integers and flags booleans although most rows have none.
    assert str(parquet["word_count"].dtype) == "Int64" and str(parquet["evidence_count"].dtype) == "Int64"
    assert str(parquet["low_confidence_transcript"].dtype) == "boolean"
    assert str(parquet["dominant_emotion"].dtype) == "string"
    as_written = pd.read_csv(store.outputs_dir / "summary.csv", dtype=str).set_index("partition_key")
    assert as_written.loc["good.wav", "word_count"].isdigit()  # "25", not "25.0"
    assert as_written.loc["good.wav", "evidence_count"].isdigit()

    metadata = summary_metadata(instance)
    shown = metadata["recordings"]
    assert isinstance(shown, TableMetadataValue) and shown.schema is not None
    assert [c.name for c in shown.schema.columns][:2] == ["partition_key", "status"]
    by_key = {r.data["partition_key"]: r.data for r in shown.records}
    assert {key: row["status"] for key, row in by_key.items()} == dict(rows["status"])
    assert by_key["good.wav"]["risk_level"] == rows.loc["good.wav", "risk_level"]
    assert by_key["later.wav"]["risk_score"] is None
    assert by_key["good.wav"]["duration_s"] == round(rows.loc["good.wav", "duration_s"], 2)  # as status shows it
    counts = {k: v.value for k, v in metadata.items() if k.startswith("recordings_")}
    assert counts == {
        "recordings_done": 1, "recordings_failed": 1, "recordings_pending": 1,
        "recordings_in_progress": 0, "recordings_stale": 0, "recordings_changed_in_inbox": 0,
        "recordings_retired": 1,
    }


def test_the_summary_sensor_asks_again_for_results_stored_after_it_asked(instance, store):
    """Dagster's automation condition took a report stored in the same tick as the
    summary's own materialization as handled, and the summary stayed without it."""
    names = ["first.wav", "second.wav", "third.wav", "broken.wav"]
    for n, name in enumerate(names[:3]):
        drop(store, SAMPLE_WAVS[n], name)
    (store.inbox_dir / "broken.wav").write_bytes(b"garbage" * 100)
    instance.add_dynamic_partitions("audio_files", names)
    assert run_batch(instance, store, ["first.wav"]).success
    asked, cursor = summary_tick(instance)
    assert asked
    # The run it asked for builds the summary, then another run stores the second
    # recording's report, both before the next tick.
    assert materialize([summary], instance=instance, resources={"store": store}).success
    assert done_in_summary(store) == ["first.wav"]
    assert run_batch(instance, store, ["second.wav"]).success
    asked, cursor = summary_tick(instance, cursor)
    assert asked
    # Asked once: a summary run that fails (here: never runs) is not asked for again
    # until there is something new.
    assert summary_tick(instance, cursor) == (False, cursor)
    assert materialize([summary], instance=instance, resources={"store": store}).success
    assert done_in_summary(store) == ["first.wav", "second.wav"]
    # A fresh sensor (no cursor) starts from what the latest summary shows.
    assert summary_tick(instance)[0] is False

    # A summary built another way (`voiceman run` builds its own) after a new report
    # shows it: not asked for again.
    assert run_batch(instance, store, ["third.wav"]).success
    assert materialize([summary], instance=instance, resources={"store": store}).success
    built = summary_metadata(instance)[RESULTS_THROUGH_KEY].value
    asked, cursor = summary_tick(instance, cursor)
    assert not asked and json.loads(cursor)[RESULTS_THROUGH_KEY] == built
    assert not summary_behind(instance)  # `voiceman run` with nothing new agrees
    # But a build that began before a result was stored does not show it, though its
    # materialization is stored after that result's event: asked for.
    assert not run_batch(instance, store, ["broken.wav"]).success  # a failure observed
    instance.report_runless_asset_event(AssetMaterialization(SUMMARY, metadata={RESULTS_THROUGH_KEY: built}))
    assert newest_result_event(instance) > built
    assert summary_behind(instance)

    # While a run is under way the summary waits for it (it may store more), but not for
    # longer than SUMMARY_WHILE_BUSY_S since the busy spell began and it last asked (a long backfill).
    under_way = create_run_for_test(instance, job_name="analysis_job", status=DagsterRunStatus.STARTED)
    asked, waiting = summary_tick(instance, cursor)
    assert not asked and json.loads(waiting)["busy_since"]  # a busy spell with something new began
    assert summary_tick(instance, waiting) == (False, waiting)
    # Not at once because the last ask was long ago: a burst after a quiet spell waits too.
    began = datetime.fromisoformat(json.loads(waiting)["busy_since"])
    earlier = (began - timedelta(seconds=SUMMARY_WHILE_BUSY_S)).isoformat()
    assert summary_tick(instance, json.dumps({**json.loads(waiting), "asked_at": earlier}))[0] is False
    # SUMMARY_WHILE_BUSY_S into the spell, and since the last ask: asked for, though runs go on.
    long_ago = json.dumps({**json.loads(waiting), "asked_at": earlier, "busy_since": earlier})
    assert summary_tick(instance, long_ago)[0]
    # Never while a summary run is under way (or queued), however it was launched: here
    # from the asset page (Dagster's implicit asset job, which plans the summary).
    asset_page = defs.resolve_implicit_global_asset_job_def()
    rebuilding = instance.create_run_for_job(asset_page, asset_selection={SUMMARY},
                                             status=DagsterRunStatus.STARTED)
    assert summary_tick(instance, long_ago) == (False, long_ago)
    instance.report_run_canceled(rebuilding)
    instance.report_run_canceled(under_way)
    asked, cursor = summary_tick(instance, cursor)
    assert asked and json.loads(cursor)[RESULTS_THROUGH_KEY] == newest_result_event(instance)
    # A cursor from before "asked_at" was kept (the storage id alone) still reads.
    assert summary_tick(instance, str(newest_result_event(instance)))[0] is False


def test_the_summary_sensor_leaves_the_summary_to_a_backfill_that_builds_it(instance, store):
    """*Materialize all* in the UI is a backfill that builds the summary after its
    recordings' runs; between those and its summary run no run is under way, and the
    sensor asked then: the summary was built twice."""
    from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill

    drop(store, SAMPLE_WAVS[0], "first.wav")
    instance.add_dynamic_partitions("audio_files", ["first.wav"])
    assert run_batch(instance, store, ["first.wav"]).success  # its report: something new to show
    backfill = PartitionBackfill.from_asset_partitions(
        backfill_id="materializeall", asset_graph=defs.resolve_asset_graph(), partition_names=["first.wav"],
        asset_selection=[AssetKey("report"), SUMMARY], backfill_timestamp=0.0, tags={},
        dynamic_partitions_store=instance, all_partitions=False, title=None, description=None, run_config=None)
    instance.add_backfill(backfill)
    assert instance.get_runs_count() == 1 and not instance.get_runs_count(
        RunsFilter(statuses=[DagsterRunStatus.STARTED, DagsterRunStatus.QUEUED]))
    result = summary_sensor(build_sensor_context(instance=instance))
    assert not result.run_requests
    assert result.skip_reason.skip_message == "backfill materializeall is under way and builds the summary"
    instance.update_backfill(backfill.with_status(BulkActionStatus.COMPLETED_FAILED))  # ended without it
    assert summary_tick(instance)[0]


def test_a_summary_listing_a_recording_no_longer_registered_is_rebuilt(instance, store):
    """The UI's "Delete partitions" stores no event: the sensor and `voiceman run` see
    all the same that the summary lists a recording no longer registered."""
    def listed() -> list[str]:
        return list(pd.read_csv(store.outputs_dir / "summary.csv")["partition_key"])

    def build() -> None:  # as the UI's Materialize does
        assert materialize([summary], instance=instance, resources={"store": store}).success

    instance.add_dynamic_partitions("audio_files", ["call.wav", "typo.wav"])
    asked, cursor = summary_tick(instance)
    assert not asked  # registered only: their results or failures will bring a rebuild
    build()
    assert listed() == ["call.wav", "typo.wav"]
    assert summary_tick(instance, cursor)[0] is False and not summary_behind(instance)

    instance.delete_dynamic_partition("audio_files", "typo.wav")
    assert summary_behind(instance)
    asked, cursor = summary_tick(instance, cursor)
    assert asked
    assert summary_tick(instance, cursor) == (False, cursor)  # asked once
    build()
    assert listed() == ["call.wav"]
    assert summary_tick(instance, cursor)[0] is False and not summary_behind(instance)

    # Deleted, but rebuilt another way before the next tick: not asked for again.
    instance.add_dynamic_partitions("audio_files", ["later.wav"])
    build()
    asked, cursor = summary_tick(instance, cursor)
    assert not asked
    instance.delete_dynamic_partition("audio_files", "later.wav")
    build()
    assert summary_tick(instance, cursor)[0] is False and not summary_behind(instance)


def summary_tick(instance, cursor: str | None = None) -> tuple[bool, str]:
    """One tick of ``summary_sensor``: whether it asked for a summary run, and its cursor after."""
    result = summary_sensor(build_sensor_context(instance=instance, cursor=cursor))
    assert isinstance(result, SensorResult) and result.cursor is not None
    assert [r.tags[SOURCE_TAG] for r in result.run_requests] in ([], ["automation"])
    # Dequeued ahead of queued analysis runs (Dagster's run queue: highest first).
    assert all(r.tags[PRIORITY_TAG] == "1" for r in result.run_requests)
    assert bool(result.run_requests) != bool(result.skip_reason)
    return bool(result.run_requests), result.cursor


def test_done_recordings_are_listed_by_their_strongest_category_first():
    # A call of threats alone scores 20 overall ("minimal") with its threat
    # category at 80 ("high"): it comes before a call of mild evidence in
    # several categories that scores more overall.
    from voiceman_pipeline.assets.summary import by_risk
    from voiceman_pipeline.summary_table import COLUMNS, typed

    rows = [
        {"partition_key": "mild.wav", "status": "done", "risk_score": 30.0,
         "highest_category": "deception", "highest_category_score": 40.0, "highest_category_level": "low"},
        {"partition_key": "threat.wav", "status": "done", "risk_score": 20.0,
         "highest_category": "threat", "highest_category_score": 80.0, "highest_category_level": "high"},
        {"partition_key": "silent.wav", "status": "done", "risk_score": None, "risk_level": "no words",
         "highest_category_score": 0.0},
        {"partition_key": "calm.wav", "status": "done", "risk_score": 0.0, "highest_category_score": 0.0},
    ]
    table = typed(pd.DataFrame(rows, columns=COLUMNS))
    assert list(by_risk(table)["partition_key"]) == ["threat.wav", "mild.wav", "calm.wav", "silent.wav"]


def test_recordings_with_the_same_content_name_each_other(store):
    # The same bytes under two names (a copy sent twice, a renamed export) are one
    # piece of evidence: each row says which others hold it.
    from voiceman_pipeline.assets.summary import summary_rows, table_metadata

    statuses = {"a.wav": "failed at audio: x", "b.wav": "failed at audio: x", "c.wav": "pending",
                "d.wav": "failed at audio: y"}
    received = {"a.wav": "f" * 64, "b.wav": "f" * 64, "d.wav": "e" * 64}
    rows = summary_rows(store, statuses, received).set_index("partition_key")
    assert rows.loc["a.wav", "same_content_as"] == "b.wav" and rows.loc["b.wav", "same_content_as"] == "a.wav"
    assert pd.isna(rows.loc["c.wav", "same_content_as"]) and pd.isna(rows.loc["d.wav", "same_content_as"])
    shown = {r.data["partition_key"]: r.data["same_content_as"] for r in table_metadata(rows.reset_index()).records}
    assert shown == {"a.wav": "b.wav", "b.wav": "a.wav", "c.wav": None, "d.wav": None}  # in the UI too
