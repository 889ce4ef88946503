"""Does a transcript's peak memory depend on the recordings decoded before it?

    python bench/transcript_order.py [--repeats 3]

The transcript stage's predicted peaks miss by more than the other stages'
(docs/memory.md, "How well the prediction matches"). This decodes the same calls
as bench/memory_prediction.py (the samples joined: 3, 18.45, 47.05 and
36.89 s, each one utterance of continuous speech) with the real
pocketsphinx engine in two orders, each pass with a freshly loaded decoder
as each run of the pipeline has, and measures each call's peak above its
baseline with the pipeline's own ``MemoryManager.track`` (``malloc_trim``,
then the kernel's peak counter). An 18.45 s call is decoded first after shorter calls only, then
after a 47.05 s one.

Figures go to bench/results/transcript-order-<UTC time>.json. A benchmark,
not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from common import write_figures  # bench/common.py
from memory_prediction import write_call  # the same calls (it also puts the checkout on sys.path)

# (name, first sample, seconds asked) as bench/memory_prediction.py's eval and learn sets make them.
CALLS = {"3s": (0, 3.0), "18s": (3, 15.0), "47s": (5, 45.0), "37s": (5, 35.0)}
ORDERS = [["3s", "18s", "47s", "18s", "37s", "18s"], ["3s", "47s", "18s", "37s", "18s"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from voiceman_pipeline.audio_io import decode_audio
    from voiceman_pipeline.engines.stt.pocketsphinx_engine import PocketsphinxTranscriber
    from voiceman_pipeline.resources.memory import MemoryManager

    memory = MemoryManager(watchdog_interval_s=10.0)  # the kernel's counter gives the peak
    with tempfile.TemporaryDirectory(prefix="vm-transcript-order-") as tmp:
        audio, seconds = {}, {}
        for name, (first, asked) in CALLS.items():
            path = Path(tmp) / f"{name}.wav"
            seconds[name] = round(write_call(path, first, asked), 2)
            audio[name] = decode_audio(path)[0]
        passes = []
        for repeat in range(args.repeats):
            for order in ORDERS:
                engine = PocketsphinxTranscriber()
                engine.load()
                rows = []
                for name in order:
                    grown = engine.grown_for_s()  # the longest utterance decoded since the load
                    with memory.track("transcript", seconds[name]) as measured:
                        engine.transcribe(audio[name], "0" * 64)
                    if measured.peak_source != "kernel":
                        raise SystemExit("needs the kernel's peak counter (Linux /proc/self/clear_refs)")
                    rows.append({"call": name, "seconds": seconds[name], "longest_before_s": round(grown, 2),
                                 "peak_mb": round(measured.peak_delta_mb, 1)})
                engine.unload()
                passes.append({"repeat": repeat, "order": order, "rows": rows})
                print(" ".join(f"{r['call']}:{r['peak_mb']}" for r in rows))
    result = {"bench": "transcript_order", "calls_s": seconds, "passes": passes,
              "cpus": os.cpu_count()}
    print(f"figures: {write_figures(result, 'transcript-order')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
