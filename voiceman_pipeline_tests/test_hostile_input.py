"""Hostile input: links out of the inbox, audio that lies or explodes, a full disk.

Every file here is real: recordings are written by the test (soundfile,
PyAV), links are real symlinks, the full disk is a real 1 MiB tmpfs where
mounting is allowed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
from collections import namedtuple
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
from dagster import AssetKey, AssetPartitionStatus, materialize

from voiceman_pipeline.audio_io import decode_audio, sha256_file
from voiceman_pipeline.error_policy import ErrorCategory, classify
from voiceman_pipeline.errors import DiskFullError, InvalidAudioError, UnsafePathError
from voiceman_pipeline.inbox import _checked_recording, find_recording, partition_key_for, scan_inbox
from voiceman_pipeline.partitions import audio_files
from voiceman_pipeline.resources import outputs
from voiceman_pipeline.resources.outputs import (
    DEFAULT_MAX_AUDIO_SECONDS,
    FREE_SPACE_MARGIN_BYTES,
    RecordingStore,
    atomic_write,
)
from voiceman_pipeline_tests.conftest import REPO, SAMPLE_WAVS, drop
from voiceman_pipeline_tests.test_audio_io import _encode

# --- 1. links and paths -------------------------------------------------------


@pytest.fixture
def secret(tmp_path) -> Path:
    """A recording outside the inbox that no key may reach."""
    folder = tmp_path / "outside"
    folder.mkdir()
    path = folder / "secret.wav"
    shutil.copyfile(SAMPLE_WAVS[0], path)
    return path


@pytest.mark.parametrize("name", ["victim.wav", "my call.wav"])
@pytest.mark.parametrize("points_to", ["outside", "inside"])
def test_recording_swapped_for_a_symlink_is_refused(store, secret, name, points_to):
    inbox = store.inbox_dir
    real = drop(store, SAMPLE_WAVS[1], name)
    key = partition_key_for(name)
    assert (key == name) == (name == "victim.wav")  # "my call.wav" needs the hashed key
    assert find_recording(inbox, key) == real
    real.unlink()
    target = secret if points_to == "outside" else drop(store, SAMPLE_WAVS[0], "other.wav")
    os.symlink(target, real)
    with pytest.raises(UnsafePathError, match="symbolic link") as raised:
        find_recording(inbox, key)
    assert name in str(raised.value)


def test_folder_swapped_for_a_symlink_is_not_searched(store, secret):
    inbox = store.inbox_dir
    name = "case 7/call.wav"
    key = partition_key_for(name)
    real = drop(store, SAMPLE_WAVS[0], name)
    assert find_recording(inbox, key) == real
    shutil.rmtree(inbox / "case 7")
    shutil.copyfile(secret, secret.parent / "call.wav")  # the same name, outside
    os.symlink(secret.parent, inbox / "case 7")
    with pytest.raises(FileNotFoundError, match="symbolic links are not searched: case 7"):
        find_recording(inbox, key)


def test_path_through_a_linked_folder_is_refused(store, secret):
    """What the walk would return if a folder were swapped for a link right after
    it was listed: the check before returning still refuses it."""
    inbox = store.inbox_dir
    os.symlink(secret.parent, inbox / "case 8")
    with pytest.raises(UnsafePathError, match="resolves outside the inbox"):
        _checked_recording(inbox, inbox / "case 8" / "secret.wav")
    (inbox / "real").mkdir()
    drop(store, SAMPLE_WAVS[0], "real/call.wav")
    os.symlink(inbox / "real", inbox / "alias")
    with pytest.raises(UnsafePathError, match="through a symbolic-link folder"):
        _checked_recording(inbox, inbox / "alias" / "call.wav")


def test_pipe_or_folder_named_like_a_recording_is_refused(store):
    inbox = store.inbox_dir
    os.mkfifo(inbox / "pipe.wav")  # opening it to hash it would block forever
    (inbox / "folder.wav").mkdir()
    for name in ("pipe.wav", "folder.wav"):
        with pytest.raises(UnsafePathError, match="not a regular file"):
            find_recording(inbox, name)


def test_hashing_neither_follows_a_link_nor_waits_on_a_pipe(store, secret):
    """The hash before each stage opens the path again: a file swapped for a
    link after the check, or a pipe, is refused instead of read (or waited on)."""
    inbox = store.inbox_dir
    os.symlink(secret, inbox / "victim.wav")
    os.mkfifo(inbox / "pipe.wav")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        sha256_file(inbox / "victim.wav")
    outcome: list = []
    pipe = inbox / "pipe.wav"
    worker = threading.Thread(target=lambda: outcome.append(_raised(sha256_file, pipe)))
    worker.start()
    worker.join(timeout=10)
    if worker.is_alive():  # blocked in open(): release it with a writer, then fail
        os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("hashing a named pipe blocked")
    assert isinstance(outcome[0], UnsafePathError) and "not a regular file" in str(outcome[0])


def _raised(function, *args):
    try:
        function(*args)
    except Exception as exc:  # noqa: BLE001 - returned for the assertion
        return exc
    return None


def test_inbox_that_is_itself_a_link_still_works(tmp_path):
    real_inbox = tmp_path / "disk" / "recordings"
    real_inbox.mkdir(parents=True)
    shutil.copyfile(SAMPLE_WAVS[0], real_inbox / "my call.wav")
    os.symlink(real_inbox, tmp_path / "inbox")
    found = find_recording(tmp_path / "inbox", partition_key_for("my call.wav"))
    assert found == tmp_path / "inbox" / "my call.wav"


def test_a_file_named_like_another_files_key_gets_a_key_of_its_own(store):
    """"q r.wav" is keyed "q_r-1080691c6e.wav"; a second file with that very name
    once took that key in intake (it opened inbox/<key> first) while the scan gave
    the key to "q r.wav": the wrong recording was analysed under it, unflagged."""
    inbox = store.inbox_dir
    spaced = drop(store, SAMPLE_WAVS[0], "q r.wav")
    key = partition_key_for("q r.wav")
    assert key == "q_r-1080691c6e.wav"
    lookalike = drop(store, SAMPLE_WAVS[1], key)
    scan = scan_inbox(inbox, max_file_bytes=10**9)
    keys = {f.relative_path: f.key for f in scan.files}
    assert scan.rejected == [] and len(set(keys.values())) == 2  # both taken in, apart
    assert keys["q r.wav"] == key and keys[key] != key
    assert find_recording(inbox, key) == spaced
    assert find_recording(inbox, keys[key]) == lookalike
    # A hashed part made only of digits gets a letter, so a phone number stays a name.
    assert partition_key_for("call-5551234567.wav") == "call-5551234567.wav"
    for name in (f"call {n}.wav" for n in range(2000)):
        made = partition_key_for(name)
        assert partition_key_for(made) != made, name  # a file named so gets another key


def test_names_starting_with_a_hash_sign_are_taken_in(store):
    """Case numbers ("#4471 call.wav") are not editors' temporary files."""
    drop(store, SAMPLE_WAVS[0], "#4471 suspect call.wav")
    drop(store, SAMPLE_WAVS[0], "w3/#12.wav")
    drop(store, SAMPLE_WAVS[0], "#autosave.wav#")  # an editor's: no audio extension
    scan = scan_inbox(store.inbox_dir, max_file_bytes=10**9)
    assert sorted(f.relative_path for f in scan.files) == ["#4471 suspect call.wav", "w3/#12.wav"]


