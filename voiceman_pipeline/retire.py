"""Retired recordings: deleted, or permanently bad and accepted as such.

A retirement is an ``AssetObservation`` of the ``audio`` asset's partition in
Dagster's storage, metadata ``{"retired": <reason>}``; ``voiceman retire
--undo`` logs one with ``{"unretired": <the former reason>}``. Nothing is
deleted: outputs and Dagster's history stay. A retired recording reads
``retired: <reason>`` in ``voiceman status`` and the summary, ``voiceman
run`` / ``retry-failed`` leave it alone, and a run launched for it anyway (the
UI's failed partitions, a backfill) skips it while its file has the content
retired, saying why (``assets/pipeline.py``).

A recording is retired while its latest ``audio`` observation is a
retirement and no ``audio`` materialization came after it: a later intake
(the file replaced and taken in again, successfully or not) un-retires it.

Both observations also carry the intake facts of the latest intake they are
about (source SHA-256, size, mtime, and its error if it failed): readers of
the latest ``audio`` observation (``sensors.recorded_intakes``, the failure
reason in ``status``) then still see that intake, so the inbox sensor does
not take an unchanged retired file in again. A recording never taken in
gets the facts of its file in the inbox now, for the same reason: retiring
covers that content; new content in the file is taken in and un-retires it.
"""

from __future__ import annotations

import sys

from dagster import AssetObservation, DagsterEventType, DagsterInstance, MetadataValue

from voiceman_pipeline.assets.checkpoint import (
    ERROR_CATEGORY_KEY,
    ERROR_KEY,
    SOURCE_MTIME_NS,
    SOURCE_SHA256,
    SOURCE_SIZE,
    latest_records,
)
from voiceman_pipeline.assets.stages import AUDIO
from voiceman_pipeline.audio_io import sha256_file
from voiceman_pipeline.errors import PermanentError
from voiceman_pipeline.inbox import find_recording
from voiceman_pipeline.partitions import audio_files
from voiceman_pipeline.resources.outputs import RecordingStore

RETIRED_KEY = "retired"  # the reason it was retired
UNRETIRED_KEY = "unretired"  # the reason it had been retired for, on an undo
# Copied from the latest intake onto (un)retirement observations (see above).
INTAKE_KEYS = (SOURCE_SHA256, SOURCE_SIZE, SOURCE_MTIME_NS, ERROR_KEY, ERROR_CATEGORY_KEY)


def retirements(instance: DagsterInstance, keys: list[str]) -> dict[str, str]:
    """Reason per retired recording among ``keys``: two reads (``latest_records``), not one per key."""
    retired = retirement_metadata(instance, keys)
    return {key: str(metadata[RETIRED_KEY].value) for key, metadata in retired.items()}


def retirement_metadata(instance: DagsterInstance, keys: list[str]) -> dict[str, dict[str, MetadataValue]]:
    """The retirement observation's metadata (reason, and the intake facts of
    the content retired) per retired recording among ``keys``."""
    observed = latest_records(instance, AUDIO.key, DagsterEventType.ASSET_OBSERVATION, keys)
    retired = {
        r.partition_key: r
        for r in observed
        if RETIRED_KEY in r.event_log_entry.asset_observation.metadata
    }
    if not retired:
        return {}
    taken_in = {
        r.partition_key: r.storage_id
        for r in latest_records(instance, AUDIO.key, DagsterEventType.ASSET_MATERIALIZATION, list(retired))
    }
    return {
        key: dict(record.event_log_entry.asset_observation.metadata)
        for key, record in retired.items()
        if taken_in.get(key, -1) < record.storage_id  # no intake since
    }


def _latest_intake_facts(
    instance: DagsterInstance, store: RecordingStore, keys: list[str]
) -> dict[str, dict]:
    """Per key, the intake metadata (INTAKE_KEYS) of its latest audio event that
    has any, else those of its file in the inbox now (none if it is gone)."""
    latest: dict[str, tuple[int, dict]] = {}
    for event_type in (DagsterEventType.ASSET_MATERIALIZATION, DagsterEventType.ASSET_OBSERVATION):
        for record in latest_records(instance, AUDIO.key, event_type, keys):
            event = record.event_log_entry
            metadata = (event.asset_materialization or event.asset_observation).metadata
            facts = {name: metadata[name] for name in INTAKE_KEYS if name in metadata}
            if SOURCE_SHA256 not in facts:
                continue
            key = record.partition_key
            if key not in latest or latest[key][0] < record.storage_id:
                latest[key] = (record.storage_id, facts)
    found = {key: facts for key, (_, facts) in latest.items()}
    for key in keys:
        if key not in found:
            try:
                path = find_recording(store.inbox_dir, key)
                stat = path.stat()
                found[key] = {
                    SOURCE_SHA256: MetadataValue.text(sha256_file(path)),
                    SOURCE_SIZE: MetadataValue.int(stat.st_size),
                    SOURCE_MTIME_NS: MetadataValue.int(stat.st_mtime_ns),
                }
            except (OSError, PermanentError):
                continue  # gone (or unsafe): nothing for the sensor to take in
    return found


def retire(instance: DagsterInstance, store: RecordingStore, keys: list[str], reason: str) -> None:
    """Log a retirement of each key (already retired ones get the new reason)."""
    facts = _latest_intake_facts(instance, store, keys)
    for key in keys:
        _observe(instance, key, f"retired: {reason}", {**facts.get(key, {}), RETIRED_KEY: reason})


def unretire(instance: DagsterInstance, store: RecordingStore, keys: list[str]) -> list[str]:
    """Undo the retirement of each retired key; returns those that were retired."""
    retired = retirements(instance, keys)
    facts = _latest_intake_facts(instance, store, list(retired))
    for key, reason in retired.items():
        _observe(
            instance, key, f"no longer retired (was: {reason})",
            {**facts.get(key, {}), UNRETIRED_KEY: reason},
        )
    return list(retired)


def _observe(instance: DagsterInstance, key: str, description: str, metadata: dict) -> None:
    """An observation of the recording's ``audio`` partition, outside any run."""
    instance.report_runless_asset_event(
        AssetObservation(asset_key=AUDIO.key, partition=key, description=description, metadata=metadata)
    )


def retire_command(
    instance: DagsterInstance, store: RecordingStore, keys: list[str], reason: str | None, undo: bool
) -> int:
    """``voiceman retire``: 0 when done, 2 (nothing changed) for an unknown key
    or a missing reason."""
    registered = set(instance.get_dynamic_partitions(audio_files.name))
    unknown = [key for key in keys if key not in registered]
    if unknown:
        print(f"voiceman retire: unknown recording(s): {', '.join(unknown)} "
              f"(`voiceman status` lists them); nothing changed", file=sys.stderr)
        return 2
    keys = list(dict.fromkeys(keys))
    if undo:
        done = unretire(instance, store, keys)
        for key in keys:
            print(f"{key}: no longer retired" if key in done else f"{key}: was not retired")
        return 0
    if not reason or not reason.strip():
        print("voiceman retire: --reason is required (why it is retired)", file=sys.stderr)
        return 2
    retire(instance, store, keys, reason.strip())
    for key in keys:
        print(f"{key}: retired: {reason.strip()}")
    return 0
