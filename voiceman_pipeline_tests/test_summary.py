"""``summary``: every registered recording with its status, results where done."""

from __future__ import annotations

import pandas as pd
from dagster import (
    AssetKey,
    AssetSelection,
    TableMetadataValue,
    evaluate_automation_conditions,
    materialize,
)

from voiceman_pipeline.assets.summary import summary
from voiceman_pipeline.definitions import defs
from voiceman_pipeline.jobs import SOURCE_TAG
from voiceman_pipeline.retire import retire
from voiceman_pipeline_tests.conftest import SAMPLE_WAVS, drop
from voiceman_pipeline_tests.test_pipeline import run_batch

SUMMARY = AssetKey("summary")


def summary_metadata(instance) -> dict:
    (record,) = instance.fetch_materializations(SUMMARY, limit=1).records
    return record.asset_materialization.metadata


def test_summary_lists_done_failed_pending_and_retired_recordings(instance, store):
    drop(store, SAMPLE_WAVS[0], "good.wav")
    (store.inbox_dir / "bad.wav").write_bytes(b"garbage" * 100)  # corrupt: fails intake
    (store.inbox_dir / "gone.wav").write_bytes(b"rubbish" * 100)  # corrupt, then retired
    drop(store, SAMPLE_WAVS[1], "later.wav")  # registered, never run
    instance.add_dynamic_partitions("audio_files", ["good.wav", "bad.wav", "gone.wav", "later.wav"])

    # The automation condition requests a refresh when a recording newly
    # fails, not only on a new report.
    only_summary = AssetSelection.assets(SUMMARY)
    first = evaluate_automation_conditions(defs, instance, asset_selection=only_summary)
    quiet = evaluate_automation_conditions(defs, instance, only_summary, cursor=first.cursor)
    assert quiet.get_num_requested(SUMMARY) == 0
    assert not run_batch(instance, store, ["bad.wav", "gone.wav"]).success  # no report made
    failed = evaluate_automation_conditions(defs, instance, only_summary, cursor=quiet.cursor)
    assert failed.get_num_requested(SUMMARY) == 1
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
    assert rows.drop(index="good.wav")[["sha256", "risk_score", "risk_level"]].isna().all().all()
    parquet = pd.read_parquet(store.outputs_dir / "summary.parquet")
    assert list(parquet["status"]) == list(table["status"])

    metadata = summary_metadata(instance)
    shown = metadata["recordings"]
    assert isinstance(shown, TableMetadataValue) and shown.schema is not None
    assert [c.name for c in shown.schema.columns][:2] == ["partition_key", "status"]
    by_key = {r.data["partition_key"]: r.data for r in shown.records}
    assert {key: row["status"] for key, row in by_key.items()} == dict(rows["status"])
    assert by_key["good.wav"]["risk_level"] == rows.loc["good.wav", "risk_level"]
    assert by_key["later.wav"]["risk_score"] is None
    counts = {k: v.value for k, v in metadata.items() if k.startswith("recordings_")}
    assert counts == {
        "recordings_done": 1, "recordings_failed": 1, "recordings_pending": 1,
        "recordings_in_progress": 0, "recordings_stale": 0, "recordings_changed_in_inbox": 0,
        "recordings_retired": 1,
    }
