"""``emotion``: speech emotion recognition through the configured recognizer."""

from __future__ import annotations

from dagster import MetadataValue

from voiceman_pipeline.recording_files import EMOTION_JSON, RecordingFiles
from voiceman_pipeline.engines.base import EmotionRecognizer


def recognize(files: RecordingFiles, recognizer: EmotionRecognizer, options: dict | None = None) -> dict:
    intake = files.intake()
    transcript = files.transcript()
    files.verify_custody()
    result = recognizer.recognize(files.audio(), transcript, source_sha256=intake.sha256)
    result.inputs = dict(files.inputs)
    path = files.store.write_result(files.key, EMOTION_JSON, result)
    d = result.descriptors
    metadata = {
        "status": result.status,
        "engine": result.engine.name if result.engine else "none",
        "model": result.engine.model if result.engine else "none",
        "dominant_label": result.dominant_label or "n/a",
        "segments": len(result.segments),
        "pitch_mean_hz (descriptor)": _num(d.pitch_mean_hz),
        "pitch_std_hz (descriptor)": _num(d.pitch_std_hz),
        "loudness_mean_db (descriptor)": _num(d.loudness_mean_db),
        "speech_rate_wps (descriptor)": _num(d.speech_rate_wps),
        "process_s": round(result.timings.process_s, 3),
        "output": MetadataValue.path(str(path)),
    }
    if result.reason:
        metadata["reason"] = result.reason
    return metadata


def _num(value: float | None):
    """A descriptor rounded for reading, or why there is none (never a made-up number)."""
    return round(value, 3) if value is not None else MetadataValue.text("not measurable")
