"""How long a run whose worker was killed (kill -9) stays stranded under the daemon.

    python bench/crash_recovery.py [--files 4] [--seconds 20] [--repeats 2]
                                   [--monitoring-defaults] [--json PATH]

Under ``dagster dev`` (the daemon), a run executes in a process of its own. When
that process dies (the kernel's OOM killer, kill -9), Dagster's run monitoring
marks the run failed and ``run_retries`` relaunches it; the relaunch computes
only what the dead run had not finished. Until then the run reads STARTED and
holds its run-queue slot. Run monitoring looks at the runs in progress every
``run_monitoring: poll_interval_seconds``: dagster.yaml ships 10, Dagster's
default is 120 (``--monitoring-defaults``).

Each pass: a fresh home, data dir and ``dagster-daemon run`` (as
``bench/sensor_burst.py`` starts them, queue limit 1), ``--files`` recordings
of ``--seconds`` dropped in the inbox, the sensor's run's worker killed with
SIGKILL once its first transcript is stored. Timed from the kill: the run
marked failed, its relaunch created, the relaunch executing, and every
recording's report stored; and how many times each (stage, recording) was
materialized in all (1 each: nothing computed twice).

This is a benchmark, not a test: it asserts nothing. Figures go to
bench/results/crash-recovery-<UTC time>.json unless ``--json`` says where.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import wait_until, write_figures  # noqa: E402
from overhead import write_recordings  # noqa: E402
from sensor_burst import STAGES, TIMEOUT_S, drop, event_time, running_daemon  # noqa: E402


def _wait(what: str, found):
    """``found()``'s first true value (``wait_until``, this benchmark's patience)."""
    return wait_until(what, found, TIMEOUT_S)


def one_pass(recordings: Path, root: Path, monitoring_defaults: bool, pool: bool) -> dict:
    """One kill -9 of a sensor run's worker mid-batch, and the recovery, timed."""
    from dagster import AssetKey, DagsterRunStatus, RunsFilter

    shipped_off = ("run_monitoring",) if monitoring_defaults else ()
    env = {"VOICEMAN_ANALYSIS_POOL": "gpu"} if pool else {}
    with running_daemon(root, 1, shipped_off, env) as (instance, data):
        names = drop(recordings, data)
        run = _wait("the sensor's run", lambda: instance.get_runs(limit=1))[0]
        _wait("a first transcript", lambda: instance.get_materialized_partitions(AssetKey("transcript")))
        pid = _wait("the run worker's pid", lambda: next(
            (int(m.group(1)) for r in instance.get_records_for_run(run.run_id).records
             if (m := re.search(r"pid: (\d+)", r.event_log_entry.message or ""))), None))
        os.kill(pid, signal.SIGKILL)
        killed = time.time()
        _wait("the run marked failed", lambda: instance.get_run_by_id(run.run_id).is_finished)
        failed_at = instance.get_run_record_by_id(run.run_id).end_time
        child = _wait("the relaunch", lambda: instance.get_runs(
            RunsFilter(tags={"dagster/parent_run_id": run.run_id})))[0]
        _wait("the relaunch to end", lambda: instance.get_run_by_id(child.run_id).is_finished)
        child_record = instance.get_run_record_by_id(child.run_id)
        counts = Counter((stage, record.partition_key) for stage in STAGES
                         for record in instance.fetch_materializations(AssetKey(stage), limit=1000).records)
        # Every run of the pass, oldest first: (job, status, seconds from the kill to
        # its creation and to its end), to see what else took the queue's slot.
        others = [{"job": r.dagster_run.job_name, "run": r.dagster_run.run_id[:8],
                   "status": r.dagster_run.status.value,
                   "created_s": round(r.create_timestamp.timestamp() - killed, 2),
                   "ended_s": round(r.end_time - killed, 2) if r.end_time else None}
                  for r in sorted(instance.get_run_records(), key=lambda r: r.create_timestamp)]
        return {
            "runs": others,
            "run_monitoring": "dagster defaults" if monitoring_defaults else "shipped",
            "analysis_step_pool": "gpu" if pool else None,
            "status_of_killed_run": instance.get_run_by_id(run.run_id).status.value,
            "marked_failed_s": round(failed_at - killed, 2),
            "relaunch_created_s": round(child_record.create_timestamp.timestamp() - killed, 2),
            "relaunch_executing_s": event_time(instance, child.run_id, "RUN_START", killed),
            "relaunch_step_started_s": event_time(instance, child.run_id, "STEP_START", killed),
            "all_done_s": round(child_record.end_time - killed, 2),
            "relaunch_status": child_record.dagster_run.status.value,
            "relaunch_success": child_record.dagster_run.status is DagsterRunStatus.SUCCESS,
            "pairs": len(counts), "pairs_expected": len(STAGES) * len(names),
            "pairs_materialized_more_than_once": sum(1 for n in counts.values() if n > 1),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--monitoring-defaults", action="store_true",
                        help="run monitoring at Dagster's own poll interval (120 s), not dagster.yaml's")
    parser.add_argument("--pool", action="store_true",
                        help="the analysis step in pool gpu (limit 1), as with GPU engines")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    passes = []
    with tempfile.TemporaryDirectory(prefix="voiceman-crash-recovery-") as tmp:
        recordings = Path(tmp) / "recordings"
        write_recordings(recordings, args.files, args.seconds, "call")
        for repeat in range(args.repeats):
            row = one_pass(recordings, Path(tmp) / f"pass-{repeat}", args.monitoring_defaults, args.pool)
            passes.append(row)
            print(f"repeat {repeat}: killed run {row['status_of_killed_run']} after {row['marked_failed_s']} s,"
                  f" relaunch created {row['relaunch_created_s']} s, executing {row['relaunch_executing_s']} s,"
                  f" its step started {row['relaunch_step_started_s']} s,"
                  f" all done {row['all_done_s']} s ({row['relaunch_status']}); {row['pairs']} of"
                  f" {row['pairs_expected']} (stage, recording) pairs stored,"
                  f" {row['pairs_materialized_more_than_once']} more than once", flush=True)
    figures = {"run_monitoring": passes[0]["run_monitoring"], "analysis_step_pool": passes[0]["analysis_step_pool"],
               "files": args.files,
               "seconds_each": args.seconds, "passes": passes,
               "median_marked_failed_s": statistics.median(p["marked_failed_s"] for p in passes),
               "median_relaunch_step_started_s": statistics.median(p["relaunch_step_started_s"] for p in passes),
               "median_all_done_s": statistics.median(p["all_done_s"] for p in passes)}
    print(f"figures: {write_figures(figures, 'crash-recovery', args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
