"""What Dagster's storage says about each (stage, recording): the one checkpoint.

Every materialization of a stage carries Dagster's own data-version tags:

- ``dagster/code_version``: the stage's code version with its configured options;
- ``dagster/data_version``: for ``audio`` the recording's SHA-256; for the
  others a SHA-256 over the stage's code version, its options (engine, model,
  settings) and the data versions of the upstream results it read;
- ``dagster/input_data_version/<stage>`` and ``dagster/input_event_pointer/<stage>``:
  the upstream materializations it was computed from. Dagster's staleness
  (the UI's "out of date", ``voiceman status``) compares these with what is
  there now;

and, as metadata, ``output_sha256``: the digest of every file it wrote.

A (stage, recording) is **current** when its latest materialization has the
code version and data version the stage would produce now, its files on
disk still have the recorded digests, and the upstream files it records having
read (``inputs`` in its JSON) are the ones recorded for those stages now. A
current pair is never computed again,
whichever way a run was started (sensor, backfill, re-execution, crash
relaunch, CLI): that is what makes every entry point resume instead of redo.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagster import (
    AssetKey,
    AssetRecordsFilter,
    DagsterEventType,
    DagsterInstance,
    EventLogRecord,
    MetadataValue,
)
from dagster._core.definitions.data_version import (
    CODE_VERSION_TAG,
    DATA_VERSION_IS_USER_PROVIDED_TAG,
    DATA_VERSION_TAG,
    get_input_data_version_tag,
    get_input_event_pointer_tag,
)

from voiceman_pipeline.assets.stages import Stage
from voiceman_pipeline.audio_io import sha256_file

OUTPUTS_KEY = "output_sha256"
# On the observation logged when a recording fails at (or before) a stage.
ERROR_KEY = "error"
ERROR_CATEGORY_KEY = "error_category"
FAILED_STAGE_KEY = "failed_stage"
# On audio's materializations and failure observations: the file content an
# intake took in or tried (the inbox sensor compares files with these).
SOURCE_SHA256 = "source_sha256"
SOURCE_SIZE = "source_size_bytes"
SOURCE_MTIME_NS = "source_mtime_ns"
# On every materialization: True when its run computed the result, False when
# a run confirmed a result that was already current; and on a confirmation, the
# run that computed it.
COMPUTED_KEY = "computed"
COMPUTED_IN_RUN = "computed_in_run"


@dataclass(frozen=True)
class Recorded:
    """The latest materialization of one (stage, recording) in Dagster's storage."""

    storage_id: int
    run_id: str
    code_version: str | None
    data_version: str | None
    outputs: dict[str, str]  # file name -> SHA-256 when it was written
    metadata: dict[str, MetadataValue]  # all of it: what the UI shows of the result

    @property
    def computed_in(self) -> str | None:
        """The run that computed the result: this one, or the one a confirmation
        names (None for a confirmation from before they named it)."""
        named = self.metadata.get(COMPUTED_IN_RUN)
        if named is not None:
            return str(named.value)
        confirmed = self.metadata.get(COMPUTED_KEY)
        return None if confirmed is not None and confirmed.value is False else self.run_id


def latest_records(
    instance: DagsterInstance, asset_key: AssetKey, event_type: DagsterEventType, keys: list[str]
) -> list[EventLogRecord]:
    """The latest materialization (or observation) of each partition in ``keys``:
    two queries for any number of keys, not one per partition."""
    if not keys:
        return []
    ids = instance.event_log_storage.get_latest_storage_id_by_partition(
        asset_key, event_type, partitions=set(keys)
    )
    if not ids:
        return []
    fetch = (
        instance.fetch_materializations
        if event_type == DagsterEventType.ASSET_MATERIALIZATION
        else instance.fetch_observations
    )
    records_filter = AssetRecordsFilter(asset_key=asset_key, storage_ids=list(ids.values()))
    return list(fetch(records_filter, limit=len(ids)).records)


def latest_materializations(
    instance: DagsterInstance, stage: Stage, keys: list[str]
) -> dict[str, Recorded]:
    """The latest materialization per recording."""
    found = {}
    for record in latest_records(instance, stage.key, DagsterEventType.ASSET_MATERIALIZATION, keys):
        event = record.event_log_entry
        tags = (event.asset_materialization.tags if event.asset_materialization else None) or {}
        outputs = event.asset_materialization.metadata.get(OUTPUTS_KEY)
        found[record.partition_key] = Recorded(
            storage_id=record.storage_id,
            run_id=record.run_id,
            code_version=tags.get(CODE_VERSION_TAG),
            data_version=tags.get(DATA_VERSION_TAG),
            outputs=dict(outputs.value) if outputs is not None else {},
            metadata=dict(event.asset_materialization.metadata),
        )
    return found


