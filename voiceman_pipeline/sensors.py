"""``inbox_sensor``: registers new recordings in ``data/inbox/`` and runs them.

Each tick scans the inbox and compares every file with what Dagster's storage
recorded for its key (the SHA-256, size and mtime of its last intake, or of
its last failed intake): a file that is as it was is settled without being
read; a file whose content was already taken in or tried, by whatever path
(this sensor, a backfill, the CLI, the UI), is not run again. A new or
changed file is ready once two ticks agree on its size and mtime, or at once
when it was last modified longer than a tick's interval ago; ready files are
hashed and returned in one ``SensorResult``: the new partition keys, one run
request per batch of up to ``VOICEMAN_BATCH_SIZE`` ready recordings, shared
evenly among the runs whose analysis steps go at once (a
partition range, so models load once per batch; ``run_key`` built from the
content hashes) and the cursor, which holds only files still settling.
``voiceman ingest`` uses the same functions.

``dead_cli_runs_sensor`` cleans up after runs whose process died, and
``summary_sensor`` rebuilds the summary table after new results.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

from dagster import (
    AssetRecordsFilter,
    DagsterEventType,
    DagsterInstance,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from dagster._core.storage.tags import PRIORITY_TAG
from dagster._serdes import serialize_value

from voiceman_pipeline.assets.checkpoint import (
    ERROR_CATEGORY_KEY,
    SOURCE_MTIME_NS,
    SOURCE_SHA256,
    SOURCE_SIZE,
)
from voiceman_pipeline.assets.stages import AUDIO
from voiceman_pipeline.devices import analysis_slots
from voiceman_pipeline.inbox import Cursor, IntakePlan, Known, inbox_missing, plan_intake, quoted, scan_inbox
from voiceman_pipeline.jobs import source_tags, summary_job
from voiceman_pipeline.partitions import audio_files, balanced_batch_size, contiguous_batches, range_tags
from voiceman_pipeline.resources.outputs import RecordingStore
from voiceman_pipeline.settings import Settings

SENSOR_TAGS = source_tags("sensor")


def recorded_intakes(instance: DagsterInstance, keys: list[str]) -> dict[str, Known]:
    """Per key, the content its latest intake took in or tried (whichever came
    last), from Dagster's storage: a few queries for any number of keys.

    Only the latest storage ids are queried on every call; an event is read
    (deserialized: the costly part with thousands of recordings) only when
    this process has not read it before: events never change, and the
    sensor's process lives from tick to tick.
    """
    cache = _INTAKE_CACHE.setdefault(_storage_identity(instance), {})
    latest: dict[str, tuple[int, Known]] = {}
    for event_type in (DagsterEventType.ASSET_MATERIALIZATION, DagsterEventType.ASSET_OBSERVATION):
        ids = (
            instance.event_log_storage.get_latest_storage_id_by_partition(
                AUDIO.key, event_type, partitions=set(keys)
            )
            if keys else {}
        )
        unread = [storage_id for storage_id in ids.values() if storage_id not in cache]
        if unread:
            fetch = (
                instance.fetch_materializations
                if event_type == DagsterEventType.ASSET_MATERIALIZATION
                else instance.fetch_observations
            )
            records_filter = AssetRecordsFilter(asset_key=AUDIO.key, storage_ids=unread)
            for record in fetch(records_filter, limit=len(unread)).records:
                cache[record.storage_id] = (record.partition_key, _known(record))
        for key, storage_id in ids.items():
            partition, known = cache.get(storage_id, (None, None))
            if known is None or partition != key:
                continue  # an observation that is not about an intake attempt
            if key not in latest or latest[key][0] < storage_id:
                latest[key] = (storage_id, known)
    if len(cache) > _INTAKE_CACHE_LIMIT:
        cache.clear()  # rebuilt from storage on the next call
    return {key: known for key, (_, known) in latest.items()}


# Storage identity -> storage id -> (partition key, what that audio event
# recorded, or None when it is not about an intake). A cache, not state: an
# event never changes once stored, and a new process reads them again.
_INTAKE_CACHE: dict[str | None, dict[int, tuple[str, Known | None]]] = {}
_INTAKE_CACHE_LIMIT = 200_000


def _storage_identity(instance: DagsterInstance) -> str | None:
    """What tells two storages apart (storage ids restart in each): the
    instance's configuration."""
    try:
        return serialize_value(instance.get_ref())
    except Exception:  # an instance without a ref (ephemeral): cache per object
        return f"object:{id(instance.event_log_storage)}"


