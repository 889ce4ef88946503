"""The report's timeline plot (PNG): energy, pitch contour, words and risk
evidence over time. Plain numpy and matplotlib, no Dagster: the report stage
draws it, and so does ``bench/bare_loop.py``, the pipeline's baseline."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from voiceman_pipeline.audio_io import read_span
from voiceman_pipeline.engines.forensic.text_risk import describe_risk
from voiceman_pipeline.results import DecodedAudio, ForensicResult, Transcript

FRAME_S = 0.02  # energy frame for the plot
MAX_LABELLED_WORDS = 80  # beyond this, word labels overlap into noise
# The PNG is 800 px wide (10 in at 80 dpi): more points per line than a few per
# pixel draw the same picture, but matplotlib's memory grows with the points,
# and a 3-hour call has 540,000 energy frames and about as many voiced pitch frames.
MAX_ENERGY_POINTS = 4000  # beyond: each point is the loudest frame of its bin
MAX_PITCH_POINTS = 8000  # beyond: every k-th voiced frame (k a power of 2)
SEGMENT_COLOURS = ("tab:blue", "tab:cyan")  # the speech lane's segments, alternating


def plot_timeline(
    audio: DecodedAudio,
    transcript: Transcript,
    forensic: ForensicResult,
    title: str,
    cache_dir: Path | None = None,
) -> bytes:
    """PNG: energy (dB), pitch contour, word timeline, risk evidence spans."""
    if cache_dir is not None:
        # matplotlib writes a font cache on first import: keep it with our data,
        # not in ~/.cache, unless the user chose a place (MPLCONFIGDIR).
        os.environ.setdefault("MPLCONFIGDIR", str(cache_dir))
    import matplotlib

    matplotlib.use("Agg")  # no display: render to memory
    import matplotlib.pyplot as plt

    duration = max(audio.duration_s, 1e-3)
    fig, (ax_energy, ax_pitch, ax_words) = plt.subplots(
        3, 1, figsize=(10, 5.5), dpi=80, sharex=True, gridspec_kw={"height_ratios": [2, 2, 1.4]}
    )
    first, loudest = binned_frame_rms(audio, MAX_ENERGY_POINTS)
    if loudest.size:
        ax_energy.plot(first * FRAME_S, 20 * np.log10(loudest + 1e-9), lw=0.7)
    ax_energy.set_ylabel("energy (dBFS)")
    ax_energy.set_title(
        f"{title}   risk {describe_risk(forensic.risk_score, forensic.risk_level, forensic.categories)}, "
        f"stress {_stress_label(forensic)}"
        + ("\nlow-confidence transcript: check the evidence against the audio"
           if forensic.low_confidence_transcript and forensic.risk_score is not None else "")
    )

    times, f0 = _pitch_contour(audio, *_pitch_range(forensic))
    ax_pitch.plot(times, f0, ".", ms=2)
    ax_pitch.set_ylabel("F0 (Hz)")
    ax_pitch.ticklabel_format(axis="y", useOffset=False)  # Hz as they are, not "+2.2e2"
    if not len(f0):
        ax_pitch.text(0.5, 0.5, "no voiced frames", transform=ax_pitch.transAxes, ha="center",
                      va="center", fontsize=8, color="0.4")

    # One collection each for segments and words, not an artist per item: a
    # 3-hour call has tens of thousands of words, and per-word artists cost
    # memory in proportion to them.
    # Segments in two alternating blues: no red, which marks evidence alone.
    segments = transcript.segments
    if segments:
        ax_words.broken_barh(
            [(seg.start, seg.end - seg.start) for seg in segments], (0.55, 0.4),
            facecolors=[SEGMENT_COLOURS[i % 2] for i in range(len(segments))], alpha=0.3,
        )
    words = transcript.words
    if words:
        ax_words.hlines([0.3] * len(words), [w.start for w in words], [w.end for w in words],
                        lw=3, color="k")
    if len(words) <= MAX_LABELLED_WORDS:
        for word in words:
            ax_words.text(word.start, 0.38, word.text, fontsize=6, rotation=45, va="bottom")
    ax_words.set_ylim(0, 1)  # lane coordinates: words at 0.3, labels above
    ax_words.set_yticks([])
    ax_words.set_ylabel("speech")
    ax_words.set_xlabel("time (s)")
    ax_words.set_xlim(0, duration)

    timed = [ev for ev in forensic.evidence if ev.time_start is not None]  # the others: JSON only
    for ev in timed:
        for ax in (ax_energy, ax_pitch, ax_words):
            ax.axvspan(ev.time_start, ev.time_end or ev.time_start, color="red", alpha=0.25)
        ax_energy.text(ev.time_start, 0.98, ev.category, transform=ax_energy.get_xaxis_transform(),
                       fontsize=7, color="darkred", va="top")
    if timed:
        from matplotlib.patches import Patch

        ax_words.legend(handles=[Patch(color="red", alpha=0.25, label="text risk evidence"),
                                 Patch(color=SEGMENT_COLOURS[0], alpha=0.3, label="speech segment")],
                        loc="lower right", fontsize=6, framealpha=0.8)
    fig.tight_layout()
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())
    plt.close(fig)
    return palette_png(pixels)


def palette_png(rgba: np.ndarray) -> bytes:
    """PNG of an (h, w, 4) opaque image with its colours reduced to a 256-entry
    palette. A plot has few colours beyond its anti-aliasing: the timeline came
    to 15 KB instead of 46 KB as full colour, and the picture is the same (each
    channel within a few levels). The report's metadata embeds the PNG, so
    it is stored with each report materialization in Dagster's storage."""
    from PIL import Image  # matplotlib's own image library

    image = Image.fromarray(rgba[..., :3])  # the figure is opaque: alpha is all 255
    buffer = io.BytesIO()
    image.quantize(256, method=Image.Quantize.FASTOCTREE).save(buffer, format="png")
    return buffer.getvalue()