_OPENED: list[str] | None = None  # paths opened while recording; None: not recording


def _record_opens(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, os.PathLike)):
        _OPENED.append(os.fspath(args[0]))


sys.addaudithook(_record_opens)  # audit hooks cannot be removed; it idles when off


def _run_intake(instance, store, key):
    """Materialize only ``audio`` for ``key``, with the deployed asset graph."""
    from voiceman_pipeline.definitions import defs  # builds the graph: import late

    analysis = next(a for a in defs.assets if AssetKey("audio") in getattr(a, "keys", ()))
    return materialize(
        [analysis],
        selection=[AssetKey("audio")],
        instance=instance,
        resources={**defs.resources, "store": store},
        partition_key=key,
        raise_on_error=False,
    )


def test_intake_of_a_swapped_recording_opens_nothing_outside(instance, store, secret, monkeypatch):
    """The whole intake, through Dagster: the link fails its partition as a
    permanent error, and neither Python nor FFmpeg opens the file it points to."""
    global _OPENED
    opened_by_ffmpeg = []
    real_open = av.open

    def recording_open(file, *args, **kwargs):  # FFmpeg opens files in C, unaudited
        opened_by_ffmpeg.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(av, "open", recording_open)
    drop(store, SAMPLE_WAVS[0], "good.wav")
    os.symlink(secret, store.inbox_dir / "victim.wav")
    instance.add_dynamic_partitions("audio_files", ["good.wav", "victim.wav"])
    _OPENED = []
    try:
        assert _run_intake(instance, store, "good.wav").success
        result = _run_intake(instance, store, "victim.wav")
    finally:
        opened, _OPENED = _OPENED, None
    assert not result.success
    status = instance.get_status_by_partition(AssetKey("audio"), ["victim.wav"], audio_files)
    assert status["victim.wav"] == AssetPartitionStatus.FAILED
    failures = " ".join(
        event.step_failure_data.user_failure_data.description or ""
        for event in result.get_step_failure_events()
    )
    assert "victim.wav" in failures and "symbolic link" in failures
    # The hooks do see opens: the good recording was hashed and decoded.
    assert any(path.endswith("good.wav") for path in opened)
    assert any(path.endswith("good.wav") for path in opened_by_ffmpeg)
    outside = secret.parent.resolve()
    touched = [p for p in opened + opened_by_ffmpeg if Path(p).resolve().is_relative_to(outside)]
    assert touched == []
    assert not store.output_path("victim.wav", "audio.json").exists()


