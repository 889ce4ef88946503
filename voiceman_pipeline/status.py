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
    DATA_VERSION_TAG,
    CachingStaleStatusResolver,
    StaleStatus,
)
from dagster._core.definitions.partitions.context import partition_loading_context
from dagster._core.definitions.partitions.mapping import IdentityPartitionMapping
from dagster._core.instance.types import CachingDynamicPartitionsLoader
from dagster._core.loader import LoadingContextForTest
from dagster._core.storage.event_log.base import AssetRecord
from dagster._core.storage.event_log.schema import SqlEventLogStorageTable
from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage
from dagster._core.storage.sqlalchemy_compat import db_select
from dagster._core.storage.partition_status_cache import (
    AssetStatusCacheValue,
    get_and_update_asset_status_cache_value,
)

from voiceman_pipeline.assets.checkpoint import ERROR_KEY, latest_records
from voiceman_pipeline.assets.stages import STAGES
from voiceman_pipeline.audio_io import sha256_file
from voiceman_pipeline.engines.forensic.text_risk import describe_risk, highest_category
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
    risk: str  # "<score> (<level>)[, <strongest category> <score> (<level>)]" once done
    outputs: str
    replaced: int = 0  # earlier contents of the file whose results are kept (superseded/)
    altered: int = 0  # results (a stage's files at one time) found edited or damaged, set aside (altered/)
    gone: bool = False  # done, but its recording is no longer in the inbox (verify says so too)
    unreadable: tuple[str, ...] = ()  # result files it reads that are not valid JSON (verify names them)
    # (strongest category's score, overall score) once done, to list the riskiest
    # first as the UI's summary table does (``by_risk``); overall -1 without words.
    scores: tuple[float, float] | None = None

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
    instance: DagsterInstance,
    store: RecordingStore,
    keys: list[str],
    asset_graph=None,
    partitions: CachingDynamicPartitionsLoader | None = None,
) -> list[RecordingStatus]:
    """Status of each key: a fixed number of storage queries for any number of
    keys (per stage: partition statuses, failure reasons, latest
    materializations for staleness), none per recording. ``partitions``: the
    loader that already read the registered keys (``voiceman status``), so
    that they are read once."""
    by_stage = partition_statuses(instance, keys, partitions)
    reasons = {stage.name: _failure_reasons(instance, stage, keys, by_stage[stage.name]) for stage in STAGES}
    retired = retirements(instance, keys)
    # Keys that no stage has a status for (most of a big backlog) are pending.
    touched = set().union(*by_stage.values())
    rows, settled = {}, []
    for key in keys:
        if key in retired:
            rows[key] = f"retired: {retired[key]}"
        elif key not in touched:
            rows[key] = "pending"
        else:
            statuses = {name: found.get(key) for name, found in by_stage.items()}
            rows[key] = _status_of(key, statuses, reasons)
            if rows[key] is None:  # every stage materialized: changed or stale or done
                settled.append(key)
    inbox = {key: _inbox_state(store, key) for key in settled}
    changed = {key for key in settled if inbox[key] == "changed"}
    for key in changed:
        rows[key] = "changed in inbox: re-run audio"
    unchanged = [key for key in settled if key not in changed]
    if unchanged and asset_graph is None:
        asset_graph = stages_asset_graph()
    stale = first_stale_stages(instance, asset_graph, unchanged)
    for key in unchanged:
        rows[key] = f"stale: re-run {stale[key]}" if key in stale else "done"
    with_results = _result_folders(store)
    return [_row(store, key, rows[key], key in with_results, gone=inbox.get(key) == "gone") for key in keys]


def stages_asset_graph():
    """The asset graph of the stages as the environment configures them (their
    code versions and dependencies, what staleness compares): built from the
    stages' multi-asset alone, without importing the code location
    (definitions.py, with the summary asset's pandas), which ``voiceman
    status`` does not otherwise need."""
    from dagster._core.definitions.assets.graph.asset_graph import AssetGraph

    from voiceman_pipeline.assets.pipeline import build_recording_analysis
    from voiceman_pipeline.settings import Settings

    return AssetGraph.from_assets([build_recording_analysis(Settings.from_env().batch_size)])


