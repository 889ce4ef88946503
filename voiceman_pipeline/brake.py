"""Error-rate brake: stop launching batches when most recordings fail.

A folder of mostly broken files (the wrong export, a damaged disk) should
not be run to the end one batch after another. ``voiceman run`` and
``retry-failed`` stop before their next batch, and ``failure_brake_sensor``
cancels a backfill (as the UI's *Cancel backfill* does: runs under way
finish, no new ones start), once more than ``failure_rate`` of the
recordings tried so far failed, after at least ``min_recordings``. The counts
are the runs' own ``voiceman/recordings_ok`` / ``_failed`` tags.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from dagster import (
    DagsterRunStatus,
    DefaultSensorStatus,
    RunsFilter,
    SensorEvaluationContext,
    SkipReason,
    sensor,
)
from dagster._core.execution.backfill import BulkActionStatus
from dagster._core.storage.tags import BACKFILL_ID_TAG

from voiceman_pipeline.assets.pipeline import RECORDINGS_FAILED_TAG, RECORDINGS_OK_TAG
from voiceman_pipeline.settings import Settings

# A backfill's runs carry this tag with "off" to run to the end whatever fails.
BRAKE_TAG = "voiceman/brake"


@dataclass(frozen=True)
class Brake:
    failure_rate: float  # share of recordings failed above which to stop (1: never)
    min_recordings: int  # recordings tried before the share counts

    @classmethod
    def from_settings(cls, settings: Settings) -> Brake:
        return cls(settings.brake_failure_rate, settings.brake_min_recordings)

    def tripped(self, ok: int, failed: int) -> bool:
        tried = ok + failed
        return tried >= self.min_recordings and failed > self.failure_rate * tried

    def reason(self, ok: int, failed: int) -> str:
        tried = ok + failed
        return (
            f"error-rate brake: {failed} of {tried} recordings failed "
            f"({100 * failed / tried:.0f}% > {100 * self.failure_rate:.0f}%)"
        )


def run_counts(runs) -> tuple[int, int]:
    """(recordings ok, recordings failed) over analysis runs, from their tags."""
    ok = sum(int(run.tags.get(RECORDINGS_OK_TAG, 0)) for run in runs)
    failed = sum(int(run.tags.get(RECORDINGS_FAILED_TAG, 0)) for run in runs)
    return ok, failed


HOW_TO_CONTINUE = (
    "`voiceman validate` lists the inbox files that cannot be taken in; replace them or "
    "`voiceman retire` them, then run again. To run to the end regardless, set "
    "VOICEMAN_BRAKE_FAILURE_RATE=1"
)

_FINISHED = [DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED]
# A braked backfill can be resumed (Dagster's resumePartitionBackfill) until it
# completes: canceling, canceled or failed. Kept in the cursor, newest last.
_DONE = {BulkActionStatus.COMPLETED, BulkActionStatus.COMPLETED_SUCCESS,
         BulkActionStatus.COMPLETED_FAILED}
REMEMBERED_MAX = 200


def build_failure_brake_sensor(brake: Brake):
    @sensor(
        name="failure_brake_sensor",
        minimum_interval_seconds=15,
        default_status=DefaultSensorStatus.RUNNING,
        description="Cancels a backfill whose runs fail for more than "
        f"{100 * brake.failure_rate:.0f}% of their recordings (after "
        f"{brake.min_recordings}); one resumed after that is left to run, and one "
        f"tagged {BRAKE_TAG}=off is never braked.",
    )
    def failure_brake_sensor(context: SensorEvaluationContext):
        instance = context.instance
        braked_before = json.loads(context.cursor or "[]")
        backfills = instance.get_backfills(status=BulkActionStatus.REQUESTED)
        braked = []
        for backfill in backfills:
            if backfill.backfill_id in braked_before or backfill.tags.get(BRAKE_TAG) == "off":
                continue  # braked once and resumed by a person, or brake off
            runs = instance.get_runs(
                RunsFilter(tags={BACKFILL_ID_TAG: backfill.backfill_id}, statuses=_FINISHED)
            )
            ok, failed = run_counts(runs)
            if brake.tripped(ok, failed):
                instance.update_backfill(backfill.with_status(BulkActionStatus.CANCELING))
                context.log.warning(
                    f"backfill {backfill.backfill_id} canceled by the {brake.reason(ok, failed)}. "
                    f"{HOW_TO_CONTINUE} (or, for one backfill, launch it with the tag "
                    f"{BRAKE_TAG}=off)."
                )
                braked.append(backfill.backfill_id)
        # Remember braked backfills for as long as they can be resumed: one a
        # person resumed is not braked again on the counts that braked it.
        remembered = [
            backfill_id for backfill_id in [*braked_before, *braked]
            if (found := instance.get_backfill(backfill_id)) is not None and found.status not in _DONE
        ]
        context.update_cursor(json.dumps(remembered[-REMEMBERED_MAX:]))
        if braked:
            return SkipReason(f"braked {len(braked)} backfill(s): {', '.join(braked)}")
        return SkipReason(f"{len(backfills)} backfill(s) running, none over the failure rate")

    return failure_brake_sensor


failure_brake_sensor = build_failure_brake_sensor(Brake.from_settings(Settings.from_env()))
