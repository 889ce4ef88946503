"""Runs the ``voiceman`` command executes in its own process, and what is left
of them when that process dies.

A CLI run executes inside the ``voiceman`` process, or in one of its worker
processes with ``--workers`` (``workers.py``), with ``execute_in_process``,
not through a run launcher, so Dagster's run monitoring never looks at it. If
that process is killed (kill -9, the out-of-memory killer, a power cut) the
run stays STARTED forever, its partitions read "in progress", and the pool
slot its step claimed is never given back, so every later step in that pool
waits forever ("Step blocked by limit for pool gpu").

So every CLI run is tagged with the host, pid and start time of the process
that executes it (``launch_tags``, called in that process); so is any other
run its first step executes in (``own_run``: `dagster asset materialize`, the
UI, the daemon). Before it opens runs, a command calls ``clean_up``: runs
with this host's tag whose process is gone are marked failed (their
recordings then read "failed", not "in progress") and their pool slots are
freed; the command then finishes their recordings. Runs without these tags
(killed before their first step began, or under Celery), runs of another
host, and runs whose process is alive are never touched.

``wait_for_pool``: see there why a command waits for a pool slot itself.
"""

from __future__ import annotations

import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import psutil
from dagster import DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter
from dagster._core.storage.dagster_run import FINISHED_STATUSES
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARENT_RUN_ID_TAG,
    PARTITION_NAME_TAG,
)

HOST_TAG = "voiceman/host"
PID_TAG = "voiceman/pid"
# The process's start time (seconds since the epoch): tells a dead run's pid
# apart from a new process that was later given the same pid.
PROCESS_START_TAG = "voiceman/process_start"

# States of a run whose process has taken it over and not finished it.
# (QUEUED and SUSPENDED runs have no process: CLI runs are never in them.)
RUNNING_STATUSES = [
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
]


def launch_tags() -> dict[str, str]:
    """Tags for a run this process executes: which process owns it."""
    me = psutil.Process()
    return {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(me.pid),
        PROCESS_START_TAG: f"{me.create_time():.2f}",
    }


def mark_canceling(instance: DagsterInstance, pid: int) -> None:
    """Mark the run process ``pid`` (of this host) executes as canceling, as the UI's
    Terminate does, before that process is interrupted: wherever the interrupt then
    lands (in Dagster's own code between two of the step's events, say), Dagster ends
    the run CANCELED; unmarked, it called such a run failed."""
    tags = {PID_TAG: str(pid), HOST_TAG: socket.gethostname()}
    for run in instance.get_runs(RunsFilter(tags=tags, statuses=[DagsterRunStatus.STARTING,
                                                                 DagsterRunStatus.STARTED])):
        instance.report_run_canceling(run, message="Stopped by voiceman (Ctrl+C or SIGTERM).")


def own_run(context) -> None:
    """Tag the run a step executes in, in one write, with what it lacks:
    where it came from (``voiceman/source``: a backfill, a re-execution, or
    ``ui`` for a run launched by hand, in the UI or with `dagster asset
    materialize`), and this process (``launch_tags``). A run of `dagster asset
    materialize`, of the UI or of the daemon executes its steps in its own
    process too (the in-process executor; Python's ``materialize`` and
    ``execute_in_process``, as `voiceman` runs, in the caller's), and if that process is killed,
    ``clean_up`` then finds the run (run monitoring does not watch `dagster
    asset materialize`'s runs). A retry or re-execution starts with the tags of
    the run it repeats, ours included: they name that run's process, so they
    are replaced. No process tags under another executor (Celery), where a
    step's process is not the run's."""
    from voiceman_pipeline.jobs import SOURCE_TAG, run_source

    have, source = context.run.tags, run_source(context.run.tags)
    tags = {SOURCE_TAG: source} if have.get(SOURCE_TAG) != source else {}
    if context.job_def.executor_def.name in ("in_process", "execute_in_process_executor"):
        mine = launch_tags()
        if any(have.get(key) != value for key, value in mine.items()):  # none yet, or copied
            tags.update(mine)
    if tags:
        context.instance.add_run_tags(context.run_id, tags)
    if context.run.remote_job_origin is None:
        _give_origin(context.instance, context.run_id, context.job_name)


