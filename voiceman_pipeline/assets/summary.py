"""``summary``: one row per registered recording (all partitions): its status,
and its results where it is done."""


import hashlib
import json
import math
from typing import TYPE_CHECKING

from dagster import (
    AssetExecutionContext,
    AssetRecordsFilter,
    DagsterEventType,
    MaterializeResult,
    MetadataValue,
    TableColumn,
    TableRecord,
    TableSchema,
    asset,
)

from voiceman_pipeline.audio_io import sha256_file
from voiceman_pipeline.recording_files import AUDIO_JSON, REPORT_JSON, changed_json_inputs
from voiceman_pipeline.assets.checkpoint import OUTPUTS_KEY, SOURCE_SHA256, latest_records
from voiceman_pipeline.assets.stages import AUDIO, GROUP, REPORT, STAGES
from voiceman_pipeline.partitions import audio_files
from voiceman_pipeline.evidence import altered_results, superseded_contents
from voiceman_pipeline.resources.outputs import RecordingStore
from voiceman_pipeline.summary_table import COLUMNS, report_columns, typed

if TYPE_CHECKING:  # pandas is imported when the summary is built, not when definitions load
    import pandas as pd

SUMMARY_CSV = "summary.csv"
SUMMARY_PARQUET = "summary.parquet"
# Rows of the table shown in the UI (the files hold all): the ones needing
# attention first, then the done ones by risk.
TABLE_ROWS = 1000
# Metadata of each build: the storage id of the newest result (``newest_result_event``)
# when it began reading. A result stored while it ran has a smaller storage id than its
# materialization, yet is not in it: only this says what it shows.
RESULTS_THROUGH_KEY = "results_through_event"
# ... and which registered recordings it lists (``listed_digest``): a recording removed
# from the partitions (the UI's "Delete partitions") stores no event; only this shows it.
LISTED_KEY = "listed_recordings_sha256"


def summary_rows(store: RecordingStore, statuses: dict[str, str],
                 received: dict[str, str] | None = None) -> "pd.DataFrame":
    """One row per recording (``statuses``: key -> its status), sorted by key;
    the results flattened from its report.json only where it is done and the
    report is current; ``received``: the SHA-256 of the content the latest
    intake of a recording not done took in or failed on (``received_sha256``).

    A report counts only while it was built from the recording intake holds
    now and from the stage outputs on disk now: a recording replaced (or
    failing intake), or a stage re-run, after its report shows no figures
    until its new report exists, instead of showing old ones.
    """
    rows, found = [], None
    for key in sorted(statuses):
        replaced = " ".join(superseded_contents(store, key)) or None
        altered = " ".join(altered_results(store, key)) or None
        row = {"partition_key": key, "status": statuses[key], "replaced_contents": replaced,
               "altered_results": altered}
        if statuses[key] == "done":
            row.update(_results(store, key))
        else:
            row["sha256"] = (received or {}).get(key)
        if not row.get("source"):  # a failed or pending one: its file, to trace a made-up key back
            found = _inbox_files(store) if found is None else found
            row["source"] = found.get(key)
        rows.append(row)
    by_content: dict[str, list[str]] = {}
    for row in rows:
        if row.get("sha256"):
            by_content.setdefault(row["sha256"], []).append(row["partition_key"])
    for row in rows:
        copies = [key for key in by_content.get(row.get("sha256") or "", []) if key != row["partition_key"]]
        row["same_content_as"] = " ".join(copies) or None
    import pandas as pd  # here: importing it costs every code-location load ~0.5 s

    return typed(pd.DataFrame(rows, columns=COLUMNS))


