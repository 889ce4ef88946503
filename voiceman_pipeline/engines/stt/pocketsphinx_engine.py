"""Embedded speech-to-text: CMU PocketSphinx with the en-us model in its wheel.

No download and no GPU: this is the default engine that always runs. It is
English only and far less accurate than Whisper (word error rate ~0.31 on
``data/samples``), so its per-word confidences matter downstream.

How a recording is decoded:

1. PocketSphinx's own voice-activity endpointer finds speech regions. Each
   region is widened by ``vad_padding_s`` on both sides (the endpointer cuts
   word onsets; 0.3 s measured best on the samples), overlapping regions are
   merged, and a region longer than ``max_utterance_s`` is cut at its quietest
   10 ms frame, so memory and lattice size stay bounded on long calls.
2. Each region is decoded as one utterance (``full_utt=True``). The feature
   computation still carries running estimates from one utterance to the
   next, so they are reset at the start of each recording (``reinit_feat``):
   a file's transcript does not depend on which files the shared decoder saw
   before.
3. Within a region, a pause of at least ``segment_pause_s`` (a ``<sil>`` or
   noise filler, or a gap between words) starts a new segment.

Word confidence is the word's posterior probability in the decoder's word
lattice: ``Segment.prob`` from ``Decoder.seg()``, which the Python binding
already converts from PocketSphinx's integer log domain (base 1.0001) with
``logmath_exp``. Integer rounding can put it a hair above 1, so it is clipped
to [0, 1]. The lattice posterior needs the ``bestpath`` search (on by default;
forced on here). Segment and overall confidence are means of word confidences.
"""

from __future__ import annotations

import re
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from voiceman_pipeline.audio_io import read_span
from voiceman_pipeline.engines.base import Transcriber
from voiceman_pipeline.errors import InvalidAudioError, ModelUnavailableError
from voiceman_pipeline.results import (
    SAMPLE_RATE,
    DecodedAudio,
    EngineInfo,
    Segment,
    Timings,
    Transcript,
    Word,
)

ENGINE_NAME = "pocketsphinx"
LANGUAGE = "en"

MB = 1024 * 1024
# Host memory of a loaded Decoder per byte of its model files. Measured with
# pocketsphinx 5.1.1 on x86-64: the bundled en-us set (35.3 MiB of files:
# acoustic model 6.3, en-us.lm.bin 25.9, cmudict 3.1) grows RSS by 91 MiB on
# load, a factor of 2.6: the dictionary and language model are expanded into
# hash tables and tries, the acoustic model into score tables.
LOADED_BYTES_PER_FILE_BYTE = 2.6

# Decoder entries that are not words: sentence marks <s> </s>, silence <sil>,
# and noise fillers such as [NOISE], [SPEECH] (5.x) or ++NOISE++ (older models).
_FILLER = re.compile(r"^(<.*>|\[.*\]|\+\+.*\+\+)$")
# Alternative pronunciations are reported as "word(2)".
_VARIANT = re.compile(r"\(\d+\)$")


def _pocketsphinx_version() -> str:
    try:
        return metadata.version("pocketsphinx")
    except metadata.PackageNotFoundError:  # running from a source checkout
        return "unknown"