def _known(record) -> Known | None:
    event = record.event_log_entry
    metadata = (event.asset_materialization or event.asset_observation).metadata
    sha = metadata.get(SOURCE_SHA256)
    if sha is None:
        return None
    category = metadata.get(ERROR_CATEGORY_KEY)
    return Known(
        sha.value,
        _int(metadata.get(SOURCE_SIZE)),
        _int(metadata.get(SOURCE_MTIME_NS)),
        failed_permanently=category is not None and category.value == "permanent",
    )


def _int(value) -> int | None:
    return int(value.value) if value is not None else None


def plan_for_inbox(
    instance: DagsterInstance,
    store: RecordingStore,
    cursor: str | None,
    max_new: int,
    settled_after_s: float,
) -> tuple[IntakePlan, list[str], list]:
    """One look at the inbox against Dagster's records: (plan, registered keys, rejections).
    A file untouched for ``settled_after_s`` is ready at once; any other waits for
    a second look that finds it unchanged."""
    scan = scan_inbox(store.inbox_dir, store.max_file_bytes)
    registered = list(instance.get_dynamic_partitions(audio_files.name))
    registered_set = set(registered)  # built once: membership per file must not be O(N)
    known = recorded_intakes(instance, [f.key for f in scan.files if f.key in registered_set])
    plan = plan_intake(
        scan, Cursor.parse(cursor), known, registered_set,
        max_new_per_tick=max_new, settled_after_s=settled_after_s,
    )
    return plan, registered, scan.rejected + plan.refused


def build_inbox_sensor(settings: Settings):
    @sensor(
        name="inbox_sensor",
        minimum_interval_seconds=settings.sensor_interval_s,
        job_name="analysis_job",
        default_status=DefaultSensorStatus.RUNNING,
        description="Registers stable new or changed recordings in the inbox as "
        "audio_files partitions and requests their analysis.",
    )
    def inbox_sensor(context: SensorEvaluationContext, store: RecordingStore):
        if missing := inbox_missing(store.inbox_dir):  # an unmounted share must not read as a quiet day
            context.log.warning(missing)
            return SensorResult(skip_reason=SkipReason(missing), cursor=context.cursor)
        plan, registered, rejected = plan_for_inbox(
            context.instance, store, context.cursor, settings.max_new_per_tick,
            settled_after_s=settings.sensor_interval_s,
        )
        for rejection in rejected:
            context.log.warning(f"inbox: skipped {quoted(rejection.relative_path)}: {rejection.reason}")
        _log_plan(context, plan)
        if not plan.ready:
            return SensorResult(skip_reason=SkipReason(_skip_message(plan)), cursor=plan.cursor())
        new_keys = [r.file.key for r in plan.ready if r.is_new_key]
        # New keys are appended in this order when the daemon applies the request.
        registered_set = set(registered)
        all_keys = registered + [k for k in new_keys if k not in registered_set]
        return SensorResult(
            run_requests=run_requests_for(
                plan, all_keys, settings.batch_size, analysis_slots(context.instance, settings)
            ),
            dynamic_partitions_requests=[audio_files.build_add_request(new_keys)],
            cursor=plan.cursor(),
        )

    return inbox_sensor


