"""Predicted against measured peak memory, per stage, over a mixed set of calls.

    python bench/memory_prediction.py [--learn 2,4,7,12,20,35,60] [--eval 3,5,9,15,25,45,90]
                                      [--eval-in-new-process] [--json PATH]

Calls of the given lengths (seconds) are made of the real samples in
data/samples concatenated round-robin, each call starting at another sample.
In one process, on a fresh instance and data dir, the whole chain
(``recording_analysis``, the configured engines) runs over the ``--learn``
calls (one run), then over the ``--eval`` calls (a second run, other lengths).
``--eval-in-new-process`` runs the second run in a child process instead, as
the daemon runs each run: there the first recording of each stage is its
process's first (``memory_first_in_process``), and the figures for those five
are also given apart (``eval_firsts``).
Every computed result records the per-recording prediction made before it
ran (``memory_predicted_mb``: from its duration and the history of that
stage, engine and machine) beside the measured peak above its pre-file
baseline (``memory_peak_delta_mb``, the kernel's peak counter). For the eval
run, per stage and over all: the median absolute error |predicted - measured|
/ measured (goal: under 20%), and the median absolute error in MB (relative
errors of stages whose peak is a few MB are large in % and small in bytes).

A benchmark, not a test: it asserts nothing. Figures go to
bench/results/memory_prediction-<time>.json unless ``--json`` says where.

    python bench/memory_prediction.py --replay FILE [FILE ...]

runs nothing: it predicts each eval row of earlier result files again with
this checkout's ``memory.predict``, from the same measured peaks the
run had before that row (its learn rows and the earlier eval rows of the
stage, newest first, with their first-in-process flags; none in files
older than that flag). A prediction changes nothing in what a run measures,
so this compares two ways of predicting on the very same measurements,
without the run-to-run noise. Figures go to
bench/results/memory_prediction-replay-<time>.json.

    python bench/memory_prediction.py --from-home DIR

runs nothing either: the same figures over every computed result already in
the Dagster home DIR (its dagster.yaml's storage), oldest first, as the user's
own runs predicted and measured them (a stage's first results there were
predicted from its defaults, without history). Figures go to
bench/results/memory_prediction-home-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_figures  # bench/common.py

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SAMPLES = sorted((REPO / "data" / "samples").glob("*.wav"))
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def write_call(target: Path, first: int, seconds: float) -> float:
    """Real speech of at least ``seconds``: samples concatenated from sample ``first``."""
    import numpy as np
    import soundfile

    parts, total, i = [], 0.0, first
    while total < seconds:
        audio, rate = soundfile.read(str(SAMPLES[i % len(SAMPLES)]), dtype="int16")
        parts.append(audio)
        total += len(audio) / rate
        i += 1
    soundfile.write(str(target), np.concatenate(parts), rate, subtype="PCM_16")
    return total


def run(instance, store, keys: list[str]) -> str:
    from dagster import materialize
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    from voiceman_pipeline.assets.pipeline import build_recording_analysis
    from voiceman_pipeline.assets.stages import STAGE_KEYS
    from voiceman_pipeline.definitions import defs

    result = materialize(
        [build_recording_analysis(batch_size=len(keys))],
        selection=STAGE_KEYS,
        instance=instance,
        resources={**defs.resources, "store": store},
        tags={ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]},
        run_config=QUIET,
        raise_on_error=False,
    )
    if not result.success:
        raise SystemExit(f"run {result.run_id} failed")
    return result.run_id


def run_in_child(home: Path, data: Path, keys: list[str]) -> None:
    """``run`` in a fresh Python process on the same instance and data dir."""
    child = subprocess.run([sys.executable, __file__, "--child", str(home), str(data), *keys])
    if child.returncode != 0:
        raise SystemExit(f"the child run exited {child.returncode}")


def child_main(home: str, data: str, keys: list[str]) -> None:
    from dagster import DagsterInstance

    from voiceman_pipeline.resources.outputs import RecordingStore

    with DagsterInstance.local_temp(home) as instance:
        run(instance, RecordingStore(data_dir=data), keys)


def summary(selected: list[dict]) -> dict:
    """Median absolute error (% of the measured peak, and MB) and median peak of ``selected`` rows."""
    rel = [abs(r["predicted_mb"] - r["measured_mb"]) / r["measured_mb"]
           for r in selected if r["measured_mb"] > 0]
    return {
        "n": len(selected),
        "median_abs_error_pct": round(100 * statistics.median(rel), 1) if rel else None,
        "median_abs_error_mb": round(statistics.median(
            abs(r["predicted_mb"] - r["measured_mb"]) for r in selected), 1) if selected else None,
        "median_measured_mb": round(statistics.median(r["measured_mb"] for r in selected), 1)
        if selected else None,
    }


def by_stage(rows: list[dict]) -> dict:
    """``summary`` of each stage's rows, in chain order."""
    from voiceman_pipeline.assets.stages import STAGES

    return {stage.name: summary([r for r in rows if r["stage"] == stage.name]) for stage in STAGES}