def _stress_label(forensic: ForensicResult) -> str:
    stress = forensic.stress
    return stress.level if stress.value is None else f"{stress.value:.0f} ({stress.level})"


def _pitch_range(forensic: ForensicResult) -> tuple[float, float]:
    """The pitch range the forensic stage settled on for this speaker, so the
    plotted contour is the one its F0 figures were computed from."""
    used = forensic.engine.options.get("acoustic", {}).get("this_file", {})
    return used.get("pitch_floor_used_hz", 75.0), used.get("pitch_ceiling_used_hz", 500.0)


def binned_frame_rms(audio: DecodedAudio, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """``binned_max`` of the RMS of each FRAME_S frame (a trailing partial frame
    dropped), computed a block of whole bins at a time from the (memory-mapped)
    signal: memory is the at most ``max_points`` bins, not the signal or 4
    bytes per 20 ms of the call."""
    frame = max(1, int(FRAME_S * audio.sample_rate))
    n = len(audio.samples) // frame
    step = bin_step(n, max_points)
    first = np.arange(0, n, step)
    loudest = np.empty(first.size, dtype=np.float32)
    per_block = max(1, (60 * audio.sample_rate) // (frame * step)) * step  # whole bins
    for j in range(0, n, per_block):
        _, bins = binned_max(_rms(audio.samples, j, min(per_block, n - j), frame), step)
        loudest[j // step : j // step + bins.size] = bins
    return first, loudest


def _rms(samples: np.ndarray, j: int, k: int, frame: int) -> np.ndarray:
    """RMS of the ``k`` frames from frame ``j``."""
    x = read_span(samples, j * frame, (j + k) * frame).reshape(k, frame)
    return np.sqrt(np.mean(x**2, axis=1))


def bin_step(count: int, max_points: int) -> int:
    """Entries per bin that put ``count`` entries in at most ``max_points``
    bins: 1 (every entry its own bin) when there are no more."""
    return max(1, -(-count // max_points))


def binned_max(values: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    """``values`` in bins of ``step`` consecutive entries: (index of each bin's
    first entry, the bin's maximum)."""
    first = np.arange(0, values.size, step)
    return first, (np.maximum.reduceat(values, first) if values.size else values)


def _pitch_contour(
    audio: DecodedAudio, floor_hz: float, ceiling_hz: float, max_points: int = MAX_PITCH_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """Voiced (time, F0) frames, Praat over windows (``voiced_pitch_windows``):
    all of them up to ``max_points``, else every k-th (k the smallest power of
    2 that leaves at most ``max_points``), thinned as the windows come, so
    memory is the points plotted, not every voiced frame of the call."""
    from voiceman_pipeline.engines.forensic.acoustic import voiced_pitch_windows

    times, f0 = np.empty(0), np.empty(0)
    every, seen = 1, 0
    for t, f in voiced_pitch_windows(audio.samples, audio.sample_rate, floor_hz, ceiling_hz):
        start = -seen % every  # the window's first frame whose overall index is a multiple of k
        times, f0 = np.concatenate([times, t[start::every]]), np.concatenate([f0, f[start::every]])
        seen += t.size
        while times.size > max_points:
            every *= 2
            times, f0 = times[::2], f0[::2]
    return times, f0
