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
from dataclasses import dataclass

from dagster import AssetPartitionStatus, DagsterEventType, DagsterInstance
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContextForTest

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
    """Status of each key: one storage query per stage for the partition
    statuses, staleness only for recordings whose every stage is materialized."""
    if asset_graph is None:
        from voiceman_pipeline.definitions import defs

        asset_graph = defs.resolve_asset_graph()
    by_stage = {
        stage.name: instance.get_status_by_partition(stage.key, keys, audio_files) or {}
        for stage in STAGES
    }
    reasons = {stage.name: _failure_reasons(instance, stage, keys, by_stage[stage.name]) for stage in STAGES}
    retired = retirements(instance, keys)
    resolver = CachingStaleStatusResolver(instance, asset_graph, LoadingContextForTest(instance))
    rows = []
    for key in keys:
        statuses = {name: found.get(key) for name, found in by_stage.items()}
        if key in retired:
            status = f"retired: {retired[key]}"
        else:
            status = _status_of(store, resolver, key, statuses, reasons)
        rows.append(_row(store, key, status))
    return rows


def _status_of(store, resolver, key: str, statuses: dict, reasons: dict) -> str:
    for name, status in statuses.items():
        if status == AssetPartitionStatus.FAILED:
            reason = reasons[name].get(key)
            return f"failed at {name}" + (f": {reason}" if reason else "")
    if any(s == AssetPartitionStatus.IN_PROGRESS for s in statuses.values()):
        return "in progress"
    if not all(s == AssetPartitionStatus.MATERIALIZED for s in statuses.values()):
        return "pending"
    if _changed_in_inbox(store, key):
        return "changed in inbox: re-run audio"
    for stage in STAGES:  # in chain order: the stages before it are current
        if resolver.get_status(stage.key, key) == StaleStatus.STALE:
            return f"stale: re-run {stage.name}"
    return "done"


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


def _row(store: RecordingStore, key: str, status: str) -> RecordingStatus:
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
