"""Decoding recordings with PyAV (FFmpeg bundled in the wheel).

Every format FFmpeg reads (wav, flac, mp3, m4a/aac, ogg/opus, webm, ...) is
decoded once, at intake, to 16 kHz mono float32: the one signal every engine
receives. Anything that is not decodable audio raises ``InvalidAudioError``
with a message that says what is wrong with the file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from voiceman_pipeline.errors import InvalidAudioError
from voiceman_pipeline.results import SAMPLE_RATE, DecodedAudio

HASH_CHUNK_BYTES = 1 << 20
TRUNCATION_TOLERANCE = 0.98  # decoded/declared length below this = cut off


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
        InvalidAudioError: empty, not audio, no audio stream, truncated so
            that nothing decodes, zero samples, or too long.
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
            if total == 0:
                raise InvalidAudioError(
                    f"{path.name}: the audio data cannot be decoded "
                    f"({_ffmpeg_reason(exc)}); the file is corrupt or truncated."
                ) from exc
            # Decoded audio followed by garbage: a truncated tail. Keep what
            # decoded; the intake metadata records the duration actually read.
    if total == 0:
        raise InvalidAudioError(
            f"{path.name}: the file decodes to zero audio samples "
            f"(codec {info.codec!r}); it is empty or truncated."
        )
    decoded_s = total / SAMPLE_RATE
    declared_s = _declared_wav_seconds(path) if info.container == "wav" else None
    if declared_s and decoded_s < declared_s * TRUNCATION_TOLERANCE:
        raise InvalidAudioError(
            f"{path.name}: truncated: the WAV header declares {declared_s:.2f} s "
            f"of audio but only {decoded_s:.2f} s are in the file."
        )
    samples = np.concatenate(chunks).astype(np.float32, copy=False)
    if not np.isfinite(samples).all():
        raise InvalidAudioError(f"{path.name}: decoded samples contain NaN or infinity.")
    return DecodedAudio(samples=samples, sample_rate=SAMPLE_RATE), info


def _declared_wav_seconds(path: Path) -> float | None:
    """Length a PCM WAV header declares. FFmpeg infers WAV length from the file
    size, so a cut-off file looks complete to it; the header still knows."""
    import wave

    try:
        with wave.open(str(path), "rb") as wav:
            return wav.getnframes() / wav.getframerate()
    except (wave.Error, EOFError, ZeroDivisionError):
        return None  # not plain PCM (e.g. float or extensible WAV): no claim


def _append(chunks: list[np.ndarray], frame) -> int:
    data = frame.to_ndarray().reshape(-1)
    if data.size:
        chunks.append(data)
    return int(data.size)


def _ffmpeg_reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc)
