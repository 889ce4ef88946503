"""Small interfaces every model backend implements.

Engines are plain Python (no Dagster): they load lazily, never at import,
and can be unloaded by the MemoryManager between batches. Dagster resources in
``voiceman_pipeline/resources/engines.py`` choose and configure them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

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

    def expected_load_mb(self) -> tuple[float, float]:
        """(host MB, GPU MB) the model is expected to hold once loaded; MB = MiB.

        An estimate for the MemoryManager's pre-load check, made WITHOUT
        loading anything: from the sizes of the model files on disk (found the
        way ``load()`` finds them, but never downloading and never touching
        the network) and the device and number format the model would run in.
        It covers the model itself, not per-file working memory (activations,
        audio buffers), not library or CUDA-context overhead, and not the
        transient host copy some libraries read before moving weights to a GPU.
        (0.0, 0.0) when there is nothing to load, or when the model cannot be
        found without loading (``load()`` then raises its own clear error).
        Already loaded or not, the answer is the same. Default: (0.0, 0.0).
        """
        return 0.0, 0.0

    def grown_for_s(self) -> float | None:
        """Seconds of signal the loaded model has grown its working buffers for
        (the longest stretch it processed since it loaded; 0.0 when not loaded),
        where that shapes its next peak: a recording grows them again only past it.
        The memory prediction uses it (``memory.within``). Default None: not said."""
        return None


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


@dataclass
class AcousticMeasurement:
    """Features plus the per-file settings that produced them (for the audit trail)."""

    features: AcousticFeatures
    # JSON-serialisable; recorded as engine.options["acoustic"]["this_file"].
    details: dict[str, Any] = field(default_factory=dict)


class AcousticAnalyzer(Engine):
    @abstractmethod
    def analyze(self, audio: DecodedAudio, transcript: Transcript) -> AcousticFeatures:
        """Voice measures (pitch, jitter, shimmer, HNR, formants, pauses)."""

    def measure(self, audio: DecodedAudio, transcript: Transcript) -> AcousticMeasurement:
        """``analyze`` plus per-file details: settings decided for this file
        (e.g. an adapted pitch range), frame counts, why a measure was skipped.

        The forensic stage calls this, so every analyzer works there; override
        it when the analyzer decides anything per file. Default: ``analyze``
        with no details.
        """
        return AcousticMeasurement(features=self.analyze(audio, transcript))