def received_sha256(instance, keys: list[str]) -> dict[str, str]:
    """SHA-256 of the content each recording's latest intake took in or failed
    on (its latest ``audio`` event), so that a file received but not decodable
    is still identified in the summary; four queries for any number of keys."""
    latest = {}
    for event_type in (DagsterEventType.ASSET_MATERIALIZATION, DagsterEventType.ASSET_OBSERVATION):
        for record in latest_records(instance, AUDIO.key, event_type, keys):
            if record.storage_id > latest.get(record.partition_key, (0, None))[0]:
                event = record.event_log_entry.asset_materialization or record.event_log_entry.asset_observation
                latest[record.partition_key] = (record.storage_id, event.metadata.get(SOURCE_SHA256))
    return {key: str(sha.value) for key, (_, sha) in latest.items() if sha is not None}


def _inbox_files(store: RecordingStore) -> dict[str, str]:
    """Partition key -> path of each recording in the inbox now (one scan, as the sensor's)."""
    from voiceman_pipeline.inbox import scan_inbox

    return {file.key: file.location for file in scan_inbox(store.inbox_dir, store.max_file_bytes).files}


def _results(store: RecordingStore, key: str) -> dict:
    """The result columns from ``key``'s report, or {} when it is not current."""
    path, intake_path = store.output_path(key, REPORT_JSON), store.output_path(key, AUDIO_JSON)
    if not path.is_file() or not intake_path.is_file():
        return {}  # outputs removed by a person since
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        if report["source_sha256"] != json.loads(intake_path.read_text(encoding="utf-8"))["sha256"]:
            return {}
        if changed_json_inputs(store.file_dir(key), report.get("inputs", {})):
            return {}  # a stage under it was re-run since: the report is stale
        return report_columns(report)
    except (OSError, ValueError, KeyError, TypeError):  # damaged since: no figures (verify names it)
        return {}


# The UI table's columns (name, type, description).
TABLE_COLUMNS = [
    ("partition_key", "string", "recording"),
    ("status", "string", "done, failed at <stage>: <reason>, pending, in progress, stale, "
                         "changed in inbox, retired: <reason>"),
    ("duration_s", "float", "seconds (to 0.01 here; summary.csv has it whole)"),
    ("risk_score", "float", "0-100, where done: the categories weighted (one alone reaches at most 25)"),
    ("risk_level", "string", "of risk_score; 'no words' where nothing was recognised"),
    ("highest_category", "string", "strongest text risk category"),
    ("highest_category_score", "float", "0-100"),
    ("highest_category_level", "string", "of highest_category_score, as risk_level"),
    ("low_confidence_transcript", "bool", "its evidence needs checking against the audio"),
    ("stress_level", "string", None),
    ("emotion_status", "string", None),
    # Custody flags, so that the UI shows them too: copies, and results kept aside.
    ("same_content_as", "string", "other recordings with this recording's SHA-256"),
    ("replaced_contents", "string", "SHA-256 of earlier contents of the file: their results are in superseded/"),
    ("altered_results", "string", "altered/ folders: result files found edited or damaged, kept there"),
]


def table_metadata(table: "pd.DataFrame") -> MetadataValue:
    """The summary as a table the UI renders: recordings needing attention
    first (by key), then the done ones by their strongest category, then by
    overall risk (``by_risk``), at most TABLE_ROWS."""
    import pandas as pd

    done = table["status"] == "done"
    ordered = pd.concat([table[~done], by_risk(table[done])]).head(TABLE_ROWS)
    ordered = ordered.assign(duration_s=ordered["duration_s"].round(2))  # as `voiceman status` shows it
    names = [name for name, _, _ in TABLE_COLUMNS]
    records = [
        TableRecord({name: _plain(row[name]) for name in names})
        for row in ordered[names].to_dict("records")
    ]
    schema = TableSchema(
        columns=[TableColumn(name, type, description) for name, type, description in TABLE_COLUMNS]
    )
    return MetadataValue.table(records, schema=schema)


def by_risk(table: "pd.DataFrame") -> "pd.DataFrame":
    """Rows by their strongest category's score, then by overall risk, highest
    first: a call of threats alone scores low overall (see text_risk)."""
    return table.sort_values(["highest_category_score", "risk_score"], ascending=False,
                             na_position="last", kind="stable")


