"""``report``: one recording's joined results (JSON) and a timeline plot (PNG)."""

from __future__ import annotations

import base64
import time
from pathlib import Path

from dagster import MetadataValue

from voiceman_pipeline import results
from voiceman_pipeline.recording_files import REPORT_JSON, REPORT_PNG, RecordingFiles
from voiceman_pipeline.report_plot import plot_timeline


def build_report(files: RecordingFiles, engine: None = None, options: dict | None = None) -> dict:
    started = time.perf_counter()
    intake = files.intake()
    transcript, forensic, emotion = files.transcript(), files.forensic(), files.emotion()
    files.verify_custody()
    audio = files.audio()
    report = {
        "schema_version": results.SCHEMA_VERSION,
        "partition_key": files.key,
        "source_sha256": intake.sha256,
        "inputs": dict(files.inputs),
        "audio": results.to_dict(intake),
        "transcript": results.to_dict(transcript),
        "forensic": results.to_dict(forensic),
        "emotion": results.to_dict(emotion),
        "produced_by": files.produced_by,  # None where called outside the pipeline
    }
    png = plot_timeline(
        audio, transcript, forensic, title=files.key,
        cache_dir=Path(files.store.data_dir) / ".cache" / "matplotlib",
    )
    png_path = files.store.write_bytes(files.key, REPORT_PNG, png)
    report["plot"] = str(png_path)
    json_path = files.store.write_json(files.key, REPORT_JSON, report)
    return {
        # Absent where the transcript has no text (level "no words"): nothing was scored.
        **({"risk_score": round(forensic.risk_score, 2)} if forensic.risk_score is not None else {}),
        "risk_level": forensic.risk_level,
        "emotion_status": emotion.status,
        "word_count": transcript.word_count,
        "plot": MetadataValue.md(f"![timeline](data:image/png;base64,{base64.b64encode(png).decode()})"),
        "plot_path": MetadataValue.path(str(png_path)),
        "output": MetadataValue.path(str(json_path)),
        "process_s": round(time.perf_counter() - started, 3),
    }