def test_intake_refuses_a_file_over_the_size_limit_without_hashing_it(instance, store, monkeypatch):
    """The sensor skips such a file, but a retry or a hand-made run reaches intake
    with it: refused there by its size, before hashing (a 25 GB file took 2 min)."""
    drop(store, SAMPLE_WAVS[0], "good.wav")
    big = drop(store, SAMPLE_WAVS[1], "big.wav")
    small = RecordingStore(data_dir=store.data_dir, max_file_bytes=big.stat().st_size - 1)
    hashed = []
    from voiceman_pipeline.assets import audio as audio_asset

    real_hash = audio_asset.sha256_file
    monkeypatch.setattr(audio_asset, "sha256_file", lambda p: hashed.append(Path(p).name) or real_hash(p))
    instance.add_dynamic_partitions("audio_files", ["good.wav", "big.wav"])
    assert _run_intake(instance, small, "good.wav").success
    result = _run_intake(instance, small, "big.wav")
    assert not result.success and "big.wav" not in hashed
    failure = result.get_step_failure_events()[0].step_failure_data.user_failure_data.description
    assert "big.wav: not taken in: it is " in failure and "limit (VOICEMAN_MAX_FILE_MB" in failure
    assert store.output_path("good.wav", "audio.json").exists()
    assert not store.output_path("big.wav", "audio.json").exists()


# --- 2. audio that is too long, or whose header lies ---------------------------

RATE = 16_000


def _silent_flac(path: Path, seconds: int) -> Path:
    """``seconds`` of 16 kHz silence as FLAC, written 10 minutes at a time
    (6.5 h compress to about 1.2 MB)."""
    block = np.zeros(RATE * 600, dtype=np.int16)
    with soundfile.SoundFile(path, "w", RATE, 1, "PCM_16", format="FLAC") as flac:
        for start in range(0, seconds, 600):
            flac.write(block[: RATE * min(600, seconds - start)])
    return path


def _patch_streaminfo(path: Path, target: Path, **fields) -> Path:
    """Copy of a FLAC file with STREAMINFO fields (rate, channels, total) replaced.
    STREAMINFO follows "fLaC" and a 4-byte block header; bytes 18-25 pack
    20 bits rate, 3 bits channels-1, 5 bits bits-per-sample-1, 36 bits total."""
    data = bytearray(path.read_bytes())
    packed = int.from_bytes(data[18:26], "big")
    info = {"rate": packed >> 44, "channels": ((packed >> 41) & 7) + 1, "total": packed % 2**36}
    info.update(fields)
    bits = packed & (31 << 36)
    packed = info["rate"] << 44 | (info["channels"] - 1) << 41 | bits | info["total"]
    data[18:26] = packed.to_bytes(8, "big")
    target.write_bytes(bytes(data))
    return target


