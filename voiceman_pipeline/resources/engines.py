"""Engines as Dagster resources: configuration in, a lazily built engine out.

Building an engine object loads nothing; the model loads on first use, inside
a run, never at import or code-location load. The MemoryManager unloads it
between stages and in teardown.
"""

from __future__ import annotations

from typing import Any

from dagster import ConfigurableResource, InitResourceContext
from pydantic import Field, PrivateAttr

from voiceman_pipeline.engines.base import AcousticAnalyzer, EmotionRecognizer, Transcriber
from voiceman_pipeline.engines.forensic.acoustic import ParselmouthAnalyzer
from voiceman_pipeline.engines.forensic.text_risk import DEFAULT_LOW_CONFIDENCE_THRESHOLD
from voiceman_pipeline.errors import ModelUnavailableError
from voiceman_pipeline.settings import check_device


class SpeechToText(ConfigurableResource):
    """Speech-to-text engine choice and options."""

    engine: str = Field(
        default="pocketsphinx",
        description="'pocketsphinx' (embedded, offline, English) or 'faster-whisper'.",
    )
    model: str = Field(
        default="",
        description="faster-whisper model: size name ('small'), hub id, or local "
        "directory (env VOICEMAN_STT_MODEL). Unused by pocketsphinx.",
    )
    device: str = Field(default="auto", description="'auto', 'cpu' or 'cuda'.")
    compute_type: str = Field(default="auto", description="CTranslate2 compute type.")
    language: str = Field(default="", description="'en', 'ko', ...; empty = detect/default.")
    vad_filter: bool = Field(default=True, description="Skip non-speech (faster-whisper).")

    _engine: Transcriber | None = PrivateAttr(default=None)

    def transcriber(self) -> Transcriber:
        if self._engine is None:
            from voiceman_pipeline.engines.stt import build_transcriber

            check_device(self.device, "VOICEMAN_STT_DEVICE (stt.device)")
            self._engine = build_transcriber(self.engine, **self._options(self.device))
        return self._engine

    def output_options(self) -> dict[str, Any]:
        """What shapes a transcript (the device does not): part of its data version."""
        if self.engine == "pocketsphinx":
            return {"engine": self.engine, "language": self.language or "en"}
        return {
            "engine": self.engine,
            # Revision of this engine's output, beside the stage's code version:
            # 2, each word's times clipped to its segment's. Changing it marks
            # this engine's transcripts out of date, and PocketSphinx's not.
            "output_revision": 2,
            "model": self.model or "small",
            "compute_type": self.compute_type,
            "language": self.language or None,
            "vad_filter": self.vad_filter,
        }

    def fall_back_to_cpu(self) -> Transcriber:
        """Replace a GPU engine that failed with the same engine on the CPU."""
        from voiceman_pipeline.engines.stt import build_transcriber

        if self._engine is not None:
            self._engine.unload()
        self._engine = build_transcriber(self.engine, **self._options("cpu"))
        return self._engine

    def _options(self, device: str) -> dict[str, Any]:
        if self.engine == "pocketsphinx":
            if self.language not in ("", "en"):
                raise ModelUnavailableError(
                    f"The embedded pocketsphinx engine has only an English model, not "
                    f"{self.language!r}: set VOICEMAN_STT_ENGINE=faster-whisper (with "
                    f"VOICEMAN_STT_MODEL) for other languages."
                )
            return {}
        return {
            "model": self.model or "small",
            "device": device,
            "compute_type": self.compute_type,
            "language": self.language or None,
            "vad_filter": self.vad_filter,
        }

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        if self._engine is not None:
            self._engine.unload()


class EmotionModel(ConfigurableResource):
    """Speech emotion recognition model (none configured = 'unavailable')."""

    model: str = Field(
        default="",
        description="Audio-classification model: hub id or local directory "
        "(env VOICEMAN_SER_MODEL). Empty: emotion 'unavailable' + acoustic descriptors.",
    )
    device: str = Field(default="auto", description="'auto', 'cpu' or 'cuda'.")

    _engine: EmotionRecognizer | None = PrivateAttr(default=None)

    def recognizer(self) -> EmotionRecognizer:
        if self._engine is None:
            from voiceman_pipeline.engines.ser import build_emotion_recognizer

            check_device(self.device, "VOICEMAN_SER_DEVICE (ser.device)")
            self._engine = build_emotion_recognizer(self.model or None, device=self.device)
        return self._engine

    def output_options(self) -> dict[str, Any]:
        """What shapes the emotion result: the model (none = descriptors only)."""
        return {"model": self.model or None}

    def fall_back_to_cpu(self) -> EmotionRecognizer:
        from voiceman_pipeline.engines.ser import build_emotion_recognizer

        if self._engine is not None:
            self._engine.unload()
        self._engine = build_emotion_recognizer(self.model or None, device="cpu")
        return self._engine

    def teardown_after_execution(self, context: InitResourceContext) -> None:
        if self._engine is not None:
            self._engine.unload()


class AcousticAnalysis(ConfigurableResource):
    """Praat (parselmouth) voice measures and text-risk options."""

    pitch_floor_hz: float = Field(
        default=ParselmouthAnalyzer.pitch_floor_hz, description="Lowest F0 searched."
    )
    pitch_ceiling_hz: float = Field(
        default=ParselmouthAnalyzer.pitch_ceiling_hz, description="Highest F0 searched."
    )
    low_confidence_threshold: float = Field(
        default=DEFAULT_LOW_CONFIDENCE_THRESHOLD,
        description="Transcripts with mean word confidence below this are flagged, "
        "and their text evidence is marked low-confidence.",
    )

    _engine: AcousticAnalyzer | None = PrivateAttr(default=None)

    def output_options(self) -> dict[str, Any]:
        """What shapes the forensic result: pitch range, the low-confidence cut and
        the text-risk pattern sets (their content, so an edited pattern counts)."""
        from voiceman_pipeline.engines.forensic.text_risk import pattern_sets_digest

        return {
            "pitch_floor_hz": self.pitch_floor_hz,
            "pitch_ceiling_hz": self.pitch_ceiling_hz,
            "low_confidence_threshold": self.low_confidence_threshold,
            "patterns_sha256": pattern_sets_digest(),
        }

    def analyzer(self) -> AcousticAnalyzer:
        if self._engine is None:
            self._engine = ParselmouthAnalyzer(
                pitch_floor_hz=self.pitch_floor_hz, pitch_ceiling_hz=self.pitch_ceiling_hz
            )
        return self._engine
