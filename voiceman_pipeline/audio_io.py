"""Decoding recordings with PyAV (FFmpeg bundled in the wheel).

Every format FFmpeg reads (wav, flac, mp3, m4a/aac, ogg/opus, webm, ...) is
decoded once, at intake, to 16 kHz mono float32: the one signal every engine
receives. Anything that is not decodable audio raises ``InvalidAudioError``
with a message that says what is wrong with the file.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import mmap
import os
import re
import stat
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from voiceman_pipeline.errors import InvalidAudioError, UnsafePathError
from voiceman_pipeline.results import SAMPLE_RATE, DecodedAudio

HASH_CHUNK_BYTES = 1 << 20
# The longest recording taken in unless configured otherwise (RecordingStore's
# max_audio_seconds): decoded at 16 kHz, ~1.4 GB of float32 on disk.
DEFAULT_MAX_AUDIO_SECONDS = 6 * 3600.0
# How far the decoded length may differ from the length a file declares before
# it counts as cut off (shorter) or as a header contradicting its audio (longer).
# Legit gaps are under one codec frame (Opus pre-skip, AAC priming, a last block
# the decoder trims): 6 ms at most on the test files.
LENGTH_SLACK_S = 0.25
# Uncompressed PCM has no codec frames: its stated length is exact to a sample, and a
# WAV cut from 1.10 s to 0.94 s passed under the slack above.
PCM_LENGTH_SLACK_S = 0.01
# Decode buffer: its first size when the file states no length, and the most
# reserved up front from a stated length when there is no max_seconds.
INITIAL_BUFFER_SAMPLES = 60 * SAMPLE_RATE
MAX_PREALLOCATED_SAMPLES = 3600 * SAMPLE_RATE
# Sample rates recorders write: 8 kHz telephony up to 768 kHz studio. A header outside
# is damaged or forged (one saying 1 Hz made a 35 KB file into a 4.9-hour call).
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 4_000, 768_000
# np.save pads the header of a 1-D float32 array to 128 bytes; ours is the same.
NPY_HEADER_BYTES = 128


@dataclass(frozen=True)
class SourceInfo:
    """What the original file was, before resampling."""

    container: str
    codec: str
    sample_rate: int
    channels: int


def sha256_file(path: Path) -> str:
    """SHA-256 of a regular file's bytes, read in 1 MiB chunks (constant memory).

    Raises:
        UnsafePathError: ``path`` is a symbolic link (not followed, so a file
            swapped for a link after it was checked is not read) or not a
            regular file (a named pipe would block the reader forever).
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno != errno.ELOOP:  # ELOOP: the last component is a link
            raise
        raise UnsafePathError(f"{Path(path).name}: refused: it is a symbolic link.") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePathError(f"{Path(path).name}: refused: it is not a regular file.")
    with open(fd, "rb") as handle:
        digest = hashlib.sha256()
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def decode_audio(path: Path, max_seconds: float | None = None) -> tuple[DecodedAudio, SourceInfo]:
    """Decode the first audio stream of ``path`` to 16 kHz mono float32, in memory.

    For short files and tools; intake streams to disk instead (``decode_to_npy``),
    which runs the same decode and the same checks below.

    The header is read before any audio. A length the file states exactly (WAV
    header, FLAC STREAMINFO, MP4 track header, MP3 Xing/Info/VBRI, finalised
    Matroska) over ``max_seconds`` is refused without decoding: a 1 MB FLAC of
    6 h of silence would otherwise decode to 1.4 GB first. FFmpeg's estimate
    from bit rate and file size is not used to refuse (it is far off for VBR
    audio). What states no length (raw ADTS, headerless MP3, live WebM, Ogg) is
    decoded into one buffer that never grows past the limit, and decoding stops
    as soon as the limit is passed.

    A header that contradicts the audio is refused, not corrected: when a file
    disagrees with itself its true timing is unknown, and timings are evidence.
    Refused are a PCM WAV whose format fields disagree (say 44.1 kHz stereo,
    with the byte rate and frame size of 16 kHz mono: FFmpeg would play it at
    the claimed rate, with a wrong duration), a decoded length that differs
    from the stated one by more than ``LENGTH_SLACK_S`` either way, and a
    stream whose sample rate, channels or sample format change mid-way (a
    splice). A header rewritten consistently in every field cannot be told
    from the bytes and is not detected.

    Args:
        path: the recording.
        max_seconds: refuse recordings longer than this (None: no limit), so a
            huge file fails alone instead of exhausting memory.

    Raises:
        InvalidAudioError: empty, not audio, no audio stream, zero samples,
            too long, a contradicting header, or corrupt/truncated: a decode
            error mid-stream, fewer seconds than the file declares, or an Ogg
            stream without its end-of-stream page. A cut on a frame boundary of
            a file that declares no length (headerless MP3, ADTS AAC, live WebM)
            is indistinguishable from a short recording and passes.
    """
    sink = _SampleBuffer(path, max_seconds)
    info = _decode(Path(path), max_seconds, sink)
    return DecodedAudio(samples=sink.take(), sample_rate=SAMPLE_RATE), info


