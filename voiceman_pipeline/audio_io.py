"""Decoding recordings with PyAV (FFmpeg bundled in the wheel).

Every format FFmpeg reads (wav, flac, mp3, m4a/aac, ogg/opus, webm, ...) is
decoded once, at intake, to 16 kHz mono float32: the one signal every engine
receives. Anything that is not decodable audio raises ``InvalidAudioError``
with a message that says what is wrong with the file.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from voiceman_pipeline.errors import InvalidAudioError
from voiceman_pipeline.results import SAMPLE_RATE, DecodedAudio

HASH_CHUNK_BYTES = 1 << 20
# Declared minus decoded length beyond which a recording counts as cut off. Legit
# gaps are under one codec frame (Opus pre-skip, a last block the decoder trims).
TRUNCATION_SLACK_S = 0.25


@dataclass(frozen=True)
class SourceInfo:
    """What the original file was, before resampling."""

    container: str
    codec: str
    sample_rate: int
    channels: int


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def decode_audio(path: Path, max_seconds: float | None = None) -> tuple[DecodedAudio, SourceInfo]:
    """Decode the first audio stream of ``path`` to 16 kHz mono float32.

    Args:
        path: the recording.
        max_seconds: refuse recordings longer than this (None: no limit), so a
            huge file fails alone instead of exhausting memory.

    Raises:
        InvalidAudioError: empty, not audio, no audio stream, zero samples,
            too long, or corrupt/truncated: a decode error mid-stream, fewer
            seconds than the file declares (WAV, FLAC, MP3 with a Xing/Info/VBRI
            header, MP4/m4a, finalised Matroska/WebM), or an Ogg stream without
            its end-of-stream page. A cut on a frame boundary of a file that
            declares no length (headerless MP3, ADTS AAC, live WebM) is
            indistinguishable from a short recording and passes.
    """
    import av  # heavy: FFmpeg libraries

    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise InvalidAudioError(f"{path.name}: the file is empty (0 bytes).")
    try:
        container = av.open(str(path), mode="r", metadata_errors="ignore")
    except av.error.FFmpegError as exc:
        raise InvalidAudioError(
            f"{path.name}: not a readable audio file ({_ffmpeg_reason(exc)}). "
            f"Check that it is a recording and not a truncated or renamed file."
        ) from exc
    with container:
        if not container.streams.audio:
            raise InvalidAudioError(
                f"{path.name}: the file holds no audio stream "
                f"(container {container.format.name!r})."
            )
        stream = container.streams.audio[0]
        info = SourceInfo(
            container=container.format.name,
            codec=stream.codec_context.name,
            sample_rate=int(stream.codec_context.sample_rate or 0),
            channels=int(stream.codec_context.channels or 0),
        )
        # The resampler also downmixes: FFmpeg's own filter, not hand-written DSP.
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        chunks: list[np.ndarray] = []
        total = 0
        limit = None if max_seconds is None else int(max_seconds * SAMPLE_RATE)
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    total += _append(chunks, out)
                if limit is not None and total > limit:
                    raise InvalidAudioError(
                        f"{path.name}: longer than the configured limit of "
                        f"{max_seconds:.0f} s; raise max_audio_seconds to process it."
                    )
            for out in resampler.resample(None):  # flush the resampler's tail
                total += _append(chunks, out)
        except av.error.FFmpegError as exc:
            # FFmpeg raises mid-stream when a packet is cut off or damaged. For
            # evidence, the audio before that point is not the recording.
            stopped = total / SAMPLE_RATE
            where = f"decoding stopped at {stopped:.2f} s" if total else "nothing decodes"
            raise InvalidAudioError(
                f"{path.name}: the file is corrupt or truncated: {where} ({_ffmpeg_reason(exc)})."
            ) from exc
        declared = _declared_length(path, container, stream)
    if total == 0:
        raise InvalidAudioError(
            f"{path.name}: the file decodes to zero audio samples "
            f"(codec {info.codec!r}); it is empty or truncated."
        )
    decoded_s = total / SAMPLE_RATE
    if info.container == "ogg" and _ogg_ends_unfinished(path):
        raise InvalidAudioError(
            f"{path.name}: truncated: the Ogg stream stops without its end-of-stream page "
            f"after {decoded_s:.2f} s of audio (no length is declared up front)."
        )
    if declared and decoded_s < declared[1] - TRUNCATION_SLACK_S:
        raise InvalidAudioError(
            f"{path.name}: truncated: {declared[0]} declares {declared[1]:.2f} s "
            f"of audio but only {decoded_s:.2f} s decode."
        )
    samples = np.concatenate(chunks).astype(np.float32, copy=False)
    if not np.isfinite(samples).all():
        raise InvalidAudioError(f"{path.name}: decoded samples contain NaN or infinity.")
    return DecodedAudio(samples=samples, sample_rate=SAMPLE_RATE), info


def _declared_length(path: Path, container, stream) -> tuple[str, float] | None:
    """(where, seconds) for a length the file states exactly, else None.

    FFmpeg fills ``duration`` for any file, estimating it from bitrate and file
    size when nothing is stated; such an estimate shrinks with the cut and would
    misfire on VBR audio, so it is only trusted where the format states it."""
    fmt = container.format.name
    if fmt == "wav":
        seconds = _declared_wav_seconds(path)
        return ("the WAV header", seconds) if seconds else None
    if fmt == "flac":  # STREAMINFO total samples (FFmpeg leaves None when 0 = unknown)
        where = "the FLAC STREAMINFO"
    elif fmt.startswith("mov,"):  # moov sample tables (fragmented: the fragments read)
        where = "the MP4 track header"
    elif fmt == "mp3" and _mp3_states_frame_count(path):
        where = "the MP3 Xing/Info/VBRI header"
    elif fmt == "matroska,webm" and len(container.streams) == 1 and container.duration:
        # Segment Duration, written on finalising; live/MediaRecorder files lack
        # it (duration None). Audio-only: with video it is the longest track.
        # It runs from 0, the audio from its first block (codec delay).
        start = max(container.start_time or 0, 0)
        return "the Matroska segment header", (container.duration - start) / 1_000_000
    else:
        return None
    if stream.duration is None or stream.time_base is None:
        return None
    return where, float(stream.duration * stream.time_base)


def _declared_wav_seconds(path: Path) -> float | None:
    """Length a PCM WAV header declares. FFmpeg infers WAV length from the file
    size, so a cut-off file looks complete to it; the header still knows."""
    import wave

    try:
        with wave.open(str(path), "rb") as wav:
            if wav.getnframes() == 0xFFFFFFFF // (wav.getsampwidth() * wav.getnchannels()):
                return None  # size placeholder of a WAV written to a pipe: no claim
            return wav.getnframes() / wav.getframerate()
    except (wave.Error, EOFError, ZeroDivisionError):
        return None  # not plain PCM (e.g. float or extensible WAV): no claim


def _mp3_states_frame_count(path: Path) -> bool:
    """Whether the first MPEG audio frame is a Xing/Info (LAME) or VBRI header
    with a frame count: only then is FFmpeg's MP3 duration exact."""
    with open(path, "rb") as handle:
        head = handle.read(10)
        if head[:3] == b"ID3":  # skip an ID3v2 tag: synchsafe size, optional footer
            size = sum((byte & 0x7F) << (21 - 7 * i) for i, byte in enumerate(head[6:10]))
            handle.seek(10 + size + (10 if head[5] & 0x10 else 0))
        else:
            handle.seek(0)
        data = handle.read(16_384)
    sync = re.search(rb"\xff[\xe0-\xff]", data)
    if sync is None:
        return False
    frame = data[sync.start() : sync.start() + 64]
    if frame[36:40] == b"VBRI":
        return True
    # The tag follows the side info: 9, 17 or 32 bytes (MPEG-2 mono, MPEG-1 mono
    # or MPEG-2 stereo, MPEG-1 stereo) after the 4-byte frame header.
    for offset in (13, 21, 36):
        if frame[offset : offset + 4] in (b"Xing", b"Info"):
            return bool(frame[offset + 7] & 1)  # flags: bit 0 = frame count present
    return False


def _ogg_ends_unfinished(path: Path) -> bool:
    """Whether an Ogg file is cut off. Ogg declares no length up front (FFmpeg
    reads its duration from the last page present), but every logical stream
    must end with a page flagged end-of-stream. Walk the page headers: a page
    cut short, or a stream with no end-of-stream page, means the tail is gone.
    Bytes after the last complete page that are not a page are ignored."""
    size = path.stat().st_size
    unended: set[bytes] = set()
    position = 0
    with open(path, "rb") as handle:
        while True:
            handle.seek(position)
            header = handle.read(27)
            if len(header) < 27 or header[:4] != b"OggS":
                break
            lacing = handle.read(header[26])
            position += 27 + header[26] + sum(lacing)
            if len(lacing) < header[26] or position > size:
                return True  # the last page is cut short
            serial = header[14:18]
            if header[5] & 0x04:  # end-of-stream flag
                unended.discard(serial)
            else:
                unended.add(serial)
    return bool(unended)


def _append(chunks: list[np.ndarray], frame) -> int:
    data = frame.to_ndarray().reshape(-1)
    if data.size:
        chunks.append(data)
    return int(data.size)


def _ffmpeg_reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc)
