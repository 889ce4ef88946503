"""Small interfaces every model backend implements.

Engines are plain Python (no Dagster): they load lazily, never at import,
and can be unloaded by the MemoryManager between batches. Dagster resources in
``voiceman_pipeline/resources/engines.py`` choose and configure them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from voiceman_pipeline.results import (
    AcousticFeatures,
    DecodedAudio,
    EmotionResult,
    EngineInfo,
    Transcript,
)


class Engine(ABC):
    """A backend holding a model that can be loaded and freed."""

    @property
    @abstractmethod
    def info(self) -> EngineInfo:
        """Engine, model and options, recorded in every result."""

    @property
    def loaded(self) -> bool:
        return False

    def load(self) -> None:
        """Load the model (idempotent). Raises ModelUnavailableError with a fix."""

    def unload(self) -> None:
        """Drop the model so its memory can be reclaimed (idempotent)."""


class Transcriber(Engine):
    @abstractmethod
    def transcribe(self, audio: DecodedAudio, source_sha256: str) -> Transcript:
        """Speech to text with word timestamps (loads the model if needed)."""


class EmotionRecognizer(Engine):
    @abstractmethod
    def recognize(
        self, audio: DecodedAudio, transcript: Transcript, source_sha256: str
    ) -> EmotionResult:
        """Emotion per speech segment, or status 'unavailable' with descriptors."""


class AcousticAnalyzer(Engine):
    @abstractmethod
    def analyze(self, audio: DecodedAudio, transcript: Transcript) -> AcousticFeatures:
        """Voice measures (pitch, jitter, shimmer, HNR, formants, pauses)."""