def decode_to_npy(path: Path, handle, max_seconds: float | None = None) -> tuple[int, SourceInfo]:
    """Decode like ``decode_audio``, streaming the signal into ``handle`` as a
    .npy file (float32, shape (n,)) instead of holding it: memory stays at one
    codec frame whatever the length. Returns (samples written, source info).

    ``handle``: a binary file open for writing at position 0 (a temporary file
    the caller renames into place once every check passed; on an error its
    contents are garbage and it must be discarded). The .npy header is written
    last, once the length is known; the file is byte-identical to ``np.save``'s.
    Raises what ``decode_audio`` raises, with the same messages.
    """
    sink = _FileSink(handle, path)
    handle.write(b"\0" * NPY_HEADER_BYTES)  # the header's place; filled in at the end
    info = _decode(Path(path), max_seconds, sink)
    handle.seek(0)
    handle.write(npy_header(sink.size))
    handle.seek(0, os.SEEK_END)
    return sink.size, info


def check_decodes(path: Path, max_seconds: float | None = None) -> tuple[float, SourceInfo]:
    """Decode ``path`` with every check of ``decode_audio``, keeping no sample
    (for a dry run such as ``voiceman validate``); (seconds, source info)."""
    sink = _CountingSink(path)
    info = _decode(Path(path), max_seconds, sink)
    return sink.size / SAMPLE_RATE, info