def _plain(value):
    """A table cell: str/int/float/bool, or None for a missing value (NaN, pandas' NA)."""
    import pandas as pd

    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if hasattr(value, "item"):  # numpy scalar
        value = value.item()
    return value


def newest_result_event(instance) -> int:
    """Storage id of the newest event the summary shows (0: none yet): a report
    materialized, or a stage's failure or a retirement observed (one query each)."""
    records = list(instance.fetch_materializations(REPORT.key, limit=1).records)
    records += [r for stage in STAGES for r in instance.fetch_observations(stage.key, limit=1).records]
    return max((record.storage_id for record in records), default=0)


def listed_digest(keys) -> str:
    """SHA-256 (16 hex) of a set of registered recordings' keys."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]


def lists_unregistered(instance, registered: list[str]) -> bool:
    """Whether the latest summary lists recordings no longer registered (deleted in the
    UI: no event says so). Recordings registered since it was built do not count: their
    results or failures bring a rebuild. A summary built before LISTED_KEY existed: no."""
    built = instance.fetch_materializations(summary.key, limit=1).records
    metadata = built[0].asset_materialization.metadata if built else {}
    listed, rows = metadata.get(LISTED_KEY), metadata.get("rows")
    if listed is None or rows is None or listed.value == listed_digest(registered):
        return False
    return len(registered) <= rows.value  # fewer, or as many but others: some were deleted


def built_through(instance, after: int = 0) -> int | None:
    """``RESULTS_THROUGH_KEY`` of the latest summary built after storage id ``after``
    (None: none since). A summary built before that key existed: its own storage id."""
    since = AssetRecordsFilter(asset_key=summary.key, after_storage_id=after or None)
    built = instance.fetch_materializations(since, limit=1).records
    if not built:
        return None
    through = built[0].asset_materialization.metadata.get(RESULTS_THROUGH_KEY)
    return built[0].storage_id if through is None else int(through.value)


@asset(
    deps=[REPORT.key],
    group_name=GROUP,
    kinds={"pandas", "parquet"},
)
def summary(context: AssetExecutionContext, store: RecordingStore) -> MaterializeResult:
    """Every registered recording in one table: its status, and where done its
    risk, stress, emotion status and source (CSV + Parquet). Its
    results_through_event: the storage id of the newest result it shows."""
    from voiceman_pipeline import runs
    from voiceman_pipeline.status import STATUS_KINDS, recording_statuses, status_kind

    runs.own_run(context)  # its source, and its process: a killed one is then found and cleaned up

    through = newest_result_event(context.instance)  # before reading: all it can show
    keys = list(context.instance.get_dynamic_partitions(audio_files.name))
    statuses = {row.key: row.status for row in recording_statuses(context.instance, store, keys)}
    not_done = [key for key, status in statuses.items() if status != "done"]
    table = summary_rows(store, statuses, received_sha256(context.instance, not_done))
    csv_path = store.outputs_dir / SUMMARY_CSV
    parquet_path = store.outputs_dir / SUMMARY_PARQUET
    store.write_file(csv_path, lambda handle: table.to_csv(handle, index=False))
    store.write_file(parquet_path, lambda handle: table.to_parquet(handle, index=False))
    # As every stage does (``output_sha256``): `voiceman verify` finds a table edited since.
    written = {path.name: sha256_file(path) for path in (csv_path, parquet_path)}
    counts = dict.fromkeys(STATUS_KINDS, 0)
    for status in statuses.values():
        counts[status_kind(status)] += 1
    return MaterializeResult(
        metadata={
            "rows": len(table),
            RESULTS_THROUGH_KEY: MetadataValue.int(through),
            LISTED_KEY: listed_digest(keys),
            **{f"recordings_{kind}": MetadataValue.int(n) for kind, n in counts.items()},
            "recordings": table_metadata(table),
            "csv": MetadataValue.path(str(csv_path)),
            "parquet": MetadataValue.path(str(parquet_path)),
            OUTPUTS_KEY: MetadataValue.json(written),
        }
    )