def run_requests_for(plan: IntakePlan, all_keys: list[str], batch_size: int,
                     parallel: int) -> list[RunRequest]:
    """One run per batch of at most ``batch_size`` ready recordings that are
    contiguous in partition order, so each run loads its models once; fewer
    per run where that shares them evenly among the ``parallel`` runs whose
    analysis steps go at once (``balanced_batch_size``).

    ``run_key`` carries the content hashes: a replaced file makes a new run
    key, an identical re-drop does not (Dagster skips a repeated run key).
    """
    by_key = {ready.file.key: ready for ready in plan.ready}
    requests = []
    size = balanced_batch_size(len(by_key), batch_size, parallel)
    for batch in contiguous_batches(all_keys, list(by_key), size):
        run_keys = [by_key[key].run_key for key in batch]
        if len(batch) == 1:
            requests.append(RunRequest(run_key=run_keys[0], partition_key=batch[0], tags=SENSOR_TAGS))
            continue
        digest = hashlib.sha256("\n".join(run_keys).encode()).hexdigest()[:16]
        requests.append(
            RunRequest(run_key=f"batch:{len(batch)}:{digest}", tags={**range_tags(batch), **SENSOR_TAGS})
        )
    return requests


def _log_plan(context: SensorEvaluationContext, plan: IntakePlan) -> None:
    for ready in plan.ready:
        verb = "new" if ready.is_new_key else "changed"
        context.log.info(f"inbox: {verb} {ready.file.relative_path!r} -> {ready.file.key}")
    if plan.unchanged:
        context.log.info(
            f"inbox: {len(plan.unchanged)} file(s) touched but with the content already "
            f"taken in; not run again"
        )


def _skip_message(plan: IntakePlan) -> str:
    if plan.waiting:
        return f"{len(plan.waiting)} file(s) still being written; waiting for them to settle"
    return "no new or changed recordings in the inbox"


inbox_sensor = build_inbox_sensor(Settings.from_env())


@sensor(
    name="dead_cli_runs_sensor",
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Fails runs on this host whose process died (kill -9, out of memory): "
    "`voiceman` commands' and `dagster asset materialize`'s, which execute in their own "
    "process, unwatched by run monitoring; frees their pool slots.",
)
def dead_cli_runs_sensor(context: SensorEvaluationContext):
    from voiceman_pipeline import runs

    cleaned = runs.clean_up(context.instance, say=context.log.warning, by="dead_cli_runs_sensor")
    return SkipReason(f"cleaned up {len(cleaned)} dead voiceman run(s)" if cleaned else "none dead")


def _backfill_building(instance, asset_key) -> str | None:
    """The id of a backfill under way that will build ``asset_key`` (the UI's *Materialize
    all*), if any."""
    from dagster._core.execution.backfill import BulkActionsFilter, BulkActionStatus

    under_way = instance.get_backfills(filters=BulkActionsFilter(
        statuses=[BulkActionStatus.REQUESTED]))
    return next((b.backfill_id for b in under_way if asset_key in (b.asset_selection or ())), None)


# Runs that may still store a report or a failure (a NOT_STARTED run never
# launched would hold the summary back for good; a CLI run is STARTED at once).
UNDER_WAY = [DagsterRunStatus.QUEUED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED,
             DagsterRunStatus.CANCELING]
# While runs are under way the summary is rebuilt at most this often (a burst or a
# backfill stores a report every few seconds; a rebuild of 10,000 recordings takes ~3 s).
SUMMARY_WHILE_BUSY_S = 300