def partition_statuses(
    instance: DagsterInstance, keys: list[str], loader: CachingDynamicPartitionsLoader | None = None
) -> dict[str, dict]:
    """Per stage, what ``instance.get_status_by_partition`` says of the keys
    that have a status (a key it leaves out has none), from Dagster's asset
    status cache as the UI reads it: the registered keys read once for all
    stages (that method reads all of them twice per call, tens of thousands
    of rows each time) and the stages' asset records in one query."""
    loader = loader or CachingDynamicPartitionsLoader(instance)
    context = LoadingContextForTest(instance)
    wanted = set(keys)
    found = {}
    with partition_loading_context(None, loader):
        AssetRecord.blocking_get_many(context, [stage.key for stage in STAGES])
        for stage in STAGES:
            value = get_and_update_asset_status_cache_value(
                instance, stage.key, audio_files, dynamic_partitions_loader=loader, loading_context=context
            )
            if not isinstance(value, AssetStatusCacheValue):
                found[stage.name] = {}
                continue
            # Later wins: in progress over failed over materialized, as that method says.
            statuses = {}
            for status, subset in (
                (AssetPartitionStatus.MATERIALIZED, value.deserialize_materialized_partition_subsets),
                (AssetPartitionStatus.FAILED, value.deserialize_failed_partition_subsets),
                (AssetPartitionStatus.IN_PROGRESS, value.deserialize_in_progress_partition_subsets),
            ):
                statuses.update(dict.fromkeys(wanted.intersection(subset(audio_files).get_partition_keys()), status))
            found[stage.name] = statuses
    return found


# A partition marked failed with no error recorded for it: its run ended
# failed without finishing it (its process killed, or a failure outside any
# one recording).
NO_REASON = ("its run ended without finishing it (its process killed, or a failure outside "
             "the recording); voiceman retry-failed runs it again")


def _status_of(key: str, statuses: dict, reasons: dict) -> str | None:
    """The status that the partition statuses alone decide; None when every
    stage is materialized (then the inbox and staleness decide)."""
    for name, status in statuses.items():
        if status == AssetPartitionStatus.FAILED:
            reason = reasons[name].get(key) or NO_REASON
            return f"failed at {name}: {reason}"
    if any(s == AssetPartitionStatus.IN_PROGRESS for s in statuses.values()):
        return "in progress"
    if not all(s == AssetPartitionStatus.MATERIALIZED for s in statuses.values()):
        return "pending"
    return None


def first_stale_stages(instance: DagsterInstance, asset_graph, keys: list[str]) -> dict[str, str]:
    """Per key that has any, the first stage in chain order that Dagster's
    staleness calls STALE (the stages before it are current).

    The same rule as Dagster's ``CachingStaleStatusResolver`` (what the UI
    shows), decided from the tags of the latest materialization of every
    (stage, key) (its code version, data version and provenance), read in a
    few queries per stage instead of several per (stage, key): a stage is
    stale when its code version differs from the one it was materialized
    with, when it was computed from a dependency it no longer has or without
    one it now has, or when a dependency has a newer materialization with
    another data version than the one it read. Where a record lacks what that
    needs (no provenance tags), Dagster's resolver decides that one (stage, key).
    """
    if not keys:
        return {}
    cache = _TagCache(instance)
    # stage key -> partition -> (storage id, provenance, data version) of its latest materialization
    latest = {}
    for stage in STAGES:
        ids = instance.event_log_storage.get_latest_storage_id_by_partition(
            stage.key, DagsterEventType.ASSET_MATERIALIZATION, partitions=set(keys)
        )
        tags = cache.tags(stage.key, ids.values())
        latest[stage.key] = {
            key: (storage_id, _provenance(tags[storage_id][1]), _data_version(tags[storage_id][1]))
            for key, storage_id in ids.items()
            if storage_id in tags and tags[storage_id][0] == key
        }
    consumed = _consumed_versions(cache, latest)
    rules = {stage.key: _stage_rule(asset_graph, stage.key, latest) for stage in STAGES}
    resolver = None
    found = {}
    for key in keys:
        for stage in STAGES:
            stale = _is_stale(rules[stage.key], stage.key, key, latest, consumed)
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