@pytest.fixture(scope="module")
def long_flacs(tmp_path_factory):
    """6.5 h of silence: stating its length, and the same with the length zeroed
    (STREAMINFO total 0 = unknown, as a streaming encoder leaves it)."""
    folder = tmp_path_factory.mktemp("long")
    declared = _silent_flac(folder / "six_and_a_half_hours.flac", int(6.5 * 3600))
    unknown = _patch_streaminfo(declared, folder / "no_length.flac", total=0)
    half = _silent_flac(folder / "half_hour.flac", 1800)
    half_hour = _patch_streaminfo(half, folder / "half_hour_no_length.flac", total=0)
    return {"declared": declared, "unknown": unknown, "half_hour": half_hour}


# Peak RSS from VmHWM: getrusage's ru_maxrss survives exec on Linux, so a child
# of a big pytest process would report the parent's size.
_MEASURE = """
import json, sys, time
from voiceman_pipeline.audio_io import decode_audio, sha256_file
from voiceman_pipeline.errors import InvalidAudioError

def status_mb(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith(field))

decode_audio(sys.argv[1])  # load FFmpeg before the baseline
base = status_mb("VmRSS:")
started = time.perf_counter()
try:
    audio, _ = decode_audio(sys.argv[2], max_seconds=json.loads(sys.argv[3]))
    outcome = f"decoded {audio.duration_s} s"
except InvalidAudioError as exc:
    outcome = str(exc)
print(json.dumps({"outcome": outcome, "seconds": time.perf_counter() - started,
                  "base_mb": base, "peak_mb": status_mb("VmHWM:")}))
"""


def _decode_measured(path: Path, max_seconds: float | None) -> dict:
    """Decode in a fresh process: what happened, how long, RSS before and at peak (MiB)."""
    if not Path("/proc/self/status").exists():
        pytest.skip("peak memory is read from /proc/self/status (Linux)")
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(SAMPLE_WAVS[0]), str(path), json.dumps(max_seconds)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_length_stated_over_the_cap_is_refused_before_decoding(long_flacs):
    result = _decode_measured(long_flacs["declared"], DEFAULT_MAX_AUDIO_SECONDS)
    assert "refused without decoding" in result["outcome"]
    assert "FLAC STREAMINFO declares 23400 s" in result["outcome"]
    assert result["seconds"] < 5
    assert result["peak_mb"] < 400  # decoding 6 h first would take 1.4 GB


def test_unstated_length_stops_decoding_at_the_cap(long_flacs):
    result = _decode_measured(long_flacs["unknown"], 1800)  # 30 min = 110 MiB decoded
    assert "decoding stopped at the limit" in result["outcome"]
    assert result["peak_mb"] < 400
    assert result["peak_mb"] - result["base_mb"] < 1.3 * 1800 * RATE * 4 / 2**20


def test_decoding_holds_one_copy_of_the_signal(long_flacs):
    """No length stated, no cap: the buffer grows in place instead of joining
    chunks at the end (which needed twice the signal)."""
    result = _decode_measured(long_flacs["half_hour"], None)
    assert result["outcome"] == "decoded 1800.0 s"
    signal_mb = 1800 * RATE * 4 / 2**20
    assert result["peak_mb"] - result["base_mb"] < 1.5 * signal_mb


