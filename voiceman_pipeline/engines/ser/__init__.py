"""Speech emotion recognition engines.

``build_emotion_recognizer(None)`` gives the embedded default (emotion
unavailable, acoustic arousal descriptors only); a model directory or hub name
gives the wav2vec2-style classifier. Nothing heavy (torch, transformers,
parselmouth) is imported until a model is loaded or audio is analysed.
"""

from __future__ import annotations

from typing import Any

from voiceman_pipeline.engines.base import EmotionRecognizer
from voiceman_pipeline.engines.ser.unavailable import DescriptorsOnlyRecognizer
from voiceman_pipeline.engines.ser.wav2vec2_engine import Wav2Vec2EmotionRecognizer

__all__ = [
    "DescriptorsOnlyRecognizer",
    "Wav2Vec2EmotionRecognizer",
    "build_emotion_recognizer",
]


def build_emotion_recognizer(model: str | None, **options: Any) -> EmotionRecognizer:
    """The recognizer for ``model`` (None or blank: descriptors only).

    ``options`` go to Wav2Vec2EmotionRecognizer (device, max_segment_s,
    min_segment_s); they are ignored when no model is configured, since the
    descriptors-only engine has nothing to configure.
    """
    if model is None or not model.strip():
        return DescriptorsOnlyRecognizer()
    return Wav2Vec2EmotionRecognizer(model.strip(), **options)
