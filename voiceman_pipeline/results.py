"""Result types: the contract between pipeline stages.

Each stage but the report (a plain dict joining these) writes one of these
to ``outputs/<partition_key>/<stage>.json`` and the next stage reads it back.
Each result carries the SHA-256 of the source recording it was computed from
(the chain-of-custody anchor recorded at intake), the engine, model and
options that produced it, and its timings, so every number in a report can be
traced back to its inputs.

Times are seconds from the start of the recording; durations are seconds.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np

SCHEMA_VERSION = 1
SAMPLE_RATE = 16_000  # every engine receives 16 kHz mono float32 in [-1, 1]


@dataclass(frozen=True)
class DecodedAudio:
    """A recording decoded once at intake: 16 kHz mono float32 samples."""

    samples: np.ndarray
    sample_rate: int = SAMPLE_RATE

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate


@dataclass
class EngineInfo:
    """Which engine produced a result, with which model and options."""

    name: str  # e.g. "pocketsphinx", "faster-whisper", "parselmouth"
    model: str  # model name or local directory; "builtin" for bundled models
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Timings:
    """Wall-clock cost of one stage for one file."""

    load_s: float = 0.0  # model load attributed to this file (0 when reused)
    process_s: float = 0.0
    audio_s: float = 0.0

    @property
    def real_time_factor(self) -> float:
        """Processing seconds per second of audio (lower is faster)."""
        return self.process_s / self.audio_s if self.audio_s else 0.0


# --- intake -----------------------------------------------------------------


@dataclass
class AudioIntake:
    """What intake found in the original recording (before any resampling)."""

    partition_key: str
    source_path: str  # absolute path of the recording at intake
    sha256: str  # of the original file's bytes: the chain-of-custody anchor
    size_bytes: int
    container: str  # e.g. "wav", "mp3", "mov,mp4,m4a,3gp,3g2,mj2"
    codec: str  # e.g. "pcm_s16le", "aac"
    original_sample_rate: int
    channels: int
    duration_s: float  # of the decoded 16 kHz mono signal
    num_samples: int  # at 16 kHz
    decoded_path: str  # .npy of the 16 kHz mono float32 samples
    decoded_sha256: str  # of that .npy: every later stage analyses these bytes
    timings: Timings = field(default_factory=Timings)
    schema_version: int = SCHEMA_VERSION
    # The file's mtime when it was hashed: status compares size and mtime
    # first and re-hashes only a file that was touched since.
    source_mtime_ns: int | None = None


# --- speech to text ---------------------------------------------------------


@dataclass
class Word:
    text: str
    start: float
    end: float
    confidence: float | None = None  # 0-1 where the engine gives one


@dataclass
class Segment:
    """A stretch of speech (an utterance) with its words."""

    text: str
    start: float
    end: float
    words: list[Word] = field(default_factory=list)
    confidence: float | None = None  # 0-1


@dataclass
class Transcript:
    """Speech-to-text output for one recording.

    ``words`` is every word of every segment in time order, so a reader needs
    no knowledge of segmentation to find what was said when.
    """

    source_sha256: str
    engine: EngineInfo
    language: str
    duration_s: float
    text: str
    segments: list[Segment]
    words: list[Word]
    confidence: float | None  # mean word confidence, 0-1; None if unknown
    timings: Timings = field(default_factory=Timings)
    # SHA-256 of each upstream output read (file name -> digest), so a reader
    # can prove which intake, signal and transcript this result came from.
    inputs: dict[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def word_count(self) -> int:
        return len(self.words)


# --- forensic analysis ------------------------------------------------------


@dataclass
class AcousticFeatures:
    """Voice measures over the voiced parts of a recording (None: not measurable)."""

    f0_mean_hz: float | None
    f0_std_hz: float | None
    f0_min_hz: float | None
    f0_max_hz: float | None
    f0_range_hz: float | None
    jitter_local_pct: float | None  # cycle-to-cycle period variation, %
    shimmer_local_pct: float | None  # cycle-to-cycle amplitude variation, %
    hnr_db: float | None  # harmonics-to-noise ratio
    f1_mean_hz: float | None
    f2_mean_hz: float | None
    formant_stability: float | None  # 0-1, 1 = perfectly steady F1/F2
    voiced_fraction: float  # share of frames with a pitch
    speech_rate_wps: float | None  # words per second of speaking time
    pause_count: int
    pause_total_s: float
    mean_pause_s: float | None


@dataclass
class StressIndex:
    """Voice stress 0-100 from shimmer, HNR, formant stability and jitter.

    ``value`` is None and ``level`` "not measurable" when none of the four
    could be measured (too little voiced speech): absent, never a made-up 0.
    """

    value: float | None
    level: Literal["low", "medium", "high", "not measurable"]
    components: dict[str, float]  # each 0-100 before weighting
    weights: dict[str, float]


@dataclass
class Evidence:
    """One text match that contributed to a risk category."""

    category: str  # threat, coercion, gaslighting, deception, emotional_manipulation
    pattern_id: str
    language: str
    matched_text: str
    char_start: int  # span in Transcript.text
    char_end: int
    time_start: float | None  # of the matched words, where known
    time_end: float | None
    weight: float
    low_confidence: bool = False  # the transcript under it was unreliable


@dataclass
class CategoryScore:
    category: str
    score: float  # 0-100
    weight: float  # share of the overall risk score
    evidence: list[Evidence] = field(default_factory=list)


@dataclass
class ForensicResult:
    source_sha256: str
    engine: EngineInfo
    acoustic: AcousticFeatures
    stress: StressIndex
    categories: list[CategoryScore]
    risk_score: float | None  # 0-100; None where the transcript has no text (level "no words")
    risk_level: Literal["minimal", "low", "moderate", "high", "critical", "no words"]
    transcript_confidence: float | None
    low_confidence_transcript: bool
    timings: Timings = field(default_factory=Timings)
    # SHA-256 of each upstream output read (file name -> digest), so a reader
    # can prove which intake, signal and transcript this result came from.
    inputs: dict[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def evidence(self) -> list[Evidence]:
        return [ev for cat in self.categories for ev in cat.evidence]


# --- speech emotion recognition ---------------------------------------------


@dataclass
class SegmentEmotion:
    start: float
    end: float
    label: str
    probabilities: dict[str, float]
    arousal: float | None = None  # where the model gives dimensional output
    valence: float | None = None


@dataclass
class ArousalDescriptors:
    """Acoustic arousal descriptors. These are measurements, NOT emotion labels.
    Pitch over Praat's standard 75-500 Hz range, where the forensic F0 measures
    use a speaker-adapted range: the two differ slightly on the same call."""

    pitch_mean_hz: float | None
    pitch_std_hz: float | None  # pitch variability
    loudness_mean_db: float | None  # dBFS (0 = full scale), over the speech frames
    loudness_std_db: float | None
    speech_rate_wps: float | None
    note: str = "acoustic arousal descriptors, not emotion labels"


@dataclass
class EmotionResult:
    source_sha256: str
    status: Literal["ok", "unavailable"]
    reason: str | None  # why emotion is unavailable
    engine: EngineInfo | None
    segments: list[SegmentEmotion]
    dominant_label: str | None
    descriptors: ArousalDescriptors
    timings: Timings = field(default_factory=Timings)
    # SHA-256 of each upstream output read (file name -> digest), so a reader
    # can prove which intake, signal and transcript this result came from.
    inputs: dict[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION


# --- serialisation ----------------------------------------------------------

T = TypeVar("T")


def to_dict(result: Any) -> dict[str, Any]:
    """Dataclass -> JSON-ready dict (derived figures included for readers)."""
    data = dataclasses.asdict(result)
    if isinstance(result, Timings):
        data["real_time_factor"] = result.real_time_factor
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        if isinstance(value, Timings):
            data[f.name]["real_time_factor"] = value.real_time_factor
    return data


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """JSON dict -> dataclass, rebuilding nested result types."""
    hints = _field_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name not in hints:
            continue  # derived figures such as real_time_factor
        kwargs[name] = _coerce(hints[name], value)
    return cls(**kwargs)


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    """{field name: its resolved type} of a result dataclass. Cached: resolving
    the hints is what reading a result cost most (once per Word otherwise)."""
    import typing

    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(hint: Any, value: Any) -> Any:
    import typing

    if value is None:
        return None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value)  # type: ignore[arg-type]
    if origin is list and args:
        return [_coerce(args[0], v) for v in value]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in args:
            if arg is not type(None) and dataclasses.is_dataclass(arg):
                return from_dict(arg, value)
    return value


def dumps(result: Any) -> str:
    return json.dumps(to_dict(result), indent=2, ensure_ascii=False, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