def _tone(seconds=3.0, rate=RATE):
    t = np.arange(int(rate * seconds)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_wav_header_claiming_another_rate_and_channels_is_refused(tmp_path):
    """16 kHz mono data under a header edited to say 44.1 kHz stereo: FFmpeg
    would decode 0.54 s of noise from 3 s of speech; the byte rate and frame
    size left in the header still say 16 kHz mono."""
    path = tmp_path / "lying.wav"
    soundfile.write(path, _tone(), RATE, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    assert struct.unpack("<HHIIHH", data[20:36]) == (1, 1, RATE, 2 * RATE, 2, 16)
    data[22:28] = struct.pack("<HI", 2, 44_100)  # channels, sample rate
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidAudioError, match="WAV header contradicts itself") as raised:
        decode_audio(path)
    assert "44100 Hz, 2 channel(s)" in str(raised.value)
    assert "16000 Hz, 1 channel(s)" in str(raised.value)


@pytest.mark.parametrize(
    "rate,channels,subtype,fmt",
    [(44_100, 2, "PCM_16", "WAV"), (8_000, 1, "PCM_24", "WAV"), (48_000, 2, "FLOAT", "WAV"),
     (22_050, 2, "PCM_16", "WAVEX"), (8_000, 1, "ULAW", "WAV")],
)
def test_honest_wav_headers_are_accepted(tmp_path, rate, channels, subtype, fmt):
    path = tmp_path / "honest.wav"
    signal = np.tile(_tone(1.0, rate)[:, None], (1, channels))
    soundfile.write(path, signal, rate, subtype=subtype, format=fmt)
    audio, info = decode_audio(path)
    assert (info.sample_rate, info.channels) == (rate, channels)
    assert abs(audio.duration_s - 1.0) < 0.01


@pytest.mark.parametrize("rate", [1, 8, 3_999, 2_000_000_000])
def test_a_sample_rate_no_recorder_writes_is_refused(tmp_path, rate):
    """A consistent header saying 1 Hz made a 35 KB file a 4.9-hour call (1.1 GB decoded)."""
    path = tmp_path / "rate.wav"
    soundfile.write(path, _tone(), RATE, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    data[24:32] = struct.pack("<II", rate, (2 * rate) % 2**32)  # sample rate, byte rate
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidAudioError, match=f"a sample rate of {rate:,} Hz, outside the 4,000 to"):
        decode_audio(path)


def test_a_pcm_wav_cut_short_by_a_sixth_of_a_second_is_refused(tmp_path):
    """Compressed audio may decode up to 0.25 s off its stated length (codec frames);
    PCM cannot: a WAV cut from 1.10 s to 0.94 s was once taken in as whole."""
    data = SAMPLE_WAVS[0].read_bytes()
    assert SAMPLE_WAVS[0].name == "cards_001.wav" and len(data) == 35_096
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[:30_000])
    with pytest.raises(InvalidAudioError, match="declares 1.10 s of audio but only 0.94 s decode"):
        decode_audio(cut)


@pytest.mark.parametrize("channels", [9, 32])
def test_channel_counts_without_a_standard_layout_are_averaged(tmp_path, channels):
    """FFmpeg has no downmix rule for 9 or 32 channels (8, 12, 16 and 24 have one):
    such files were called corrupt. Now their channels' mean is the signal."""
    path = tmp_path / "many.wav"
    rng = np.random.default_rng(channels)
    signal = np.clip(rng.normal(0, 0.1, (RATE, channels)), -1, 1)
    soundfile.write(path, signal, RATE, subtype="PCM_16")
    audio, info = decode_audio(path)
    assert info.channels == channels
    expected = soundfile.read(path)[0].mean(axis=1)
    assert audio.samples.shape == expected.shape
    np.testing.assert_allclose(audio.samples, expected, atol=1e-6)


@pytest.mark.parametrize("fields", [{"rate": 44_100, "channels": 2}, {"total": 16_000}])
def test_flac_streaminfo_understating_the_audio_is_refused(tmp_path, fields):
    honest = tmp_path / "honest.flac"
    soundfile.write(honest, _tone(), RATE, subtype="PCM_16")
    lying = _patch_streaminfo(honest, tmp_path / "lying.flac", **fields)
    with pytest.raises(InvalidAudioError, match="header contradicts the audio") as raised:
        decode_audio(lying)
    assert "3.00 s decode" in str(raised.value)
    assert decode_audio(honest)[0].duration_s == 3.0


def test_stream_that_changes_rate_mid_way_is_refused(tmp_path):
    """Two ADTS AAC files joined: 16 kHz mono, then 44.1 kHz stereo. Each
    frame carries its own header, so only the decoded frames tell."""
    first, second = tmp_path / "a.aac", tmp_path / "b.aac"
    _encode(first, "aac", RATE, "mono", container="adts")
    _encode(second, "aac", 44_100, "stereo", container="adts")
    spliced = tmp_path / "spliced.aac"
    spliced.write_bytes(first.read_bytes() + second.read_bytes())
    with pytest.raises(InvalidAudioError, match="changes from 16000 Hz, 1 channel") as raised:
        decode_audio(spliced)
    assert "44100 Hz, 2 channel(s)" in str(raised.value) and "spliced.aac" in str(raised.value)