def marked_failed(instance: DagsterInstance, asset_key: AssetKey, keys: list[str]) -> set[str]:
    """Those of ``keys`` Dagster marks failed for ``asset_key``: a run that
    planned them failed, and no materialization came after. Read from Dagster's
    partition status cache, where a failed partition stays failed while a new
    run has it in progress; the single status ``get_status_by_partition`` gives
    shows only "in progress" then, inside the very run that could turn it green."""
    from dagster._core.storage.partition_status_cache import (
        get_and_update_asset_status_cache_value,
    )

    from voiceman_pipeline.partitions import audio_files

    cached = get_and_update_asset_status_cache_value(instance, asset_key, audio_files)
    if cached is None:
        return set()
    failed = cached.deserialize_failed_partition_subsets(audio_files)
    return {key for key in keys if key in failed}


def derived_data_version(
    stage: Stage, options: dict[str, Any], upstream: dict[str, Recorded]
) -> str:
    """Data version of a stage that reads other stages: what it was computed from."""
    payload = {
        "stage": stage.name,
        "code": stage.code_version,
        "options": options,
        "inputs": {name: upstream[name].data_version for name in stage.reads},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def is_current(
    recorded: Recorded | None,
    code_version: str,
    data_version: str,
    folder: Path,
    stage: Stage,
    upstream: dict[str, Recorded],
) -> bool:
    """True when the recorded result is the one the stage would compute now,
    its files are intact (a damaged or deleted output makes it not current)
    and it was computed from the upstream results there now (``changed_inputs``)."""
    return (
        recorded is not None
        and recorded.code_version == code_version
        and recorded.data_version == data_version
        and outputs_intact(folder, recorded.outputs)
        and not changed_inputs(folder, stage, upstream)
    )


def outputs_present(folder: Path, digests: dict[str, str]) -> bool:
    """Every file of a result there (its content not checked); False for a result
    recorded before outputs were digested: nothing can vouch for it."""
    return bool(digests) and all((folder / name).is_file() for name in digests)


def outputs_intact(folder: Path, digests: dict[str, str]) -> bool:
    return outputs_present(folder, digests) and all(
        sha256_file(folder / name) == digest for name, digest in digests.items())


# ``changed_inputs``' key for a result that records no inputs (written by an earlier version).
INPUTS_NOT_RECORDED = "inputs"


def why_inputs_changed(changed: dict[str, tuple[str, str]]) -> str:
    """``changed_inputs``' answer as the reason a result is computed again."""
    if INPUTS_NOT_RECORDED in changed:
        return "it does not record which upstream files it was computed from (an earlier version wrote it)"
    return f"computed from an earlier {', '.join(changed)} (computed again since)"


def changed_inputs(folder: Path, stage: Stage, upstream: dict[str, Recorded]) -> dict[str, tuple[str, str]]:
    """The upstream files a stage's result was computed from (the ``inputs``
    its JSON records) that are no longer the ones recorded there now: file name
    -> (digest the result recorded, digest recorded for it now, or "missing");
    ``INPUTS_NOT_RECORDED`` alone where the result names none.
    An upstream result computed again (its files deleted or damaged, or
    ``recompute``) has the same data version, but not the same bytes (timings
    differ): what was built from the old file must be built again."""
    if not stage.reads:
        return {}
    now = {name: digest for dep in upstream.values() for name, digest in dep.outputs.items()}
    try:
        read = json.loads((folder / stage.writes[0]).read_bytes()).get("inputs")
    except (OSError, ValueError, AttributeError):
        read = None
    if not isinstance(read, dict) or not read:  # no record of what it read: cannot vouch for it
        return {INPUTS_NOT_RECORDED: ("a list of the upstream files it read", "none in the file")}
    return {
        name: (digest, now.get(name, "missing"))
        for name, digest in read.items()
        if now.get(name) != digest
    }


def output_digests(stage: Stage, folder: Path) -> MetadataValue:
    return MetadataValue.json({name: sha256_file(folder / name) for name in stage.writes})


def version_tags(
    stage: Stage, code_version: str, data_version: str, upstream: dict[str, Recorded]
) -> dict[str, str]:
    """Dagster's provenance tags for a materialization (see the module docstring)."""
    tags = {
        CODE_VERSION_TAG: code_version,
        DATA_VERSION_TAG: data_version,
        DATA_VERSION_IS_USER_PROVIDED_TAG: "true",
    }
    for name in stage.reads:
        dep = upstream[name]
        key = AssetKey(name)
        tags[get_input_data_version_tag(key)] = dep.data_version or ""
        tags[get_input_event_pointer_tag(key)] = str(dep.storage_id)
    return tags