# The code location and repository the UI and the daemon know this project by (workspace.yaml).
LOCATION_NAME, REPOSITORY_NAME = "voiceman_pipeline", "__repository__"


def _give_origin(instance: DagsterInstance, run_id: str, job_name: str) -> None:
    """Record this project's code location as where a run executed in a process of
    its own comes from (`voiceman`'s, `dagster asset materialize`'s: Dagster records
    none for them). Without it the UI's *Re-execute* of such a run fails
    (CheckError: Expected non-None value) and run_retries cannot relaunch it;
    with it both go through the daemon like any run the UI launched. Done as
    Dagster's `dagster run migrate-repository` does it; in the first step, where
    nothing else writes the run."""
    from dagster._core.remote_origin import (ManagedGrpcPythonEnvCodeLocationOrigin, RemoteJobOrigin,
                                             RemoteRepositoryOrigin)
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    location = ManagedGrpcPythonEnvCodeLocationOrigin(
        LoadableTargetOrigin(module_name="voiceman_pipeline.definitions"), LOCATION_NAME)
    origin = RemoteJobOrigin(RemoteRepositoryOrigin(location, REPOSITORY_NAME), job_name)
    run = instance.get_run_by_id(run_id)  # as stored now, with the tags just added
    if run is not None:
        instance.run_storage.replace_job_origin(run, origin)


def process_alive(pid: int, started: float | None) -> bool:
    """True while process ``pid`` runs and is the one that started at ``started``."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped
            return False
        # create_time is derived from boot time and clock ticks: equal to ~0.01 s.
        return started is None or abs(process.create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # it exists and is not ours to judge


@dataclass(frozen=True)
class DeadRun:
    """A run of this host's ``voiceman`` command whose process is gone."""

    run: DagsterRun  # as storage has it now
    pid: int
    slots: int  # pool slots it still holds
    queued: int  # its steps still waiting in a pool's queue (ahead of later runs')

    @property
    def unfinished(self) -> bool:
        return self.run.status not in FINISHED_STATUSES

    def partition_range(self) -> tuple[str, str] | None:
        """First and last recording of the run (CLI runs cover a range)."""
        tags = self.run.tags
        if ASSET_PARTITION_RANGE_START_TAG in tags:
            return tags[ASSET_PARTITION_RANGE_START_TAG], tags[ASSET_PARTITION_RANGE_END_TAG]
        if PARTITION_NAME_TAG in tags:
            return tags[PARTITION_NAME_TAG], tags[PARTITION_NAME_TAG]
        return None  # the summary

    def describe(self) -> str:
        state = self.run.status.value if self.unfinished else f"{self.run.status.value}, ended"
        return f"run {self.run.run_id[:8]} ({state}; its process, pid {self.pid}, is gone)"


def dead_runs(instance: DagsterInstance) -> list[DeadRun]:
    """This host's CLI runs whose process is gone and that are still unfinished
    or still hold a pool slot. Reads only."""
    host = socket.gethostname()
    storage = instance.event_log_storage
    slots: Counter[str] = Counter()  # run id -> pool slots it holds
    queued: Counter[str] = Counter()  # run id -> its steps waiting in a pool's queue
    if storage.supports_global_concurrency_limits:
        pools = storage.get_concurrency_infos(list(storage.get_concurrency_keys()))
        for info in pools.values():
            slots.update(slot.run_id for slot in info.claimed_slots)
            # (a step that got its slot keeps an "assigned" queue entry: not waiting)
            queued.update(step.run_id for step in info.pending_steps if not step.assigned_timestamp)
    runs = {
        run.run_id: run
        for run in instance.get_runs(RunsFilter(statuses=RUNNING_STATUSES, tags={HOST_TAG: host}))
    }
    if slots or queued:  # a run can end and still hold a slot: its process died ending it
        holders = RunsFilter(run_ids=list(slots | queued), tags={HOST_TAG: host})
        runs.update((run.run_id, run) for run in instance.get_runs(holders))
    found = []
    for run in runs.values():
        try:
            pid = int(run.tags[PID_TAG])
            started = float(run.tags[PROCESS_START_TAG]) if PROCESS_START_TAG in run.tags else None
        except (KeyError, ValueError):
            continue  # not a run this command tagged: not ours to judge
        holds = slots[run.run_id] + queued[run.run_id]
        if (run.status in RUNNING_STATUSES or holds) and not process_alive(pid, started):
            if not _copied_from_parent(instance, run):
                found.append(DeadRun(run, pid, slots[run.run_id], queued[run.run_id]))
    return found


