"""Per-recording status, read from Dagster's storage (the only checkpoint)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from dagster import AssetPartitionStatus, DagsterInstance

from voiceman_pipeline.assets.recording import AUDIO_JSON
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


def recording_status(instance: DagsterInstance, store: RecordingStore, key: str) -> RecordingStatus:
    statuses = {
        asset_key.to_user_string(): instance.get_status_by_partition(asset_key, [key], audio_files)[key]
        for asset_key in STAGE_KEYS
    }
    failed = [stage for stage, s in statuses.items() if s == AssetPartitionStatus.FAILED]
    if failed:
        status = f"failed at {failed[0]}"
    elif any(s == AssetPartitionStatus.IN_PROGRESS for s in statuses.values()):
        status = "in progress"
    elif all(s == AssetPartitionStatus.MATERIALIZED for s in statuses.values()):
        status = "done"
    else:
        status = "pending"
    folder = store.file_dir(key)
    duration = None
    if (folder / AUDIO_JSON).is_file():
        duration = json.loads((folder / AUDIO_JSON).read_text())["duration_s"]
    risk = "-"
    if (folder / "forensic.json").is_file():
        forensic = json.loads((folder / "forensic.json").read_text())
        risk = f"{forensic['risk_score']:.0f} {forensic['risk_level']}"
    return RecordingStatus(key, duration, status, risk, str(folder) if folder.is_dir() else "-")
