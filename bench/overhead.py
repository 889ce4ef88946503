"""What Dagster and the pipeline's bookkeeping cost, and whether memory grows batch over batch.

    python bench/overhead.py [--files 10] [--batch-size 5] [--batches 4] [--json PATH]

Part 1, overhead. N recordings (data/samples/*.wav copied round-robin under
distinct names into a temporary inbox, registered as ``audio_files``
partitions in a temporary Dagster instance) are processed twice:

- dagster: ``recording_analysis`` (audio -> transcript -> forensic -> emotion
  -> report) through ``materialize``, one run per batch of ``--batch-size``
  with the partition-range tags, the resources of definitions.py with a
  temporary RecordingStore;
- bare: the per-file work of ``bench/bare_loop.py`` (``analyse``: decode,
  transcribe, forensic analysis, emotion, report plot) called in a plain loop
  in this process, models loaded once, nothing written to disk.

One recording goes through each path first (warm-up, not timed) so one-time
imports, Praat/matplotlib initialisation and Dagster's first job build count
on neither side. Read "dagster/bare" as the price of the pipeline per
recording: 1.0 = free. The per-stage table splits it: "bare" is the engine
call alone; "engine" is the same call timed inside the pipeline (its
``process_s``/``decode_s`` metadata); "in stage" is the whole stage body
under the MemoryManager's tracker (``memory_processing_time_s``: reading and
re-hashing upstream results, the engine, atomic writes, the model load on the
first file of a run). What the stages do not account for ("framework") is
Dagster itself plus the step's memory checks, history queries and cleanups.

Part 2, memory. ``--batches`` batches of fresh recordings run back to back in
this process; after each, gc.collect() and this process's RSS, plus the
highest ``memory_peak_mb`` the run's materializations recorded. RSS that
keeps rising from batch 1 to batch K points to a leak (models are unloaded
after every stage, so it should not).

This is a benchmark, not a test: it asserts nothing, and its ratios only
compare figures measured in the same run on the same machine.

    python bench/overhead.py --whole-process [--short 16] [--long 4]
                             [--short-seconds 5] [--long-seconds 60] [--repeats 2]
                             [--side-by-side]

Whole process: what a user waits for. For each length, the recordings (the
samples, 16 kHz mono PCM, concatenated round-robin from a different sample
each and cut to exactly that many seconds) are processed, each time in a
fresh temporary folder:

- pipeline: the real ``voiceman run --settle 0`` (intake, the five stages,
  the summary) with a fresh DAGSTER_HOME holding the shipped dagster.yaml,
  its storage redirected there, and a fresh data dir whose inbox holds them;
- bare: ``bench/bare_loop.py``, one Python process running the same engines
  on every file and writing each one's report.json and report.png, then the
  summary table (summary.csv and summary.parquet) the pipeline also writes.

Both sides start from nothing: fresh folders, and matplotlib's font cache
(MPLCONFIGDIR) in the fresh data dir, where the pipeline keeps it.

With ``--kept-home N`` both sides start instead where a user's second
command does: N earlier recordings of the same length (under other names)
were processed once per length, untimed, and each pass starts from a copy of
that: for the pipeline its DAGSTER_HOME and data dir (storage, results,
the earlier recordings still in the inbox, done, and its font cache); for
the loop its font cache only (it keeps nothing else between runs). The
pipeline's summary then covers the N earlier recordings too.

With ``--before DIR`` a third side, "before", runs ``voiceman run`` from the
checkout in DIR (an earlier copy of the code: its package put first on
PYTHONPATH), so a change is measured against the old code in the same run;
``--after DIR`` runs the "pipeline" side from another checkout the same way.
``--pipeline-batch-size N`` runs the pipeline side (not "before") with
VOICEMAN_BATCH_SIZE=N instead of its default (8 recordings per run).

Each side is timed as a whole process, wall seconds from spawn to exit, and
by its CPU seconds (user + system of the child, from getrusage: less bent by
other load than wall). The sides alternate, pipeline then bare, ``--repeats``
times per length, so the machine's other load falls on both; the ratio per
length is the median pipeline wall over the median bare wall (the CPU ratio
beside it), and the median of each repeat's own ratio.

With ``--side-by-side`` the two sides of a repeat start at the same moment,
each pinned to its own CPU (side i on CPU (i + repeat) mod N, so each side
has each CPU in turn): load from outside this benchmark (on a shared virtual
machine the same engine call can take 14 s in one minute and 24 s in the
next) then falls on both sides of a pair, and each repeat's own ratio is the
estimate to read. Pinned, the pipeline's helper threads share its one CPU
with its main thread, where otherwise they could use the idle second one.

Figures go to bench/results/overhead-whole-<UTC time>.json unless ``--json``
says where.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import bare_loop  # bench/bare_loop.py, the baseline (this script's folder is on sys.path)
from common import fresh_home, stop_group  # bench/common.py

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

SAMPLES = sorted((REPO / "data" / "samples").glob("*.wav"))
STAGES = ["audio", "transcript", "forensic", "emotion", "report"]
# The engine's own timing in each stage's metadata (intake reports decode_s;
# report's process_s covers its whole body: joining results, plot, writes).
ENGINE_TIME_KEY = {"audio": "decode_s"} | {s: "process_s" for s in STAGES[1:]}
# Keep the run's console quiet; events still go to the instance's event log as usual.
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
# MemoryManager.cleanup's log line (runs between stages and at teardown, outside
# the per-file tracker, so its time is part of "framework").
CLEANUP_LINE = re.compile(r"^Cleanup \((.+?)\): .* in ([0-9.]+)s$")


def drop(inbox: Path, prefix: str, count: int, start: int = 0) -> list[str]:
    """Copy samples round-robin into the inbox as <prefix>_<i>_<sample>; the keys."""
    keys = []
    for i in range(start, start + count):
        sample = SAMPLES[i % len(SAMPLES)]
        key = f"{prefix}_{i:03d}_{sample.name}"  # already a safe partition key
        shutil.copyfile(sample, inbox / key)
        keys.append(key)
    return keys


class DagsterPath:
    """One materialize run per batch, as the tests and backfills do it."""

    def __init__(self, instance, store, batch_size: int):
        from voiceman_pipeline.assets.pipeline import build_recording_analysis
        from voiceman_pipeline.definitions import defs

        self.instance = instance
        self.batch_size = batch_size
        self.asset = build_recording_analysis(batch_size)
        self.resources = {**defs.resources, "store": store}

    def run(self, keys: list[str]) -> list[tuple[str, float]]:
        """Materialize ``keys`` in contiguous batches; (run_id, seconds) per run."""
        from dagster import materialize

        from voiceman_pipeline.partitions import contiguous_batches, range_tags

        all_keys = self.instance.get_dynamic_partitions("audio_files")
        runs = []
        for batch in contiguous_batches(all_keys, keys, self.batch_size):
            t = time.perf_counter()
            result = materialize(
                [self.asset],
                instance=self.instance,
                resources=self.resources,
                tags=range_tags(batch),
                run_config=QUIET,
                raise_on_error=False,
            )
            seconds = time.perf_counter() - t
            if not result.success:
                raise SystemExit(f"pipeline run over {batch} failed; see the event log above")
            runs.append((result.run_id, seconds))
        return runs

    def metadata(self, run_ids: list[str]) -> list[dict]:
        """Metadata of every materialization of these runs, with 'stage' and 'key'."""
        from dagster import DagsterEventType

        rows = []
        for run_id in run_ids:
            records = self.instance.get_records_for_run(
                run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION
            ).records
            for record in records:
                mat = record.event_log_entry.asset_materialization
                md = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
                rows.append({**md, "stage": mat.asset_key.to_user_string(), "key": mat.partition})
        return rows


    def cleanup_seconds(self, run_ids: list[str]) -> tuple[int, float]:
        """(count, seconds) of the MemoryManager cleanups these runs logged."""
        count, seconds = 0, 0.0
        for run_id in run_ids:
            for record in self.instance.get_records_for_run(run_id).records:
                match = CLEANUP_LINE.match(record.event_log_entry.user_message or "")
                if match:
                    count, seconds = count + 1, seconds + float(match.group(2))
        return count, seconds


class BarePath:
    """bench/bare_loop.py's engines and per-file work, called directly and
    timed per stage; models loaded once, nothing written to disk."""

    def __init__(self):
        self.engines = bare_loop.load_engines()

    def run(self, paths: list[Path]) -> dict[str, list[float]]:
        """Process every file; seconds per stage per file."""
        times: dict[str, list[float]] = {s: [] for s in STAGES}
        for path in paths:
            last = time.perf_counter()

            def lap(stage: str) -> None:
                nonlocal last
                now = time.perf_counter()
                times[stage].append(now - last)
                last = now

            bare_loop.analyse(path, self.engines, lap)
        return times


def rss_mb() -> float:
    import psutil

    gc.collect()  # count what is still referenced, not garbage awaiting collection
    return psutil.Process().memory_info().rss / 2**20


def mean(values) -> float:
    values = [float(v) for v in values if v is not None]
    return statistics.fmean(values) if values else float("nan")


# --- whole process ------------------------------------------------------------

def write_recording(target: Path, first: int, seconds: float) -> float:
    """The samples concatenated round-robin from sample ``first``, cut to
    exactly ``seconds``; written as 16-bit PCM WAV. Its seconds."""
    import numpy as np
    import soundfile

    parts, total, i = [], 0, first
    rate = soundfile.info(str(SAMPLES[0])).samplerate
    want = int(round(seconds * rate))
    while total < want:
        audio, r = soundfile.read(str(SAMPLES[i % len(SAMPLES)]), dtype="int16")
        assert r == rate, "samples must share one rate"
        parts.append(audio)
        total += len(audio)
        i += 1
    soundfile.write(str(target), np.concatenate(parts)[:want], rate, subtype="PCM_16")
    return want / rate


def write_recordings(folder: Path, count: int, seconds: float, prefix: str, first: int = 0) -> float:
    """``count`` recordings of ``seconds`` (``write_recording``, from sample ``first``
    on) in the new folder ``folder``, as ``<prefix>_000.wav`` on; their seconds in all."""
    folder.mkdir()
    return sum(write_recording(folder / f"{prefix}_{i:03d}.wav", first + i, seconds) for i in range(count))


def timed_children(commands: list[tuple[list[str], dict, Path, Path, int | None]]
                   ) -> list[tuple[float, float, int]]:
    """Start every (command, env, log, cwd, cpu) at once, each pinned to
    ``cpu`` when not None; (wall s from spawn to its exit, its CPU s, exit
    status) for each. Each child's own rusage (os.wait4), so children timed
    side by side do not mix their CPU seconds."""
    children, results = [], {}
    try:
        for command, env, log, cwd, cpu in commands:
            with open(log, "w") as out:
                pin = (lambda cpu=cpu: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
                children.append((subprocess.Popen(
                    command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True, preexec_fn=pin), time.perf_counter()))
        while len(results) < len(children):
            for n, (child, started) in enumerate(children):
                if n in results:
                    continue
                pid, status, usage = os.wait4(child.pid, os.WNOHANG)
                if pid:
                    child.returncode = os.waitstatus_to_exitcode(status)
                    results[n] = (time.perf_counter() - started, usage.ru_utime + usage.ru_stime,
                                  child.returncode)
            time.sleep(0.01)
    except BaseException:
        for child, _ in children:  # no pipeline keeps running behind an interrupted benchmark
            if child.returncode is None:
                stop_group(child)
        raise
    return [results[n] for n in range(len(children))]


def prepare_side(side: str, recordings: Path, root: Path, before: Path | None = None,
                 after: Path | None = None, batch_size: int | None = None,
                 kept: Path | None = None) -> tuple[list[str], dict, Path]:
    """A fresh folder for one whole-process pass of ``side`` over the
    recordings; (command, environment, checkout to run it from). ``before``:
    the checkout whose pipeline the "before" side runs; ``after``: the one the
    "pipeline" side runs, this one if None. ``kept``: the folder of an earlier
    pass of this side to start from (``--kept-home``)."""
    home, data = root / "home", root / "data"
    if kept and side != "bare":  # its home and data dir, as that pass left them
        shutil.copytree(kept, root, dirs_exist_ok=True)
        (home / "dagster.yaml").write_text((home / "dagster.yaml").read_text().replace(str(kept), str(root)))
    elif kept:  # the loop keeps its font cache only
        shutil.copytree(kept / "data" / ".cache", data / ".cache")
    (data / "outputs").mkdir(parents=True, exist_ok=True)
    shutil.copytree(recordings, data / "inbox", dirs_exist_ok=True)
    repo = before if side == "before" else after if side == "pipeline" and after else REPO
    env = {**os.environ, "PYTHONPATH": str(repo)}  # ahead of the installed package
    env.pop("VOICEMAN_BATCH_SIZE", None)  # each side's own default
    if side == "pipeline" and batch_size:
        env["VOICEMAN_BATCH_SIZE"] = str(batch_size)
    env["VOICEMAN_WORKERS"] = "1"  # one process, as the bare loop is (bench/throughput.py: workers)
    # matplotlib's font cache where the pipeline keeps it (its data dir), for
    # both sides: each pass builds it once, as a first run in a fresh folder
    # does. Before, the loop used the one the environment named (by default
    # ~/.cache/matplotlib, long built): import and one figure took 0.46-0.50 s
    # with a cache, 0.59-0.78 s building it.
    env["MPLCONFIGDIR"] = str(data / ".cache" / "matplotlib")
    if side in ("pipeline", "before"):
        if not kept:
            fresh_home(home, repo)
        env.update(DAGSTER_HOME=str(home), VOICEMAN_DATA_DIR=str(data))
        command = [str(Path(sys.executable).with_name("voiceman")), "run", "--settle", "0"]
    else:
        command = [sys.executable, str(REPO / "bench" / "bare_loop.py"),
                   str(data / "inbox"), str(data / "outputs")]
    return command, env, repo


def done_in_summary(table: Path) -> set[str]:
    """The recordings a summary.csv lists as done."""
    if not table.is_file():
        return set()
    with table.open(newline="") as rows:
        return {row["partition_key"] for row in csv.DictReader(rows) if row["status"] == "done"}


def side_row(side: str, recordings: Path, root: Path, timed: tuple[float, float, int],
             load: float, cpu: int | None = None) -> dict:
    """The figures of one pass, and whether it did all the work: a report per
    recording and the summary table."""
    wall, cpu_s, rc = timed
    outputs = root / "data" / "outputs"
    expected = {p.name for p in recordings.iterdir()}
    done = {p.parent.name for p in outputs.glob("*/report.png") if (p.parent / "report.json").is_file()}
    listed = done_in_summary(outputs / "summary.csv")  # both sides write the table
    row = {"side": side, "wall_s": round(wall, 2), "cpu_s": round(cpu_s, 2), "exit_status": rc,
           "ok": rc == 0 and expected <= done and expected <= listed,
           "load_1min_before": round(load, 2)}
    if cpu is not None:
        row["cpu"] = cpu
    if not row["ok"]:
        row["log_tail"] = (root / "log.txt").read_text()[-2000:]
    return row


def run_sides(sides: list[str], recordings: Path, roots: list[Path], args,
              cpus: list[int] | None = None, kept: dict[str, Path] | None = None) -> list[dict]:
    """One pass of each side, one after another, or with ``cpus`` all at once,
    side i pinned to ``cpus[i]``; ``kept``: each side's folder to start from."""
    prepared = [prepare_side(side, recordings, root, args.before, args.after,
                             args.pipeline_batch_size, (kept or {}).get(side))
                for side, root in zip(sides, roots)]
    plan = [(command, env, root / "log.txt", repo, cpus[n] if cpus else None)
            for n, ((command, env, repo), root) in enumerate(zip(prepared, roots))]
    timed = []  # (wall, CPU s, status) and the load average just before the start
    if cpus:
        load = os.getloadavg()[0]
        timed = [(t, load) for t in timed_children(plan)]
    else:
        for step in plan:
            load = os.getloadavg()[0]
            timed.append((timed_children([step])[0], load))
    return [side_row(side, recordings, root, t, load, cpus[n] if cpus else None)
            for n, (side, root, (t, load)) in enumerate(zip(sides, roots, timed))]


