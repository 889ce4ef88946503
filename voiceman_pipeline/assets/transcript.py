"""``transcript``: speech to text through the configured ``Transcriber``."""

from __future__ import annotations

from dagster import MetadataValue

from voiceman_pipeline.recording_files import TRANSCRIPT_JSON, RecordingFiles
from voiceman_pipeline.engines.base import Transcriber

PREVIEW_CHARS = 300


def transcribe(files: RecordingFiles, transcriber: Transcriber, options: dict | None = None) -> dict:
    intake = files.intake()
    files.verify_custody()
    transcript = transcriber.transcribe(files.audio(), source_sha256=intake.sha256)
    transcript.inputs = dict(files.inputs)
    path = files.store.write_result(files.key, TRANSCRIPT_JSON, transcript)
    preview = transcript.text[:PREVIEW_CHARS] + ("…" if len(transcript.text) > PREVIEW_CHARS else "")
    return {
        "engine": transcript.engine.name,
        "model": transcript.engine.model,
        "device": transcript.engine.device,
        "language": transcript.language,
        "duration_s": transcript.duration_s,
        "word_count": transcript.word_count,
        "segment_count": len(transcript.segments),
        "confidence": (
            round(transcript.confidence, 3)
            if transcript.confidence is not None
            else MetadataValue.text("not reported by this engine")
        ),
        "real_time_factor": round(transcript.timings.real_time_factor, 4),
        "process_s": round(transcript.timings.process_s, 3),
        "text_preview": MetadataValue.text(preview),
        "output": MetadataValue.path(str(path)),
    }
