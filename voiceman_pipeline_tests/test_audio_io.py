"""PyAV decoding on real recordings and on bad input."""

from __future__ import annotations

import hashlib
import math
import re

import av
import numpy as np
import pytest
import soundfile

from voiceman_pipeline.audio_io import (
    check_decodes,
    decode_audio,
    decode_to_npy,
    read_span,
    sha256_file,
)
from voiceman_pipeline.results import DecodedAudio
from voiceman_pipeline.errors import InvalidAudioError
from voiceman_pipeline_tests.conftest import SAMPLE_WAVS


@pytest.mark.parametrize("path", SAMPLE_WAVS, ids=lambda p: p.name)
def test_sample_durations_match_soundfile(path):
    audio, info = decode_audio(path)
    reference = soundfile.info(str(path)).duration
    assert math.isclose(audio.duration_s, reference, rel_tol=0.01)
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert -1.0 <= audio.samples.min() and audio.samples.max() <= 1.0
    assert (info.container, info.codec, info.channels) == ("wav", "pcm_s16le", 1)
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def _encode(
    path, codec, rate, layout, seconds=1.5, container=None, samples=None, options=None, vbr=False
):
    """Write a tone, or mono float32 ``samples`` at ``rate``, with PyAV's encoder
    (a real compressed file, not a stub). ``options`` go to the muxer."""
    if samples is None:
        t = np.arange(int(rate * seconds)) / rate
        samples = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    channels = 2 if layout == "stereo" else 1
    with av.open(str(path), "w", format=container, options=options or {}) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        if vbr:
            stream.codec_context.qscale = True  # LAME VBR: the bitrate varies per frame
        frame_size = stream.codec_context.frame_size or 1024
        planar = np.tile(samples, (channels, 1))
        for start in range(0, planar.shape[1], frame_size):
            chunk = np.ascontiguousarray(planar[:, start : start + frame_size])
            # PyAV converts float planar frames to the encoder's own format.
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


@pytest.mark.parametrize(
    "name,codec,container",
    [("tone.flac", "flac", None), ("tone.m4a", "aac", "ipod"), ("tone.ogg", "libopus", "ogg")],
)
def test_compressed_stereo_44k_is_resampled_to_16k_mono(tmp_path, name, codec, container):
    path = tmp_path / name
    rate = 48_000 if codec == "libopus" else 44_100
    try:
        _encode(path, codec, rate, "stereo", container=container)
    except av.error.FFmpegError as exc:  # an encoder missing from this FFmpeg build
        pytest.skip(f"PyAV cannot encode {codec}: {exc}")
    audio, info = decode_audio(path)
    assert info.channels == 2 and info.sample_rate == rate
    assert audio.sample_rate == 16_000
    priming = 2048 / rate if codec == "aac" else 0.0  # AAC priming + last-frame padding
    assert abs(audio.duration_s - 1.5) <= 0.015 + priming
    spectrum = np.abs(np.fft.rfft(audio.samples[: 16_000]))
    assert abs(np.argmax(spectrum) - 220) <= 2  # the tone survived at 220 Hz


SPEECH = max(SAMPLE_WAVS, key=lambda p: p.stat().st_size)  # the longest sample (about 7 s)

