"""Speech-to-text engines and the factory that picks one by name.

Importing this package imports no speech library: pocketsphinx, faster_whisper
and ctranslate2 are imported inside the engines when a model loads.
"""

from __future__ import annotations

from typing import Any

from voiceman_pipeline.engines.base import Transcriber

ENGINES = ("pocketsphinx", "faster-whisper")


def build_transcriber(engine: str, **options: Any) -> Transcriber:
    """A transcriber for ``engine`` ("pocketsphinx" | "faster-whisper"); loads nothing.

    ``options`` go to the engine's constructor (see PocketsphinxTranscriber and
    FasterWhisperTranscriber); an unknown option raises TypeError.
    """
    if engine == "pocketsphinx":
        from voiceman_pipeline.engines.stt.pocketsphinx_engine import PocketsphinxTranscriber

        return PocketsphinxTranscriber(**options)
    if engine == "faster-whisper":
        from voiceman_pipeline.engines.stt.faster_whisper_engine import FasterWhisperTranscriber

        return FasterWhisperTranscriber(**options)
    raise ValueError(f"Invalid STT engine: {engine!r}; choose one of {', '.join(ENGINES)}")


__all__ = ["ENGINES", "build_transcriber"]
