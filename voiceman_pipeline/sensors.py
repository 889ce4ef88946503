"""``inbox_sensor``: registers new recordings in ``data/inbox/`` and runs them.

Each tick scans the inbox, waits for files to stop changing, hashes the
stable ones, and returns in one ``SensorResult``: the new partition keys, one
run request per batch of up to ``VOICEMAN_BATCH_SIZE`` ready recordings (a
partition range, so models load once per batch; ``run_key`` built from the
content hashes, so a file replaced by different content runs again and an
identical re-drop does not), and the cursor. The ``voiceman ingest`` command uses the same functions.
"""

from __future__ import annotations

import hashlib

from dagster import (
    AssetRecordsFilter,
    DagsterInstance,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from voiceman_pipeline.assets.specs import AUDIO, STAGE_KEYS
from voiceman_pipeline.inbox import IntakePlan, IntakeState, plan_intake, scan_inbox
from voiceman_pipeline.partitions import audio_files, contiguous_batches, range_tags
from voiceman_pipeline.resources.outputs import RecordingStore
from voiceman_pipeline.settings import Settings


def recorded_sha256(instance: DagsterInstance):
    """Lookup of the SHA-256 that a partition's latest ``audio`` materialization recorded."""

    def lookup(key: str) -> str | None:
        if not instance.has_dynamic_partition(audio_files.name, key):
            return None
        records = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AUDIO.key, asset_partitions=[key]), limit=1
        ).records
        if not records:
            return None
        value = records[0].asset_materialization.metadata.get("sha256")
        return getattr(value, "value", None)

    return lookup


def build_inbox_sensor(settings: Settings):
    @sensor(
        name="inbox_sensor",
        minimum_interval_seconds=settings.sensor_interval_s,
        asset_selection=STAGE_KEYS,
        default_status=DefaultSensorStatus.RUNNING,
        description="Registers stable new or changed recordings in the inbox as "
        "audio_files partitions and requests their analysis.",
    )
    def inbox_sensor(context: SensorEvaluationContext, store: RecordingStore):
        scan = scan_inbox(store.inbox_dir, store.max_file_bytes)
        for rejection in scan.rejected:
            context.log.warning(f"inbox: skipped {rejection.relative_path!r}: {rejection.reason}")
        plan = plan_intake(
            scan,
            IntakeState.from_json(context.cursor),
            max_new_per_tick=settings.max_new_per_tick,
            recorded_sha256=recorded_sha256(context.instance),
        )
        _log_plan(context, plan)
        if not plan.ready:
            return SensorResult(
                skip_reason=SkipReason(_skip_message(plan)), cursor=plan.state.to_json()
            )
        new_keys = [r.file.key for r in plan.ready if r.is_new_key]
        known = context.instance.get_dynamic_partitions(audio_files.name)
        # New keys are appended in this order when the daemon applies the request.
        all_keys = list(known) + [k for k in new_keys if k not in set(known)]
        return SensorResult(
            run_requests=run_requests_for(plan, all_keys, settings.batch_size),
            dynamic_partitions_requests=[
                audio_files.build_add_request(new_keys)
            ],
            cursor=plan.state.to_json(),
        )

    return inbox_sensor


def run_requests_for(plan: IntakePlan, all_keys: list[str], batch_size: int) -> list[RunRequest]:
    """One run per batch of at most ``batch_size`` ready recordings that are
    contiguous in partition order, so each run loads its models once.

    ``run_key`` carries the content hashes: a replaced file makes a new run
    key, an identical re-drop does not (Dagster skips a repeated run key).
    """
    by_key = {ready.file.key: ready for ready in plan.ready}
    requests = []
    for batch in contiguous_batches(all_keys, list(by_key), batch_size):
        run_keys = [by_key[key].run_key for key in batch]
        if len(batch) == 1:
            requests.append(RunRequest(run_key=run_keys[0], partition_key=batch[0]))
            continue
        digest = hashlib.sha256("\n".join(run_keys).encode()).hexdigest()[:16]
        requests.append(RunRequest(run_key=f"batch:{len(batch)}:{digest}", tags=range_tags(batch)))
    return requests


def _log_plan(context: SensorEvaluationContext, plan: IntakePlan) -> None:
    for ready in plan.ready:
        verb = "new" if ready.is_new_key else "changed"
        context.log.info(f"inbox: {verb} {ready.file.relative_path!r} -> {ready.file.key}")
    if plan.unchanged:
        context.log.info(f"inbox: {len(plan.unchanged)} re-dropped file(s) unchanged, not re-run")


def _skip_message(plan: IntakePlan) -> str:
    if plan.waiting:
        return f"{len(plan.waiting)} file(s) still being written; waiting for them to settle"
    return "no new or changed recordings in the inbox"


inbox_sensor = build_inbox_sensor(Settings.from_env())
