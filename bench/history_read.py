"""What reading the memory history costs once a stage has many materializations.

    python bench/history_read.py [--copies 500] [--repeats 3]

One recording (data/samples/cards_001.wav) goes through the real pipeline
in a temporary instance; each stage's materialization is then reported again
``--copies`` times with the same metadata (a runless materialization, so the
event log holds what a home that processed that many recordings holds per
stage). Then, per stage, best of ``--repeats``:

- paged: ``memory_history`` as the stages call it (a page of 50 at a time,
  at most the latest 500 materializations);
- all at once: the latest 500 read in one query and filtered, as it was done
  before.

Prints seconds per stage and per run (the five stages), and writes them to
bench/results/history-read-<UTC time>.json unless ``--json`` says where.
A benchmark: it asserts nothing.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from bench.common import write_figures  # noqa: E402

STAGES = ["audio", "transcript", "forensic", "emotion", "report"]


def all_at_once(instance, stage: str, engine: str | None, limit: int = 50) -> list:
    """The earlier read: the latest 10 x limit in one query, then filtered."""
    import dagster as dg

    from voiceman_pipeline.resources.memory import ENGINE_KEY, HOST_KEY, PEAK_KEY

    host, out = socket.gethostname(), []
    for record in instance.fetch_materializations(dg.AssetKey(stage), limit=10 * limit).records:
        md = {k: getattr(v, "value", v) for k, v in record.asset_materialization.metadata.items()}
        if PEAK_KEY in md and md.get(ENGINE_KEY) == engine and md.get(HOST_KEY) == host:
            out.append(md[PEAK_KEY])
    return out[:limit]


def best(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import dagster as dg

    from voiceman_pipeline.assets.pipeline import build_recording_analysis
    from voiceman_pipeline.definitions import defs
    from voiceman_pipeline.partitions import range_tags
    from voiceman_pipeline.resources.memory import ENGINE_KEY, memory_history
    from voiceman_pipeline.resources.outputs import RecordingStore

    figures = {"bench": "history_read", "copies": args.copies, "repeats": args.repeats, "stages": {}}
    with tempfile.TemporaryDirectory(prefix="voiceman-history-") as tmp, \
            dg.instance_for_test(temp_dir=tmp) as instance:
        data = Path(tmp) / "data"
        (data / "inbox").mkdir(parents=True)
        (data / "outputs").mkdir()
        key = "cards_001.wav"
        shutil.copyfile(REPO / "data" / "samples" / key, data / "inbox" / key)
        instance.add_dynamic_partitions("audio_files", [key])
        result = dg.materialize([build_recording_analysis(1)], instance=instance,
                                resources={**defs.resources, "store": RecordingStore(data_dir=str(data))},
                                tags=range_tags([key]),
                                run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}})
        assert result.success, "the pipeline failed on the sample"
        engines = {}
        for stage in STAGES:
            mat = instance.fetch_materializations(dg.AssetKey(stage), limit=1).records[0].asset_materialization
            engine = mat.metadata.get(ENGINE_KEY)
            engines[stage] = getattr(engine, "value", engine)
            for _ in range(args.copies):
                instance.report_runless_asset_event(
                    dg.AssetMaterialization(stage, partition=key, metadata=dict(mat.metadata)))
        for stage in STAGES:
            engine = engines[stage]
            figures["stages"][stage] = {
                "paged_s": round(best(lambda: memory_history(instance, stage, engine), args.repeats), 4),
                "all_at_once_s": round(best(lambda: all_at_once(instance, stage, engine), args.repeats), 4),
            }
    for way in ("paged_s", "all_at_once_s"):
        figures[f"run_{way}"] = round(sum(s[way] for s in figures["stages"].values()), 3)
    print(f"{'stage':<12}{'paged s':>10}{'all at once s':>15}")
    for stage, s in figures["stages"].items():
        print(f"{stage:<12}{s['paged_s']:>10.3f}{s['all_at_once_s']:>15.3f}")
    print(f"{'per run':<12}{figures['run_paged_s']:>10.3f}{figures['run_all_at_once_s']:>15.3f}")
    print(f"wrote {write_figures(figures, 'history-read', args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