# --- 3. a full disk --------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 1 MiB filesystem (tmpfs); skipped where mounting is not allowed."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("needs Linux mount to make a 1 MiB tmpfs")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mount_point)],
        capture_output=True, text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if not p.is_dir())


def test_numpy_short_write_on_a_full_disk_is_a_disk_full_error(tiny_disk):
    target = tiny_disk / "outputs" / "call.wav" / "audio_16k.npy"
    signal = np.zeros(480_000, dtype=np.float32)  # 1.8 MiB: numpy writes part, no errno
    with pytest.raises(DiskFullError, match="filled up while writing audio_16k.npy") as raised:
        atomic_write(target, lambda handle: np.save(handle, signal))
    message = str(raised.value)
    assert f"the disk mounted at {tiny_disk}" in message and "free now" in message
    assert "requested and" in message  # numpy's own words, kept for the record
    assert classify(raised.value) == ErrorCategory.RESOURCE
    assert _files_under(tiny_disk) == []  # no temporary file, no partial target


def test_enospc_keeps_the_previous_result_intact(tiny_disk):
    target = tiny_disk / "outputs" / "k" / "report.json"
    atomic_write(target, lambda handle: handle.write(b'{"old": true}'))
    with pytest.raises(DiskFullError, match="filled up") as raised:
        atomic_write(target, lambda handle: handle.write(b"x" * 2_000_000), expected_bytes=None)
    assert raised.value.__cause__.errno == errno.ENOSPC
    assert target.read_bytes() == b'{"old": true}'
    assert _files_under(tiny_disk) == [target]


def test_store_refuses_a_signal_larger_than_the_free_space(tiny_disk):
    store = RecordingStore(data_dir=str(tiny_disk))
    with pytest.raises(DiskFullError, match="not enough disk space") as raised:
        store.write_array("call.wav", "audio_16k.npy", np.zeros(480_000, dtype=np.float32))
    message = str(raised.value)
    assert "needs 1.8 MiB" in message and "1.0 MiB is free" in message
    assert f"the disk mounted at {tiny_disk}" in message
    assert _files_under(tiny_disk) == []


DiskUsage = namedtuple("DiskUsage", "total used free")


def _usage_with_free(free: int):
    return lambda path: DiskUsage(10**12, 10**12 - free, free)


def test_pre_flight_counts_the_margin(store, monkeypatch):
    signal = np.zeros(2**20 // 4, dtype=np.float32)  # 1 MiB
    monkeypatch.setattr(outputs.shutil, "disk_usage", _usage_with_free(FREE_SPACE_MARGIN_BYTES))
    with pytest.raises(DiskFullError, match="needs 1.0 MiB plus 64.0 MiB kept free"):
        store.write_array("k", "audio_16k.npy", signal)  # fits, but not with the margin
    assert _files_under(store.outputs_dir) == []
    enough = _usage_with_free(FREE_SPACE_MARGIN_BYTES + 2**21)
    monkeypatch.setattr(outputs.shutil, "disk_usage", enough)
    path = store.write_array("k", "audio_16k.npy", signal)
    assert np.load(path).shape == signal.shape


def test_short_write_without_errno_is_recognised_anywhere(store):
    """The same numpy message, raised by hand: runs where no tmpfs can be mounted."""

    def short_write(handle):
        handle.write(b"\0" * 146_400)
        raise OSError("480000 requested and 146400 written")

    target = store.output_path("k", "audio_16k.npy")
    with pytest.raises(DiskFullError, match="1.8 MiB needed"):
        atomic_write(target, short_write, expected_bytes=480_000 * 4)
    assert _files_under(store.outputs_dir) == []

    def bad_message(handle):
        raise OSError(errno.EBADMSG, "Bad message")

    with pytest.raises(OSError, match="Bad message") as raised:  # other errors pass through
        atomic_write(target, bad_message, expected_bytes=10)
    assert not isinstance(raised.value, DiskFullError)
