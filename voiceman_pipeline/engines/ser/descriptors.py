"""Acoustic arousal descriptors: pitch, loudness and speech rate.

These are plain measurements that correlate with vocal arousal (raised,
variable pitch; loud, variable level; fast speech). They are reported beside
(or, without a model, instead of) emotion labels and are never turned into a
label here. Every figure is None when it cannot be measured (silence, no
voiced frames, no timed words).
"""

from __future__ import annotations

import numpy as np

from voiceman_pipeline.audio_io import iter_spans, read_span
from voiceman_pipeline.results import ArousalDescriptors, DecodedAudio, Transcript

# Pitch search range (Hz). 75 Hz is Praat's standard floor for speech; 500 Hz
# covers raised adult and most child voices without inviting octave jumps.
PITCH_FLOOR_HZ = 75.0
PITCH_CEILING_HZ = 500.0
PITCH_TIME_STEP_S = 0.01

# Loudness frames: 25 ms windows every 10 ms, the usual speech-analysis frame.
FRAME_S = 0.025
HOP_S = 0.010
# A frame counts as speech when it is within SPEECH_RANGE_DB of the loud end
# of the recording (95th percentile frame, robust to clicks) and above an
# absolute floor, so line noise and digital silence do not drag the mean down.
SPEECH_RANGE_DB = 30.0
ABSOLUTE_FLOOR_DBFS = -60.0
# Gaps between words longer than this are pauses, not speaking time.
PAUSE_MIN_S = 0.3
# Shorter audio cannot hold three periods at the pitch floor plus a margin.
MIN_PITCH_AUDIO_S = 0.1
_EPS = 1e-10


def arousal_descriptors(audio: DecodedAudio, transcript: Transcript | None) -> ArousalDescriptors:
    """Pitch level/variability, loudness level/variability and speech rate."""
    pitch_mean, pitch_std = _pitch_stats(audio)
    loud_mean, loud_std = _loudness_stats(audio)
    return ArousalDescriptors(
        pitch_mean_hz=pitch_mean,
        pitch_std_hz=pitch_std,
        loudness_mean_db=loud_mean,
        loudness_std_db=loud_std,
        speech_rate_wps=speech_rate_wps(transcript) if transcript is not None else None,
    )


def frame_levels_dbfs(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """RMS level of each 25 ms frame (10 ms hop) in dB re full scale (1.0).

    Computed a minute of frames at a time (a memory-mapped signal is read a
    span at a time), so memory is the levels themselves, kept as float32 (4
    bytes per 10 ms: 4 MB for a 3-hour call; their rounding, under 1e-5 dB,
    is far below any level difference that matters)."""
    frame = int(round(FRAME_S * sample_rate))
    hop = int(round(HOP_S * sample_rate))
    n = len(samples)
    if n < frame:
        return np.empty(0, dtype=np.float32)
    count = (n - frame) // hop + 1
    levels = np.empty(count, dtype=np.float32)
    per_block = max(1, 60 * sample_rate // hop)
    for j in range(0, count, per_block):
        k = min(per_block, count - j)
        x = read_span(samples, j * hop, (j + k - 1) * hop + frame)
        # A strided view plus einsum sums squares without copying the
        # overlapping frames.
        frames = np.lib.stride_tricks.sliding_window_view(x, frame)[::hop]
        energy = np.einsum("ij,ij->i", frames, frames, dtype=np.float64) / frame
        levels[j : j + k] = 10.0 * np.log10(np.maximum(energy, _EPS))
    return levels


def speech_frame_mask(levels_db: np.ndarray) -> np.ndarray:
    """True for frames loud enough to be speech (see SPEECH_RANGE_DB)."""
    if levels_db.size == 0:
        return np.zeros(0, dtype=bool)
    return levels_db >= speech_threshold_db(levels_db.copy())


def speech_threshold_db(levels_db: np.ndarray) -> float:
    """Level (dBFS) from which a frame counts as speech (see SPEECH_RANGE_DB).
    Reorders ``levels_db`` (partly sorts it in place, so no copy is made)."""
    reference = float(np.percentile(levels_db, 95, overwrite_input=True))
    return max(ABSOLUTE_FLOOR_DBFS, reference - SPEECH_RANGE_DB)


def speech_rate_wps(transcript: Transcript) -> float | None:
    """Words per second of speaking time.

    Speaking time runs from the first word's start to the last word's end,
    less every gap between words longer than PAUSE_MIN_S (pauses).
    """
    words = sorted(
        (w for w in transcript.words if w.end >= w.start), key=lambda w: (w.start, w.end)
    )
    if not words:
        return None
    speaking = 0.0
    span_start, span_end = words[0].start, words[0].end
    for word in words[1:]:
        if word.start - span_end > PAUSE_MIN_S:
            speaking += span_end - span_start
            span_start = word.start
        span_end = max(span_end, word.end)
    speaking += span_end - span_start
    if speaking <= 0:
        return None
    return len(words) / speaking


def _pitch_stats(audio: DecodedAudio) -> tuple[float | None, float | None]:
    if audio.duration_s < MIN_PITCH_AUDIO_S or not _any_nonzero(audio.samples):
        return None, None
    # Imported where used, as the other engines' heavy modules are.
    from voiceman_pipeline.engines.forensic.acoustic import Moments, voiced_pitch_windows

    # Praat a window at a time; only the voiced frames' running moments are kept.
    stats = Moments()
    for _, f0 in voiced_pitch_windows(
        audio.samples, audio.sample_rate, PITCH_FLOOR_HZ, PITCH_CEILING_HZ, PITCH_TIME_STEP_S
    ):
        stats.add(f0)
    if not stats.count:
        return None, None
    return stats.mean, stats.std(ddof=1)


def _any_nonzero(samples: np.ndarray) -> bool:
    return any(np.any(x) for _, x in iter_spans(samples, 1 << 20))


def _loudness_stats(audio: DecodedAudio) -> tuple[float | None, float | None]:
    from voiceman_pipeline.engines.forensic.acoustic import Moments

    levels = frame_levels_dbfs(audio.samples, audio.sample_rate)
    if levels.size == 0:
        return None, None
    # The frames' order does not matter here: the threshold sorts them in
    # place, and the speech frames' moments are taken a block at a time (no
    # mask or copy as long as the call).
    threshold = speech_threshold_db(levels)
    stats = Moments()
    for j in range(0, levels.size, 1 << 16):
        block = levels[j : j + (1 << 16)]
        stats.add(block[block >= threshold])
    if not stats.count:
        return None, None
    return stats.mean, stats.std(ddof=1)