def _copied_from_parent(instance: DagsterInstance, run: DagsterRun) -> bool:
    """Whether ``run``'s process tags are those of the run it retries or re-executes:
    Dagster copies a run's tags to its automatic retry and to a re-execution, so
    until the new run's step tags it as its own (``own_run``), they name the other
    run's (dead) process, not one that took this run over. Such a run is Dagster's
    to judge meanwhile (its code server marks it failed if its process dies)."""
    parent_id = run.tags.get(PARENT_RUN_ID_TAG)
    parent = instance.get_run_by_id(parent_id) if parent_id else None
    keys = (HOST_TAG, PID_TAG, PROCESS_START_TAG)
    return parent is not None and all(parent.tags.get(k) == run.tags.get(k) for k in keys)


def clean_up(
    instance: DagsterInstance, say: Callable[[str], None], by: str = "a later voiceman command"
) -> list[DeadRun]:
    """Mark this host's dead CLI runs failed and free their pool slots; ``say``
    one line per run; ``by``: who did, for the run's failure message."""
    cleaned = []
    for dead in dead_runs(instance):
        run = instance.get_run_by_id(dead.run.run_id)  # another command may have been first
        if run is not None and run.status not in FINISHED_STATUSES:
            instance.report_run_failed(
                run,
                message=f"The voiceman process that executed this run (pid {dead.pid} on "
                f"{run.tags.get(HOST_TAG)}) is gone: killed or crashed. Marked failed by "
                f"{by}.",
            )
        if dead.slots or dead.queued:  # also takes its claims out of the queue
            instance.event_log_storage.free_concurrency_slots_for_run(dead.run.run_id)
        did = ["marked failed"] if dead.unfinished else []
        did += [f"freed {dead.slots} pool slot(s)"] if dead.slots else []
        did += [f"dropped {dead.queued} queued pool claim(s)"] if dead.queued else []
        say(f"cleaned up {dead.describe()}: {', '.join(did)}")
        cleaned.append(dead)
    return cleaned


def wait_for_pool(
    instance: DagsterInstance, pool: str, say: Callable[[str], None], poll_s: float = 1.0
) -> None:
    """Return once ``pool`` has a free slot, cleaning up dead runs meanwhile.

    Dagster waits for a slot inside ``execute_in_process`` too, but there it
    holds back Ctrl+C and SIGTERM until the step starts (and spins a CPU core):
    a command queued behind another run could not be stopped. Waiting here
    first, in plain Python, keeps it stoppable. (Another run can still take
    the slot between this check and the claim; Dagster then waits until that
    run's step ends, as usual.)
    """
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return
    told = False
    while True:
        info = storage.get_concurrency_info(pool)
        if not info.slot_count or len(info.claimed_slots) < info.slot_count:
            return
        if not told:
            holders = ", ".join(sorted({slot.run_id[:8] for slot in info.claimed_slots}))
            say(f"waiting for a free slot in pool '{pool}' (held by run {holders}); Ctrl+C stops")
            told = True
        time.sleep(poll_s)
        clean_up(instance, say)  # a holder may die while we wait
