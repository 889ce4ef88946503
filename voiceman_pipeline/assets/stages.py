"""The per-recording chain, one definition per stage.

A ``Stage`` holds everything about one step of ``audio -> transcript ->
forensic -> emotion -> report``: its asset (key, upstream stages,
description), the files it writes, its code version, its engine and the
options that shape its output, and the function that runs it for one
recording. ``STAGES`` lists them in chain order; the multi-asset's specs and
the batch loop in ``pipeline.py`` are both built from it, so adding a stage
means adding one ``Stage`` here and its module.

Every stage runs as ``run(files, engine, options) -> metadata``: ``files`` is
the recording's checked results on disk, ``engine`` the loaded model (or
None), ``options`` the settings that are part of its data version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dagster import AssetKey, AssetSpec

from voiceman_pipeline.assets import audio, emotion, forensic, report, transcript
from voiceman_pipeline.engines.base import Engine
from voiceman_pipeline.partitions import audio_files
from voiceman_pipeline.recording_files import (
    AUDIO_JSON,
    DECODED_NPY,
    EMOTION_JSON,
    FORENSIC_JSON,
    REPORT_JSON,
    REPORT_PNG,
    TRANSCRIPT_JSON,
    RecordingFiles,
)
from voiceman_pipeline.resources.engines import AcousticAnalysis, EmotionModel, SpeechToText
from voiceman_pipeline.resources.outputs import RecordingStore

GROUP = "voice_analysis"
# Predicted memory with no history: in practice a fresh home's first run, where
# each stage's first recording is also its process's first (which pays for
# imports on first use, caches, allocator pools). The fixed parts cover the
# highest peak above the pre-file baseline (kernel peak counter) measured per
# stage with the default engines on calls of 1-91 s, rounded up: audio 32.1 MB,
# transcript 32.7 and report 50.6 (each a process's first, in the sessions of use
# of bench/results/memory_prediction-home-20261125-154624.json and -160339),
# forensic 72.2 (bench/results/memory_prediction-20261125-112739.json), emotion
# 28.8 (in a run whose file was not kept; the kept ones, 27.3 at most). Beyond a
# minute (the default engines' window) peaks grow slowly.
# The rates per audio second are each stage's growth from a 65 s call to a
# 10,801 s one in one `voiceman run` of a kept home, read from the
# materializations' metadata (audio 3.0 -> 3.0 MB, transcript 30.1 -> 119.3,
# forensic 57.2 -> 106.6, emotion 15.7 -> 50.6, report 41.4 -> 125.6; rounded
# up); that run's whole-process figures are
# bench/results/call-length-180-20261124-moments.json.


@dataclass
class StageResources:
    """What a stage may use; engines are built lazily on first access."""

    store: RecordingStore
    stt: SpeechToText
    ser: EmotionModel
    acoustic: AcousticAnalysis


RunFn = Callable[[RecordingFiles, Engine | None, dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    name: str
    description: str
    reads: tuple[str, ...]  # upstream stages (the asset's deps), in chain order
    writes: tuple[str, ...]  # files in outputs/<key>/, digested into the checkpoint
    # Bump when a code change changes this stage's output: every recording's
    # result then shows as out of date (Dagster's "code version changed").
    code_version: str
    run: RunFn
    # A recording's peak memory above its baseline before this stage has any
    # history: (fixed MB, MB per audio second); see the comment above GROUP.
    memory_default: tuple[float, float]
    engine: Callable[[StageResources], Engine | None] = lambda r: None
    # The engine, model and options that shape the output (not the device, not
    # memory limits): part of the data version, so changing one makes the
    # stage out of date for every recording.
    options: Callable[[StageResources], dict[str, Any]] = lambda r: {}
    # Replace a GPU engine that failed on its device with the CPU one.
    cpu_fallback: Callable[[StageResources], Engine] | None = None
    kinds: frozenset[str] = field(default_factory=lambda: frozenset({"python"}))

    @property
    def key(self) -> AssetKey:
        return AssetKey(self.name)

    def versioned_code(self, resources: StageResources) -> str:
        """The asset's code version: this stage's code plus its configured options,
        so the UI marks results out of date when either changes."""
        return f"{self.code_version}+{options_digest(self.options(resources))[:10]}"

    def spec(self, resources: StageResources) -> AssetSpec:
        return AssetSpec(
            self.name,
            deps=[AssetKey(name) for name in self.reads],
            group_name=GROUP,
            partitions_def=audio_files,
            description=self.description,
            kinds=set(self.kinds),
            code_version=self.versioned_code(resources),
        )


def options_digest(options: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()


STAGES: list[Stage] = [
    Stage(
        "audio",
        "Intake: the recording decoded once to 16 kHz mono, with its SHA-256 (the "
        "chain-of-custody anchor), codec, sample rate, channels and duration.",
        reads=(),
        writes=(AUDIO_JSON, DECODED_NPY),
        code_version="audio-1",
        run=audio.take_in,
        kinds=frozenset({"python", "audio"}),
        memory_default=(33.0, 0.0),  # highest 32.1 MB (a first; later 3.1)
    ),
    Stage(
        "transcript",
        "Speech to text: text, segments and words with start/end times and confidence.",
        reads=("audio",),
        writes=(TRANSCRIPT_JSON,),
        # 2: PocketSphinx resets its feature state per recording (a transcript
        # no longer depends on the recording decoded before it)
        code_version="transcript-2",
        run=transcript.transcribe,
        engine=lambda r: r.stt.transcriber(),
        options=lambda r: r.stt.output_options(),
        cpu_fallback=lambda r: r.stt.fall_back_to_cpu(),
        memory_default=(33.0, 0.009),  # highest 32.7 MB (a first; later 17.8) (pocketsphinx)
    ),
    Stage(
        "forensic",
        "Acoustic stress features and text risk indicators, combined into a 0-100 risk "
        "score; every score keeps the evidence that produced it.",
        reads=("audio", "transcript"),
        writes=(FORENSIC_JSON,),
        # 2: unmeasurable stress is absent, not 0; 3: no phrase matched across a
        # pause over 2 s, and no risk score for a transcript with no text
        code_version="forensic-3",
        run=forensic.analyze,
        engine=lambda r: r.acoustic.analyzer(),
        options=lambda r: r.acoustic.output_options(),
        memory_default=(73.0, 0.005),  # highest 72.2 MB (Praat)
    ),
    Stage(
        "emotion",
        "Speech emotion per segment, or 'unavailable' plus acoustic arousal descriptors "
        "when no emotion model is configured.",
        reads=("audio", "transcript"),
        writes=(EMOTION_JSON,),
        code_version="emotion-1",
        run=emotion.recognize,
        engine=lambda r: r.ser.recognizer(),
        options=lambda r: r.ser.output_options(),
        cpu_fallback=lambda r: r.ser.fall_back_to_cpu(),
        kinds=frozenset({"python", "pytorch"}),
        memory_default=(36.0, 0.004),  # highest 28.8 MB (descriptors only)
    ),
    Stage(
        "report",
        "One recording's joined results (JSON) and a plot of energy, pitch, words and "
        "risk evidence over time (PNG).",
        reads=("audio", "transcript", "forensic", "emotion"),
        writes=(REPORT_JSON, REPORT_PNG),
        # 2: "not measurable" stress in the plot title; 3: long calls' plot lines
        # binned; 4: a long call's pitch points thinned by powers of 2, as they come;
        # 5: the strongest category beside the overall risk, red for evidence alone;
        # 6: report.json names the software, host and Dagster runs that produced it
        code_version="report-6",
        run=report.build_report,
        memory_default=(52.0, 0.008),  # highest 50.6 MB (a first; later 29.9)
    ),
]

STAGE_BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}
STAGE_KEYS: list[AssetKey] = [stage.key for stage in STAGES]
AUDIO, REPORT = STAGE_BY_NAME["audio"], STAGE_BY_NAME["report"]
