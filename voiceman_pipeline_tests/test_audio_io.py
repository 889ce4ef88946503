"""PyAV decoding on real recordings and on bad input."""

from __future__ import annotations

import hashlib
import math

import av
import numpy as np
import pytest
import soundfile

from voiceman_pipeline.audio_io import decode_audio, sha256_file
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


def _encode(path, codec, rate, layout, seconds=1.5, container=None):
    """Write a tone with PyAV's encoder (a real compressed file, not a stub)."""
    t = np.arange(int(rate * seconds)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    channels = 2 if layout == "stereo" else 1
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        frame_size = stream.codec_context.frame_size or 1024
        planar = np.tile(tone, (channels, 1))
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
    assert abs(audio.duration_s - 1.5) < 0.1  # encoder padding/priming only
    spectrum = np.abs(np.fft.rfft(audio.samples[: 16_000]))
    assert abs(np.argmax(spectrum) - 220) <= 2  # the tone survived at 220 Hz


BAD_FILES = {
    "empty.wav": (lambda p: p.write_bytes(b""), "empty"),
    "header_cut.wav": (lambda p: p.write_bytes(SAMPLE_WAVS[0].read_bytes()[:30]), "not a readable audio file"),
    "header_only.wav": (lambda p: p.write_bytes(SAMPLE_WAVS[0].read_bytes()[:44]), "zero audio samples"),
    "data_cut.wav": (lambda p: p.write_bytes(SAMPLE_WAVS[1].read_bytes()[:20_000]), "truncated"),
    "noise.m4a": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(20_000)), "not a readable audio file"),
    "notes.mp3": (lambda p: p.write_text("this is a text file, not a recording\n" * 20), "not a readable audio file"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_input_raises_a_clear_invalid_audio_error(tmp_path, name):
    make, message = BAD_FILES[name]
    path = tmp_path / name
    make(path)
    with pytest.raises(InvalidAudioError, match=message) as raised:
        decode_audio(path)
    assert name in str(raised.value)  # the message names the file


def test_recording_over_the_length_limit_is_refused(tmp_path):
    with pytest.raises(InvalidAudioError, match="longer than the configured limit"):
        decode_audio(SAMPLE_WAVS[-1], max_seconds=1.0)