def keep_homes(name: str, sides: list[str], seconds: float, first: int, tmp: Path,
               args) -> dict[str, Path]:
    """``--kept-home``: one untimed pass of each side over ``args.kept_home``
    earlier recordings (made as the timed ones are, from sample ``first`` on);
    the folder each left, by side."""
    earlier = tmp / f"{name}-earlier-recordings"
    write_recordings(earlier, args.kept_home, seconds, "earlier", first)
    roots = [tmp / f"{name}-{side}-kept" for side in sides]
    for row in run_sides(sides, earlier, roots, args):
        if not row["ok"]:
            raise SystemExit(f"the earlier pass of {row['side']} failed:\n{row.get('log_tail', '')}")
    return dict(zip(sides, roots))


def whole_process(args) -> int:
    lengths = [("short", args.short, args.short_seconds), ("long", args.long, args.long_seconds)]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    target = args.json or REPO / "bench" / "results" / f"overhead-whole-{stamp}.json"
    figures: dict = {"bench": "overhead --whole-process", "started_utc": stamp,
                     "repeats": args.repeats, "cpus": os.cpu_count(),
                     "before": str(args.before) if args.before else None,
                     "pipeline": str(args.after or REPO),
                     "pipeline_batch_size": args.pipeline_batch_size,
                     "kept_home": args.kept_home, "lengths": {}}
    cpu_list = sorted(os.sched_getaffinity(0))
    figures["side_by_side"] = args.side_by_side
    with tempfile.TemporaryDirectory(prefix="voiceman-overhead-") as tmp:
        for name, count, seconds in lengths:
            if count < 1:
                continue
            recordings = Path(tmp) / f"{name}-recordings"
            audio_s = write_recordings(recordings, count, seconds, name)
            rows = []
            sides = (["before"] if args.before else []) + ["pipeline", "bare"]
            kept = keep_homes(name, sides, seconds, count, Path(tmp), args) if args.kept_home else None
            for repeat in range(args.repeats):
                # Side by side: side i on CPU (i + repeat) mod N, so each side has
                # each CPU in turn. Otherwise interleaved: A B A B (or A' A B A' A B).
                cpus = ([cpu_list[(n + repeat) % len(cpu_list)] for n in range(len(sides))]
                        if args.side_by_side else None)
                roots = [Path(tmp) / f"{name}-{side}-{repeat}" for side in sides]
                for row in run_sides(sides, recordings, roots, args, cpus, kept):
                    row = {"repeat": repeat, **row}
                    rows.append(row)
                    print(json.dumps({"length": name, **{k: v for k, v in row.items()
                                                         if k != "log_tail"}}), flush=True)
                    if not row["ok"]:
                        print(row.get("log_tail", ""), file=sys.stderr)
                for root in roots:
                    shutil.rmtree(root, ignore_errors=True)
            ok = all(r["ok"] for r in rows)

            def median(side, key):
                return statistics.median(r[key] for r in rows if r["side"] == side)

            def by_repeat(side):
                return {r["repeat"]: r for r in rows if r["side"] == side}

            summary = {"recordings": count, "seconds_each": seconds, "audio_s": round(audio_s, 1),
                       "all_ok": ok, "runs": rows}
            bare = by_repeat("bare")
            for side in sides:
                summary[f"{side}_wall_median_s"] = median(side, "wall_s")
                summary[f"{side}_cpu_median_s"] = median(side, "cpu_s")
            for side in sides[:-1]:  # pipeline (and before) over bare
                summary[f"{side}_ratio_wall"] = round(
                    summary[f"{side}_wall_median_s"] / summary["bare_wall_median_s"], 3)
                summary[f"{side}_ratio_cpu"] = round(
                    summary[f"{side}_cpu_median_s"] / summary["bare_cpu_median_s"], 3)
                summary[f"{side}_ratio_wall_per_repeat"] = [
                    round(r["wall_s"] / bare[n]["wall_s"], 3) for n, r in by_repeat(side).items()]
                summary[f"{side}_ratio_cpu_per_repeat"] = [
                    round(r["cpu_s"] / bare[n]["cpu_s"], 3) for n, r in by_repeat(side).items()]
                for kind in ("wall", "cpu"):  # the paired estimate: each repeat's own ratio
                    summary[f"{side}_ratio_{kind}_median_of_repeats"] = round(
                        statistics.median(summary[f"{side}_ratio_{kind}_per_repeat"]), 3)
            figures["lengths"][name] = summary
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(figures, indent=2) + "\n")  # after each length
    print(f"\n{'length':<8}{'side':<10}{'files':>6}{'audio s':>9}{'median s':>10}{'CPU s':>8}"
          f"{'/ bare':>8}{'CPU / bare':>12}{'paired':>8}")
    for name, s in figures["lengths"].items():
        for side in [k[: -len("_wall_median_s")] for k in s if k.endswith("_wall_median_s")]:
            ratios = ("" if side == "bare" else  # paired: the median of each repeat's wall ratio
                      f"{s[side + '_ratio_wall']:>7.2f}x{s[side + '_ratio_cpu']:>11.2f}x"
                      f"{s[side + '_ratio_wall_median_of_repeats']:>7.2f}x")
            print(f"{name:<8}{side:<10}{s['recordings']:>6}{s['audio_s']:>9.1f}"
                  f"{s[side + '_wall_median_s']:>10.2f}{s[side + '_cpu_median_s']:>8.2f}{ratios}")
        if not s["all_ok"]:
            print("   (some passes failed: see the JSON)")
    print(f"wrote {target}")
    return 0 if all(s["all_ok"] for s in figures["lengths"].values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10, help="recordings timed in part 1")
    parser.add_argument("--batch-size", type=int, default=5, help="recordings per run")
    parser.add_argument("--batches", type=int, default=4, help="batches run in part 2")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    whole = parser.add_argument_group("whole process (--whole-process)")
    whole.add_argument("--whole-process", action="store_true",
                       help="time `voiceman run` against bench/bare_loop.py as whole processes")
    whole.add_argument("--short", type=int, default=16, help="short recordings")
    whole.add_argument("--long", type=int, default=4, help="long recordings")
    whole.add_argument("--short-seconds", type=float, default=5.0)
    whole.add_argument("--long-seconds", type=float, default=60.0)
    whole.add_argument("--repeats", type=int, default=2, help="pipeline/bare pairs per length")
    whole.add_argument("--before", type=Path, help="also time the pipeline of this other checkout "
                       "(an earlier copy of the code), interleaved with the two others")
    whole.add_argument("--pipeline-batch-size", dest="pipeline_batch_size", type=int, default=None,
                       help="VOICEMAN_BATCH_SIZE of the pipeline side (default: its own)")
    whole.add_argument("--after", type=Path, help="run the pipeline side from this other "
                       "checkout instead of this one")
    whole.add_argument("--kept-home", dest="kept_home", type=int, default=0, metavar="N",
                       help="start each pass where an earlier one over N other recordings "
                       "left its home (see above); 0: from nothing")
    whole.add_argument("--side-by-side", dest="side_by_side", action="store_true",
                       help="start the sides of a repeat at the same moment, each pinned to "
                       "its own CPU (needs a CPU per side), so load from outside falls on both")
    args = parser.parse_args(argv)
    if args.whole_process:
        if args.repeats < 1:
            parser.error("--repeats must be at least 1")
        if args.side_by_side and len(os.sched_getaffinity(0)) < 2 + bool(args.before):
            parser.error("--side-by-side needs a CPU per side")
        return whole_process(args)
    if args.files < 1 or args.batch_size < 1 or args.batches < 1:
        parser.error("--files, --batch-size and --batches must be at least 1")

    from dagster import instance_for_test

    from voiceman_pipeline.resources.outputs import RecordingStore

    figures: dict = {"files": args.files, "batch_size": args.batch_size, "batches": args.batches}
    with tempfile.TemporaryDirectory(prefix="voiceman-bench-") as tmp, instance_for_test() as instance:
        data = Path(tmp) / "data"
        inbox = data / "inbox"
        inbox.mkdir(parents=True)
        (data / "outputs").mkdir()
        store = RecordingStore(data_dir=str(data))

        # Register everything up front, each set contiguous in partition order,
        # so every batch is one partition range.
        warm = drop(inbox, "warm", 1)
        timed_keys = drop(inbox, "file", args.files)
        mem_keys = [drop(inbox, f"mem{b}", args.batch_size) for b in range(args.batches)]
        instance.add_dynamic_partitions("audio_files", warm + timed_keys + sum(mem_keys, []))

        dagster_path = DagsterPath(instance, store, args.batch_size)
        bare_path = BarePath()

        # Warm-up (untimed): one recording through each path.
        dagster_path.run(warm)
        bare_path.run([inbox / k for k in warm])

        # --- part 1: overhead ---------------------------------------------------
        t = time.perf_counter()
        bare_times = bare_path.run([inbox / k for k in timed_keys])
        bare_s = time.perf_counter() - t
        runs = dagster_path.run(timed_keys)
        dagster_s = sum(s for _, s in runs)
        rows = dagster_path.metadata([r for r, _ in runs])
        audio_s = sum(r["duration_s"] for r in rows if r["stage"] == "audio")

        n = args.files
        stages = {}
        for stage in STAGES:
            mine = [r for r in rows if r["stage"] == stage]
            stages[stage] = {
                "bare_s": mean(bare_times[stage]),
                "engine_s": mean(r.get(ENGINE_TIME_KEY[stage]) for r in mine),
                "in_stage_s": mean(r["memory_processing_time_s"] for r in mine),
            }
        in_stages_s = sum(r["memory_processing_time_s"] for r in rows)
        cleanups, cleanup_s = dagster_path.cleanup_seconds([r for r, _ in runs])
        figures["overhead"] = {
            "audio_s": audio_s,
            "bare_s": bare_s,
            "dagster_s": dagster_s,
            "dagster_runs_s": [s for _, s in runs],
            "bare_files_per_s": n / bare_s,
            "dagster_files_per_s": n / dagster_s,
            "ratio_dagster_over_bare": dagster_s / bare_s,
            "dagster_in_stages_s": in_stages_s,
            "dagster_framework_s": dagster_s - in_stages_s,
            "dagster_cleanups": cleanups,
            "dagster_cleanup_s": cleanup_s,
            "per_stage_mean_s": stages,
        }

        o = figures["overhead"]
        print(f"\nPart 1: overhead, {n} recordings ({audio_s:.1f} s of audio), "
              f"batches of {args.batch_size}, after a 1-recording warm-up on each path")
        print(f"{'path':<10}{'seconds':>9}{'files/s':>9}{'s/file':>9}")
        print(f"{'bare':<10}{bare_s:>9.2f}{n / bare_s:>9.2f}{bare_s / n:>9.3f}")
        print(f"{'dagster':<10}{dagster_s:>9.2f}{n / dagster_s:>9.2f}{dagster_s / n:>9.3f}"
              f"   ({len(runs)} runs: " + ", ".join(f"{s:.2f}" for _, s in runs) + " s)")
        print(f"ratio dagster/bare: {o['ratio_dagster_over_bare']:.2f}x "
              f"(+{dagster_s - bare_s:.2f} s, {(dagster_s - bare_s) / n:.3f} s per recording)")
        print("\nper stage, mean s/file   bare = engine call alone; engine = same call in the "
              "pipeline;\n                         in stage = whole stage body (I/O, custody "
              "re-hash, model load)")
        print(f"{'stage':<12}{'bare':>8}{'engine':>8}{'in stage':>10}")
        for stage, s in stages.items():
            print(f"{stage:<12}{s['bare_s']:>8.3f}{s['engine_s']:>8.3f}{s['in_stage_s']:>10.3f}")
        print(f"{'all stages':<12}{bare_s / n:>8.3f}{'':>8}{in_stages_s / n:>10.3f}")
        print(f"framework (dagster wall - all stage bodies): {o['dagster_framework_s']:.2f} s, "
              f"{o['dagster_framework_s'] / len(runs):.2f} s per run, "
              f"{o['dagster_framework_s'] / dagster_s:.0%} of dagster wall")
        print(f"  of which MemoryManager cleanups (unload, gc, malloc_trim): "
              f"{cleanup_s:.2f} s in {cleanups} cleanups ({cleanup_s / cleanups:.2f} s each)")
        print(f"  rest (Dagster run/step setup, event-log writes, memory checks, history "
              f"queries): {o['dagster_framework_s'] - cleanup_s:.2f} s")

        # --- part 2: memory across batches --------------------------------------
        # Batch 1 is not cold (part 1 ran before it): growth is measured from it on.
        print(f"\nPart 2: memory over {args.batches} batches of {args.batch_size} "
              f"(RSS after gc.collect(); peak = max memory_peak_mb of the run)")
        print(f"{'batch':>5}{'seconds':>9}{'RSS MB':>9}{'peak MB':>9}")
        batches = []
        for b, keys in enumerate(mem_keys, start=1):
            ((run_id, seconds),) = dagster_path.run(keys)
            peak = max(r["memory_peak_mb"] for r in dagster_path.metadata([run_id]))
            batches.append({"batch": b, "seconds": seconds, "rss_mb": rss_mb(), "peak_mb": peak})
            print(f"{b:>5}{seconds:>9.2f}{batches[-1]['rss_mb']:>9.1f}{peak:>9.1f}")
        first, last = batches[0]["rss_mb"], batches[-1]["rss_mb"]
        growth = last - first
        pct = growth / first * 100
        verdict = ("growth < 5% of batch-1 RSS: no leak seen" if pct < 5
                   else "growth >= 5% of batch-1 RSS: memory grows batch over batch, look for a leak")
        print(f"RSS batch 1 -> {args.batches}: {growth:+.1f} MB ({pct:+.1f}%); {verdict}")
        figures["memory"] = {"batches": batches, "rss_growth_mb": growth,
                             "rss_growth_pct": pct, "verdict": verdict}

    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
        print(f"\nfigures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
