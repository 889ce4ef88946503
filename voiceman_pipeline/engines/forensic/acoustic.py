"""Acoustic voice measures through Praat (praat-parselmouth).

Every measure is computed by Praat itself through ``parselmouth.praat.call``
with real Praat command names, or by the ``Sound.to_*`` methods that wrap
them (checked against praat-parselmouth 0.4.7 / Praat 6.1.38). A measure Praat
reports as undefined (no voiced frames, too few periods) is ``None``: nothing
is estimated in its place.

Grain: pitch, formant and harmonicity frames every ``time_step`` seconds
(10 ms by default); jitter and shimmer over the glottal pulses Praat finds in
the voiced parts; timing measures from the transcript's word timestamps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

# AcousticMeasurement is part of the AcousticAnalyzer interface; re-exported here
# for code that imported it from this module.
from voiceman_pipeline.audio_io import read_span
from voiceman_pipeline.engines.base import AcousticAnalyzer, AcousticMeasurement
from voiceman_pipeline.errors import InvalidAudioError, ModelUnavailableError
from voiceman_pipeline.results import AcousticFeatures, DecodedAudio, EngineInfo, Transcript, Word

# Praat's own standard arguments for jitter and shimmer (its Voice report):
# shortest period 0.1 ms, longest period 20 ms (i.e. F0 >= 50 Hz), a period may
# differ from its neighbour by at most a factor 1.3, an amplitude by 1.6.
# Consecutive pulses further apart than that are a voice break, not jitter.
_PERIOD_FLOOR_S = 0.0001
_PERIOD_CEILING_S = 0.02
_MAX_PERIOD_FACTOR = 1.3
_MAX_AMPLITUDE_FACTOR = 1.6

# Praat marks a Harmonicity frame it could not measure (silent or unvoiced) with
# exactly -200 dB.
_HNR_UNDEFINED_DB = -200.0
# Praat's default silence threshold of "To Pitch (ac)", relative to the peak.
_PITCH_SILENCE_THRESHOLD = 0.03


@dataclass
class ParselmouthAnalyzer(AcousticAnalyzer):
    """Voice measures over the voiced frames of a 16 kHz mono recording.

    Pitch (Praat "To Pitch" autocorrelation, the method Praat recommends for
    speech) in two passes: a first pass over ``pitch_floor_hz``..
    ``pitch_ceiling_hz`` finds the speaker's quartiles Q1/Q3, and the second pass
    uses floor ``max(pitch_floor_hz, floor_factor * Q1)`` and ceiling
    ``min(pitch_ceiling_hz, ceiling_factor * Q3)`` (the two-pass speaker-adapted
    range of De Looze & Hirst; 0.75 x Q1 and 2.5 x Q3 leave room for expressive
    speech). Without it, a few octave/noise errors at 450-500 Hz in a 100 Hz
    voice dominated F0 max and range on the sample recordings. The first pass
    needs ``min_voiced_frames_for_adaptation`` voiced frames, else the
    configured range is kept.

    Formant stability: ``1 - (CV(F1) + CV(F2)) / 2`` clipped to [0, 1], where
    CV is standard deviation / mean of that formant over the voiced pitch
    frames where Praat found both F1 and F2. Note it includes ordinary
    vowel-to-vowel variation (read speech scores about 0.55-0.65), so it is
    comparable between recordings of similar speech, not an absolute measure.
    """

    pitch_floor_hz: float = 75.0
    pitch_ceiling_hz: float = 500.0
    adaptive_pitch_range: bool = True
    floor_factor: float = 0.75
    ceiling_factor: float = 2.5
    min_voiced_frames_for_adaptation: int = 20
    time_step_s: float = 0.01
    # Burg formant analysis, Praat's defaults: 5 formants below 5500 Hz
    # (suited to adult female and male voices alike), 25 ms window.
    max_formant_hz: float = 5500.0
    max_number_of_formants: float = 5.0
    formant_window_s: float = 0.025
    # Harmonicity (cc), Praat's defaults.
    hnr_silence_threshold: float = 0.1
    hnr_periods_per_window: float = 1.0
    # A gap between consecutive words at least this long is a pause.
    min_pause_s: float = 0.3
    # Praat analyses the signal in windows of at most this length (read from
    # the memory-mapped signal one at a time, so memory does not grow with the
    # call), each with this much of its neighbours on both sides for context.
    window_s: float = 60.0
    window_margin_s: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.pitch_floor_hz < self.pitch_ceiling_hz:
            raise ValueError(
                f"need 0 < pitch_floor_hz < pitch_ceiling_hz, got "
                f"{self.pitch_floor_hz}..{self.pitch_ceiling_hz}"
            )
        if self.window_s < 1.0 or not 0 <= self.window_margin_s < self.window_s:
            raise ValueError(
                f"need window_s >= 1 and 0 <= window_margin_s < window_s, got "
                f"{self.window_s}, {self.window_margin_s}"
            )
        if self.min_pause_s <= 0:
            raise ValueError(f"min_pause_s must be > 0, got {self.min_pause_s}")
        self._loaded = False

    # --- Engine -----------------------------------------------------------

    @property
    def info(self) -> EngineInfo:
        import parselmouth

        return EngineInfo(
            name="parselmouth",
            model=f"praat {parselmouth.PRAAT_VERSION}",
            device="cpu",
            options={
                "parselmouth_version": parselmouth.__version__,
                "pitch_method": "To Pitch (ac)",
                "pitch_floor_hz": self.pitch_floor_hz,
                "pitch_ceiling_hz": self.pitch_ceiling_hz,
                "adaptive_pitch_range": self.adaptive_pitch_range,
                "floor_factor": self.floor_factor,
                "ceiling_factor": self.ceiling_factor,
                "min_voiced_frames_for_adaptation": self.min_voiced_frames_for_adaptation,
                "time_step_s": self.time_step_s,
                "point_process": "To PointProcess (cc)",
                "jitter": "Get jitter (local)",
                "shimmer": "Get shimmer (local)",
                "period_floor_s": _PERIOD_FLOOR_S,
                "period_ceiling_s": _PERIOD_CEILING_S,
                "max_period_factor": _MAX_PERIOD_FACTOR,
                "max_amplitude_factor": _MAX_AMPLITUDE_FACTOR,
                "hnr": "To Harmonicity (cc), mean of frames > -200 dB",
                "hnr_silence_threshold": self.hnr_silence_threshold,
                "hnr_periods_per_window": self.hnr_periods_per_window,
                "formants": "To Formant (burg), sampled at voiced pitch frames",
                "max_formant_hz": self.max_formant_hz,
                "max_number_of_formants": self.max_number_of_formants,
                "formant_window_s": self.formant_window_s,
                "formant_stability": "1 - (CV(F1) + CV(F2)) / 2, clipped to [0, 1]",
                "min_pause_s": self.min_pause_s,
                "window_s": self.window_s,
                "window_margin_s": self.window_margin_s,
                "windows": (
                    "pitch, HNR, formant frames pooled over windows; jitter and shimmer "
                    "per window, weighted by its number of periods"
                ),
                "speech_rate": "words / (last word end - first word start - pause total)",
            },
        )

    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self) -> None:
        """Nothing to load but the library; fail clearly if it is missing."""
        try:
            import parselmouth  # noqa: F401
        except ImportError as exc:  # the dependency itself is missing
            raise ModelUnavailableError(
                "praat-parselmouth is not installed: pip install praat-parselmouth==0.4.7"
            ) from exc
        self._loaded = True

    def unload(self) -> None:
        self._loaded = False

    # --- analysis ---------------------------------------------------------

    def analyze(self, audio: DecodedAudio, transcript: Transcript) -> AcousticFeatures:
        return self.measure(audio, transcript).features

    def measure(self, audio: DecodedAudio, transcript: Transcript) -> AcousticMeasurement:
        """Features plus per-file details (pitch range actually used, frame counts,
        or why the voice measures were skipped)."""
        self.load()
        voice, details = self._voice_measures(audio)
        timing = pause_measures(transcript.words, self.min_pause_s)
        return AcousticMeasurement(features=AcousticFeatures(**voice, **timing), details=details)

    def min_duration_s(self) -> float:
        """Shortest audio Praat can analyse: its pitch window needs 2 periods of
        the pitch floor; we ask for 3 so at least a couple of frames exist."""
        return 3.0 / self.pitch_floor_hz

    def _windows(self, n: int, rate: int) -> list[tuple[int, int, int, int]]:
        """(read_start, read_end, own_start, own_end) in samples: equal windows of
        at most ``window_s`` that tile the signal (no short tail), each read
        with ``window_margin_s`` of its neighbours so Praat's analysis windows
        near the edge see real signal; only frames in its own span count."""
        count = max(1, math.ceil(n / (self.window_s * rate) - 1e-9))
        margin = int(self.window_margin_s * rate)
        edges = [round(i * n / count) for i in range(count + 1)]
        return [
            (max(0, a - margin), min(n, b + margin), a, b)
            for a, b in zip(edges[:-1], edges[1:])
        ]

    def _pitch(self, sound, floor: float, ceiling: float, silence_factor: float):
        """Praat "To Pitch (ac)", its silence threshold (0.03 of the peak by
        default) taken relative to the whole recording's peak (see sounds())."""
        return sound.to_pitch_ac(
            time_step=self.time_step_s, pitch_floor=floor, pitch_ceiling=ceiling,
            silence_threshold=_PITCH_SILENCE_THRESHOLD * silence_factor,
        )

    def _voice_measures(self, audio: DecodedAudio) -> tuple[dict[str, Any], dict[str, Any]]:
        """Praat over fixed windows of at most ``window_s`` (a long call is
        never one Praat Sound), combined so the result is that of one pass
        over the whole recording up to edge effects:

        - pitch: the voiced F0 frames of every window pooled (mean, std, min,
          max exact over the pooled frames); the speaker-adapted range comes
          from the quartiles of the pooled first-pass frames;
        - jitter, shimmer: Praat's value per window over the window's own
          span, averaged weighted by its number of periods;
        - HNR: mean of all defined frames pooled (sum / count);
        - F1, F2, formant stability: formants at the pooled voiced frames.
        """
        from parselmouth.praat import call

        samples = audio.samples
        if np.ndim(samples) != 1:
            raise InvalidAudioError(f"expected mono samples, got shape {np.shape(samples)}")

        empty = dict(
            f0_mean_hz=None, f0_std_hz=None, f0_min_hz=None, f0_max_hz=None,
            f0_range_hz=None, jitter_local_pct=None, shimmer_local_pct=None,
            hnr_db=None, f1_mean_hz=None, f2_mean_hz=None, formant_stability=None,
            voiced_fraction=0.0,
        )  # fmt: skip
        rate = audio.sample_rate
        duration = len(samples) / rate
        windows = self._windows(len(samples), rate)

        def sounds():
            """(window, Praat Sound of its samples, silence factor), read one
            window at a time. Praat's silence thresholds are relative to the
            peak of the Sound it is given; scaled by global peak / window peak
            they stay relative to the whole recording's peak, as in one pass."""
            for window in windows:
                x = read_span(samples, window[0], window[1])
                if not np.all(np.isfinite(x)):
                    raise InvalidAudioError("audio contains NaN or infinite samples")
                peak = _peak(x)
                factor = global_peak / peak if peak > 0 else 1.0
                sound = _praat_sound(x, rate)
                del x  # only Praat's copy stays alive while the caller works
                yield window, sound, factor

        # Praat's peak: largest distance from the mean, here per window (the
        # DC offset of a recording is steady, so this is the global one).
        global_peak = max(
            (_peak(read_span(samples, w[0], w[1])) for w in windows), default=0.0
        )

        def own(window, times: np.ndarray) -> np.ndarray:
            """Which frame times (window-local) fall in the window's own span."""
            t = times + window[0] / rate
            return (t >= window[2] / rate) & (t < window[3] / rate)

        if duration < self.min_duration_s():
            for _ in sounds():  # still refuses NaN/inf
                pass
            why = f"audio {duration:.3f} s shorter than {self.min_duration_s():.3f} s"
            return empty, {"skipped": why}

        floor, ceiling = self.pitch_floor_hz, self.pitch_ceiling_hz
        # The first pass's voiced F0 values, kept (exact quartiles need them all)
        # in one buffer sized for every frame the call can have: pages never
        # written cost no memory, so this holds 8 bytes per voiced 10 ms frame
        # (4 MB for a 3-hour call), with no list to concatenate or copy to sort.
        first_voiced = np.empty(int(duration / self.time_step_s) + 2 * len(windows) + 2)
        first_pass_voiced = 0
        for window, sound, factor in sounds():
            pitch = self._pitch(sound, floor, ceiling, factor)
            f0 = pitch.selected_array["frequency"]  # 0 where unvoiced
            f0 = f0[own(window, pitch.xs()) & (f0 > 0)]
            first_voiced, first_pass_voiced = _append(first_voiced, first_pass_voiced, f0)
            del sound, pitch  # see the end of the second pass
        adapted = False
        if self.adaptive_pitch_range and first_pass_voiced >= self.min_voiced_frames_for_adaptation:
            q1, q3 = np.percentile(  # sorts the buffer in place: no copy
                first_voiced[:first_pass_voiced], [25, 75], overwrite_input=True
            )
            new_floor = max(floor, self.floor_factor * float(q1))
            new_ceiling = min(ceiling, self.ceiling_factor * float(q3))
            # A raised floor only shortens Praat's window, so the duration
            # check above still holds; guard against a degenerate range.
            if new_floor < new_ceiling:
                floor, ceiling, adapted = new_floor, new_ceiling, True
        del first_voiced

        # The second pass keeps no frames: running moments per measure.
        frames = 0
        f0_stats, f1_stats, f2_stats = Moments(), Moments(), Moments()
        periods = pulses_total = 0
        jitter_sum = shimmer_sum = 0.0
        jitter_periods = shimmer_periods = 0
        hnr_sum, hnr_count = 0.0, 0
        for window, sound, factor in sounds():
            pitch = self._pitch(sound, floor, ceiling, factor)
            f0 = pitch.selected_array["frequency"]
            times = pitch.xs()
            mine = own(window, times)
            voiced = mine & (f0 > 0)
            frames += int(np.count_nonzero(mine))
            if not voiced.any():
                del sound, pitch
                continue
            f0_stats.add(f0[voiced])
            # The window's own span in its local time: each period counts once.
            t0 = (window[2] - window[0]) / rate
            t1 = (window[3] - window[0]) / rate

            # Glottal pulses, guided by the pitch contour (what Praat's Voice report does).
            pulses = call([sound, pitch], "To PointProcess (cc)")
            if call(pulses, "Get number of points"):  # pulses in the own span only
                first = call(pulses, "Get high index", t0)
                last = call(pulses, "Get low index", t1)
                pulses_total += max(0, int(last) - int(first) + 1) if first and last else 0
            n = int(call(
                pulses, "Get number of periods", t0, t1,
                _PERIOD_FLOOR_S, _PERIOD_CEILING_S, _MAX_PERIOD_FACTOR,
            ))  # fmt: skip
            periods += n
            jitter = call(
                pulses, "Get jitter (local)", t0, t1,
                _PERIOD_FLOOR_S, _PERIOD_CEILING_S, _MAX_PERIOD_FACTOR,
            )  # fmt: skip
            shimmer = call(
                [sound, pulses], "Get shimmer (local)", t0, t1,
                _PERIOD_FLOOR_S, _PERIOD_CEILING_S, _MAX_PERIOD_FACTOR, _MAX_AMPLITUDE_FACTOR,
            )  # fmt: skip
            if _pct_or_none(jitter) is not None and n:
                jitter_sum, jitter_periods = jitter_sum + jitter * n, jitter_periods + n
            if _pct_or_none(shimmer) is not None and n:
                shimmer_sum, shimmer_periods = shimmer_sum + shimmer * n, shimmer_periods + n

            harmonicity = sound.to_harmonicity_cc(
                time_step=self.time_step_s,
                minimum_pitch=floor,
                silence_threshold=self.hnr_silence_threshold * factor,
                periods_per_window=self.hnr_periods_per_window,
            )
            hnr = harmonicity.values[0]
            hnr = hnr[own(window, harmonicity.xs()) & (hnr > _HNR_UNDEFINED_DB)]
            hnr_sum, hnr_count = hnr_sum + float(hnr.sum()), hnr_count + int(hnr.size)

            formant = sound.to_formant_burg(
                time_step=self.time_step_s,
                max_number_of_formants=self.max_number_of_formants,
                maximum_formant=self.max_formant_hz,
                window_length=self.formant_window_s,
            )
            f1 = np.array([formant.get_value_at_time(1, t) for t in times[voiced]])
            f2 = np.array([formant.get_value_at_time(2, t) for t in times[voiced]])
            both = np.isfinite(f1) & np.isfinite(f2)  # NaN where Praat found no such formant
            f1_stats.add(f1[both])
            f2_stats.add(f2[both])
            # This window's Praat objects go now: the loop variables would keep
            # them alive while sounds() reads and builds the next window's.
            del sound, pitch, pulses, harmonicity, formant

        details: dict[str, Any] = {
            "pitch_floor_used_hz": floor,
            "pitch_ceiling_used_hz": ceiling,
            "pitch_range_adapted": adapted,
            "first_pass_voiced_frames": first_pass_voiced,
            "pitch_frames": frames,
            "voiced_frames": f0_stats.count,
            "windows": len(windows),
            "window_s": self.window_s,
        }
        out = dict(empty)
        out["voiced_fraction"] = float(f0_stats.count / frames) if frames else 0.0
        if not f0_stats.count:
            return out, details

        out.update(
            f0_mean_hz=f0_stats.mean,
            f0_std_hz=f0_stats.std(),
            f0_min_hz=f0_stats.min,
            f0_max_hz=f0_stats.max,
            f0_range_hz=f0_stats.max - f0_stats.min,
        )
        details["glottal_pulses"] = pulses_total
        details["periods"] = periods
        out["jitter_local_pct"] = (
            _pct_or_none(jitter_sum / jitter_periods) if jitter_periods else None
        )
        out["shimmer_local_pct"] = (
            _pct_or_none(shimmer_sum / shimmer_periods) if shimmer_periods else None
        )
        details["hnr_frames"] = hnr_count
        out["hnr_db"] = hnr_sum / hnr_count if hnr_count else None

        details["formant_frames"] = f1_stats.count
        if f1_stats.count:
            out["f1_mean_hz"] = f1_stats.mean
            out["f2_mean_hz"] = f2_stats.mean
            if f1_stats.count >= 2:
                cv = (f1_stats.std() / f1_stats.mean + f2_stats.std() / f2_stats.mean) / 2.0
                out["formant_stability"] = float(np.clip(1.0 - cv, 0.0, 1.0))
        return out, details