@sensor(
    name="summary_sensor",
    job=summary_job,
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Rebuilds `summary` when a report was stored, a stage's failure or a "
    "retirement observed, or a recording deleted, after the summary was last "
    f"built or asked for: once no run is "
    f"under way, or every {SUMMARY_WHILE_BUSY_S // 60} minutes while runs go on.",
)
def summary_sensor(context: SensorEvaluationContext):
    # The cursor (JSON, on the sensor's page): "results_through_event", the storage id of the
    # newest such event the summary was last asked for or built with (``built_through``);
    # "registered", how many recordings were registered at its last tick; "deleted", true
    # from when that number fell (a recording deleted in the UI stores no event) until the
    # summary no longer lists what was deleted; "asked_at", when it last asked, and
    # "busy_since", since when runs have been under way while it had something new to show
    # (UTC). Its run reads what is stored when it starts, so an event after that id may be
    # missing from it, even one stored while it ran. (Dagster's declarative automation compares events by tick, and
    # took a report stored in the tick that also saw the summary's own materialization as
    # handled: dagster-io/dagster#24650.)
    from voiceman_pipeline.assets.summary import (RESULTS_THROUGH_KEY, built_through, lists_unregistered,
                                                  newest_result_event, summary)

    instance = context.instance
    newest, registered = newest_result_event(instance), instance.get_dynamic_partitions(audio_files.name)
    state = json.loads(context.cursor) if context.cursor else {}
    state = {RESULTS_THROUGH_KEY: state} if isinstance(state, int) else state  # an older cursor
    # A summary built since (another way in: `voiceman run`, the UI; on the first tick,
    # any) may show it.
    asked = state.get(RESULTS_THROUGH_KEY, 0)
    if newest > asked:
        state[RESULTS_THROUGH_KEY] = asked = max(asked, built_through(instance, after=asked) or 0)
    if len(registered) < state.get("registered", 0):
        state["deleted"] = True
    state["registered"] = len(registered)
    if state.get("deleted") and not lists_unregistered(instance, registered):
        del state["deleted"]  # the latest summary lists none of them (built another way since)
    if newest <= asked and not state.get("deleted"):
        state.pop("busy_since", None)
        return SensorResult(skip_reason="nothing new since the summary was last built or asked for",
                            cursor=json.dumps(state))
    # Any run that plans the summary: this sensor's, `voiceman run`'s, the asset page's
    # (Dagster's implicit asset job) or `dagster asset materialize`'s.
    planned = instance.get_latest_planned_materialization_info(summary.key)
    building = planned and instance.get_run_by_id(planned.run_id)
    if building and building.status in UNDER_WAY:
        return SensorResult(skip_reason=f"a summary run is under way ({building.run_id})", cursor=json.dumps(state))
    now = datetime.now(timezone.utc)
    busy = instance.get_runs_count(RunsFilter(statuses=UNDER_WAY))
    if not busy and (backfill := _backfill_building(instance, summary.key)):
        # Between its last recording's run and its own summary run no run is under way:
        # asking then built the summary twice (once here, once by the backfill).
        return SensorResult(skip_reason=f"backfill {backfill} is under way and builds the summary",
                            cursor=json.dumps(state))
    if busy:
        # A burst's runs store results every few seconds: one rebuild once they end, or
        # one every SUMMARY_WHILE_BUSY_S while they go on (counted from the later of the
        # last ask and the start of this busy spell, so that a burst does not get one at once).
        state["busy_since"] = state.get("busy_since") or now.isoformat(timespec="seconds")
        waited_from = max(datetime.fromisoformat(state[k]) for k in ("busy_since", "asked_at") if state.get(k))
        if (now - waited_from).total_seconds() < SUMMARY_WHILE_BUSY_S:
            return SensorResult(skip_reason=f"waiting for the runs under way to end, or until"
                                f" {SUMMARY_WHILE_BUSY_S} s after they began and after the last rebuild"
                                " it asked for", cursor=json.dumps(state))
    # Ahead of the queue: behind a backfill's queued runs it would wait for all of them.
    tags = {**source_tags("automation"), PRIORITY_TAG: "1"}
    return SensorResult(run_requests=[RunRequest(tags=tags)], cursor=json.dumps({
        RESULTS_THROUGH_KEY: newest, "registered": len(registered), "asked_at": now.isoformat(timespec="seconds")}))
