"""Where a `voiceman run` spends its time outside the engines, part by part.

    python bench/overhead_parts.py [--recordings 16] [--seconds 5] [--repeats 3]

Issue 9's overhead goal compares a whole `voiceman run` with a hand-written
loop (bench/overhead.py --whole-process). This splits the pipeline's side.
Each repeat makes a fresh DAGSTER_HOME (the shipped dagster.yaml, its
storage redirected there) and a fresh data dir whose inbox holds the same
recordings as bench/overhead.py's short set (the samples joined round-robin
and cut to ``--seconds``). Then a fresh Python process (this script with
``--child``) calls the real ``voiceman run --settle 0`` in-process
(``cli.main``, VOICEMAN_WORKERS=1: one process, as the loop), with a timer
wrapped around each of these (one perf_counter pair per call; the parts
overlap where one calls another, e.g. a cleanup inside a run):

- startup: from the child's first line until the instance is opened
  (imports of Dagster, the storage and the code location, settings);
- opening the instance (``DagsterInstance.get``);
- each event Dagster stores (``SqliteEventLogStorage.store_event``), by type,
  and each batch of events (``store_event_batch``: a new run's "planned"
  events, with DAGSTER_EVENT_BATCH_SIZE set);
- checking or creating each event database the storage opens (the shipped
  storage's ``_initdb``: the index, each run's own file);
- each pocketsphinx load (``PocketsphinxTranscriber.load``);
- each memory cleanup (``MemoryManager.cleanup``: between stages, teardown);
- the summary's run (``cli.materialize_summary``);
- Python's garbage collections (``gc.callbacks``);
- the whole command (``cli.main``), and the child's own wall time to exit.

Figures go to bench/results/overhead-parts-<UTC time>.json: each repeat's,
and the median of each part over the repeats. A benchmark, not a test: it
asserts only that every recording was done.
"""

from __future__ import annotations

import time

CHILD_STARTED = time.perf_counter()  # before any other import: startup counts from here

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

from common import write_figures  # noqa: E402  bench/common.py

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing


class Timers:
    """Seconds and calls per part, from wrappers around the functions that do them."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.first_call: dict[str, float] = {}

    def wrap(self, owner, name: str, part, keyed=None) -> None:
        """Time every call of ``owner.name`` under ``part`` (or ``part + keyed(args)``)."""
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            key = part + (keyed(*args, **kwargs) if keyed else "")
            started = time.perf_counter()
            self.first_call.setdefault(key, started)
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - started
                self.calls[key] += 1

        setattr(owner, name, timed)

    def time_gc(self) -> None:
        started = {}

        def callback(phase, info):
            if phase == "start":
                started["t"] = time.perf_counter()
            elif "t" in started:
                self.seconds["gc"] += time.perf_counter() - started.pop("t")
                self.calls["gc"] += 1

        import gc

        gc.callbacks.append(callback)


def child() -> int:
    """In a fresh process: `voiceman run --settle 0` in-process, with the timers; figures as JSON on stdout."""
    timers = Timers()
    timers.time_gc()
    from voiceman_pipeline import cli  # imports no Dagster itself

    # The modules wrapped below are imported as `voiceman run` imports them (cli._command),
    # with collection paused, then frozen: imported outside, they would add about 0.2-0.3 s
    # of collections that the command itself does not pay.
    with cli.collection_paused(then_freeze=True):
        from dagster import DagsterInstance
        from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage

        from voiceman_pipeline.engines.stt.pocketsphinx_engine import PocketsphinxTranscriber
        from voiceman_pipeline.resources.memory import MemoryManager
        from voiceman_pipeline.sqlite_pool import PooledSqliteEventLogStorage

    def event_type(_storage, event, *args, **kwargs) -> str:
        return ":" + (event.dagster_event.event_type_value if event.dagster_event else "log")

    timers.wrap(DagsterInstance, "get", "instance_open")
    timers.wrap(SqliteEventLogStorage, "store_event", "store_event", keyed=event_type)
    timers.wrap(PooledSqliteEventLogStorage, "_initdb", "event_db_open")  # the storage dagster.yaml ships
    timers.wrap(PooledSqliteEventLogStorage, "store_event_batch", "store_event_batch")
    timers.wrap(PocketsphinxTranscriber, "load", "pocketsphinx_load")
    timers.wrap(MemoryManager, "cleanup", "memory_cleanup")
    timers.wrap(cli, "materialize_summary", "summary_run")
    timers.wrap(cli, "main", "command")
    code = cli.main(["run", "--settle", "0"])
    figures = {
        "exit_code": code,
        "startup_s": round(timers.first_call["instance_open"] - CHILD_STARTED, 3),
        "seconds": {k: round(v, 3) for k, v in sorted(timers.seconds.items())},
        "calls": dict(sorted(timers.calls.items())),
    }
    print(json.dumps(figures))
    return 0


def one_repeat(recordings: Path, root: Path) -> dict:
    """A fresh home and data dir over ``recordings``, made as bench/overhead.py
    makes the pipeline's side; the child's figures, and its wall to exit."""
    from overhead import prepare_side  # bench/overhead.py

    _, env, _ = prepare_side("pipeline", recordings, root)
    started = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"the child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    figures["process_wall_s"] = round(wall, 3)
    done = {line.split()[0] for line in out.stdout.splitlines() if " done " in line}
    figures["recordings_done"] = len(done)
    return figures


def medians(repeats: list[dict]) -> dict:
    """The median of each part's seconds (and of startup and wall) over the repeats."""
    parts = sorted({k for r in repeats for k in r["seconds"]})
    return {
        "startup_s": statistics.median(r["startup_s"] for r in repeats),
        "process_wall_s": statistics.median(r["process_wall_s"] for r in repeats),
        "seconds": {k: round(statistics.median(r["seconds"].get(k, 0.0) for r in repeats), 3)
                    for k in parts},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--recordings", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.child:
        return child()
    from overhead import write_recordings  # bench/overhead.py: the same recordings

    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="voiceman-overhead-parts-") as tmp:
        recordings = Path(tmp) / "recordings"
        write_recordings(recordings, args.recordings, args.seconds, "short")
        repeats = []
        for n in range(args.repeats):
            figures = one_repeat(recordings, Path(tmp) / f"pass{n}")
            assert figures["recordings_done"] == args.recordings, figures
            repeats.append(figures)
            print(f"repeat {n + 1}: {figures['process_wall_s']:.2f} s, startup "
                  f"{figures['startup_s']:.2f} s, " + ", ".join(
                      f"{k} {v:.2f}" for k, v in figures["seconds"].items() if v >= 0.05))
    result = {
        "bench": "overhead_parts",
        "recordings": args.recordings, "seconds_each": args.seconds, "repeats": repeats,
        "median": medians(repeats), "cpus": os.cpu_count(),
        "loadavg_start": load_at_start, "loadavg_end": os.getloadavg(),
    }
    print(f"figures: {write_figures(result, 'overhead-parts')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
