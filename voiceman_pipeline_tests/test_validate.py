"""``voiceman validate``: a dry run of intake over a mixed inbox of real files."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


from voiceman_pipeline.resources.outputs import RecordingStore
from voiceman_pipeline.validate import validate_command, validate_inbox
from voiceman_pipeline_tests.conftest import REPO, SAMPLE_WAVS

BIN = Path(sys.executable).parent
# Modules a model load would import (the engines import them lazily, inside runs).
ENGINE_MODULES = ("pocketsphinx", "faster_whisper", "ctranslate2", "torch", "transformers")
ODD_NAME = "통화 녹음/고객 01 (final).wav"


def mixed_inbox(inbox: Path, outside: Path) -> set[str]:
    """Good, bad and ignored files; returns the relative paths that must be flagged."""
    good, other = SAMPLE_WAVS[0], SAMPLE_WAVS[1]
    shutil.copyfile(good, inbox / "good.wav")
    (inbox / ODD_NAME).parent.mkdir()
    shutil.copyfile(other, inbox / ODD_NAME)
    data = good.read_bytes()
    (inbox / "truncated.wav").write_bytes(data[: len(data) // 2])  # header still says full length
    (inbox / "empty.wav").write_bytes(b"")
    (inbox / "notes.wav").write_text("call notes: ring back Tuesday\n" * 20)
    (inbox / "liar.wav").write_bytes(_claiming_hours(data, hours=10))  # over the 6 h cap
    shutil.copyfile(good, outside / "elsewhere.wav")
    (inbox / "link.wav").symlink_to(outside / "elsewhere.wav")
    # Skipped by the scan, as the sensor skips them: not failures.
    (inbox / "readme.txt").write_text("not audio\n")
    (inbox / ".hidden.wav").write_bytes(b"junk")
    (inbox / "download.wav.part").write_bytes(b"junk")
    return {"truncated.wav", "empty.wav", "notes.wav", "liar.wav", "link.wav"}


def _claiming_hours(wav: bytes, hours: float) -> bytes:
    """``wav`` (a plain PCM WAV) with its data chunk size claiming ``hours``."""
    assert wav[:4] == b"RIFF" and wav[36:40] == b"data", "expected a 44-byte PCM header"
    byte_rate = int.from_bytes(wav[28:32], "little")
    claimed = int(hours * 3600 * byte_rate)
    return (
        wav[:4] + (claimed + 36).to_bytes(4, "little") + wav[8:40]
        + claimed.to_bytes(4, "little") + wav[44:]
    )


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its kind, content hash or link target, and mtime."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            stat = path.lstat()
            if path.is_symlink():
                found[str(path.relative_to(root))] = ("link", os.readlink(path))
            elif path.is_dir():
                found[str(path.relative_to(root))] = ("dir", stat.st_mode)
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                found[str(path.relative_to(root))] = ("file", digest, stat.st_mode,
                                                      stat.st_mtime_ns)
    return found


def test_flags_exactly_the_bad_files_and_loads_no_model(store: RecordingStore, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    bad = mixed_inbox(store.inbox_dir, outside)
    before_modules = set(sys.modules)
    before = snapshot(Path(store.data_dir))

    result = validate_inbox(store)

    assert {f.relative_path for f in result.failures} == bad
    assert result.checked == 7  # the two good ones and the five bad
    reasons = {f.relative_path: f.reason for f in result.failures}
    assert "truncated" in reasons["truncated.wav"]
    assert "empty" in reasons["empty.wav"]
    assert "not a readable audio file" in reasons["notes.wav"]
    assert "longer than the configured limit" in reasons["liar.wav"]
    assert "symbolic link" in reasons["link.wav"]
    assert not reasons["liar.wav"].startswith("liar.wav")  # the path is not said twice
    gained = {m for m in set(sys.modules) - before_modules if m.split(".")[0] in ENGINE_MODULES}
    assert not gained
    assert snapshot(Path(store.data_dir)) == before


def test_cli_lists_bad_files_exits_1_and_changes_nothing(env, tmp_path):
    home, data = Path(env["DAGSTER_HOME"]), Path(env["VOICEMAN_DATA_DIR"])
    outside = tmp_path / "outside"
    outside.mkdir()
    bad = mixed_inbox(data / "inbox", outside)
    before = snapshot(data)

    started = time.monotonic()
    # -X importtime lists every module the command imports, on stderr.
    out = subprocess.run(
        [sys.executable, "-X", "importtime", str(BIN / "voiceman"), "validate"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.monotonic() - started

    assert out.returncode == 1, out.stderr[-3000:]
    *lines, count = out.stdout.strip().splitlines()
    assert {line.split(": ", 1)[0] for line in lines} == bad and len(lines) == len(bad)
    assert count.startswith("7 file(s) checked")
    assert "5 would fail intake, 2 would be taken in" in count
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert "voiceman_pipeline.validate" in imported and "av" in imported  # the list is read right
    assert not {m for m in imported if m.split(".")[0] in ENGINE_MODULES}
    assert elapsed < 60
    assert snapshot(data) == before
    assert [p.name for p in home.iterdir()] == ["dagster.yaml"]  # no storage, no lock: never opened


def test_cli_exits_0_on_a_clean_inbox_with_an_odd_name(env):
    inbox = Path(env["VOICEMAN_DATA_DIR"]) / "inbox"
    (inbox / ODD_NAME).parent.mkdir()
    shutil.copyfile(SAMPLE_WAVS[0], inbox / ODD_NAME)
    out = subprocess.run(
        [BIN / "voiceman", "validate"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines() == [
        f"1 file(s) checked in {inbox}: 0 would fail intake, 1 would be taken in"
    ]


def test_a_name_holding_a_line_break_cannot_forge_lines(store: RecordingStore, tmp_path, capsys):
    """A link named to look like a clean report once printed as one, line break and all."""
    forged = "x.wav: is fine\n300 file(s) checked: 0 would fail intake, 300 would be taken in\ny.wav"
    os.symlink(tmp_path / "nowhere.wav", store.inbox_dir / forged)
    assert validate_command(store) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{forged!r}: is a symbolic link; copy the recording into the inbox",
                     f"1 file(s) checked in {store.inbox_dir}: 1 would fail intake, 0 would be taken in"]