class Moments:
    """Count, mean, variance, min and max of values given a chunk at a time,
    without keeping them: each chunk's own mean and sum of squared deviations
    merged into the running ones (Chan et al.'s pairwise update), which agrees
    with numpy over all the values to rounding (about 1e-15 relative)."""

    def __init__(self) -> None:
        self.count, self.mean, self._m2 = 0, 0.0, 0.0
        self.min, self.max = math.inf, -math.inf

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        n = int(values.size)
        if not n:
            return
        mean = float(values.mean())
        m2 = float(np.square(values - mean).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self._m2 += m2 + delta * delta * self.count * n / total
        self.count = total
        self.min, self.max = min(self.min, float(values.min())), max(self.max, float(values.max()))

    def std(self, ddof: int = 0) -> float | None:
        """Standard deviation (numpy's ``ddof``); None without enough values."""
        return math.sqrt(self._m2 / (self.count - ddof)) if self.count > ddof else None


def _append(buffer: np.ndarray, used: int, values: np.ndarray) -> tuple[np.ndarray, int]:
    """``values`` written after the first ``used`` entries of ``buffer``
    (doubled if full); the buffer and its new number of used entries."""
    if used + values.size > buffer.size:
        grown = np.empty(max(2 * buffer.size, used + values.size), buffer.dtype)
        grown[:used] = buffer[:used]
        buffer = grown
    buffer[used : used + values.size] = values
    return buffer, used + values.size


def _praat_sound(x: np.ndarray, rate: int):
    """A Praat Sound of float32 samples, converted straight into Praat's own
    float64 buffer: a numpy float64 copy first would be a third copy of the
    window at the same time (the zeros passed in are untouched pages)."""
    import parselmouth

    sound = parselmouth.Sound(np.zeros(x.size), sampling_frequency=rate)
    sound.values[0] = x
    return sound


def _peak(x: np.ndarray) -> float:
    return float(np.max(np.abs(x - x.mean()))) if x.size else 0.0


def _pct_or_none(fraction: float) -> float | None:
    """Praat returns undefined (NaN) when there are too few periods."""
    return None if fraction is None or not math.isfinite(fraction) else float(fraction) * 100.0


def pause_measures(words: list[Word], min_pause_s: float = 0.3) -> dict[str, Any]:
    """Speech rate and pauses from word timestamps.

    A pause is a gap of at least ``min_pause_s`` between the end of the words
    so far and the start of the next word (words sorted by start; overlapping
    words leave no gap). Speaking time is first word start to last word end
    minus the pauses, so shorter gaps (between-word transitions) count as
    speaking. Speech rate is words per second of speaking time, None without
    words or speaking time. Words with empty text are ignored.
    """
    ws = sorted((w for w in words if w.text.strip()), key=lambda w: (w.start, w.end))
    result: dict[str, Any] = {
        "speech_rate_wps": None,
        "pause_count": 0,
        "pause_total_s": 0.0,
        "mean_pause_s": None,
    }
    if not ws:
        return result
    pauses: list[float] = []
    reached = ws[0].end
    for w in ws[1:]:
        gap = w.start - reached
        # 1 us tolerance: timestamps like 1.2 - 0.9 are 0.29999999999999993 in floats.
        if gap >= min_pause_s - 1e-6:
            pauses.append(gap)
        reached = max(reached, w.end)
    total = float(sum(pauses))
    speaking = (reached - ws[0].start) - total
    result["pause_count"] = len(pauses)
    result["pause_total_s"] = total
    result["mean_pause_s"] = total / len(pauses) if pauses else None
    result["speech_rate_wps"] = len(ws) / speaking if speaking > 0 else None
    return result


def voiced_pitch_windows(
    samples: np.ndarray,
    sample_rate: int,
    pitch_floor_hz: float,
    pitch_ceiling_hz: float,
    time_step_s: float | None = None,
    window_s: float = 60.0,
    margin_s: float = 0.5,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(times s, F0 Hz) of the voiced frames of Praat "To Pitch (ac)" (its
    defaults otherwise), one window of ``window_s`` at a time as
    ``ParselmouthAnalyzer`` computes them (silence threshold relative to the
    whole recording's peak; only each window's own frames), so a caller that
    needs only statistics keeps nothing that grows with the recording."""
    analyzer = ParselmouthAnalyzer(window_s=window_s, window_margin_s=margin_s)
    windows = analyzer._windows(len(samples), sample_rate)
    global_peak = max((_peak(read_span(samples, w[0], w[1])) for w in windows), default=0.0)
    for read_a, read_b, own_a, own_b in windows:
        x = read_span(samples, read_a, read_b)
        if len(x) / sample_rate < 3.0 / pitch_floor_hz:
            continue  # too short for Praat's pitch window (only a tiny recording)
        peak = _peak(x)
        sound = _praat_sound(x, sample_rate)
        del x
        pitch = sound.to_pitch_ac(
            time_step=time_step_s,
            pitch_floor=pitch_floor_hz,
            pitch_ceiling=pitch_ceiling_hz,
            silence_threshold=_PITCH_SILENCE_THRESHOLD * (global_peak / peak if peak > 0 else 1.0),
        )
        f0 = pitch.selected_array["frequency"]
        t = pitch.xs() + read_a / sample_rate
        keep = (t >= own_a / sample_rate) & (t < own_b / sample_rate) & (f0 > 0)
        t, f0 = t[keep], f0[keep]
        del sound, pitch, keep  # not alive while the next window is built
        yield t, f0
