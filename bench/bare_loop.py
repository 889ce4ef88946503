"""A hand-written loop over the default pipeline's engines: the baseline of
``bench/overhead.py --whole-process``.

    python bench/bare_loop.py INBOX OUTPUTS

One plain Python process, no Dagster: imports the libraries the default
pipeline uses (PyAV decode, pocketsphinx, Praat through parselmouth, the
descriptors-only emotion recognizer, the matplotlib report plot), loads each
engine once, then for every file in INBOX (sorted by name): hashes it once,
decodes it to 16 kHz mono in memory, transcribes it, runs the forensic
analysis and the emotion descriptors, and writes OUTPUTS/<name>/report.json
(every result joined, as the pipeline's report.json holds them) and
OUTPUTS/<name>/report.png (the same plot); at the end the summary table the
pipeline's ``summary`` asset writes, OUTPUTS/summary.csv and summary.parquet
(one row per file, the same columns, through pandas). What it leaves out on purpose is
what the pipeline adds: the per-stage result files and decoded-signal cache,
atomic writes, re-hashing for the chain of custody, memory checks and
cleanups, Dagster's runs, steps and event log. Exits non-zero if any file
fails.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing


def load_engines() -> tuple:
    """(transcriber, acoustic analyzer, emotion recognizer), each loaded once.
    Their defaults are the pipeline's (its resources take them from there)."""
    # Engines, plot and summary table only: these modules import no Dagster
    # (voiceman_pipeline_tests/test_layering.py checks it), as a loop written
    # by hand over the same libraries would not.
    from voiceman_pipeline.engines.forensic.acoustic import ParselmouthAnalyzer
    from voiceman_pipeline.engines.ser import build_emotion_recognizer
    from voiceman_pipeline.engines.stt.pocketsphinx_engine import PocketsphinxTranscriber

    engines = (PocketsphinxTranscriber(), ParselmouthAnalyzer(), build_emotion_recognizer(None))
    for engine in engines:
        engine.load()
    return engines


def analyse(path: Path, engines: tuple, lap=lambda stage: None) -> dict:
    """One file through every engine, in memory: its hash, decoded signal and
    container info, each stage's result, and the report plot (PNG bytes).
    ``lap(stage)`` is called as each stage ends (bench/overhead.py times them)."""
    from voiceman_pipeline.audio_io import DEFAULT_MAX_AUDIO_SECONDS, decode_audio, sha256_file
    from voiceman_pipeline.engines.forensic import analyze_forensic
    from voiceman_pipeline.report_plot import plot_timeline

    stt, analyzer, ser = engines
    sha = sha256_file(path)  # once: the engines take the recording's identity as an argument
    audio, info = decode_audio(path, max_seconds=DEFAULT_MAX_AUDIO_SECONDS)
    lap("audio")
    transcript = stt.transcribe(audio, source_sha256=sha)
    lap("transcript")
    forensic = analyze_forensic(audio, transcript, analyzer, source_sha256=sha)
    lap("forensic")
    emotion = ser.recognize(audio, transcript, source_sha256=sha)
    lap("emotion")
    png = plot_timeline(audio, transcript, forensic, title=path.name)
    lap("report")
    return {"sha": sha, "audio": audio, "info": info, "transcript": transcript,
            "forensic": forensic, "emotion": emotion, "png": png}


def main(argv: list[str]) -> int:
    inbox, outputs = Path(argv[0]), Path(argv[1])
    from voiceman_pipeline import results
    from voiceman_pipeline.summary_table import COLUMNS, report_columns, typed

    engines = load_engines()
    rows = []
    for path in sorted(p for p in inbox.iterdir() if p.is_file()):
        done = analyse(path, engines)
        sha, audio, info = done["sha"], done["audio"], done["info"]
        folder = outputs / path.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.png").write_bytes(done["png"])
        report = {
            "schema_version": results.SCHEMA_VERSION,
            "partition_key": path.name,
            "source_sha256": sha,
            "audio": {"source_path": str(path), "sha256": sha, "codec": info.codec,
                      "container": info.container, "sample_rate": info.sample_rate,
                      "channels": info.channels, "duration_s": audio.duration_s},
            **{stage: results.to_dict(done[stage]) for stage in ("transcript", "forensic", "emotion")},
            "plot": str(folder / "report.png"),
        }
        text = json.dumps(report, indent=2, default=str)
        (folder / "report.json").write_text(text)
        # The summary's columns from the report as written, as the pipeline reads them.
        rows.append({"partition_key": path.name, "status": "done", **report_columns(json.loads(text))})
    import pandas as pd

    table = typed(pd.DataFrame(rows, columns=COLUMNS))
    table.to_csv(outputs / "summary.csv", index=False)
    table.to_parquet(outputs / "summary.parquet", index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
