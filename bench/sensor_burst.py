"""A burst of recordings through the inbox sensor and the daemon: one run, or shared out.

    python bench/sensor_burst.py [--files 4] [--seconds 5] [--repeats 3] [--queue-defaults]
                                 [--json PATH]

The inbox sensor shares a tick's ready recordings evenly among the runs the run
queue lets go at once (``partitions.balanced_batch_size`` with
``devices.analysis_slots``). Each such run is a process of its own, started by
the daemon's run launcher (its imports and model loads). Whether that is worth
it on a small burst is what this measures, under the real ``dagster-daemon run``
(sensor, run queue, run launcher, run monitoring as shipped): the same
``--files`` recordings dropped in the inbox with the queue's limit at 1 (one run
takes them all) and at 2 (the shipped default on this 2-core machine: two runs
share them), alternately, ``--repeats`` times.

Each pass starts a fresh DAGSTER_HOME (the shipped dagster.yaml, storage
redirected there), a fresh data dir and its own daemon, with the sensor ticking
every 2 s. The recordings (``bench/overhead.py``'s: the samples concatenated
and cut to ``--seconds``) are dated an hour back, so the first tick that sees
them takes them at once. Per pass: the runs and their sizes, and the seconds
from the first run's creation (the sensor's tick) to the last run's end (what
the user waits for after the tick; a tick's own delay falls on both sides
alike); and wall seconds from the drop to the last result, for reference. Per
run, when the queue launched it, when its process began executing, and when
it ended. ``--queue-defaults`` runs the queue with Dagster's own dequeue
settings (a look at the queue every 5 s, one launch at a time) instead of
those dagster.yaml ships (every second, launches at once).

This is a benchmark, not a test: it asserts nothing. Figures go to
bench/results/sensor-burst-<UTC time>.json unless ``--json`` says where.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, fresh_home, wait_until, write_figures  # noqa: E402
from overhead import write_recordings  # noqa: E402

STAGES = ("audio", "transcript", "forensic", "emotion", "report")
TIMEOUT_S = 600.0


@contextlib.contextmanager
def running_daemon(root: Path, slots: int, shipped_off: tuple[str, ...] = (),
                   env_extra: dict[str, str] | None = None) -> Iterator[tuple[Any, Path]]:
    """A real ``dagster-daemon run`` on a fresh home and data dir under ``root``, its run
    queue letting ``slots`` go at once, the sensor ticking every 2 s; ``shipped_off``:
    dagster.yaml sections whose ``config`` is dropped (Dagster's own defaults there);
    ``env_extra``: more environment for the daemon and its runs. Yields (an instance on that home, the data dir) once the daemon is up; stops its
    whole process group after."""
    from dagster import DagsterInstance

    home, data = fresh_home(root / "home"), root / "data"
    config = yaml.safe_load((home / "dagster.yaml").read_text())
    for section in shipped_off:  # run_coordinator: its config; run_monitoring: all but "enabled"
        keep = ("enabled",) if section == "run_monitoring" else ("module", "class")
        config[section] = {k: v for k, v in config[section].items() if k in keep}
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    (data / "inbox").mkdir(parents=True)
    env = {**os.environ, "DAGSTER_HOME": str(home), "VOICEMAN_DATA_DIR": str(data),
           "VOICEMAN_MAX_CONCURRENT_RUNS": str(slots), "VOICEMAN_SENSOR_INTERVAL_S": "2",
           "MPLCONFIGDIR": str(data / ".cache" / "matplotlib")}
    env.pop("VOICEMAN_BATCH_SIZE", None)  # the shipped default
    env.update(env_extra or {})
    daemon = subprocess.Popen([str(Path(sys.executable).with_name("dagster-daemon")), "run", "-w",
                               str(REPO / "workspace.yaml")], cwd=REPO, env=env, start_new_session=True,
                              stdout=open(root / "daemon.log", "w"), stderr=subprocess.STDOUT)
    try:
        os.environ["DAGSTER_HOME"] = str(home)
        with DagsterInstance.get() as instance:
            # The daemon is up (its code location loaded) before anything is dropped.
            wait_until("the daemon's first heartbeat", instance.get_daemon_heartbeats, TIMEOUT_S)
            yield instance, data
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(daemon.pid, signal.SIGKILL)  # any run process left behind


def drop(recordings: Path, data: Path) -> list[str]:
    """Every recording moved into the inbox whole, dated an hour back (ready at the
    sensor's next tick); their names."""
    names = sorted(p.name for p in recordings.iterdir())
    hour_ago = time.time() - 3600
    for name in names:  # each whole at once: copied beside the inbox, then renamed in
        part = data / f".{name}.part"
        shutil.copyfile(recordings / name, part)
        os.utime(part, (hour_ago, hour_ago))
        part.rename(data / "inbox" / name)
    return names


def one_pass(recordings: Path, root: Path, slots: int, queue_defaults: bool = False) -> dict:
    """One burst of ``recordings`` through a fresh daemon whose run queue lets ``slots``
    go at once; ``queue_defaults``: with Dagster's own dequeue settings, not the shipped ones."""
    with running_daemon(root, slots, ("run_coordinator",) if queue_defaults else ()) as (instance, data):
        return _timed_burst(instance, recordings, data, root, slots) | {
            "queue": "dagster defaults" if queue_defaults else "shipped"}


def _timed_burst(instance, recordings: Path, data: Path, root: Path, slots: int) -> dict:
    """Drop the recordings once the daemon is up; wait for every result and run; the figures."""
    from dagster import AssetKey, DagsterRunStatus

    names = drop(recordings, data)
    dropped = time.time()

    def all_done() -> bool:
        runs = instance.get_run_records()
        return (len(instance.get_materialized_partitions(AssetKey("report"))) >= len(names)
                and bool(runs) and all(r.dagster_run.is_finished for r in runs))

    wait_until(f"every report and run (see {root / 'daemon.log'})", all_done, TIMEOUT_S, every_s=0.5)
    finished = time.time()
    runs = sorted(instance.get_run_records(), key=lambda r: r.create_timestamp.timestamp())
    first = runs[0].create_timestamp.timestamp()
    last = max(r.end_time for r in runs)
    # Per run, seconds after the first run's creation (the sensor queued it): each
    # step of its launch, its end; and its recordings' range.
    timeline = [{"first": r.dagster_run.tags.get("dagster/asset_partition_range_start"),
                 "last": r.dagster_run.tags.get("dagster/asset_partition_range_end"),
                 "created": round(r.create_timestamp.timestamp() - first, 2),
                 "started": round(r.start_time - first, 2) if r.start_time else None,
                 "ended": round(r.end_time - first, 2),
                 **{name.lower(): event_time(instance, r.dagster_run.run_id, name, first)
                    for name in ("RUN_STARTING", "RUN_START")}} for r in runs]
    counts = {stage: len(instance.get_materialized_partitions(AssetKey(stage)) & set(names)) for stage in STAGES}
    return {"slots": slots, "runs": len(runs), "run_timeline": timeline,
            "statuses": [r.dagster_run.status.value for r in runs],
            "all_success": all(r.dagster_run.status is DagsterRunStatus.SUCCESS for r in runs),
            "results_per_stage": counts, "tick_to_last_end_s": round(last - first, 2),
            "drop_to_done_s": round(finished - dropped, 2)}


def event_time(instance, run_id: str, name: str, since: float) -> float | None:
    """Seconds after ``since`` of the run's first event of type ``name`` (None without one):
    RUN_STARTING (the run queue took it and launched its process), RUN_START (the
    process is up and executing), STEP_START (its step began: it had its pool slot)."""
    from dagster import DagsterEventType

    events = instance.all_logs(run_id, of_type=DagsterEventType[name])
    return round(events[0].timestamp - since, 2) if events else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--queue-defaults", action="store_true",
                        help="the run queue with Dagster's own dequeue settings (every 5 s, one launch"
                             " at a time), not dagster.yaml's")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    passes = []
    with tempfile.TemporaryDirectory(prefix="voiceman-sensor-burst-") as tmp:
        recordings = Path(tmp) / "recordings"
        audio_s = write_recordings(recordings, args.files, args.seconds, "burst")
        for repeat in range(args.repeats):
            for slots in (1, 2):
                row = one_pass(recordings, Path(tmp) / f"pass-{repeat}-{slots}", slots, args.queue_defaults)
                row["repeat"] = repeat
                passes.append(row)
                print(f"repeat {repeat}, {slots} slot(s): {row['runs']} run(s), tick to last end"
                      f" {row['tick_to_last_end_s']:.1f} s, drop to done {row['drop_to_done_s']:.1f} s,"
                      f" {'all SUCCESS' if row['all_success'] else row['statuses']}", flush=True)
    ratios = [one["tick_to_last_end_s"] / two["tick_to_last_end_s"]
              for one, two in zip(passes[0::2], passes[1::2])]
    figures = {"queue": passes[0]["queue"], "files": args.files, "seconds_each": args.seconds, "audio_s": round(audio_s, 2),
               "cpus": len(os.sched_getaffinity(0)), "passes": passes,
               "ratio_one_slot_over_two_per_repeat": [round(r, 3) for r in ratios],
               "median_ratio": round(statistics.median(ratios), 3)}
    print(f"one slot / two slots (tick to last end), per repeat: {', '.join(f'{r:.2f}' for r in ratios)};"
          f" median {figures['median_ratio']:.2f}")
    print(f"figures: {write_figures(figures, 'sensor-burst', args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