# The tags staleness reads (Dagster's data version and provenance tags).
_PROVENANCE_PREFIXES = ("dagster/code_version", "dagster/data_version", "dagster/logical_version",
                        "dagster/input_data_version/", "dagster/input_logical_version/",
                        "dagster/input_event_pointer/")


class _TagCache:
    """The partition and provenance tags of materializations, by storage id,
    each read once per status (the staleness of a stage reads its upstream's
    again). Kept in memory only: a file would outlive a switch of storage
    (VOICEMAN_PG_URL), whose storage ids mean other events."""

    def __init__(self, instance: DagsterInstance):
        self.instance = instance
        self.entries: dict[int, tuple[str, str | None, dict[str, str]]] = {}

    def tags(self, asset_key, storage_ids) -> dict[int, tuple[str | None, dict[str, str]]]:
        """storage id -> (partition, provenance tags) of materializations of ``asset_key``."""
        name = asset_key.to_user_string()
        found, missing = {}, []
        for storage_id in storage_ids:
            entry = self.entries.get(storage_id)
            if entry is not None and entry[0] == name:
                found[storage_id] = (entry[1], entry[2])
            else:
                missing.append(storage_id)
        for storage_id, partition, tags in _read_tags(self.instance, asset_key, missing):
            kept = {k: v for k, v in tags.items() if k.startswith(_PROVENANCE_PREFIXES)}
            found[storage_id] = (partition, kept)
            self.entries[storage_id] = (name, partition, kept)
        return found


def _read_tags(instance, asset_key, storage_ids):
    """(storage id, partition, tags) of the materializations with those ids.

    On SQL storage the stored JSON is read for its tags alone: Dagster's full
    deserialization of each event (every metadata value as an object) costs
    about ten times as much and is most of the time ``voiceman status`` takes
    once thousands of recordings are processed."""
    ids = sorted(set(storage_ids))
    if not ids:
        return []
    found, rest = [], ids
    storage = instance.event_log_storage
    if isinstance(storage, SqlEventLogStorage):
        rest = []
        for start in range(0, len(ids), 2000):  # under any backend's bound-parameter limit
            chunk = ids[start : start + 2000]
            table = SqlEventLogStorageTable
            query = db_select([table.c.id, table.c.event]).where(table.c.id.in_(chunk))
            with storage.index_connection() as conn:
                rows = conn.execute(query).fetchall()
            seen = set()
            for storage_id, event in rows:
                try:
                    data = json.loads(event)["dagster_event"]["event_specific_data"]["materialization"]
                    asset = data["asset_key"]["path"]
                    tags = data.get("tags") or {}
                    if not isinstance(tags, dict) or asset != list(asset_key.path):
                        raise ValueError("not this asset's materialization, or tags in another form")
                    found.append((storage_id, data.get("partition"), tags))
                    seen.add(storage_id)
                except (ValueError, KeyError, TypeError):
                    pass  # read it the regular way below
            rest = [i for i in chunk if i not in seen] + rest
    if rest:
        result = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=asset_key, storage_ids=rest), limit=len(rest)
        )
        for record in result.records:
            found.append((record.storage_id, record.partition_key, dict(record.event_log_entry.tags or {})))
    return found


