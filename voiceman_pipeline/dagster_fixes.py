"""A fix for a Dagster bug this pipeline's backfills meet, applied when the
instance's storage loads (``storage.py``): the backfill daemon, the webserver
and every command load it, whatever started them.

Remove it once Dagster's own code is fixed (``test_live_dagster_dev.py``
re-executes such a backfill from failure through the real daemon).
"""

from __future__ import annotations

from dagster import RunsFilter
from dagster._core.execution import job_backfill
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_SET_TAG,
)


def _fetch_last_run(instance, remote_partition_set, partition_key_or_range):
    """Dagster 1.13.27's ``job_backfill._fetch_last_run``, for partition ranges too.

    A job backfill of ``analysis_job`` (its *Partitions* tab) runs ranges of
    recordings (the stages' ``BackfillPolicy.multi_run``). Its *Re-execute ->
    From failure* looks up each range's last run here, and Dagster's function,
    although written for ranges, first checks that it was given a single key:
    the backfill daemon failed the re-execution ("Param "partition_name" is not
    a str. Got PartitionKeyRange(...)") and ran nothing. The query is Dagster's.
    """
    if isinstance(partition_key_or_range, str):
        return _dagsters(instance, remote_partition_set, partition_key_or_range)
    tags = {PARTITION_SET_TAG: remote_partition_set.name,
            ASSET_PARTITION_RANGE_START_TAG: partition_key_or_range.start,
            ASSET_PARTITION_RANGE_END_TAG: partition_key_or_range.end}
    runs = instance.get_runs(RunsFilter(job_name=remote_partition_set.job_name, tags=tags), limit=1)
    return runs[0] if runs else None


_dagsters = job_backfill._fetch_last_run
job_backfill._fetch_last_run = _fetch_last_run  # looked up when called (create_backfill_run)
