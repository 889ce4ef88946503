"""Peak memory and wall time of one whole `voiceman run` against the call's length.

    python bench/call_length.py [--minutes 1 10 60 180] [--json PATH] [--keep]

For each length, one call of at least that many minutes of real speech (the
data/samples recordings, 16 kHz mono PCM, concatenated round-robin and
written block by block to a 16-bit WAV in a temporary folder) is dropped
into a fresh data dir's inbox, with a fresh DAGSTER_HOME holding the shipped
dagster.yaml with its storage paths redirected there. Then the real command,
``voiceman run --settle 0`` (ingest + audio -> transcript -> forensic ->
emotion -> report -> summary, default engines: pocketsphinx, Praat,
descriptors-only SER), runs as a child process.

Measured per call:
- peak_rss_mb: the highest sum of RSS over the whole process tree (the
  command and any children), polled every 0.2 s with psutil (RSS counts
  memory-mapped file pages a process has touched, so a stage that maps the
  decoded signal and reads it all shows it);
- max_rss_mb: the largest single process's peak (getrusage(RUSAGE_CHILDREN)
  ru_maxrss, exact, not polled);
- wall_s: the command's wall time; ok: exit status 0 and report.json written.

Results go to bench/results/call-length-<UTC timestamp>.json. A benchmark, not a
test: it asserts nothing. The machine's other load changes wall times.

    python bench/call_length.py --stages [--minutes 1 180]

measures instead the stage work that scales with the signal, each step in a
fresh process on the same call (decoded once with ``decode_to_npy`` and read
memory-mapped, as the stages read it): intake's streamed decode, the old
in-memory decode for comparison, Praat's voice measures (forensic), the
arousal descriptors (emotion), the frame energies (the speech-frame levels
the SER engine keeps without segments, and the report plot's binned energy
line) and the report plot's pitch contour (``plot_pitch``, Praat pitch at the
default 75-500 Hz). Per step: ``ru_maxrss`` at the end minus ``ru_maxrss``
once its libraries were imported, and seconds.
Results go to bench/results/call-length-stages-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from common import fresh_home, wait_or_stop  # bench/common.py (this script's folder is on sys.path)

REPO = Path(__file__).resolve().parent.parent
SAMPLES = sorted((REPO / "data" / "samples").glob("*.wav"))
POLL_S = 0.2
MB = 2**20


def write_call(target: Path, minutes: float) -> float:
    """A WAV of at least ``minutes`` of the samples in a row, written a sample
    at a time (the bench itself holds one sample, not the call); its seconds."""
    import soundfile

    clips = [soundfile.read(str(p), dtype="int16") for p in SAMPLES]
    rate = clips[0][1]
    assert all(r == rate for _, r in clips), "samples must share one rate"
    written, i = 0, 0
    with soundfile.SoundFile(str(target), "w", rate, 1, subtype="PCM_16") as out:
        while written < minutes * 60 * rate:
            audio = clips[i % len(clips)][0]
            out.write(audio)
            written += len(audio)
            i += 1
    return written / rate


def fresh_instance(root: Path) -> tuple[Path, Path]:
    home, data = root / "home", root / "data"
    fresh_home(home)
    (data / "inbox").mkdir(parents=True)
    return home, data


def tree_rss(proc) -> int:
    """Bytes of RSS of ``proc`` and all its descendants (0 once it is gone)."""
    import psutil

    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_call(minutes: float, root: Path) -> dict:
    import psutil

    home, data = fresh_instance(root)
    call = data / "inbox" / f"call_{minutes:g}min.wav"
    seconds = write_call(call, minutes)
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "VOICEMAN_DATA_DIR": str(data),
    }
    voiceman = Path(sys.executable).with_name("voiceman")
    command = [str(voiceman), "run", "--settle", "0"]
    log = root / "run.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        proc = psutil.Process(child.pid)
        peak = 0
        done = threading.Event()

        def poll() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, tree_rss(proc))
                done.wait(POLL_S)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            rc = wait_or_stop(child)
        finally:
            done.set()
            poller.join()
    wall = time.perf_counter() - started
    report = data / "outputs" / call.name / "report.json"
    return {
        "minutes": minutes,
        "audio_s": round(seconds, 2),
        "wav_mb": round(call.stat().st_size / MB, 1),
        "peak_rss_mb": round(peak / MB, 1),
        "wall_s": round(wall, 1),
        "exit_status": rc,
        "ok": rc == 0 and report.is_file(),
        "log_tail": log.read_text()[-2000:] if rc != 0 else "",
    }


STEPS = ["decode_streamed", "decode_in_memory", "praat", "descriptors", "frame_energies",
         "plot_pitch"]


def stage_step(step: str, wav: str, npy: str) -> dict:
    """One step in this (fresh) process; its memory above the imports."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    from voiceman_pipeline.report_plot import MAX_ENERGY_POINTS, _pitch_contour, binned_frame_rms
    from voiceman_pipeline.audio_io import decode_audio, decode_to_npy
    from voiceman_pipeline.engines.forensic.acoustic import ParselmouthAnalyzer
    from voiceman_pipeline.engines.ser.descriptors import arousal_descriptors, frame_levels_dbfs
    from voiceman_pipeline.results import DecodedAudio, EngineInfo, Transcript
    import av  # noqa: F401  (FFmpeg and Praat loaded before the baseline)
    import parselmouth  # noqa: F401

    audio = DecodedAudio(np.load(npy, mmap_mode="r"))
    empty = Transcript(source_sha256="0" * 64, engine=EngineInfo("none", "none"), language="en",
                       duration_s=audio.duration_s, text="", segments=[], words=[], confidence=None)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    if step == "decode_streamed":
        with open(npy + ".again", "wb") as handle:
            decode_to_npy(wav, handle)
        os.unlink(npy + ".again")
    elif step == "decode_in_memory":
        decode_audio(wav)
    elif step == "praat":
        ParselmouthAnalyzer().measure(audio, empty)
    elif step == "descriptors":
        arousal_descriptors(audio, empty)
    elif step == "frame_energies":
        frame_levels_dbfs(audio.samples, audio.sample_rate)
        binned_frame_rms(audio, MAX_ENERGY_POINTS)
    elif step == "plot_pitch":
        _pitch_contour(audio, 75.0, 500.0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"step": step, "above_imports_mb": round((peak - base) / 1024, 1),
            "peak_mb": round(peak / 1024, 1), "s": round(time.perf_counter() - started, 1)}