def _consumed_versions(cache: _TagCache, latest: dict) -> dict:
    """(dependency key, storage id) -> (partition, data version) of each upstream
    materialization that some latest stage materialization was computed from,
    where the dependency has a newer one since (only then does it matter)."""
    by_name = {asset_key.to_user_string(): asset_key for asset_key in latest}
    wanted: dict = {}
    for records in latest.values():
        for key, (_, provenance, _) in records.items():
            for dep_name, storage_id in (provenance.input_storage_ids if provenance else {}).items():
                dep_key = by_name.get(dep_name)
                dep_latest = latest[dep_key].get(key) if dep_key else None
                if storage_id and dep_latest is not None and dep_latest[0] > storage_id:
                    wanted.setdefault(dep_key, set()).add(storage_id)
    consumed = {}
    for dep_key, ids in wanted.items():
        for storage_id, (partition, tags) in cache.tags(dep_key, ids).items():
            consumed[(dep_key, storage_id)] = (partition, _data_version(tags))
    return consumed


@dataclass(frozen=True)
class _Provenance:
    """What ``DataProvenance.from_tags`` reads from a materialization's tags,
    with the dependencies as user strings ("audio"), parsed as it parses them
    (a dependency's key is everything after the tag's second slash): built for
    every (stage, recording) on each status, where Dagster's AssetKey and
    DataVersion objects cost several times more."""

    code_version: str
    inputs: frozenset[str]  # dependencies it read (input data version tags)
    input_storage_ids: dict[str, int | None]  # dependency -> storage id of what it read

    def has_input_asset(self, name: str) -> bool:
        return name in self.inputs


_INPUT_VERSION_PREFIXES = ("dagster/input_data_version/", "dagster/input_logical_version/")
_INPUT_POINTER_PREFIX = "dagster/input_event_pointer/"


def _provenance(tags: dict) -> _Provenance | None:
    code_version = tags.get("dagster/code_version")
    if code_version is None:
        return None
    inputs, pointers = set(), {}
    for tag, value in tags.items():
        if tag.startswith(_INPUT_VERSION_PREFIXES):
            inputs.add(tag.split("/", 2)[-1])
        elif tag.startswith(_INPUT_POINTER_PREFIX):
            pointers[tag.split("/", 2)[-1]] = None if value == "NULL" else int(value)
    return _Provenance(code_version, frozenset(inputs), pointers)


def _data_version(tags: dict) -> str | None:
    """The data version's value (Dagster's tag, or its older name)."""
    return tags.get(DATA_VERSION_TAG) or tags.get("dagster/logical_version")


def _stage_rule(asset_graph, stage_key, latest: dict) -> tuple[str | None, dict] | None:
    """What staleness compares for ``stage_key``, the same for every partition:
    its code version and dependencies; None when the fetched records cannot
    decide it (an external or virtual asset, another partitioning than one
    recording per partition): then Dagster's resolver decides."""
    node = asset_graph.get(stage_key)
    if node.is_external or node.is_virtual:
        return None
    parents = tuple(node.parent_keys)
    for dep_key in parents:
        mapping = asset_graph.get_partition_mapping(stage_key, dep_key)
        if dep_key not in latest or asset_graph.get(dep_key).is_virtual or not isinstance(
            mapping, IdentityPartitionMapping
        ):
            return None
    return node.code_version, {dep_key: dep_key.to_user_string() for dep_key in parents}


def _is_stale(rule, stage_key, key: str, latest: dict, consumed: dict) -> bool | None:
    """Dagster's staleness of one (stage, key) from the fetched tags; None
    when they do not suffice (then Dagster's resolver decides)."""
    found = latest[stage_key].get(key)
    if rule is None or found is None or found[1] is None or found[2] is None:
        return None  # no record, or no provenance or data version in it
    code_version, parents = rule
    provenance = found[1]
    if code_version and code_version != provenance.code_version:
        return True
    if provenance.inputs - set(parents.values()):
        return True  # computed from a dependency it no longer has
    for dep_key, dep_name in parents.items():
        if not provenance.has_input_asset(dep_name):
            return True  # a new dependency
        cursor = provenance.input_storage_ids.get(dep_name)
        dep_latest = latest[dep_key].get(key)
        if not cursor or dep_latest is None or dep_latest[0] <= cursor:
            continue  # nothing newer upstream
        read = consumed.get((dep_key, cursor))
        if read is None or read[0] != key:
            return None  # what it read is not a materialization of this partition
        if read[1] != dep_latest[2]:
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