# name: (codec, muxer, muxer options, LAME VBR, seconds the codec may add beyond 1%).
# Everything is 16 kHz mono. AAC keeps 1024 priming samples and pads the last
# 1024-sample frame; MP3 without a LAME header keeps the decoder delay (529),
# the encoder delay (576) and the padding of the last 576-sample frame.
AAC_EXTRA_S = 2048 / 16_000
MP3_EXTRA_S = (529 + 576 + 576) / 16_000
COMPRESSED = {
    "speech.flac": ("flac", None, {}, False, 0.0),
    "speech_cbr.mp3": ("libmp3lame", "mp3", {}, False, 0.0),  # LAME "Info" header
    "speech_vbr.mp3": ("libmp3lame", "mp3", {}, True, 0.0),  # LAME "Xing" header
    "speech_vbr_no_xing.mp3": ("libmp3lame", "mp3", {"write_xing": "0"}, True, MP3_EXTRA_S),
    "speech.m4a": ("aac", "ipod", {}, False, AAC_EXTRA_S),  # moov after the audio
    "speech_faststart.m4a": ("aac", "ipod", {"movflags": "+faststart"}, False, AAC_EXTRA_S),
    "speech.aac": ("aac", "adts", {}, False, AAC_EXTRA_S),
    "speech.ogg": ("libopus", "ogg", {}, False, 0.0),
    "speech.webm": ("libopus", "webm", {}, False, 0.0),
}
# Without a declared length (MP3 without a Xing/Info/VBRI header, raw ADTS AAC)
# a copy cut between frames looks like a shorter recording, and FFmpeg drops a
# partial last MP3 frame silently: those cuts are undetectable, so not tested.
UNDETECTABLE_CUTS = {
    ("speech_vbr_no_xing.mp3", "half_bytes"),
    ("speech_vbr_no_xing.mp3", "frame_boundary"),
    ("speech.aac", "frame_boundary"),
}
DETECTABLE_CUTS = [
    (name, cut)
    for name in sorted(COMPRESSED)
    for cut in ("half_bytes", "frame_boundary")
    if (name, cut) not in UNDETECTABLE_CUTS
]


def _encode_speech(tmp_path, name):
    codec, container, options, vbr, _ = COMPRESSED[name]
    samples, rate = soundfile.read(str(SPEECH), dtype="float32")
    path = tmp_path / name
    try:
        _encode(path, codec, rate, "mono", container, samples=samples, options=options, vbr=vbr)
    except av.error.FFmpegError as exc:  # an encoder missing from this FFmpeg build
        pytest.skip(f"PyAV cannot encode {codec}: {exc}")
    return path


@pytest.mark.parametrize("name", sorted(COMPRESSED))
def test_compressed_speech_keeps_the_source_duration(tmp_path, name):
    audio, _ = decode_audio(_encode_speech(tmp_path, name))
    reference = soundfile.info(str(SPEECH)).duration
    assert abs(audio.duration_s - reference) <= 0.01 * reference + COMPRESSED[name][4]