def run_stages(minutes: float, root: Path) -> list[dict]:
    sys.path.insert(0, str(REPO))
    from voiceman_pipeline.audio_io import decode_to_npy

    wav, npy = root / "call.wav", root / "call.npy"
    seconds = write_call(wav, minutes)
    with open(npy, "wb") as handle:
        decode_to_npy(wav, handle)
    rows = []
    for step in STEPS:
        out = subprocess.run([sys.executable, __file__, "--step", step, str(wav), str(npy)],
                             check=True, capture_output=True, text=True).stdout
        row = {"minutes": minutes, "audio_s": round(seconds, 2), **json.loads(out)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 10, 60, 180])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders")
    parser.add_argument("--stages", action="store_true", help="per-stage memory, not `voiceman run`")
    parser.add_argument("--step", nargs=3, help=argparse.SUPPRESS)  # internal: one stage step
    args = parser.parse_args(argv)
    if args.step:
        print(json.dumps(stage_step(*args.step)))
        return 0
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    if args.stages:
        target = args.json or REPO / "bench" / "results" / f"call-length-stages-{stamp}.json"
        rows = []
        for minutes in args.minutes:
            root = Path(tempfile.mkdtemp(prefix=f"voiceman-stages-{minutes:g}min-"))
            try:
                rows += run_stages(minutes, root)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps({"bench": "call_length --stages", "started_utc": stamp,
                                          "steps": rows}, indent=2) + "\n")
        print(f"wrote {target}")
        return 0
    target = args.json or REPO / "bench" / "results" / f"call-length-{stamp}.json"
    results = {
        "bench": "call_length",
        "started_utc": stamp,
        "command": "voiceman run --settle 0",
        "samples": [p.name for p in SAMPLES],
        "cpus": os.cpu_count(),
        "calls": [],
    }
    for minutes in args.minutes:
        root = Path(tempfile.mkdtemp(prefix=f"voiceman-call-{minutes:g}min-"))
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        try:
            row = run_call(minutes, root)
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
        # ru_maxrss (KiB on Linux) of the largest child so far: exact for this
        # call only when it exceeds every earlier call's.
        after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        row["max_rss_mb"] = round(after / 1024, 1) if after > before else None
        results["calls"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "log_tail"}), flush=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(results, indent=2) + "\n")  # after each call
    first = results["calls"][0]["peak_rss_mb"]
    for row in results["calls"]:
        row["peak_vs_first"] = round(row["peak_rss_mb"] / first, 2) if first else None
    target.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
