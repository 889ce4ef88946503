"""What trimming the heap before every recording costs a whole `voiceman run`.

    python bench/heap_trim.py [--files 16] [--seconds 5] [--repeats 4]

``MemoryManager.track`` calls ``malloc_trim`` before each (stage, recording),
so that memory freed by the one before goes back to the kernel and the
recording's growth shows in the kernel's peak counter (reused heap would not).
What is given back is faulted in again when the next recording needs it. Timing
``malloc_trim`` alone (``bench/overhead_parts.py``) sees only the call, not
those page faults.

This benchmark runs the real ``voiceman run --settle 0`` on the same recordings
(the samples concatenated, as ``bench/overhead.py --whole-process`` makes
them), each pass in a fresh home and data dir, alternately as shipped
("trimmed") and with ``malloc_trim`` replaced by a no-op in both memory
modules ("untrimmed": the per-recording peaks then under-read, which is why
the pipeline does not ship that way). Every pass runs alone, pinned to one CPU,
one worker. Per pass, from the child's rusage: wall s, user and system CPU s,
minor page faults, and the maximum resident set (MB). The paired figures are
each repeat's trimmed minus untrimmed, and their median.

Figures go to bench/results/heap-trim-<UTC time>.json (``--json``: elsewhere).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_figures  # noqa: E402
from overhead import prepare_side, write_recordings  # noqa: E402

# The untrimmed side: `voiceman run` with malloc_trim a no-op wherever it is bound.
UNTRIMMED = (
    "import sys\n"
    "import voiceman_pipeline.resources.memory as memory\n"
    "import voiceman_pipeline.resources.memory_readings as readings\n"
    "readings.malloc_trim = memory.malloc_trim = lambda: None\n"
    "from voiceman_pipeline.cli import command\n"
    "sys.argv = ['voiceman', 'run', '--settle', '0']\n"
    "sys.exit(command())\n"
)
FIELDS = ("wall_s", "user_s", "system_s", "minor_faults", "max_rss_mb")


def one_pass(side: str, recordings: Path, root: Path, cpu: int) -> dict:
    """One whole `voiceman run` of ``side`` ("trimmed" or "untrimmed") in a fresh folder."""
    command, env, repo = prepare_side("pipeline", recordings, root)
    if side == "untrimmed":
        command = [sys.executable, "-c", UNTRIMMED]
    with open(root / "log.txt", "w") as log:
        started = time.perf_counter()
        child = subprocess.Popen(command, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
    return {"side": side, "exit_status": os.waitstatus_to_exitcode(status), "wall_s": round(wall, 2),
            "user_s": round(usage.ru_utime, 2), "system_s": round(usage.ru_stime, 2),
            "minor_faults": usage.ru_minflt, "max_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    cpu = max(os.sched_getaffinity(0))
    rows = []
    with tempfile.TemporaryDirectory(prefix="voiceman-heap-trim-") as tmp:
        recordings = Path(tmp) / "recordings"
        write_recordings(recordings, args.files, args.seconds, "call")
        for repeat in range(args.repeats):
            # Alternate which side goes first, so a drift in the machine falls on both.
            for side in (("trimmed", "untrimmed") if repeat % 2 == 0 else ("untrimmed", "trimmed")):
                row = {"repeat": repeat, **one_pass(side, recordings, Path(tmp) / f"{side}-{repeat}", cpu)}
                print(row, flush=True)
                rows.append(row)
    ok = all(r["exit_status"] == 0 for r in rows)
    by = {side: {r["repeat"]: r for r in rows if r["side"] == side} for side in ("trimmed", "untrimmed")}
    figures = {"files": args.files, "seconds_each": args.seconds, "repeats": args.repeats, "cpu": cpu,
               "all_ok": ok, "runs": rows, "median": {}, "paired_median_trimmed_minus_untrimmed": {}}
    for field in FIELDS:
        for side in by:
            figures["median"][f"{side}_{field}"] = round(statistics.median(r[field] for r in by[side].values()), 2)
        figures["paired_median_trimmed_minus_untrimmed"][field] = round(statistics.median(
            by["trimmed"][n][field] - by["untrimmed"][n][field] for n in range(args.repeats)), 2)
    target = write_figures(figures, "heap-trim", args.json)
    print(f"{'':<12}" + "".join(f"{f:>14}" for f in FIELDS))
    for side in by:
        print(f"{side:<12}" + "".join(f"{figures['median'][f'{side}_{f}']:>14}" for f in FIELDS))
    paired = figures["paired_median_trimmed_minus_untrimmed"]
    print(f"{'difference':<12}" + "".join(f"{paired[f]:>14}" for f in FIELDS))
    print(f"wrote {target}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