def _cut_at_frame(path):
    """Bytes up to the first packet starting past the middle: a cut between frames."""
    with av.open(str(path)) as container:
        starts = [p.pos for p in container.demux(container.streams.audio[0]) if p.pos is not None]
    data = path.read_bytes()
    return data[: min(pos for pos in starts if pos >= len(data) // 2)]


@pytest.mark.parametrize("name,cut", DETECTABLE_CUTS)
def test_truncated_compressed_copy_is_refused(tmp_path, name, cut):
    whole = _encode_speech(tmp_path, name)
    truncated = tmp_path / f"cut_{name}"
    data = whole.read_bytes()
    truncated.write_bytes(data[: len(data) // 2] if cut == "half_bytes" else _cut_at_frame(whole))
    with pytest.raises(InvalidAudioError, match="truncated|corrupt") as raised:
        decode_audio(truncated)
    assert truncated.name in str(raised.value)


def test_wav_streamed_without_a_data_size_is_not_called_truncated(tmp_path):
    path = tmp_path / "streamed.wav"
    data = bytearray(SPEECH.read_bytes())
    assert data[36:40] == b"data"
    data[4:8] = data[40:44] = b"\xff\xff\xff\xff"  # what a recorder writing to a pipe leaves
    path.write_bytes(bytes(data))
    audio, _ = decode_audio(path)
    assert math.isclose(audio.duration_s, soundfile.info(str(SPEECH)).duration, rel_tol=0.01)


BAD_FILES = {
    "empty.wav": (lambda p: p.write_bytes(b""), "empty"),
    "header_cut.wav": (lambda p: p.write_bytes(SAMPLE_WAVS[0].read_bytes()[:30]), "not a readable audio file"),
    "header_only.wav": (lambda p: p.write_bytes(SAMPLE_WAVS[0].read_bytes()[:44]), "zero audio samples"),
    "data_cut.wav": (lambda p: p.write_bytes(SAMPLE_WAVS[1].read_bytes()[:20_000]), "truncated"),
    # Samples there, but fewer than FFmpeg's resampler gives any output for: not "empty".
    "blip.wav": (lambda p: soundfile.write(p, np.full(10, 0.1), 8000, subtype="PCM_16"),
                 "the file holds only 10 audio sample(s) (1.2 ms at 8000 Hz): too short to analyse"),
    "noise.m4a": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(20_000)), "not a readable audio file"),
    "notes.mp3": (lambda p: p.write_text("this is a text file, not a recording\n" * 20), "not a readable audio file"),
}


def decode_streamed(path, max_seconds=None):
    """``decode_to_npy`` into a file beside ``path``, read back memory-mapped."""
    npy = path.with_name(path.name + ".npy")
    with open(npy, "wb") as handle:
        n, info = decode_to_npy(path, handle, max_seconds=max_seconds)
    samples = np.load(npy, mmap_mode="r")
    assert len(samples) == n
    return DecodedAudio(samples=samples), info


def decode_checked_only(path, max_seconds=None):
    seconds, info = check_decodes(path, max_seconds=max_seconds)
    return DecodedAudio(samples=np.zeros(round(seconds * 16_000), np.float32)), info


DECODERS = [
    pytest.param(decode_audio, id="in-memory"),
    pytest.param(decode_streamed, id="streamed"),
    pytest.param(decode_checked_only, id="check-only"),
]


@pytest.mark.parametrize("decode", DECODERS)
@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_input_raises_a_clear_invalid_audio_error(tmp_path, name, decode):
    make, message = BAD_FILES[name]
    path = tmp_path / name
    make(path)
    with pytest.raises(InvalidAudioError, match=re.escape(message)) as raised:
        decode(path)
    assert name in str(raised.value)  # the message names the file


@pytest.mark.parametrize("decode", DECODERS)
def test_recording_over_the_length_limit_is_refused(tmp_path, decode):
    path = tmp_path / "long.wav"
    path.write_bytes(SAMPLE_WAVS[-1].read_bytes())
    with pytest.raises(InvalidAudioError, match="longer than the configured limit"):
        decode(path, max_seconds=1.0)


def test_streamed_decode_is_the_file_np_save_writes(tmp_path):
    """Decoded straight to disk: the same samples, source info and bytes as
    decoding in memory and saving with np.save (so readers see no difference)."""
    import io
    import shutil

    wav = shutil.copy(SAMPLE_WAVS[0], tmp_path / "call.wav")
    for source in (wav, _encode_speech(tmp_path, sorted(COMPRESSED)[0])):
        in_memory, info = decode_audio(source)
        streamed, streamed_info = decode_streamed(source)
        assert streamed_info == info
        assert np.array_equal(np.asarray(streamed.samples), in_memory.samples)
        saved = io.BytesIO()
        np.save(saved, in_memory.samples)
        assert source.with_name(source.name + ".npy").read_bytes() == saved.getvalue()


def test_read_span_copies_and_leaves_the_signal_intact(tmp_path):
    """Spans of a memory-mapped signal come back as copies, and the pages
    handed back read the same afterwards; an array in memory is untouched."""
    signal = np.random.default_rng(1).standard_normal(100_000).astype(np.float32)
    np.save(tmp_path / "s.npy", signal)
    mapped = np.load(tmp_path / "s.npy", mmap_mode="r")
    for samples in (mapped, signal.copy()):
        span = read_span(samples, 1_000, 60_000)
        assert span.flags.owndata and np.array_equal(span, signal[1_000:60_000])
        assert np.array_equal(np.asarray(samples), signal)
