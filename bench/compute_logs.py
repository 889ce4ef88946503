"""What capturing a run's stdout/stderr costs, and what reaches the terminal: Dagster's
manager (``tail -F`` and a watcher process per stream) against ours (a thread).

    python bench/compute_logs.py [--runs 12] [--repeats 3]

Cost: a process pinned to one core runs a one-op job (one printed line)
``--runs`` times after one untimed run, with each manager in turn, ``--repeats``
times alternating; per run: wall time, the process's own CPU time and its
children's. Each side has a fresh home with the shipped dagster.yaml, only
``compute_logs`` differing.

Completeness: 1 MiB written to a captured stream just before its capture
ends; how many bytes reached the terminal (a pipe read to the end).

Prints the figures and writes them to bench/results/compute-logs-<UTC time>.json
unless ``--json`` says where. A benchmark: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, fresh_home, write_figures  # noqa: E402

MANAGERS = {
    "dagster": ("dagster._core.storage.local_compute_log_manager", "LocalComputeLogManager"),
    "voiceman": ("voiceman_pipeline.compute_logs", "ComputeLogManager"),
}

RUNS = """
import json, os, resource, sys, time
from dagster import DagsterInstance, job, op
os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}})

@op
def speak():
    print("one line")

@job
def one_op():
    speak()

def cpu(who):
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime

with DagsterInstance.get() as instance:
    one_op.execute_in_process(instance=instance)  # untimed: first run creates the storage
    wall, own, children = time.perf_counter(), cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN)
    for _ in range({runs}):
        one_op.execute_in_process(instance=instance)
    print(json.dumps({{
        "wall_s": (time.perf_counter() - wall) / {runs},
        "own_cpu_s": (cpu(resource.RUSAGE_SELF) - own) / {runs},
        "children_cpu_s": (cpu(resource.RUSAGE_CHILDREN) - children) / {runs},
    }}), file=sys.__stderr__)
"""


def per_run(manager: str, runs: int, workdir: Path) -> dict:
    """One process's figures per run of the one-op job under ``manager``."""
    home = fresh_home(Path(tempfile.mkdtemp(dir=workdir)) / "home")
    module, cls = MANAGERS[manager]
    config = (home / "dagster.yaml").read_text()
    config = config.replace(f"module: {MANAGERS['voiceman'][0]}", f"module: {module}")
    config = config.replace(f"class: {MANAGERS['voiceman'][1]}", f"class: {cls}")
    (home / "dagster.yaml").write_text(config)
    done = subprocess.run(
        [sys.executable, "-c", RUNS.format(runs=runs)], cwd=REPO, capture_output=True,
        text=True, env={**os.environ, "DAGSTER_HOME": str(home)}, check=True,
    )
    return json.loads(done.stderr.strip().splitlines()[-1])


def echoed_bytes(capture, workdir: Path, size: int = 1 << 20) -> int:
    """Bytes of ``size`` written at a capture's end that reach the terminal."""
    read_end, write_end = os.pipe()
    got = bytearray()

    def read():
        while chunk := os.read(read_end, 1 << 16):
            got.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    log = Path(tempfile.mkdtemp(dir=workdir)) / "run.out"
    with os.fdopen(write_end, "w") as terminal, capture(terminal, str(log)):
        os.write(write_end, b"x" * size)
    reader.join()
    os.close(read_end)
    return len(got)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from dagster._core.execution.compute_logs import mirror_stream_to_file

    from voiceman_pipeline.compute_logs import captured

    figures: dict = {"runs_per_process": args.runs, "repeats": args.repeats, "cost": {}}
    with tempfile.TemporaryDirectory(prefix="voiceman-bench-logs-") as tmp:
        workdir = Path(tmp)
        for _ in range(args.repeats):
            for manager in MANAGERS:
                figures["cost"].setdefault(manager, []).append(per_run(manager, args.runs, workdir))
        figures["echoed_of_1_MiB"] = {
            "dagster": echoed_bytes(mirror_stream_to_file, workdir),
            "voiceman": echoed_bytes(captured, workdir),
        }
    for manager, rows in figures["cost"].items():
        median = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
        figures.setdefault("median_per_run", {})[manager] = median
        print(f"{manager:9} per run (median of {args.repeats}): wall {median['wall_s'] * 1000:.0f} ms, "
              f"own CPU {median['own_cpu_s'] * 1000:.0f} ms, children's CPU "
              f"{median['children_cpu_s'] * 1000:.0f} ms; echoed {figures['echoed_of_1_MiB'][manager]} "
              f"of {1 << 20} bytes")
    print(f"written: {write_figures(figures, 'compute-logs', args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