def stale_recordings(instance: DagsterInstance, keys: list[str], by_stage: dict | None = None) -> dict[str, str]:
    """Of ``keys``, those done but for Dagster's staleness (code or options changed
    since, or a stage computed again alone): {key: the first stage to re-run}, as
    ``voiceman status`` reads "stale: re-run <stage>". Retired ones are left out.
    ``by_stage``: ``partition_statuses`` of (at least) ``keys``, where already read."""
    if not keys:
        return {}
    by_stage = by_stage or partition_statuses(instance, keys)
    done = AssetPartitionStatus.MATERIALIZED
    settled = [key for key in keys if all(found.get(key) == done for found in by_stage.values())]
    retired = retirements(instance, settled)
    settled = [key for key in settled if key not in retired]
    return first_stale_stages(instance, stages_asset_graph(), settled) if settled else {}


def _inbox_state(store: RecordingStore, key: str) -> str | None:
    """"changed" when the inbox file differs from what intake took in (compared by
    size and mtime first, by SHA-256 only when those differ: a touched file),
    "gone" when it is no longer there (or unreadable, or now a link), else None."""
    try:
        intake = json.loads(store.output_path(key, AUDIO_JSON).read_text())
    except (OSError, ValueError):
        return None  # no intake on disk to compare with
    try:
        path = find_recording(store.inbox_dir, key)
        stat = path.stat()
    except (OSError, PermanentError):
        return "gone"
    if stat.st_size == intake.get("size_bytes") and stat.st_mtime_ns == intake.get("source_mtime_ns"):
        return None
    return "changed" if sha256_file(path) != intake["sha256"] else None


def _result_folders(store: RecordingStore) -> set[str]:
    """Names of the recordings' folders under outputs/: one listing, so that
    recordings without results (most, in a big backlog) cost no file access."""
    try:
        with os.scandir(store.outputs_dir) as entries:
            return {entry.name for entry in entries if entry.is_dir()}
    except FileNotFoundError:
        return set()


def _row(store: RecordingStore, key: str, status: str, has_folder: bool = True,
         gone: bool = False) -> RecordingStatus:
    if not has_folder:
        return RecordingStatus(key, None, status, "-", "-")
    folder = store.file_dir(key)
    unreadable = []

    def read(name: str) -> dict | None:  # a damaged file is named, not a traceback
        try:
            return json.loads((folder / name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, UnicodeDecodeError):
            unreadable.append(name)
            return None

    intake = read(AUDIO_JSON)
    forensic = read(FORENSIC_JSON) if status == "done" else None
    risk, scores = "-", None
    try:
        if forensic:
            risk = describe_risk(forensic["risk_score"], forensic["risk_level"], forensic["categories"],
                                 forensic["low_confidence_transcript"])
            overall = forensic["risk_score"]
            scores = (highest_category(forensic["categories"])[1], -1.0 if overall is None else overall)
    except (KeyError, TypeError):  # valid JSON, not a forensic result
        risk, unreadable = "-", [*unreadable, FORENSIC_JSON]
    from voiceman_pipeline.evidence import altered_results, superseded_contents

    return RecordingStatus(
        key, intake.get("duration_s") if isinstance(intake, dict) else None, status, risk,
        str(folder) if folder.is_dir() else "-",
        replaced=len(superseded_contents(store, key)), altered=len(altered_results(store, key)), gone=gone,
        unreadable=tuple(unreadable),
        scores=scores,
    )