class PocketsphinxTranscriber(Transcriber):
    """PocketSphinx decoder, loaded once and reused for every file until unloaded.

    Args:
        hmm: acoustic model directory; None = the en-us model in the wheel.
        lm: n-gram language model file; None = the wheel's en-us.lm.bin.
        dictionary: pronunciation dictionary; None = the wheel's CMUdict.
        vad_padding_s: seconds of audio kept before and after each speech region.
        max_utterance_s: longest stretch decoded as one utterance.
        segment_pause_s: a pause at least this long inside an utterance starts
            a new segment.
    """

    def __init__(
        self,
        *,
        hmm: str | None = None,
        lm: str | None = None,
        dictionary: str | None = None,
        vad_padding_s: float = 0.3,
        max_utterance_s: float = 60.0,
        segment_pause_s: float = 0.5,
    ) -> None:
        if vad_padding_s < 0 or max_utterance_s < 5 or segment_pause_s <= 0:
            raise ModelUnavailableError(
                "pocketsphinx options out of range: need vad_padding_s >= 0, "
                f"max_utterance_s >= 5, segment_pause_s > 0 (got {vad_padding_s}, "
                f"{max_utterance_s}, {segment_pause_s})"
            )
        self.hmm = hmm
        self.lm = lm
        self.dictionary = dictionary
        self.vad_padding_s = float(vad_padding_s)
        self.max_utterance_s = float(max_utterance_s)
        self.segment_pause_s = float(segment_pause_s)
        self.load_count = 0  # how many times a Decoder was built (reuse check)
        self._decoder: Any = None
        self._grown_s = 0.0  # the longest utterance this decoder has decoded (grown_for_s)
        self._frame_rate = 100  # decoder frames per second; read from its config at load
        # A PocketSphinx Decoder is stateful and not thread-safe.
        self._lock = threading.RLock()

    # --- Engine ---------------------------------------------------------------

    def _model_paths(self) -> dict[str, str]:
        import pocketsphinx  # a small C extension; importing it loads no model

        return {
            "hmm": self.hmm or pocketsphinx.get_model_path("en-us/en-us"),
            "lm": self.lm or pocketsphinx.get_model_path("en-us/en-us.lm.bin"),
            "dict": self.dictionary or pocketsphinx.get_model_path("en-us/cmudict-en-us.dict"),
        }

    @property
    def info(self) -> EngineInfo:
        paths = self._model_paths()
        builtin = self.hmm is None and self.lm is None and self.dictionary is None
        return EngineInfo(
            name=ENGINE_NAME,
            model="builtin" if builtin else paths["hmm"],
            device="cpu",
            options={
                "pocketsphinx_version": _pocketsphinx_version(),
                "model_set": "en-us (bundled)" if builtin else "custom",
                **paths,
                "sample_rate": SAMPLE_RATE,
                "frame_rate": self._frame_rate,
                "bestpath": True,
                "vad_padding_s": self.vad_padding_s,
                "max_utterance_s": self.max_utterance_s,
                "segment_pause_s": self.segment_pause_s,
                "confidence": "lattice word posterior, clipped to [0, 1]",
            },
        )

    @property
    def loaded(self) -> bool:
        return self._decoder is not None

    def load(self) -> None:
        with self._lock:
            if self._decoder is not None:
                return
            import pocketsphinx

            paths = self._model_paths()
            for key, path in paths.items():
                if not Path(path).exists():
                    raise ModelUnavailableError(
                        f"PocketSphinx {key} model {path!r} does not exist. "
                        "Reinstall pocketsphinx, or point the option at an existing file."
                    )
            try:
                decoder = pocketsphinx.Decoder(
                    hmm=paths["hmm"],
                    lm=paths["lm"],
                    dict=paths["dict"],
                    samprate=SAMPLE_RATE,
                    bestpath=True,  # needed for lattice word posteriors
                    loglevel="FATAL",  # its INFO log is hundreds of lines per file
                )
            except (RuntimeError, ValueError) as exc:
                raise ModelUnavailableError(
                    f"PocketSphinx could not load its model ({paths}): {exc}"
                ) from exc
            self._frame_rate = int(decoder.config["frate"])
            self._decoder = decoder
            self.load_count += 1

    def expected_load_mb(self) -> tuple[float, float]:
        """(host MB, 0.0): an estimate of the loaded Decoder, from its files.

        The sizes of the acoustic model directory, language model and
        dictionary ``load()`` would use, times ``LOADED_BYTES_PER_FILE_BYTE``
        (measured, see there). PocketSphinx runs on the CPU only, so no GPU
        memory. Missing files count as 0 (``load()`` names them). Loads nothing.
        """
        total = sum(_size_on_disk(Path(path)) for path in self._model_paths().values())
        return total / MB * LOADED_BYTES_PER_FILE_BYTE, 0.0

    def grown_for_s(self) -> float:
        return self._grown_s

    def unload(self) -> None:
        with self._lock:
            # The Cython object frees the C decoder (about 91 MiB, above) when its last
            # reference goes.
            self._decoder = None
            self._grown_s = 0.0  # the next decoder starts from nothing

    # --- Transcriber ----------------------------------------------------------

    def transcribe(self, audio: DecodedAudio, source_sha256: str) -> Transcript:
        # The signal (usually memory-mapped) is read and converted to 16-bit
        # PCM one block or utterance at a time: memory stays at one utterance
        # (max_utterance_s) whatever the length of the call.
        samples = _check_signal(audio)
        pcm = _Pcm16(samples)
        with self._lock:
            started = time.perf_counter()
            load_s = 0.0
            if self._decoder is None:
                self.load()
                load_s = time.perf_counter() - started
            processing = time.perf_counter()
            # The feature computation carries its running estimates from one
            # utterance to the next, so a recording decoded
            # after another could come out different (seen: "cold are" alone,
            # "cold car" after the previous file). Reset per recording (~0.1 ms):
            # each decodes as with a fresh decoder, whatever came before.
            self._decoder.reinit_feat()
            duration = audio.duration_s
            segments: list[Segment] = []
            for start, end in self._utterances(pcm):
                entries = self._decode(pcm.read(start, end), offset_s=start / SAMPLE_RATE)
                # The decoder keeps what it grew for its longest utterance, and grows
                # again only for a longer one (measured: bench/transcript_order.py).
                self._grown_s = max(self._grown_s, (end - start) / SAMPLE_RATE)
                segments.extend(self._segments(entries, limit_s=min(end / SAMPLE_RATE, duration)))
            process_s = time.perf_counter() - processing

        words = [w for seg in segments for w in seg.words]
        return Transcript(
            source_sha256=source_sha256,
            engine=self.info,
            language=LANGUAGE,
            duration_s=duration,
            text=" ".join(seg.text for seg in segments),
            segments=segments,
            words=words,
            confidence=_mean_confidence(words),
            timings=Timings(load_s=load_s, process_s=process_s, audio_s=duration),
        )

    # --- internals ------------------------------------------------------------

    def _utterances(self, pcm: "_Pcm16") -> list[tuple[int, int]]:
        """Sample ranges [start, end) to decode, one utterance each."""
        regions = _speech_regions(pcm)
        pad = int(round(self.vad_padding_s * SAMPLE_RATE))
        merged: list[list[int]] = []
        for start, end in regions:
            start, end = max(0, start - pad), min(len(pcm), end + pad)
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        limit = int(self.max_utterance_s * SAMPLE_RATE)
        out: list[tuple[int, int]] = []
        for start, end in merged:
            while end - start > limit:
                cut = _quietest_point(pcm, start + limit // 2, start + limit)
                out.append((start, cut))
                start = cut
            out.append((start, end))
        return out

    def _decode(self, pcm: np.ndarray, offset_s: float) -> list[tuple[str, float, float, float]]:
        """Decode one utterance: (decoder word, start s, end s, posterior) entries."""
        decoder = self._decoder
        decoder.start_utt()
        decoder.process_raw(pcm.tobytes(), full_utt=True)
        decoder.end_utt()
        if decoder.hyp() is None:  # nothing recognised in this stretch
            return []
        rate = float(self._frame_rate)
        return [
            (
                seg.word,
                offset_s + seg.start_frame / rate,
                offset_s + (seg.end_frame + 1) / rate,  # end_frame is inclusive
                seg.prob,
            )
            for seg in decoder.seg()
        ]

    def _segments(
        self, entries: list[tuple[str, float, float, float]], limit_s: float
    ) -> list[Segment]:
        """Words of one utterance grouped into segments at pauses."""
        groups: list[list[Word]] = [[]]
        last_end: float | None = None
        for token, start, end, prob in entries:
            start, end = min(start, limit_s), min(end, limit_s)
            if _FILLER.match(token):
                if end - start >= self.segment_pause_s and groups[-1]:
                    groups.append([])
                continue
            if last_end is not None and start - last_end >= self.segment_pause_s and groups[-1]:
                groups.append([])
            groups[-1].append(
                Word(
                    text=_VARIANT.sub("", token),
                    start=start,
                    end=end,
                    confidence=float(min(1.0, max(0.0, prob))),
                )
            )
            last_end = end
        return [
            Segment(
                text=" ".join(w.text for w in group),
                start=group[0].start,
                end=group[-1].end,
                words=group,
                confidence=_mean_confidence(group),
            )
            for group in groups
            if group
        ]


def _size_on_disk(path: Path) -> int:
    """Bytes of a file, or of all files under a directory; 0 if it does not exist."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size if path.is_file() else 0


# Samples converted to PCM at a time while looking for speech regions (60 s,
# a whole number of endpointer frames).
BLOCK_SAMPLES = 60 * SAMPLE_RATE


def _check_signal(audio: DecodedAudio) -> np.ndarray:
    if audio.sample_rate != SAMPLE_RATE:
        raise InvalidAudioError(
            f"pocketsphinx needs {SAMPLE_RATE} Hz audio, got {audio.sample_rate} Hz"
        )
    samples = audio.samples
    if np.ndim(samples) != 1 or np.size(samples) == 0:
        raise InvalidAudioError(
            f"expected a non-empty mono signal, got an array of shape {np.shape(samples)}"
        )
    return samples


class _Pcm16:
    """The float signal read as the 16-bit PCM PocketSphinx reads, a span at a
    time (``audio_io.read_span``: pages of a memory-mapped signal are handed
    back after each span)."""

    def __init__(self, samples: np.ndarray):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, start: int, stop: int) -> np.ndarray:
        return _to_pcm16(read_span(self.samples, start, stop))


def _to_pcm16(samples: np.ndarray) -> np.ndarray:
    """16 kHz float samples in [-1, 1] -> the 16-bit PCM PocketSphinx reads."""
    if not np.all(np.isfinite(samples)):
        raise InvalidAudioError("the decoded audio contains NaN or infinite samples")
    # x * 32768 inverts the usual int16 -> float scaling (soundfile, PyAV).
    return np.clip(np.round(samples * 32768.0), -32768, 32767).astype(np.int16)


def _speech_regions(pcm: _Pcm16) -> list[tuple[int, int]]:
    """Speech regions [start, end) in samples, found by PocketSphinx's endpointer."""
    from pocketsphinx import Endpointer

    endpointer = Endpointer(sample_rate=SAMPLE_RATE)
    frame = endpointer.frame_bytes // 2  # samples per frame
    regions: list[tuple[int, int]] = []

    def close() -> None:
        regions.append(
            (
                int(round(endpointer.speech_start * SAMPLE_RATE)),
                int(round(endpointer.speech_end * SAMPLE_RATE)),
            )
        )

    n = len(pcm)
    full = n - n % frame
    block = max(frame, BLOCK_SAMPLES // frame * frame)
    for lo in range(0, full, block):
        chunk = pcm.read(lo, min(lo + block, full))
        for i in range(0, len(chunk), frame):
            speech = endpointer.process(chunk[i : i + frame].tobytes())
            if speech is not None and not endpointer.in_speech:
                close()  # the endpointer returned the last frame of a region
    if endpointer.in_speech:
        # Speech runs to the end of the file: flush what the endpointer holds.
        # end_stream rejects an empty buffer, so a file that ends on a frame
        # boundary gets one silent sample (its end is clipped below).
        tail = pcm.read(full, n) if n > full else np.zeros(1, dtype=np.int16)
        endpointer.end_stream(tail.tobytes())
        close()
    elif n > full:
        pcm.read(full, n)  # the tail is still checked for NaN/infinity
    return [(max(0, s), min(n, e)) for s, e in regions if e > s]


def _quietest_point(pcm: _Pcm16, lo: int, hi: int) -> int:
    """Sample index at the centre of the lowest-energy 10 ms frame in [lo, hi)."""
    hop = SAMPLE_RATE // 100
    n = (hi - lo) // hop
    frames = pcm.read(lo, lo + n * hop).astype(np.float32).reshape(n, hop)
    return lo + int(np.argmin(np.sum(frames * frames, axis=1))) * hop + hop // 2


def _mean_confidence(words: list[Word]) -> float | None:
    values = [w.confidence for w in words if w.confidence is not None]
    return float(np.mean(values)) if values else None
