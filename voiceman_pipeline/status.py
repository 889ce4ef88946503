"""Per-recording status, read from Dagster's storage (the only checkpoint).

A recording's status is the first thing in chain order that keeps it from
being done:

- ``retired: <reason>``: set aside by ``voiceman retire`` (see ``retire.py``);
  nothing else about it matters then;
- ``failed at <stage>: <reason>``: its latest attempt at that stage failed;
- ``in progress``: a run is working on it;
- ``pending``: some stage has no result yet;
- ``changed in inbox: re-run audio``: the file in the inbox no longer has the
  content its intake took in (noticed before any run);
- ``stale: re-run <stage>``: Dagster's own staleness (code and data versions)
  says the results from ``<stage>`` on are out of date; ``<stage>`` is the
  first one to re-run (its own inputs or code changed, not just an upstream's);
- ``done``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from dagster import AssetPartitionStatus, AssetRecordsFilter, DagsterEventType, DagsterInstance
from dagster._core.definitions.data_version import (
    CachingStaleStatusResolver,
    StaleStatus,
    extract_data_provenance_from_entry,
    extract_data_version_from_entry,
)
from dagster._core.definitions.partitions.context import partition_loading_context
from dagster._core.definitions.partitions.mapping import IdentityPartitionMapping
from dagster._core.instance.types import CachingDynamicPartitionsLoader
from dagster._core.loader import LoadingContextForTest
from dagster._core.storage.partition_status_cache import (
    AssetStatusCacheValue,
    get_and_update_asset_status_cache_value,
)

from voiceman_pipeline.assets.checkpoint import ERROR_KEY, latest_records
from voiceman_pipeline.assets.stages import STAGES
from voiceman_pipeline.audio_io import sha256_file
from voiceman_pipeline.errors import PermanentError
from voiceman_pipeline.inbox import find_recording
from voiceman_pipeline.partitions import audio_files
from voiceman_pipeline.recording_files import AUDIO_JSON, FORENSIC_JSON
from voiceman_pipeline.resources.outputs import RecordingStore
from voiceman_pipeline.retire import retirements


@dataclass
class RecordingStatus:
    key: str
    duration_s: float | None
    status: str
    risk: str  # "<score> <level>" once done
    outputs: str
    replaced: int = 0  # earlier contents of the file whose results are kept (superseded/)

    @property
    def failed(self) -> bool:
        return self.status.startswith("failed")

    @property
    def retired(self) -> bool:
        return self.status.startswith("retired")


# What each status reads as, in one word (the summary's counts).
STATUS_KINDS = ("done", "failed", "pending", "in_progress", "stale", "changed_in_inbox", "retired")


def status_kind(status: str) -> str:
    """``status`` (as ``recording_statuses`` words it) as one of STATUS_KINDS."""
    for kind in STATUS_KINDS:
        if status.startswith(kind.replace("_", " ")):
            return kind
    raise ValueError(f"unknown status {status!r}")


def recording_statuses(
    instance: DagsterInstance, store: RecordingStore, keys: list[str], asset_graph=None
) -> list[RecordingStatus]:
    """Status of each key: a fixed number of storage queries for any number of
    keys (per stage: partition statuses, failure reasons, latest
    materializations for staleness), none per recording."""
    if asset_graph is None:
        from voiceman_pipeline.definitions import defs

        asset_graph = defs.resolve_asset_graph()
    by_stage = _partition_statuses(instance, keys)
    reasons = {stage.name: _failure_reasons(instance, stage, keys, by_stage[stage.name]) for stage in STAGES}
    retired = retirements(instance, keys)
    rows, settled = {}, []
    for key in keys:
        statuses = {name: found.get(key) for name, found in by_stage.items()}
        if key in retired:
            rows[key] = f"retired: {retired[key]}"
        else:
            rows[key] = _status_of(key, statuses, reasons)
            if rows[key] is None:  # every stage materialized: changed or stale or done
                settled.append(key)
    changed = {key for key in settled if _changed_in_inbox(store, key)}
    for key in changed:
        rows[key] = "changed in inbox: re-run audio"
    unchanged = [key for key in settled if key not in changed]
    stale = first_stale_stages(instance, asset_graph, unchanged)
    for key in unchanged:
        rows[key] = f"stale: re-run {stale[key]}" if key in stale else "done"
    with_results = _result_folders(store)
    return [_row(store, key, rows[key], key in with_results) for key in keys]


def _partition_statuses(instance: DagsterInstance, keys: list[str]) -> dict[str, dict]:
    """Per stage, what ``instance.get_status_by_partition`` says of each key,
    with the registered keys read once for all stages: that method reads all
    of them twice per call (tens of thousands of rows, each time)."""
    loader = CachingDynamicPartitionsLoader(instance)
    found = {}
    with partition_loading_context(None, loader):
        for stage in STAGES:
            value = get_and_update_asset_status_cache_value(
                instance, stage.key, audio_files, dynamic_partitions_loader=loader
            )
            if not isinstance(value, AssetStatusCacheValue):
                found[stage.name] = {}
                continue
            in_progress = value.deserialize_in_progress_partition_subsets(audio_files)
            failed = value.deserialize_failed_partition_subsets(audio_files)
            materialized = value.deserialize_materialized_partition_subsets(audio_files)
            found[stage.name] = {
                key: AssetPartitionStatus.IN_PROGRESS if key in in_progress
                else AssetPartitionStatus.FAILED if key in failed
                else AssetPartitionStatus.MATERIALIZED if key in materialized
                else None
                for key in keys
            }
    return found


def _status_of(key: str, statuses: dict, reasons: dict) -> str | None:
    """The status that the partition statuses alone decide; None when every
    stage is materialized (then the inbox and staleness decide)."""
    for name, status in statuses.items():
        if status == AssetPartitionStatus.FAILED:
            reason = reasons[name].get(key)
            return f"failed at {name}" + (f": {reason}" if reason else "")
    if any(s == AssetPartitionStatus.IN_PROGRESS for s in statuses.values()):
        return "in progress"
    if not all(s == AssetPartitionStatus.MATERIALIZED for s in statuses.values()):
        return "pending"
    return None


def first_stale_stages(instance: DagsterInstance, asset_graph, keys: list[str]) -> dict[str, str]:
    """Per key that has any, the first stage in chain order that Dagster's
    staleness calls STALE (the stages before it are current).

    The same rule as Dagster's ``CachingStaleStatusResolver`` (what the UI
    shows), decided from the latest materialization of every (stage, key),
    fetched in a few queries per stage instead of several per (stage, key):
    a stage is stale when its code version differs from the one it was
    materialized with, when it was computed from a dependency it no longer
    has or without one it now has, or when a dependency has a newer
    materialization with another data version than the one it read. Where a
    record lacks what that needs (no provenance tags), Dagster's resolver
    decides that one (stage, key).
    """
    if not keys:
        return {}
    latest = {  # stage key -> partition -> its latest materialization
        stage.key: {
            r.partition_key: r
            for r in latest_records(instance, stage.key, DagsterEventType.ASSET_MATERIALIZATION, keys)
        }
        for stage in STAGES
    }
    consumed = _consumed_records(instance, asset_graph, latest)
    resolver = None
    found = {}
    for key in keys:
        for stage in STAGES:
            stale = _is_stale(asset_graph, stage.key, key, latest, consumed)
            if stale is None:  # not decidable from the records: ask Dagster
                if resolver is None:
                    resolver = CachingStaleStatusResolver(
                        instance, asset_graph, LoadingContextForTest(instance)
                    )
                stale = resolver.get_status(stage.key, key) == StaleStatus.STALE
            if stale:
                found[key] = stage.name
                break
    return found


def _consumed_records(instance, asset_graph, latest: dict) -> dict:
    """(dependency key, storage id) -> (partition, data version) of each upstream
    materialization that some latest stage materialization was computed from,
    where the dependency has a newer one since (only then does it matter)."""
    wanted: dict = {}
    for stage_key, records in latest.items():
        for key, record in records.items():
            provenance = extract_data_provenance_from_entry(record.event_log_entry)
            for dep_key, storage_id in (provenance.input_storage_ids if provenance else {}).items():
                dep_latest = latest.get(dep_key, {}).get(key)
                if storage_id and dep_latest is not None and dep_latest.storage_id > storage_id:
                    wanted.setdefault(dep_key, set()).add(storage_id)
    consumed = {}
    for dep_key, ids in wanted.items():
        result = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=dep_key, storage_ids=sorted(ids)), limit=len(ids)
        )
        for record in result.records:
            consumed[(dep_key, record.storage_id)] = (
                record.partition_key, extract_data_version_from_entry(record.event_log_entry)
            )
    return consumed


def _is_stale(asset_graph, stage_key, key: str, latest: dict, consumed: dict) -> bool | None:
    """Dagster's staleness of one (stage, key) from the fetched records; None
    when they do not suffice (then Dagster's resolver decides)."""
    record = latest[stage_key].get(key)
    node = asset_graph.get(stage_key)
    provenance = extract_data_provenance_from_entry(record.event_log_entry) if record else None
    if record is None or provenance is None or node.is_external or node.is_virtual:
        return None
    if extract_data_version_from_entry(record.event_log_entry) is None:
        return None
    if node.code_version and node.code_version != provenance.code_version:
        return True
    parents = node.parent_keys
    if set(provenance.input_data_versions) - set(parents):
        return True  # computed from a dependency it no longer has
    for dep_key in parents:
        dep_node = asset_graph.get(dep_key)
        mapping = asset_graph.get_partition_mapping(stage_key, dep_key)
        if dep_key not in latest or dep_node.is_virtual or not isinstance(mapping, IdentityPartitionMapping):
            return None  # another partitioning than one recording per partition
        if not provenance.has_input_asset(dep_key):
            return True  # a new dependency
        cursor = provenance.input_storage_ids.get(dep_key)
        dep_latest = latest[dep_key].get(key)
        if not cursor or dep_latest is None or dep_latest.storage_id <= cursor:
            continue  # nothing newer upstream
        read = consumed.get((dep_key, cursor))
        if read is None or read[0] != key:
            return None  # what it read is not a materialization of this partition
        if read[1] != extract_data_version_from_entry(dep_latest.event_log_entry):
            return True  # upstream has another data version than it read
    return False


def _failure_reasons(instance, stage, keys: list[str], statuses: dict) -> dict[str, str]:
    """Why each failed partition of ``stage`` failed: its latest observation's error."""
    failed = [k for k in keys if statuses.get(k) == AssetPartitionStatus.FAILED]
    reasons = {}
    for record in latest_records(instance, stage.key, DagsterEventType.ASSET_OBSERVATION, failed):
        error = record.event_log_entry.asset_observation.metadata.get(ERROR_KEY)
        if error is not None:
            reasons[record.partition_key] = str(error.value).splitlines()[0][:300]
    return reasons


def _changed_in_inbox(store: RecordingStore, key: str) -> bool:
    """The inbox file differs from what intake took in: compared by size and
    mtime first, by SHA-256 only when those differ (a touched file)."""
    intake_path = store.output_path(key, AUDIO_JSON)
    try:
        intake = json.loads(intake_path.read_text())
        path = find_recording(store.inbox_dir, key)
        stat = path.stat()
    except (OSError, ValueError, PermanentError):
        return False  # gone from the inbox: the custody check reports that when a stage runs
    if stat.st_size == intake.get("size_bytes") and stat.st_mtime_ns == intake.get("source_mtime_ns"):
        return False
    return sha256_file(path) != intake["sha256"]


def _result_folders(store: RecordingStore) -> set[str]:
    """Names of the recordings' folders under outputs/: one listing, so that
    recordings without results (most, in a big backlog) cost no file access."""
    try:
        with os.scandir(store.outputs_dir) as entries:
            return {entry.name for entry in entries if entry.is_dir()}
    except FileNotFoundError:
        return set()


def _row(store: RecordingStore, key: str, status: str, has_folder: bool = True) -> RecordingStatus:
    if not has_folder:
        return RecordingStatus(key, None, status, "-", "-")
    folder = store.file_dir(key)
    duration = None
    if (folder / AUDIO_JSON).is_file():
        duration = json.loads((folder / AUDIO_JSON).read_text())["duration_s"]
    risk = "-"
    if status == "done" and (folder / FORENSIC_JSON).is_file():
        forensic = json.loads((folder / FORENSIC_JSON).read_text())
        risk = f"{forensic['risk_score']:.0f} {forensic['risk_level']}"
    from voiceman_pipeline.evidence import superseded_contents

    return RecordingStatus(
        key, duration, status, risk, str(folder) if folder.is_dir() else "-",
        replaced=len(superseded_contents(store, key)),
    )
