"""What a backfill launched from the UI waits for: Dagster's daemons, not the work.

    python bench/backfill_latency.py [--files 4] [--seconds 5] [--repeats 3] [--batch-size N] [--json PATH]

A real ``dagster dev`` on a fresh DAGSTER_HOME (the shipped dagster.yaml, storage
redirected there) and a fresh data dir, the inbox sensor paused (``voiceman
pause``), so that recordings are registered but not analysed: each pass writes
``--files`` new recordings of ``--seconds`` (``bench/overhead.py``'s: the samples
concatenated and cut) into the inbox, registers them (``voiceman ingest``), and
launches a backfill of their five stages with the UI's own GraphQL call
(``launchPartitionBackfill``, as *Materialize* on the asset graph with the missing
partitions picked), at a random point of the backfill daemon's 30 s cycle (after a
pause of 0-30 s). Passes follow one another in the same ``dagster dev``. With
``--batch-size N``, ``dagster dev`` runs with ``VOICEMAN_BATCH_SIZE=N`` (the backfill's
runs hold at most N recordings each; default: the shipped 8).

Per pass, seconds after the launch: when the backfill daemon created the first and
the last run, when the runs began executing and ended, when the backfill was marked
done (``backfill_end_timestamp``), and when ``summary`` was next built after the last
run (``summary_sensor``'s refresh); and the materializations per (stage, recording).

This is a benchmark, not a test: it asserts nothing. Figures go to
bench/results/backfill-latency-<UTC time>.json unless ``--json`` says where.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, fresh_home, graphql, wait_until, write_figures  # noqa: E402
from overhead import write_recordings  # noqa: E402
from sensor_burst import STAGES, event_time  # noqa: E402

BIN = Path(sys.executable).parent
TIMEOUT_S = 600.0
LAUNCH = """mutation($names: [String!], $assets: [AssetKeyInput!]) {
  launchPartitionBackfill(backfillParams: {partitionNames: $names, assetSelection: $assets}) {
    __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }"""


def location_loaded(url: str) -> bool:
    try:
        answer = graphql(url, "{ repositoriesOrError { ... on RepositoryConnection { nodes { name } } } }")
    except OSError:
        return False  # not listening yet
    return bool(answer["data"]["repositoriesOrError"].get("nodes"))


def one_pass(instance, url: str, env: dict, data: Path, root: Path, n: int, files: int, seconds: float) -> dict:
    """Register ``files`` new recordings, backfill them, and time what follows."""
    from dagster import AssetKey, DagsterRunStatus, RunsFilter

    write_recordings(root / f"pass{n}", files, seconds, f"pass{n}")
    names = sorted(p.name for p in (root / f"pass{n}").iterdir())
    for name in names:
        shutil.move(root / f"pass{n}" / name, data / "inbox" / name)
    subprocess.run([str(BIN / "voiceman"), "ingest", "--settle", "0"], env=env, cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    time.sleep(random.uniform(0, 30))  # launch at any point of the backfill daemon's 30 s cycle
    answer = graphql(url, LAUNCH, names=names, assets=[{"path": [stage]} for stage in STAGES])
    launched = time.time()
    result = answer["data"]["launchPartitionBackfill"]
    if result["__typename"] != "LaunchBackfillSuccess":
        raise RuntimeError(f"the backfill was not launched: {result}")
    backfill_id = result["backfillId"]

    def done():
        backfill = instance.get_backfill(backfill_id)
        return backfill if backfill.status.value != "REQUESTED" else None

    backfill = wait_until(f"backfill {backfill_id} (see {root / 'dagster-dev.log'})", done, TIMEOUT_S, 0.5)
    runs = sorted(instance.get_run_records(RunsFilter(tags={"dagster/backfill": backfill_id})),
                  key=lambda r: r.create_timestamp.timestamp())
    last_end = max(r.end_time for r in runs)

    def refreshed():  # the first summary built after the backfill's last run ended
        latest = instance.fetch_materializations(AssetKey("summary"), limit=1).records
        return latest[0] if latest and latest[0].timestamp >= last_end else None

    summary = wait_until("the summary's refresh", refreshed, TIMEOUT_S, 0.5)
    stored = {stage: sum(1 for r in instance.fetch_materializations(AssetKey(stage), limit=10_000).records
                         if r.partition_key in names) for stage in STAGES}
    executing = [event_time(instance, r.dagster_run.run_id, "RUN_START", launched) for r in runs]
    return {
        "recordings": names, "backfill_status": backfill.status.value,
        # From the first run's start of execution to the last run's end: the work, side by side or not.
        "work_s": round(last_end - launched - min(e for e in executing if e is not None), 2),
        "runs": [{"created": round(r.create_timestamp.timestamp() - launched, 2),
                  "executing": start,
                  "ended": round(r.end_time - launched, 2) if r.end_time else None,
                  "status": r.dagster_run.status.value,
                  "partitions": [r.dagster_run.tags.get("dagster/asset_partition_range_start"),
                                 r.dagster_run.tags.get("dagster/asset_partition_range_end")]}
                 for r, start in zip(runs, executing)],
        "all_success": bool(runs) and all(r.dagster_run.status is DagsterRunStatus.SUCCESS for r in runs),
        "backfill_done_s": round(backfill.backfill_end_timestamp - launched, 2)
        if backfill.backfill_end_timestamp else None,
        "summary_refreshed_s": round(summary.timestamp - launched, 2),
        "materializations_per_stage": stored,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, help="VOICEMAN_BATCH_SIZE for dagster dev")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from dagster import DagsterInstance

    root = Path(tempfile.mkdtemp(prefix="voiceman-backfill-"))
    home, data = fresh_home(root / "home"), root / "data"
    (data / "inbox").mkdir(parents=True)
    env = {**os.environ, "DAGSTER_HOME": str(home), "VOICEMAN_DATA_DIR": str(data),
           "MPLCONFIGDIR": str(data / ".cache" / "matplotlib")}
    for shipped_default in ("VOICEMAN_BATCH_SIZE", "VOICEMAN_MAX_CONCURRENT_RUNS", "VOICEMAN_PG_URL"):
        env.pop(shipped_default, None)
    if args.batch_size:
        env["VOICEMAN_BATCH_SIZE"] = str(args.batch_size)
    subprocess.run([str(BIN / "voiceman"), "pause"], env=env, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/graphql"
    server = subprocess.Popen(
        [str(BIN / "dagster"), "dev", "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO, env=env, start_new_session=True, stdout=open(root / "dagster-dev.log", "w"),
        stderr=subprocess.STDOUT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    passes = []
    try:
        os.environ["DAGSTER_HOME"] = str(home)
        with DagsterInstance.get() as instance:
            wait_until("the code location", lambda: location_loaded(url), TIMEOUT_S, 1.0)
            wait_until("the daemon's first heartbeat", instance.get_daemon_heartbeats, TIMEOUT_S)
            for n in range(args.repeats):
                passes.append(one_pass(instance, url, env, data, root, n, args.files, args.seconds))
                print(json.dumps({k: v for k, v in passes[-1].items() if k != "recordings"}))
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # dagster dev, its daemon, webserver and code servers
        server.wait()
        shutil.rmtree(root, ignore_errors=True)

    def median(key: str):
        values = [p[key] for p in passes if p[key] is not None]
        return statistics.median(values) if values else None

    figures = {"files": args.files, "seconds": args.seconds, "repeats": args.repeats,
               "batch_size": args.batch_size or "shipped default (8)",
               "daemon_interval_note": "Dagster 1.13's backfill daemon looks every 30 s (fixed)",
               "median_first_run_created_s": statistics.median(p["runs"][0]["created"] for p in passes),
               "median_last_run_ended_s": statistics.median(max(r["ended"] for r in p["runs"]) for p in passes),
               "median_work_s": median("work_s"), "median_backfill_done_s": median("backfill_done_s"),
               "median_summary_refreshed_s": median("summary_refreshed_s"), "passes": passes}
    print(f"figures: {write_figures(figures, 'backfill-latency', args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