def computed_results(instance, stage: str):
    """(partition key, metadata values) of each computed result of ``stage``
    (one with a measured peak), oldest first, a page at a time."""
    from dagster import AssetKey

    from voiceman_pipeline.resources.memory import PEAK_KEY

    cursor = None
    while True:
        page = instance.fetch_materializations(AssetKey(stage), limit=500, cursor=cursor, ascending=True)
        for record in page.records:
            md = {k: v.value for k, v in record.asset_materialization.metadata.items()}
            if PEAK_KEY in md:
                yield record.partition_key, md
        if not page.has_more:
            return
        cursor = page.cursor


def replay(paths: list[Path]) -> None:
    """Each file's eval rows predicted again by this checkout (see the module's docstring)."""
    from voiceman_pipeline.assets.stages import STAGES
    from voiceman_pipeline.resources.memory import HistoryRow, predict

    files = []
    for path in paths:
        figures = json.loads(path.read_text())
        replayed = []
        for stage in STAGES:
            history: list = []  # newest first, as memory_history reads the event log
            for r in [r for r in [*figures["learn_rows"], *figures["rows"]] if r["stage"] == stage.name]:
                first, grown = bool(r.get("first_in_process")), r.get("grown_s")  # None in older files
                if r["set"] == "eval":
                    need = predict(r["audio_s"], history[:50], stage.memory_default, first, grown)
                    replayed.append({**r, "recorded_prediction_mb": r["predicted_mb"],
                                     "predicted_mb": round(need.host_mb, 1)})
                history.insert(0, HistoryRow(r["audio_s"], r["measured_mb"], None, first, grown))
        files.append({"file": path.name, "eval_in_new_process": figures.get("eval_in_new_process"),
                      "recorded": figures["overall"], "replayed": summary(replayed),
                      "replayed_per_stage": by_stage(replayed),
                      "rows": replayed})
        print(f"{path.name}: recorded {figures['overall']['median_abs_error_pct']}%, "
              f"replayed {files[-1]['replayed']['median_abs_error_pct']}%")
    out = write_figures({"bench": "memory_prediction --replay", "files": files}, "memory_prediction-replay")
    print(f"wrote {out}")


