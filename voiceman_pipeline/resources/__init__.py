"""Dagster resources: memory management, output writing, model engines."""

from __future__ import annotations

from typing import Any

from voiceman_pipeline.settings import Settings


def configured_resources(settings: Settings) -> dict[str, Any]:
    """The resources as the environment configures them (``VOICEMAN_*``)."""
    from voiceman_pipeline.resources.engines import AcousticAnalysis, EmotionModel, SpeechToText
    from voiceman_pipeline.resources.memory import MemoryManager
    from voiceman_pipeline.resources.outputs import RecordingStore

    return {
        "store": RecordingStore(
            data_dir=settings.data_dir,
            max_file_bytes=int(settings.max_file_mb * 2**20),
            output_mode=settings.output_mode,
        ),
        "stt": SpeechToText(
            engine=settings.stt_engine,
            model=settings.stt_model,
            device=settings.stt_device,
            language=settings.stt_language,
        ),
        "ser": EmotionModel(model=settings.ser_model, device=settings.ser_device),
        "acoustic": AcousticAnalysis(),
        "memory": MemoryManager(
            system_threshold_pct=settings.memory_threshold_pct,
            gpu_threshold_pct=settings.gpu_threshold_pct,
            critical_threshold_pct=settings.critical_threshold_pct,
            safety_margin=settings.safety_margin,
        ),
    }
