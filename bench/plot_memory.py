"""Memory of the report's timeline plot for a 3-hour call: every frame drawn
against the lines binned as ``plot_timeline`` draws them now.

    python bench/plot_memory.py

Each way runs in a fresh process: arrays the size of a 180-minute call's
(540,000 energy frames of 20 ms, 500,000 voiced pitch frames; random values,
since only their number matters to matplotlib) are made first, one small plot
warms matplotlib up, then ``ru_maxrss`` is read before and after drawing and
saving the 800 px wide PNG. Prints the growth per way. A benchmark, not a
test: it asserts nothing.
"""

from __future__ import annotations

import io
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENERGY_FRAMES, PITCH_FRAMES = 540_000, 500_000


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(way: str) -> None:
    sys.path.insert(0, str(REPO))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from voiceman_pipeline.report_plot import (
        FRAME_S, MAX_ENERGY_POINTS, MAX_PITCH_POINTS, bin_step, binned_max,
    )

    rng = np.random.default_rng(0)
    rms = rng.random(ENERGY_FRAMES).astype(np.float32)
    times, f0 = np.sort(rng.random(PITCH_FRAMES) * 10_800), 100 + rng.random(PITCH_FRAMES) * 100
    fig, _ = plt.subplots(3, 1, figsize=(10, 5.5))
    fig.savefig(io.BytesIO(), format="png", dpi=80)
    plt.close(fig)
    before = peak_mb()
    fig, (ax_energy, ax_pitch, _) = plt.subplots(3, 1, figsize=(10, 5.5), sharex=True)
    if way == "every-frame":  # as the plot drew before
        ax_energy.plot(np.arange(rms.size) * FRAME_S, 20 * np.log10(rms + 1e-9), lw=0.7)
        ax_pitch.plot(times, f0, ".", ms=2)
    else:  # as plot_timeline draws now
        first, loudest = binned_max(rms, bin_step(rms.size, MAX_ENERGY_POINTS))
        ax_energy.plot(first * FRAME_S, 20 * np.log10(loudest + 1e-9), lw=0.7)
        every = 1  # the smallest power of 2 that leaves at most MAX_PITCH_POINTS
        while -(-times.size // every) > MAX_PITCH_POINTS:
            every *= 2
        ax_pitch.plot(times[::every], f0[::every], ".", ms=2)
    fig.tight_layout()
    fig.savefig(io.BytesIO(), format="png", dpi=80)
    plt.close(fig)
    print(f"{way}: +{peak_mb() - before:.1f} MB peak while drawing")


if __name__ == "__main__":
    if len(sys.argv) == 2:
        one(sys.argv[1])
    else:
        for way in ("every-frame", "binned"):
            subprocess.run([sys.executable, __file__, way], check=True)
