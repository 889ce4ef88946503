"""The embedded SER default: no emotion model, only acoustic descriptors.

Without a trained speech-emotion model there is no honest way to name an
emotion, so this engine reports emotion as unavailable (with the fix) and
gives the measurable arousal descriptors instead. It never produces labels.
"""

from __future__ import annotations

import time

from voiceman_pipeline.engines.base import EmotionRecognizer
from voiceman_pipeline.engines.ser.descriptors import arousal_descriptors
from voiceman_pipeline.results import (
    DecodedAudio,
    EmotionResult,
    EngineInfo,
    Timings,
    Transcript,
)

NO_MODEL_REASON = (
    "no speech-emotion model configured: set VOICEMAN_SER_MODEL to a model "
    "directory or hub name"
)


class DescriptorsOnlyRecognizer(EmotionRecognizer):
    """Emotion 'unavailable' plus acoustic arousal descriptors; nothing to load."""

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(name="descriptors-only", model="none")

    def recognize(
        self, audio: DecodedAudio, transcript: Transcript, source_sha256: str
    ) -> EmotionResult:
        started = time.perf_counter()
        descriptors = arousal_descriptors(audio, transcript)
        return EmotionResult(
            source_sha256=source_sha256,
            status="unavailable",
            reason=NO_MODEL_REASON,
            engine=self.info,
            segments=[],
            dominant_label=None,
            descriptors=descriptors,
            timings=Timings(
                process_s=time.perf_counter() - started, audio_s=audio.duration_s
            ),
        )
