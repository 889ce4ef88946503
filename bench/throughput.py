"""Throughput of one worker against two concurrent workers on CPU-only engines.

    python bench/throughput.py [--mode processes|cli|bare] [--files 20] [--batch-size 5]
                               [--workers 2] [--call-seconds S] [--uncapped] [--repeats R]
                               [--json PATH]

The same ``--files`` recordings (data/samples/*.wav copied round-robin under
distinct names) are analysed twice, each time from scratch (a fresh temporary
data dir, so no result is reused, and a fresh temporary DAGSTER_HOME holding
the shipped dagster.yaml with its storage paths redirected there):

- 1 worker: one process runs ``recording_analysis`` over all the recordings,
  one run per contiguous batch of ``--batch-size`` (as the daemon's run queue
  launches a backfill's runs);
- N workers: N processes at once, each doing the same over its contiguous
  share (1/N) of the recordings, on the one instance and data dir.

Each worker is a separate process (its own imports and model loads, like the
daemon's run processes). That is ``--mode processes`` (the default).

``--mode cli`` measures the real command instead: ``voiceman run --workers 1``
against ``voiceman run --workers N`` (at most ``--batch-size`` recordings per
run; the command shares fewer files than N x that evenly among its workers, and
with one worker a single batch of them runs in the command's own process), the
whole process from start to exit, each with a fresh DAGSTER_HOME and data dir
whose inbox holds the recordings (the command takes them in itself). Its
workers cap their native thread pools to cores // N (``workers.py``);
``--uncapped`` sets OMP_NUM_THREADS and the like to the number of cores
instead (what the libraries would take by themselves), to see whether the cap
matters.

``--mode bare`` measures what the machine itself allows, with no pipeline:
``bench/bare_loop.py`` (the same engines in a plain loop) over all the
recordings in one process, against N such processes at once, each over its
share, native threads capped as the workers cap them. Its ratio is the
ceiling for the pipeline's: two busy cores of a virtual machine (or SMT
siblings, or a shared memory bus) may give less than 2x whatever runs on them.

``--repeats R`` alternates the two modes R times (1, N, 1, N, ...) so that
the machine's changing speed falls on both, and reports the median ratio with
each repeat's. "cores used" is then the CPU seconds of the command and its workers. Reported per mode: wall seconds from launching the
workers to the last one's exit, and the window from the first analysis step's
start to the last step's end (the event log; excludes process start-up and
imports); audio seconds per wall second for both; and the ratio N workers /
1 worker. 2 workers on 2 free cores would ideally read 2.0. "cores used" is
the workers' CPU seconds per wall second (what they actually got); the load
average before each mode is recorded, since another process's load bends the
figures.

This is a benchmark, not a test: it asserts nothing. Figures go to
bench/results/throughput-<time>.json (git-ignored) unless ``--json`` says where.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import fresh_home  # bench/common.py (this script's folder is on sys.path)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

SAMPLES = sorted((REPO / "data" / "samples").glob("*.wav"))
RESULTS = REPO / "bench" / "results"
# Keep the run's console quiet; events still go to the instance's event log as usual.
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def audio_seconds(path: Path) -> float:
    import soundfile

    return soundfile.info(str(path)).duration


def cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def write_call(target: Path, first: int, call_seconds: float) -> None:
    """A call of at least ``call_seconds`` of real speech: the samples (all
    16 kHz mono PCM) concatenated round-robin from sample ``first``."""
    import numpy as np
    import soundfile

    parts, total, i = [], 0.0, first
    while total < call_seconds:
        audio, rate = soundfile.read(str(SAMPLES[i % len(SAMPLES)]), dtype="int16")
        parts.append(audio)
        total += len(audio) / rate
        i += 1
    soundfile.write(str(target), np.concatenate(parts), rate, subtype="PCM_16")


def prepare(
    root: Path, files: int, call_seconds: float = 0.0, register: bool = True
) -> tuple[Path, Path, list[str], float]:
    """A fresh DAGSTER_HOME and data dir under ``root`` with ``files`` recordings
    in the inbox, registered unless not ``register``; (home, data, keys in
    partition order, seconds of audio). ``call_seconds`` > 0: each recording
    is samples concatenated to that length."""
    from dagster import DagsterInstance

    home, data = root / "home", root / "data"
    fresh_home(home)
    (data / "inbox").mkdir(parents=True)
    (data / "outputs").mkdir()
    keys, seconds = [], 0.0
    for i in range(files):
        sample = SAMPLES[i % len(SAMPLES)]
        key = f"rec_{i:03d}_{sample.name}"
        if call_seconds > 0:
            write_call(data / "inbox" / key, i, call_seconds)
        else:
            shutil.copyfile(sample, data / "inbox" / key)
        keys.append(key)
        seconds += audio_seconds(data / "inbox" / key)
    if register:
        with DagsterInstance.from_config(str(home)) as instance:
            instance.add_dynamic_partitions("audio_files", keys)
    return home, data, keys, seconds


def steps_window(home: Path, run_ids: list[str]) -> float:
    """Seconds from the first analysis step's start to the last step's end."""
    from dagster import DagsterEventType, DagsterInstance

    starts, ends = [], []
    with DagsterInstance.from_config(str(home)) as instance:
        for run_id in run_ids:
            for record in instance.get_records_for_run(run_id).records:
                kind = record.event_log_entry.dagster_event_type
                if kind == DagsterEventType.STEP_START:
                    starts.append(record.timestamp)
                elif kind in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
                    ends.append(record.timestamp)
    return max(ends) - min(starts)


def analysis_pool() -> str | None:
    """The pool the analysis step is in with this machine's engines (as the command's)."""
    os.environ.pop("VOICEMAN_ANALYSIS_POOL", None)
    from voiceman_pipeline.definitions import recording_analysis

    return recording_analysis.op.pool


def run_cli(root: Path, files: int, workers: int, batch_size: int, call_seconds: float,
            uncapped: bool) -> dict:
    """``voiceman run --workers N`` over ``files`` fresh recordings, start to exit."""
    import resource

    from dagster import DagsterInstance

    from voiceman_pipeline.workers import THREAD_ENV

    home, data, keys, audio_s = prepare(root, files, call_seconds, register=False)
    env = {**os.environ, "DAGSTER_HOME": str(home), "VOICEMAN_DATA_DIR": str(data),
           "PYTHONPATH": str(REPO)}
    env.pop("VOICEMAN_ANALYSIS_POOL", None)  # the pool the engines decide
    if uncapped:  # what the libraries take by themselves: every core, in every worker
        env.update({name: str(cpus()) for name in THREAD_ENV})
    else:  # the cap workers.py sets (a person's own setting would win)
        for name in THREAD_ENV:
            env.pop(name, None)
    command = [str(Path(sys.executable).parent / "voiceman"), "run", "--settle", "0",
               "--workers", str(workers), "--batch-size", str(batch_size)]
    load = os.getloadavg()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall_s = time.perf_counter() - began
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"voiceman run --workers {workers} exited {done.returncode}:\n"
                         f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    cpu_s = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    with DagsterInstance.from_config(str(home)) as instance:
        analysis = [r for r in instance.get_runs() if r.job_name == "analysis_job"]
        pids = {r.tags.get("voiceman/pid") for r in analysis}
    steps_s = steps_window(home, [r.run_id for r in analysis])
    return {
        "workers": workers,
        "worker_processes": len(pids),  # pids the runs were tagged with
        "uncapped_threads": uncapped,
        "recordings": len(keys),
        "audio_s": audio_s,
        "runs": len(analysis),
        "pool": analysis_pool(),
        "loadavg_before": load,
        "wall_s": wall_s,
        "steps_window_s": steps_s,
        "cpu_s": cpu_s,
        "cores_used": cpu_s / wall_s,
        "audio_s_per_wall_s": audio_s / wall_s,
        "audio_s_per_step_window_s": audio_s / steps_s,
    }


def run_bare(root: Path, files: int, workers: int, call_seconds: float) -> dict:
    """``bench/bare_loop.py`` in ``workers`` processes at once, each over its
    share of ``files`` recordings, threads capped as ``voiceman run``'s workers are."""
    import resource

    from voiceman_pipeline.workers import THREAD_ENV, threads_per_worker

    _home, data, keys, audio_s = prepare(root, files, call_seconds, register=False)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.update({name: str(threads_per_worker(workers, cpus())) for name in THREAD_ENV})
    share = -(-len(keys) // workers)
    inboxes = []
    for n, start in enumerate(range(0, len(keys), share)):
        inbox = root / f"share{n}"
        inbox.mkdir()
        for key in keys[start:start + share]:
            (data / "inbox" / key).rename(inbox / key)
        inboxes.append(inbox)
    load = os.getloadavg()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    processes = [subprocess.Popen([sys.executable, str(REPO / "bench" / "bare_loop.py"),
                                   str(inbox), str(data / "outputs")], cwd=REPO, env=env)
                 for inbox in inboxes]
    if any(process.wait() != 0 for process in processes):
        raise SystemExit("a bare loop failed; see above")
    wall_s = time.perf_counter() - began
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    return {
        "workers": len(inboxes),
        "recordings": len(keys),
        "audio_s": audio_s,
        "runs": 0,
        "pool": None,
        "loadavg_before": load,
        "wall_s": wall_s,
        "steps_window_s": wall_s,  # no steps: the whole processes
        "cpu_s": cpu_s,
        "cores_used": cpu_s / wall_s,
        "audio_s_per_wall_s": audio_s / wall_s,
        "audio_s_per_step_window_s": audio_s / wall_s,
    }


def run_mode(root: Path, files: int, workers: int, batch_size: int, call_seconds: float = 0.0) -> dict:
    """Analyse ``files`` fresh recordings with ``workers`` concurrent processes."""
    home, data, keys, audio_s = prepare(root, files, call_seconds)
    env = {**os.environ, "DAGSTER_HOME": str(home), "VOICEMAN_DATA_DIR": str(data),
           "VOICEMAN_BATCH_SIZE": str(batch_size), "PYTHONPATH": str(REPO)}
    env.pop("VOICEMAN_ANALYSIS_POOL", None)  # the pool the engines decide
    share = -(-len(keys) // workers)
    shares = [keys[i:i + share] for i in range(0, len(keys), share)]
    load = os.getloadavg()
    began = time.perf_counter()
    processes = [
        subprocess.Popen([sys.executable, __file__, "--worker", str(batch_size), *mine],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        for mine in shares
    ]
    reports = []
    for process in processes:
        out, _ = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"a worker failed (exit {process.returncode}); see above")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    wall_s = time.perf_counter() - began

    run_ids = [run_id for report in reports for run_id in report["run_ids"]]
    steps_s = steps_window(home, run_ids)
    return {
        "workers": len(shares),
        "recordings": len(keys),
        "audio_s": audio_s,
        "runs": len(run_ids),
        "pool": reports[0]["pool"],
        "loadavg_before": load,
        "wall_s": wall_s,
        "steps_window_s": steps_s,
        "worker_wall_s": [r["seconds"] for r in reports],
        "worker_cpu_s": [r["cpu_s"] for r in reports],
        # CPU-seconds the workers got per wall second: near N when N free cores.
        "cores_used": sum(r["cpu_s"] for r in reports) / wall_s,
        "audio_s_per_wall_s": audio_s / wall_s,
        "audio_s_per_step_window_s": audio_s / steps_s,
    }


def worker(batch_size: int, keys: list[str]) -> int:
    """One worker: ``keys`` in runs of ``batch_size``, in this process; a JSON line out."""
    from dagster import DagsterInstance, materialize

    from voiceman_pipeline.definitions import defs, recording_analysis
    from voiceman_pipeline.partitions import contiguous_batches, range_tags

    began = time.perf_counter()
    run_ids = []
    with DagsterInstance.get() as instance:
        all_keys = list(instance.get_dynamic_partitions("audio_files"))
        for batch in contiguous_batches(all_keys, keys, batch_size):
            result = materialize([recording_analysis], instance=instance, resources=defs.resources,
                                 tags=range_tags(batch), run_config=QUIET, raise_on_error=False)
            if not result.success:
                print(f"run over {batch} failed", file=sys.stderr)
                return 1
            run_ids.append(result.run_id)
    print(json.dumps({"run_ids": run_ids, "seconds": time.perf_counter() - began,
                      "cpu_s": time.process_time(),
                      "pool": recording_analysis.op.pool}))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(int(argv[1]), argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("processes", "cli", "bare"), default="processes",
                        help="worker processes of this script, the real `voiceman run --workers`, "
                        "or bench/bare_loop.py processes (the machine's ceiling)")
    parser.add_argument("--uncapped", action="store_true",
                        help="cli mode: threads per worker not capped (OMP_NUM_THREADS etc. = cores)")
    parser.add_argument("--files", type=int, default=20, help="recordings analysed per mode")
    parser.add_argument("--batch-size", type=int, default=5, help="most recordings per run")
    parser.add_argument("--workers", type=int, default=2, help="concurrent workers, second mode")
    parser.add_argument("--call-seconds", type=float, default=0.0,
                        help="build each recording as samples concatenated to this length "
                        "(default: the samples as they are, 1-7 s)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="alternate 1 and N workers this many times; the median ratio counts")
    parser.add_argument("--json", type=Path, help="where the figures go")
    args = parser.parse_args(argv)
    if args.files < args.workers or args.batch_size < 1 or args.workers < 2:
        parser.error("need --workers >= 2, --files >= --workers and --batch-size >= 1")

    figures: dict = {"mode": args.mode, "files": args.files, "batch_size": args.batch_size, "cpus": cpus(),
                     "call_seconds": args.call_seconds,
                     "max_concurrent_runs_env": os.environ.get("VOICEMAN_MAX_CONCURRENT_RUNS")}
    def measure(root: Path, workers: int) -> dict:
        if args.mode == "cli":
            return run_cli(root, args.files, workers, args.batch_size, args.call_seconds,
                           args.uncapped)
        if args.mode == "bare":
            return run_bare(root, args.files, workers, args.call_seconds)
        return run_mode(root, args.files, workers, args.batch_size, args.call_seconds)

    pairs = []
    for repeat in range(max(1, args.repeats)):
        with tempfile.TemporaryDirectory(prefix="voiceman-throughput-") as tmp:
            one = measure(Path(tmp) / "one", 1)
            many = measure(Path(tmp) / "many", args.workers)
        pairs.append((one, many))
        print(f"repeat {repeat}: {many['audio_s_per_wall_s'] / one['audio_s_per_wall_s']:.3f}x wall",
              flush=True)
    ratios = [many["audio_s_per_wall_s"] / one["audio_s_per_wall_s"] for one, many in pairs]
    ratios_steps = [many["audio_s_per_step_window_s"] / one["audio_s_per_step_window_s"]
                    for one, many in pairs]
    middle = sorted(range(len(pairs)), key=lambda i: ratios[i])[(len(pairs) - 1) // 2]
    one, many = pairs[middle]  # the pair with the median ratio, shown below
    figures["modes"] = [one, many]
    figures["repeats"] = [{"one": a, "many": b} for a, b in pairs]
    figures["ratio_wall"] = ratios[middle]
    figures["ratio_steps"] = ratios_steps[middle]
    figures["ratio_wall_per_repeat"] = [round(r, 3) for r in ratios]
    figures["ratio_steps_per_repeat"] = [round(r, 3) for r in ratios_steps]
    figures["loadavg_after"] = os.getloadavg()

    threads = " (threads uncapped)" if args.uncapped and args.mode == "cli" else ""
    print(f"\n{args.mode} mode{threads}: {args.files} recordings ({one['audio_s']:.1f} s of audio), runs of "
          f"{args.batch_size}, {figures['cpus']} CPUs, analysis pool: {one['pool']}")
    print(f"{'workers':>7}{'runs':>6}{'wall s':>9}{'audio s/wall s':>16}"
          f"{'steps s':>9}{'audio s/steps s':>17}{'cores used':>12}   load avg before (1, 5, 15 min)")
    for mode in (one, many):
        print(f"{mode['workers']:>7}{mode['runs']:>6}{mode['wall_s']:>9.2f}"
              f"{mode['audio_s_per_wall_s']:>16.2f}{mode['steps_window_s']:>9.2f}"
              f"{mode['audio_s_per_step_window_s']:>17.2f}{mode['cores_used']:>12.2f}   "
              + ", ".join(f"{x:.2f}" for x in mode["loadavg_before"]))
    print(f"ratio {many['workers']} workers / 1 worker: {figures['ratio_wall']:.2f}x (wall), "
          f"{figures['ratio_steps']:.2f}x (steps window)"
          + (f"; median of {len(pairs)}, each: {figures['ratio_wall_per_repeat']}" if len(pairs) > 1 else ""))

    path = args.json or RESULTS / f"throughput-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2))
    print(f"figures written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
