"""The recording store's files on disk: atomic, and owner-only unless configured."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from pydantic import ValidationError

from voiceman_pipeline.resources.outputs import RecordingStore, atomic_write


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o000, 0o077], ids=lambda u: f"umask{u:03o}")
def umask(request):
    """Run under several umasks: the modes must not depend on it."""
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def _write_everything(store: RecordingStore, key: str) -> list:
    return [
        store.write_json(key, "audio.json", {"sha256": "0" * 64}),
        store.write_array(key, "audio_16k.npy", np.zeros(16_000, dtype=np.float32)),
        store.write_bytes(key, "report.png", b"\x89PNG"),
        store.write_file(store.outputs_dir / "summary.csv", lambda handle: handle.write(b"a,b\n")),
    ]


def test_outputs_are_owner_only_by_default(tmp_path, umask):
    store = RecordingStore(data_dir=str(tmp_path / "data"))
    files = _write_everything(store, "call.wav")
    assert {_mode(path) for path in files} == {0o600}
    # Folders the store created, from data/ down to outputs/<key>/.
    for folder in (tmp_path / "data", store.outputs_dir, store.file_dir("call.wav")):
        assert _mode(folder) == 0o700, folder


@pytest.mark.parametrize(
    "configured,file_mode,folder_mode",
    [("0640", 0o640, 0o750), (0o644, 0o644, 0o755), ("0o600", 0o600, 0o700)],
)
def test_output_mode_is_configurable(tmp_path, umask, configured, file_mode, folder_mode):
    store = RecordingStore(data_dir=str(tmp_path / "data"), output_mode=configured)
    files = _write_everything(store, "call.wav")
    assert {_mode(path) for path in files} == {file_mode}
    assert _mode(store.file_dir("call.wav")) == folder_mode


def test_a_rewritten_result_takes_the_configured_mode(store):
    target = store.output_path("call.wav", "audio.json")
    target.parent.mkdir()
    target.write_text("{}")
    os.chmod(target, 0o666)  # left world-writable by an older version or a person
    store.write_json("call.wav", "audio.json", {"new": True})
    assert _mode(target) == 0o600 and "new" in target.read_text()


def test_existing_folders_keep_their_mode(store):
    os.chmod(store.outputs_dir, 0o755)  # made by the operator
    store.write_json("call.wav", "audio.json", {})
    assert _mode(store.outputs_dir) == 0o755
    assert _mode(store.file_dir("call.wav")) == 0o700


def test_atomic_write_defaults_to_owner_only(tmp_path):
    target = tmp_path / "new" / "summary.parquet"
    atomic_write(target, lambda handle: handle.write(b"PAR1"))
    assert _mode(target) == 0o600 and _mode(target.parent) == 0o700


@pytest.mark.parametrize("bad", ["0400", "rw-------", "999", 0o1777, -1, "0o200"])
def test_unusable_output_modes_are_refused(bad):
    with pytest.raises(ValidationError, match="output_mode"):
        RecordingStore(output_mode=bad)
