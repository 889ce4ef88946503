"""Forensic analysis of one recording: acoustic voice measures, stress index, verbal risk.

``analyze_forensic`` combines the three and records, in ``engine.options``,
every parameter that produced a number (analyzer settings and the analyzer's
per-file details from ``AcousticAnalyzer.measure``, such as the pitch range
actually used for this file; stress formula and weights, pattern set versions,
category weights and thresholds), so a report figure can be traced to its
inputs.
"""

from __future__ import annotations

import time
from typing import Any

from voiceman_pipeline.engines.base import AcousticAnalyzer, AcousticMeasurement
from voiceman_pipeline.engines.forensic.acoustic import ParselmouthAnalyzer, pause_measures
from voiceman_pipeline.engines.forensic.stress import FORMULA as STRESS_FORMULA
from voiceman_pipeline.engines.forensic.stress import stress_index
from voiceman_pipeline.engines.forensic.text_risk import (
    CATEGORY_WEIGHTS,
    DEFAULT_LOW_CONFIDENCE_THRESHOLD,
    PatternSet,
    analyze_text,
    load_builtin_pattern_sets,
    risk_level,
)
from voiceman_pipeline.errors import ChainOfCustodyError
from voiceman_pipeline.results import DecodedAudio, EngineInfo, ForensicResult, Timings, Transcript

__all__ = [
    "CATEGORY_WEIGHTS",
    "AcousticMeasurement",
    "ParselmouthAnalyzer",
    "analyze_forensic",
    "analyze_text",
    "load_builtin_pattern_sets",
    "pause_measures",
    "risk_level",
    "stress_index",
]

ENGINE_NAME = "voiceman-forensic"


def analyze_forensic(
    audio: DecodedAudio,
    transcript: Transcript,
    analyzer: AcousticAnalyzer,
    *,
    source_sha256: str,
    pattern_sets: dict[str, PatternSet] | None = None,
    low_confidence_threshold: float = DEFAULT_LOW_CONFIDENCE_THRESHOLD,
    unknown_confidence_is_low: bool = True,
) -> ForensicResult:
    """Acoustic features + stress index + text risk for one recording.

    Raises ChainOfCustodyError if the transcript was computed from a different
    recording (its SHA-256 differs from ``source_sha256``).
    """
    if transcript.source_sha256 != source_sha256:
        raise ChainOfCustodyError(
            f"transcript is of recording {transcript.source_sha256[:12]}..., "
            f"not of {source_sha256[:12]}...: refusing to combine them"
        )

    load_s = 0.0
    if not analyzer.loaded:
        t = time.perf_counter()
        analyzer.load()
        load_s = time.perf_counter() - t

    t = time.perf_counter()
    # measure() is on the AcousticAnalyzer interface (default: analyze() with no
    # details), so any analyzer works and its per-file details are recorded.
    measurement = analyzer.measure(audio, transcript)
    acoustic, per_file = measurement.features, measurement.details
    stress = stress_index(acoustic)
    if pattern_sets is None:
        pattern_sets = load_builtin_pattern_sets()
    text = analyze_text(
        transcript,
        pattern_sets,
        low_confidence_threshold=low_confidence_threshold,
        unknown_confidence_is_low=unknown_confidence_is_low,
    )
    process_s = time.perf_counter() - t

    acoustic_info = analyzer.info
    versions = ", ".join(s["version"] for s in text.options["pattern_sets"].values())
    options: dict[str, Any] = {
        "acoustic": {
            "engine": acoustic_info.name,
            "model": acoustic_info.model,
            "options": acoustic_info.options,
            "this_file": per_file,
        },
        "stress": STRESS_FORMULA,
        "text_risk": text.options,
    }
    return ForensicResult(
        source_sha256=source_sha256,
        engine=EngineInfo(
            name=ENGINE_NAME,
            model=f"{acoustic_info.model}; patterns {versions}",
            device=acoustic_info.device,
            options=options,
        ),
        acoustic=acoustic,
        stress=stress,
        categories=text.categories,
        risk_score=text.risk_score,
        risk_level=text.risk_level,
        transcript_confidence=transcript.confidence,
        low_confidence_transcript=text.low_confidence_transcript,
        timings=Timings(load_s=load_s, process_s=process_s, audio_s=audio.duration_s),
    )