def from_home(home: Path) -> None:
    """Predicted against measured peak of every computed result in the Dagster home ``home``."""
    import os

    os.environ["DAGSTER_HOME"] = str(home.resolve())
    os.chdir(home)  # the shipped dagster.yaml's storage paths are relative to its folder
    from dagster import DagsterInstance

    from voiceman_pipeline.assets.stages import STAGES
    from voiceman_pipeline.resources.memory import FIRST_KEY, PEAK_KEY, PREDICTED_MB_KEY, SECONDS_KEY

    with DagsterInstance.get() as instance:
        rows = [{"stage": stage.name, "recording": key, "audio_s": md[SECONDS_KEY],
                 "predicted_mb": md[PREDICTED_MB_KEY], "measured_mb": md[PEAK_KEY],
                 "first_in_process": md.get(FIRST_KEY)}
                for stage in STAGES for key, md in computed_results(instance, stage.name)
                if PREDICTED_MB_KEY in md]  # none in results of versions before the prediction
    figures = {"home": str(home), "overall": summary(rows), "per_stage": by_stage(rows), "rows": rows}
    for name, s in [*figures["per_stage"].items(), ("ALL", figures["overall"])]:
        print(f"{name:<11} {s['n']:>4} results, median |err| {s['median_abs_error_pct']}%"
              f" ({s['median_abs_error_mb']} MB), median peak {s['median_measured_mb']} MB")
    out = write_figures({"bench": "memory_prediction --from-home", **figures}, "memory_prediction-home")
    print(f"wrote {out}")


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child_main(sys.argv[2], sys.argv[3], sys.argv[4:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--learn", default="2,4,7,12,20,35,60")
    parser.add_argument("--eval", default="3,5,9,15,25,45,90")
    parser.add_argument("--eval-in-new-process", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--replay", type=Path, nargs="+", metavar="FILE")
    parser.add_argument("--from-home", type=Path, metavar="DIR")
    args = parser.parse_args()
    if args.replay:
        replay(args.replay)
        return
    if args.from_home:
        from_home(args.from_home)
        return

    from dagster import DagsterInstance

    from voiceman_pipeline.assets.stages import STAGES
    from voiceman_pipeline.resources.memory import FIRST_KEY, GROWN_KEY, PEAK_KEY, PREDICTED_MB_KEY
    from voiceman_pipeline.resources.outputs import RecordingStore

    with tempfile.TemporaryDirectory(prefix="vm-memory-bench-") as tmp:
        root = Path(tmp)
        (root / "data" / "inbox").mkdir(parents=True)
        (root / "data" / "outputs").mkdir()
        store = RecordingStore(data_dir=str(root / "data"))
        sets: dict[str, dict[str, float]] = {"learn": {}, "eval": {}}
        for name, spec in (("learn", args.learn), ("eval", args.eval)):
            for i, seconds in enumerate(float(s) for s in spec.split(",")):
                key = f"{name}_{i:02d}_{seconds:g}s.wav"
                sets[name][key] = write_call(store.inbox_dir / key, i, seconds)
        (root / "home").mkdir()
        with DagsterInstance.local_temp(str(root / "home")) as instance:
            instance.add_dynamic_partitions("audio_files", [*sets["learn"], *sets["eval"]])
            began = time.perf_counter()
            run(instance, store, list(sets["learn"]))
            if args.eval_in_new_process:
                run_in_child(root / "home", root / "data", list(sets["eval"]))
            else:
                run(instance, store, list(sets["eval"]))
            wall = time.perf_counter() - began
            rows, started = [], set()  # (stage, set) whose run's first recording is in rows
            seconds_of = {**sets["learn"], **sets["eval"]}
            for stage in STAGES:
                # Oldest first: the first of each run is its stage's first in the run.
                for key, md in computed_results(instance, stage.name):
                    seconds = seconds_of[key]
                    which = "eval" if key in sets["eval"] else "learn"
                    rows.append({
                        "set": which, "stage": stage.name, "recording": key, "audio_s": round(seconds, 2),
                        "predicted_mb": md[PREDICTED_MB_KEY], "measured_mb": md[PEAK_KEY],
                        "peak_source": md.get("memory_peak_source"),
                        "first_of_run": (stage.name, which) not in started,
                        "first_in_process": md.get(FIRST_KEY),  # None before it was recorded
                        "grown_s": md.get(GROWN_KEY),  # None where the engine does not say
                    })
                    started.add((stage.name, which))

    learn = [r for r in rows if r["set"] == "learn"]
    rows = [r for r in rows if r["set"] == "eval"]
    per_stage = by_stage(rows)
    figures = {
        "learn_seconds": sorted(round(s, 2) for s in sets["learn"].values()),
        "eval_seconds": sorted(round(s, 2) for s in sets["eval"].values()),
        "overall": summary(rows),
        "per_stage": per_stage,
        "rows": rows,
        "learn_rows": learn,  # what the history was learnt from (their predictions had less of it)
        "eval_in_new_process": args.eval_in_new_process,
        # Each stage's first recording of the eval run: its process's first
        # where the eval ran in a new process.
        "eval_firsts": summary([r for r in rows if r["first_of_run"]]),
        "eval_others": summary([r for r in rows if not r["first_of_run"]]),
        "wall_s": round(wall, 1),
    }
    print(f"{'stage':<11} {'n':>3} {'median |err| %':>15} {'median |err| MB':>16} {'median peak MB':>15}")
    for name, s in [*per_stage.items(), ("ALL", figures["overall"]), ("firsts", figures["eval_firsts"]),
                    ("others", figures["eval_others"])]:
        print(f"{name:<11} {s['n']:>3} {s['median_abs_error_pct']!s:>15} "
              f"{s['median_abs_error_mb']!s:>16} {s['median_measured_mb']!s:>15}")
    for r in [*learn, *rows]:
        print(f"  {r['set']:<5}", end="")
        print(f"  {r['stage']:<10} {r['audio_s']:>7.1f} s  predicted {r['predicted_mb']:>8.1f} MB"
              f"  measured {r['measured_mb']:>8.1f} MB")
    print(f"wrote {write_figures(figures, 'memory_prediction', args.json)}")


if __name__ == "__main__":
    main()
