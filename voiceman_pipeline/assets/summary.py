"""``summary``: one row per recording with a materialized report (all partitions)."""


import json

import pandas as pd
from dagster import (
    AssetExecutionContext,
    AssetPartitionStatus,
    AutomationCondition,
    MaterializeResult,
    MetadataValue,
    asset,
)

from voiceman_pipeline.recording_files import AUDIO_JSON, REPORT_JSON, changed_json_inputs
from voiceman_pipeline.assets.stages import GROUP, REPORT
from voiceman_pipeline.partitions import audio_files
from voiceman_pipeline.evidence import superseded_contents
from voiceman_pipeline.resources.outputs import RecordingStore

SUMMARY_CSV = "summary.csv"
SUMMARY_PARQUET = "summary.parquet"
TOP_RISK_ROWS = 10
COLUMNS = [
    "partition_key", "source", "sha256", "duration_s", "stt_engine", "word_count",
    "transcript_confidence", "risk_score", "risk_level", "highest_category",
    "highest_category_score", "stress_index", "stress_level",
    "evidence_count", "low_confidence_transcript", "emotion_status", "dominant_emotion",
    "replaced_contents",  # SHA-256 of earlier contents of the file; their results are kept
]


def summary_rows(store: RecordingStore, partition_keys: list[str]) -> pd.DataFrame:
    """Flatten each partition's report.json into one row, if it is current.

    A report counts only while it was built from the recording intake holds
    now and from the stage outputs on disk now: a recording replaced (or
    failing intake), or a stage re-run, after its report drops out until its
    new report exists, instead of showing old figures.
    """
    rows = []
    for key in sorted(partition_keys):
        path, intake_path = store.output_path(key, REPORT_JSON), store.output_path(key, AUDIO_JSON)
        if not path.is_file() or not intake_path.is_file():
            continue  # outputs removed by a person since
        report = json.loads(path.read_text(encoding="utf-8"))
        if report["source_sha256"] != json.loads(intake_path.read_text())["sha256"]:
            continue
        if changed_json_inputs(store.file_dir(key), report.get("inputs", {})):
            continue  # a stage under it was re-run since: the report is stale
        audio, transcript = report["audio"], report["transcript"]
        forensic, emotion = report["forensic"], report["emotion"]
        strongest = max(forensic["categories"], key=lambda c: c["score"])
        rows.append(
            {
                "partition_key": key,
                "source": audio["source_path"],
                "sha256": audio["sha256"],
                "duration_s": audio["duration_s"],
                "stt_engine": transcript["engine"]["name"],
                "word_count": len(transcript["words"]),
                "transcript_confidence": transcript["confidence"],
                "risk_score": forensic["risk_score"],
                "risk_level": forensic["risk_level"],
                "highest_category": strongest["category"] if strongest["score"] > 0 else None,
                "highest_category_score": strongest["score"],
                "stress_index": forensic["stress"]["value"],
                "stress_level": forensic["stress"]["level"],
                "evidence_count": sum(len(c["evidence"]) for c in forensic["categories"]),
                "low_confidence_transcript": forensic["low_confidence_transcript"],
                "emotion_status": emotion["status"],
                "dominant_emotion": emotion["dominant_label"],
                "replaced_contents": " ".join(superseded_contents(store, key)) or None,
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)


@asset(
    deps=[REPORT.key],
    group_name=GROUP,
    kinds={"pandas", "parquet"},
    # Refresh when any recording's report changes, even while other
    # recordings are still missing or failed (eager() would wait for all).
    automation_condition=AutomationCondition.eager().without(
        ~AutomationCondition.any_deps_missing()
    ),
)
def summary(context: AssetExecutionContext, store: RecordingStore) -> MaterializeResult:
    """All recordings in one table: risk, stress, emotion status, sources (CSV + Parquet)."""
    # Partitions whose latest report attempt succeeded (not failed since).
    keys = context.instance.get_dynamic_partitions(audio_files.name)
    statuses = context.instance.get_status_by_partition(REPORT.key, keys, audio_files) or {}
    current = [k for k, status in statuses.items() if status == AssetPartitionStatus.MATERIALIZED]
    table = summary_rows(store, current)
    csv_path = store.outputs_dir / SUMMARY_CSV
    parquet_path = store.outputs_dir / SUMMARY_PARQUET
    store.write_file(csv_path, lambda handle: table.to_csv(handle, index=False))
    store.write_file(parquet_path, lambda handle: table.to_parquet(handle, index=False))
    top = table.sort_values("risk_score", ascending=False).head(TOP_RISK_ROWS)
    shown = top[
        ["partition_key", "risk_score", "risk_level", "highest_category", "stress_level", "emotion_status"]
    ]
    return MaterializeResult(
        metadata={
            "rows": len(table),
            "highest_risk": MetadataValue.md(
                shown.to_markdown(index=False) if len(shown) else "_no reports yet_"
            ),
            "csv": MetadataValue.path(str(csv_path)),
            "parquet": MetadataValue.path(str(parquet_path)),
        }
    )
