"""What building the summary table costs once many recordings are done.

    python bench/summary_scale.py [--copies 10000] [--repeats 3]

The bundled samples go through the real pipeline (`voiceman run`) in a
temporary home and data dir. Their output folders are then copied,
round-robin, to ``--copies`` recording keys, each copy consistent in itself
(its report's inputs and source hash are its own folder's). Then, best of
``--repeats``:

- rows: ``summary_rows`` over the copies, every one "done" (each report read,
  checked against its intake record and re-hashed inputs, flattened);
- files: writing that table as summary.csv and summary.parquet.

The copies were just written, so they are read from the page cache, not the
disk. Not included: reading the partitions' statuses from Dagster's storage (see
"Scale" in the README for `voiceman status` over 10,000 partitions).

Prints the figures and writes them to bench/results/summary-scale-<UTC time>.json
unless ``--json`` says where. A benchmark: it asserts nothing.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, fresh_home, write_figures  # noqa: E402


def processed_samples(root: Path) -> Path:
    """The outputs folder of a real `voiceman run` over data/samples/."""
    home, data = fresh_home(root / "home"), root / "data"
    shutil.copytree(REPO / "data" / "samples", data / "inbox", ignore=shutil.ignore_patterns("*.txt", "*.md"))
    env = {**os.environ, "DAGSTER_HOME": str(home), "VOICEMAN_DATA_DIR": str(data),
           "MPLCONFIGDIR": str(data / ".cache" / "matplotlib")}
    subprocess.run([str(Path(sys.executable).with_name("voiceman")), "run", "--settle", "0"],
                   cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return data / "outputs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from voiceman_pipeline.assets.summary import summary_rows
    from voiceman_pipeline.resources.outputs import RecordingStore

    with tempfile.TemporaryDirectory(prefix="voiceman-bench-summary-") as tmp:
        outputs = processed_samples(Path(tmp) / "source")
        done = sorted(p for p in outputs.iterdir() if (p / "report.json").is_file())
        data = Path(tmp) / "many"
        (data / "inbox").mkdir(parents=True)
        for n in range(args.copies):
            shutil.copytree(done[n % len(done)], data / "outputs" / f"r{n:05d}.wav")
        store = RecordingStore(data_dir=str(data))
        statuses = {f"r{n:05d}.wav": "done" for n in range(args.copies)}
        rows_s, files_s, table = [], [], None
        for _ in range(args.repeats):
            started = time.perf_counter()
            table = summary_rows(store, statuses)
            rows_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            table.to_csv(io.StringIO(), index=False)
            table.to_parquet(io.BytesIO(), index=False)
            files_s.append(time.perf_counter() - started)
        with_results = int(table["risk_score"].notna().sum())
    figures = {
        "copies": args.copies, "source_recordings": [p.name for p in done],
        "rows_with_results": with_results,
        "rows_s": rows_s, "files_s": files_s,
        "best_rows_s": min(rows_s), "best_files_s": min(files_s),
        "rows_ms_per_recording": 1000 * min(rows_s) / args.copies,
    }
    print(f"{args.copies} done recordings ({with_results} with results): rows {min(rows_s):.2f} s "
          f"({figures['rows_ms_per_recording']:.2f} ms each), CSV + Parquet {min(files_s):.2f} s "
          f"(best of {args.repeats})")
    print(f"written: {write_figures(figures, 'summary-scale', args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