def _decode(path: Path, max_seconds: float | None, samples) -> SourceInfo:
    """Decode ``path`` into ``samples`` (a sink with ``append(frame)`` and
    ``size``), running every check ``decode_audio`` documents."""
    import av  # heavy: FFmpeg libraries

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
        _check_rate(path, info.sample_rate)
        if info.container == "wav" and (contradiction := _wav_format_contradiction(path)):
            raise InvalidAudioError(
                f"{path.name}: the WAV header contradicts itself: {contradiction}."
            )
        declared = _declared_length(path, container, stream)
        if max_seconds is not None and declared and declared[1] > max_seconds:
            raise InvalidAudioError(
                f"{path.name}: longer than the configured limit of {max_seconds:.0f} s: "
                f"{declared[0]} declares {declared[1]:.0f} s (it would decode to "
                f"{declared[1] * SAMPLE_RATE * 4 / 2**20:.0f} MiB); refused without decoding. "
                f"Raise max_audio_seconds to process it."
            )
        limit = None if max_seconds is None else int(max_seconds * SAMPLE_RATE)
        samples.reserve(int(declared[1] * SAMPLE_RATE) + SAMPLE_RATE if declared else 0)
        # The resampler also downmixes: FFmpeg's own filter, not hand-written DSP.
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        first_shape, by_mean, taken = None, False, 0  # taken: samples decoded, before resampling
        try:
            for frame in container.decode(stream):
                taken += frame.samples
                shape = (frame.sample_rate, frame.layout.nb_channels, frame.format.name)
                if first_shape is None:
                    first_shape = shape
                    _check_rate(path, frame.sample_rate)
                    # FFmpeg has no downmix for channel counts without a standard layout
                    # (9, 32, ...): their channels are averaged instead.
                    by_mean = not _resampler_downmixes(frame)
                if shape != first_shape:
                    raise InvalidAudioError(
                        f"{path.name}: the audio changes from {_describe(first_shape)} to "
                        f"{_describe(shape)} at {samples.size / SAMPLE_RATE:.2f} s; "
                        f"a spliced or damaged file."
                    )
                for out in resampler.resample(_channel_mean(frame) if by_mean else frame):
                    samples.append(out)
                if limit is not None and samples.size > limit:
                    raise InvalidAudioError(
                        f"{path.name}: longer than the configured limit of {max_seconds:.0f} s "
                        f"(the file states no length; decoding stopped at the limit). "
                        f"Raise max_audio_seconds to process it."
                    )
            for out in resampler.resample(None):  # flush the resampler's tail
                samples.append(out)
        except av.error.FFmpegError as exc:
            # FFmpeg raises mid-stream when a packet is cut off or damaged. For
            # evidence, the audio before that point is not the recording.
            stopped = samples.size / SAMPLE_RATE
            where = f"decoding stopped at {stopped:.2f} s" if samples.size else "nothing decodes"
            raise InvalidAudioError(
                f"{path.name}: the file is corrupt or truncated: {where} ({_ffmpeg_reason(exc)})."
            ) from exc
    if samples.size == 0 and taken:  # FFmpeg's resampler gives nothing for the first ~17 samples
        raise InvalidAudioError(
            f"{path.name}: the file holds only {taken} audio sample(s) ({1000 * taken / first_shape[0]:.1f} ms"
            f" at {first_shape[0]} Hz): too short to analyse."
        )
    if samples.size == 0:
        raise InvalidAudioError(
            f"{path.name}: the file decodes to zero audio samples "
            f"(codec {info.codec!r}); it is empty or truncated."
        )
    decoded_s = samples.size / SAMPLE_RATE
    if info.container == "ogg" and _ogg_ends_unfinished(path):
        raise InvalidAudioError(
            f"{path.name}: truncated: the Ogg stream stops without its end-of-stream page "
            f"after {decoded_s:.2f} s of audio (no length is declared up front)."
        )
    slack = PCM_LENGTH_SLACK_S if info.codec.startswith("pcm_") else LENGTH_SLACK_S
    if declared and decoded_s < declared[1] - slack:
        raise InvalidAudioError(
            f"{path.name}: truncated: {declared[0]} declares {declared[1]:.2f} s "
            f"of audio but only {decoded_s:.2f} s decode."
        )
    if declared and decoded_s > declared[1] + slack:
        raise InvalidAudioError(
            f"{path.name}: the header contradicts the audio: {declared[0]} declares "
            f"{declared[1]:.2f} s but {decoded_s:.2f} s decode; the file is damaged or altered."
        )
    return info


