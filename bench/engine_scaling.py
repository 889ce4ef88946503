"""How the engines alone scale from 1 to 2 processes: the ceiling for the pipeline's throughput.

    python bench/engine_scaling.py [--repeat 2]

A hand-written loop, no Dagster: one call (the samples concatenated four
times, about 74 s) is decoded (``decode_audio``), transcribed (pocketsphinx,
loaded once) and measured (Praat) ``--repeat`` times, first in one process,
then in two processes at once. Reported: each process's seconds and the
throughput ratio 2 processes / 1 process (2.0 = perfect). A pure-Python busy
loop is timed the same way as the machine's own ceiling. Compare with
``bench/throughput.py``, the pipeline's ratio on the same machine.

A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ENGINES = """
import sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from voiceman_pipeline.audio_io import decode_audio
from voiceman_pipeline.engines.forensic.acoustic import ParselmouthAnalyzer
from voiceman_pipeline.engines.stt.pocketsphinx_engine import PocketsphinxTranscriber
stt = PocketsphinxTranscriber(); stt.load(); praat = ParselmouthAnalyzer()
started = time.perf_counter()
for _ in range({repeat}):
    audio, _ = decode_audio(Path({call!r}))
    praat.measure(audio, stt.transcribe(audio, "bench"))
print(time.perf_counter() - started)
"""
SPIN = """
import time
started = time.perf_counter(); x = 0
for i in range(40_000_000):
    x += i * i
print(time.perf_counter() - started)
"""


def timed(code: str, processes: int) -> list[float]:
    """Seconds each of ``processes`` copies of ``code`` took, all started at once."""
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
             for _ in range(processes)]
    return [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2, help="times each process analyses the call")
    args = parser.parse_args()
    import numpy as np
    import soundfile

    samples = sorted((REPO / "data" / "samples").glob("*.wav"))
    parts = [soundfile.read(str(path), dtype="int16")[0] for path in samples] * 4
    with tempfile.TemporaryDirectory() as tmp:
        call = Path(tmp) / "call.wav"
        soundfile.write(str(call), np.concatenate(parts), 16000, subtype="PCM_16")
        seconds = sum(len(p) for p in parts) / 16000
        print(f"call: {seconds:.1f} s of audio, analysed {args.repeat} times per process")
        for name, code in (("python busy loop", SPIN),
                           ("engines (decode, pocketsphinx, Praat)",
                            ENGINES.format(repo=str(REPO), repeat=args.repeat, call=str(call)))):
            one = timed(code, 1)[0]
            two = timed(code, 2)
            ratio = 2 * one / max(two)
            print(f"{name}: 1 process {one:.2f} s; 2 at once {two[0]:.2f} / {two[1]:.2f} s; "
                  f"throughput ratio {ratio:.2f}x")


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"({time.perf_counter() - started:.0f} s)")
