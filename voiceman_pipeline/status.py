"""Per-recording status, read from Dagster's storage (the only checkpoint)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dagster import AssetPartitionStatus, DagsterInstance

from voiceman_pipeline.assets.recording import (
    AUDIO_JSON,
    FORENSIC_JSON,
    REPORT_JSON,
    changed_json_inputs,
)
from voiceman_pipeline.assets.specs import STAGE_KEYS
from voiceman_pipeline.partitions import audio_files
from voiceman_pipeline.resources.outputs import RecordingStore


@dataclass
class RecordingStatus:
    key: str
    duration_s: float | None
    status: str  # "done", "failed at <stage>", "in progress", "pending"
    risk: str  # "<score> <level>" once forensic ran
    outputs: str


def recording_statuses(
    instance: DagsterInstance, store: RecordingStore, keys: list[str]
) -> list[RecordingStatus]:
    """Status of each key: one storage query per stage, not per recording."""
    by_stage = {}
    for asset_key in STAGE_KEYS:
        # None: the asset has no events at all yet (nothing ran).
        found = instance.get_status_by_partition(asset_key, keys, audio_files) or {}
        by_stage[asset_key.to_user_string()] = found
    return [_status_of(store, key, {s: found.get(key) for s, found in by_stage.items()}) for key in keys]


def _status_of(store: RecordingStore, key: str, statuses: dict) -> RecordingStatus:
    failed = [stage for stage, s in statuses.items() if s == AssetPartitionStatus.FAILED]
    if failed:
        status = f"failed at {failed[0]}"
    elif any(s == AssetPartitionStatus.IN_PROGRESS for s in statuses.values()):
        status = "in progress"
    elif all(s == AssetPartitionStatus.MATERIALIZED for s in statuses.values()):
        status = "done" if not _stale(store.file_dir(key)) else "stale: re-run report"
    else:
        status = "pending"
    folder = store.file_dir(key)
    duration = None
    if (folder / AUDIO_JSON).is_file():
        duration = json.loads((folder / AUDIO_JSON).read_text())["duration_s"]
    risk = "-"
    if status == "done" and (folder / FORENSIC_JSON).is_file():
        forensic = json.loads((folder / FORENSIC_JSON).read_text())
        risk = f"{forensic['risk_score']:.0f} {forensic['risk_level']}"
    return RecordingStatus(key, duration, status, risk, str(folder) if folder.is_dir() else "-")


def _stale(folder: Path) -> bool:
    """A report whose inputs were replaced since it was built (a stage re-run)."""
    report = folder / REPORT_JSON
    if not report.is_file():
        return False
    return bool(changed_json_inputs(folder, json.loads(report.read_text()).get("inputs", {})))