class _SampleBuffer:
    """The decoded signal, in one float32 array that grows in place.

    Joining a list of chunks at the end needs twice the signal's memory; this
    array grows with realloc (large blocks are remapped, not copied), is
    trimmed at the end, and never grows past the limit (``max_seconds``) plus
    the chunk that crosses it."""

    def __init__(self, path: Path, max_seconds: float | None):
        self.path = Path(path)
        self.limit = None if max_seconds is None else int(max_seconds * SAMPLE_RATE)
        self.size = 0
        self.array = np.empty(0, np.float32)

    def reserve(self, expected: int) -> None:
        """Size the array from the samples the header announces (0: unknown)."""
        capacity = expected or INITIAL_BUFFER_SAMPLES
        # With no limit a header's claim is all that bounds the reservation.
        limit = self.limit
        capacity = min(capacity, MAX_PREALLOCATED_SAMPLES if limit is None else limit + 1)
        self.array = np.empty(capacity, np.float32)  # untouched pages cost nothing yet

    def append(self, frame) -> None:
        data = _frame_samples(frame, self.path)
        end = self.size + data.size
        if end > self.array.size:
            grown = max(end, self.array.size * 5 // 4)
            if self.limit is not None:
                grown = max(end, min(grown, self.limit + 1))
            self.array.resize(grown, refcheck=False)
        self.array[self.size : end] = data
        self.size = end

    def take(self) -> np.ndarray:
        self.array.resize(self.size, refcheck=False)
        return self.array


class _FileSink:
    """The decoded signal appended to an open file as raw float32, frame by frame."""

    def __init__(self, handle, path: Path):
        self.handle = handle
        self.path = Path(path)
        self.size = 0

    def reserve(self, expected: int) -> None:
        pass  # a file grows as written; free space is checked by the caller

    def append(self, frame) -> None:
        data = _frame_samples(frame, self.path)
        self.handle.write(memoryview(np.ascontiguousarray(data, dtype="<f4")).cast("B"))
        self.size += data.size


class _CountingSink(_FileSink):
    """Checks and counts the decoded samples, and drops them."""

    def __init__(self, path: Path):
        super().__init__(None, path)

    def append(self, frame) -> None:
        self.size += _frame_samples(frame, self.path).size


def _frame_samples(frame, path: Path) -> np.ndarray:
    data = frame.to_ndarray().reshape(-1)
    if not np.isfinite(data).all():
        raise InvalidAudioError(f"{path.name}: decoded samples contain NaN or infinity.")
    return data


def npy_header(num_samples: int) -> bytes:
    """The .npy (version 1.0) header of a float32 array of shape (num_samples,),
    padded to ``NPY_HEADER_BYTES`` as ``np.save`` pads it."""
    text = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d,), }" % num_samples
    text = text.ljust(NPY_HEADER_BYTES - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def read_span(samples: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Samples [start, stop) as a float32 array of their own.

    When ``samples`` is the memory-mapped decoded file, the file pages just
    copied are handed back (they stay in the OS page cache, not in this
    process): otherwise every page read once stays resident, and a process
    that went through a 3-hour recording window by window would still count
    its whole 690 MB in its RSS."""
    start, stop = max(0, start), min(len(samples), stop)
    out = np.array(samples[start:stop], dtype=np.float32)
    release_pages(samples, start, stop)
    return out


def iter_spans(samples: np.ndarray, window: int, overlap: int = 0):
    """(start, window samples) over the whole signal, ``window`` samples each
    (the last shorter), each starting ``overlap`` samples before the previous
    one ended; pages are released as in ``read_span``."""
    step = max(1, window - overlap)
    start = 0
    while start < len(samples):
        yield start, read_span(samples, start, start + window)
        if start + window >= len(samples):
            break
        start += step


_MADV_DONTNEED = 4  # Linux


def release_pages(samples: np.ndarray, start: int, stop: int) -> None:
    """Drop this process's mapping of samples [start, stop) when ``samples`` is
    a read-only memory map of a file (a later read maps them again from the
    page cache). Anything else (an array in memory) is left alone: advising
    away anonymous memory would zero it."""
    if not (isinstance(samples, np.memmap) and samples.mode == "r") or stop <= start:
        return
    if not sys.platform.startswith("linux") or samples.ndim != 1 or not samples.flags.c_contiguous:
        return
    global _madvise
    if _madvise is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            _madvise = libc.madvise
            _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _madvise = False
    if not _madvise:
        return
    page = mmap.PAGESIZE
    base = samples.ctypes.data
    # The mapping starts and ends on page boundaries around the data, so the
    # rounded range stays inside it; partial pages are simply re-read later.
    lo = (base + start * samples.itemsize) // page * page
    hi = -(-(base + stop * samples.itemsize) // page) * page
    _madvise(lo, hi - lo, _MADV_DONTNEED)


_madvise = None


def _check_rate(path: Path, rate: int) -> None:
    """Refuse a sample rate no recorder writes (0: not stated yet, checked on the first frame)."""
    if rate and not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise InvalidAudioError(
            f"{path.name}: the file states a sample rate of {rate:,} Hz, outside the"
            f" {MIN_SAMPLE_RATE:,} to {MAX_SAMPLE_RATE:,} Hz that recorders write; its header is"
            " damaged or altered, and its length and pitch would be wrong.")


def _resampler_downmixes(frame) -> bool:
    """Whether FFmpeg's resampler can make ``frame`` mono (a fresh one: a failed try spoils it)."""
    import av

    try:
        av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE).resample(frame)
    except av.error.FFmpegError:
        return False
    return True


# Full scale of FFmpeg's sample formats (planar ones end in "p"); u8 is offset by 128.
_FULL_SCALE = {"u8": 128.0, "s16": 2.0**15, "s32": 2.0**31, "s64": 2.0**63, "flt": 1.0, "dbl": 1.0}


def _channel_mean(frame):
    """``frame`` as one mono float frame: the mean of its channels."""
    import av

    name = frame.format.name.removesuffix("p")
    data = frame.to_ndarray().astype(np.float64)  # planar: (channels, n); packed: (1, n x channels)
    channels = data if frame.format.is_planar else data.reshape(frame.samples, -1).T
    mono = (channels.mean(axis=0) - (128.0 if name == "u8" else 0.0)) / _FULL_SCALE[name]
    out = av.AudioFrame.from_ndarray(mono.astype(np.float32)[None, :], format="flt", layout="mono")
    out.sample_rate = frame.sample_rate
    return out


def _describe(shape: tuple[int, int, str]) -> str:
    rate, channels, sample_format = shape
    return f"{rate} Hz, {channels} channel(s), {sample_format}"


def _wav_format_contradiction(path: Path) -> str | None:
    """What in a PCM/float WAV's fmt chunk does not add up, or None.

    The byte rate and frame size (block align) are redundant with the sample
    rate, channels and sample width. FFmpeg decodes from the latter alone, so a
    file whose rate or channels were edited plays at a wrong speed and length;
    the redundant fields still tell the original."""
    with open(path, "rb") as handle:
        head = handle.read(12)
        if head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
            return None
        while len(chunk := handle.read(8)) == 8:  # walk the chunks to "fmt "
            chunk_size = int.from_bytes(chunk[4:], "little")
            if chunk[:4] == b"fmt ":
                fmt = handle.read(16)
                break
            handle.seek(chunk_size + (chunk_size & 1), 1)  # chunks are word-aligned
        else:
            return None
    if len(fmt) < 16:
        return None
    tag, channels, rate, byte_rate, block_align, bits = struct.unpack("<HHIIHH", fmt)
    # PCM, IEEE float, A-law, mu-law, extensible: uncompressed, fixed-size frames.
    if tag not in (1, 3, 6, 7, 0xFFFE) or not channels or not bits:
        return None
    width = (bits + 7) // 8
    frame = channels * width
    if block_align == frame and byte_rate == rate * frame:
        return None
    claim = f"{rate} Hz, {channels} channel(s) of {bits}-bit samples ({rate * frame} bytes/s)"
    other = f"{byte_rate} bytes/s in {block_align}-byte frames"
    if block_align and block_align % width == 0:
        other += f" (which is {byte_rate // block_align} Hz, {block_align // width} channel(s))"
    return f"it says {claim} but also {other}"


def declared_seconds(path: Path) -> float | None:
    """The length ``path``'s container header states exactly (see
    ``_declared_length``), read without decoding any audio; None when it
    states none or the file cannot be opened (intake then says why)."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    # Asked twice per recording (the prediction before intake, then intake);
    # opening a container costs FFmpeg ~3 ms of probing.
    return _declared_seconds(str(path), found.st_ino, found.st_size, found.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _declared_seconds(path: str, inode: int, size: int, mtime_ns: int) -> float | None:
    """``declared_seconds`` of the file at ``path`` as (inode, size, mtime) identify it."""
    # A PCM WAV's header is read directly (~0.1 ms; what the FFmpeg route
    # below ends in for WAV too); FFmpeg probes the other formats (~3 ms).
    try:
        wav_seconds = _declared_wav_seconds(Path(path))
    except OSError:
        return None
    if wav_seconds is not None:
        return wav_seconds or None  # 0 frames states no length, as in _declared_length
    import av

    try:
        with av.open(path) as container:
            if not container.streams.audio:
                return None
            declared = _declared_length(Path(path), container, container.streams.audio[0])
    except (av.error.FFmpegError, OSError, ValueError):
        return None
    return declared[1] if declared else None


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


def _ffmpeg_reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc)
