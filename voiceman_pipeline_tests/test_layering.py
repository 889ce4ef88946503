"""The engines, the report plot and the summary table work without Dagster.

``bench/bare_loop.py`` is the baseline the pipeline's overhead is measured
against: a loop written by hand over the same libraries. It must not pay for
importing Dagster (about 0.8 s of import and interpreter exit on this project's
machine), or the overhead would read lower than it is.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "samples" / "cards_001.wav"

# Runs the bare loop as its own script would, then says which packages it imported.
RUN_BARE_LOOP = """
import json, runpy, sys
sys.argv = [{script!r}, sys.argv[1], sys.argv[2]]
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as done:
    code = done.code
print(json.dumps({{"code": code, "dagster": "dagster" in sys.modules,
                  "pocketsphinx": "pocketsphinx" in sys.modules}}))
"""


def test_bare_loop_runs_the_engines_without_importing_dagster(tmp_path):
    inbox, outputs = tmp_path / "inbox", tmp_path / "outputs"
    inbox.mkdir()
    outputs.mkdir()
    shutil.copy(SAMPLE, inbox / SAMPLE.name)
    code = RUN_BARE_LOOP.format(script=str(REPO / "bench" / "bare_loop.py"))
    done = subprocess.run(
        [sys.executable, "-c", code, str(inbox), str(outputs)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"code": 0, "dagster": False, "pocketsphinx": True}

    # It did the work: the report of the recording, and the summary table with its row.
    report = json.loads((outputs / SAMPLE.name / "report.json").read_text())
    assert report["transcript"]["words"], "the sample has speech: some words are recognized"
    assert (outputs / SAMPLE.name / "report.png").read_bytes()[:4] == b"\x89PNG"
    table = pd.read_csv(outputs / "summary.csv")
    assert table["partition_key"].tolist() == [SAMPLE.name]
    assert table["word_count"].tolist() == [len(report["transcript"]["words"])]
