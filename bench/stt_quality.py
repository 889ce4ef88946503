"""Speech-to-text quality and speed per engine on recordings with reference texts.

    python bench/stt_quality.py [FOLDER] [--engine pocketsphinx]
                                [--engine faster-whisper:/path/to/model] ...

For every audio file in FOLDER (default data/samples) that has a reference
transcript NAME.txt beside it, each engine transcribes the file and the script
prints one row per file and engine:

- WER: word error rate against the reference, after lower-casing and removing
  punctuation on both sides (Whisper writes "Mr." and commas; the references
  have none), so it measures words, not formatting;
- RTF: real-time factor, processing seconds per second of audio, model load
  excluded (load time is reported once per engine).

Then per engine: corpus WER (all errors / all reference words, so long files
weigh more), mean RTF over files, total audio and load time.

A faster-whisper engine is given as ``faster-whisper:MODEL`` where MODEL is a
local directory, a size name or a hub id; ``--language``, ``--device`` and
``--no-vad`` apply to it. This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".m4a", ".ogg", ".opus", ".webm", ".aac"}


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def build(spec: str, language: str | None, device: str, vad_filter: bool):
    """An engine from 'pocketsphinx' or 'faster-whisper:MODEL'."""
    from voiceman_pipeline.engines.stt import build_transcriber

    name, _, model = spec.partition(":")
    if name == "pocketsphinx":
        if model:
            raise SystemExit("pocketsphinx takes no model: use --engine pocketsphinx")
        return build_transcriber("pocketsphinx")
    if name == "faster-whisper":
        if not model:
            raise SystemExit("give the model: --engine faster-whisper:/path/or/size")
        return build_transcriber(
            "faster-whisper", model=model, language=language, device=device, vad_filter=vad_filter
        )
    return build_transcriber(name)  # raises ValueError naming the valid engines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", default=str(REPO / "data" / "samples"))
    parser.add_argument(
        "--engine",
        action="append",
        help="'pocketsphinx' or 'faster-whisper:MODEL' (repeatable; default pocketsphinx)",
    )
    parser.add_argument(
        "--language", default=None, help="faster-whisper language (default: detect)"
    )
    parser.add_argument("--device", default="auto", help="faster-whisper device")
    parser.add_argument(
        "--no-vad", action="store_true", help="turn faster-whisper's VAD filter off (default on)"
    )
    args = parser.parse_args(argv)

    import jiwer

    from voiceman_pipeline.audio_io import decode_audio

    folder = Path(args.folder)
    files = sorted(
        p for p in folder.iterdir()
        if p.suffix.lower() in AUDIO_SUFFIXES and p.with_suffix(".txt").is_file()
    )
    if not files:
        print(f"no audio files with a NAME.txt reference in {folder}", file=sys.stderr)
        return 1
    specs = args.engine or ["pocketsphinx"]

    decoded = {}
    for path in files:
        audio, _ = decode_audio(path)
        decoded[path] = (audio, normalise(path.with_suffix(".txt").read_text(encoding="utf-8")))

    name_width = max(len(p.name) for p in files)
    engine_width = max(len(s) for s in specs)
    header = (
        f"{'file':<{name_width}}  {'engine':<{engine_width}}  "
        f"{'audio_s':>7}  {'WER':>6}  {'RTF':>6}  hypothesis"
    )
    print(header)
    print("-" * len(header))
    summary = []
    for spec in specs:
        engine = build(spec, args.language, args.device, not args.no_vad)
        started = time.perf_counter()
        engine.load()
        load_s = time.perf_counter() - started
        refs, hyps, rtfs, audio_total = [], [], [], 0.0
        for path, (audio, ref) in decoded.items():
            transcript = engine.transcribe(audio, source_sha256="bench")
            hyp = normalise(transcript.text)
            wer = jiwer.wer(ref, hyp)
            rtfs.append(transcript.timings.real_time_factor)
            refs.append(ref)
            hyps.append(hyp)
            audio_total += audio.duration_s
            print(
                f"{path.name:<{name_width}}  {spec:<{engine_width}}  {audio.duration_s:7.2f}  "
                f"{wer:6.3f}  {rtfs[-1]:6.3f}  {hyp[:60]}"
            )
        # jiwer.wer over lists pools all words: a corpus-level rate.
        summary.append((spec, jiwer.wer(refs, hyps), sum(rtfs) / len(rtfs), audio_total, load_s))
        engine.unload()

    print()
    print(
        f"{'engine':<{engine_width}}  {'files':>5}  {'audio_s':>7}  {'WER':>6}  "
        f"{'mean RTF':>8}  {'load_s':>6}"
    )
    for spec, wer, rtf, audio_total, load_s in summary:
        print(
            f"{spec:<{engine_width}}  {len(files):5d}  {audio_total:7.1f}  {wer:6.3f}  "
            f"{rtf:8.3f}  {load_s:6.2f}"
        )
    return 0


if __name__ == "__main__":
    from voiceman_pipeline.errors import VoicemanError

    try:
        sys.exit(main())
    except (VoicemanError, ValueError) as exc:  # a model or engine that cannot be used
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
