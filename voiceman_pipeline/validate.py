"""``voiceman validate``: which inbox files would fail intake, and why.

A dry run of intake over the whole inbox: the scan's rules (``inbox.scan_inbox``:
links, files outside the inbox, the size limit, key collisions), the path
checks the ``audio`` asset makes before opening a file (``find_recording``), and
its decode with every check and the same duration cap, keeping no sample
(``audio_io.check_decodes``): what finds a truncated file or a header that
contradicts its audio.
Nothing is written, no model is loaded and Dagster's storage is not opened:
a file that passes here is taken in unless it changes meanwhile. Hidden,
temporary and non-audio names are skipped, as the sensor skips them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from voiceman_pipeline.audio_io import check_decodes
from voiceman_pipeline.errors import VoicemanError
from voiceman_pipeline.inbox import find_recording, quoted, scan_inbox
from voiceman_pipeline.resources.outputs import RecordingStore


@dataclass(frozen=True)
class WouldFail:
    """An inbox file intake would refuse: path relative to the inbox, and why."""

    relative_path: str
    reason: str


@dataclass
class Validation:
    checked: int  # audio files found (failing ones included)
    failures: list[WouldFail]


def validate_inbox(store: RecordingStore) -> Validation:
    """Check every audio file in ``store``'s inbox as intake would; read-only."""
    scan = scan_inbox(store.inbox_dir, store.max_file_bytes)
    failures = [WouldFail(r.relative_path, r.reason) for r in scan.rejected]
    for file in scan.files:
        reason = intake_failure(store, file.key, file.relative_path)
        if reason is not None:
            failures.append(WouldFail(file.relative_path, reason))
    failures.sort(key=lambda f: f.relative_path)
    return Validation(checked=len(scan.files) + len(scan.rejected), failures=failures)


def intake_failure(store: RecordingStore, key: str, relative_path: str) -> str | None:
    """Why intake of ``key`` would fail, or None if it would succeed."""
    try:
        path = find_recording(store.inbox_dir, key)
        check_decodes(path, max_seconds=store.max_audio_seconds)  # every check, no sample kept
    except (VoicemanError, OSError) as exc:
        return _without_name(str(exc) or type(exc).__name__, relative_path)
    return None


def _without_name(message: str, relative_path: str) -> str:
    # Intake's messages start with the file's name; the report line already has the path.
    for prefix in (f"{relative_path}: ", f"{Path(relative_path).name}: "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    return message


def validate_command(store: RecordingStore) -> int:
    """Print one line per file that would fail and a count; 1 if any would fail."""
    if not store.inbox_dir.is_dir():
        print(f"inbox {store.inbox_dir} does not exist: nothing to validate")
        return 0
    result = validate_inbox(store)
    for failure in result.failures:
        # Escaped where a name holds a line break or other control (``quoted``).
        print(f"{quoted(failure.relative_path, quotes='')}: {failure.reason}", flush=True)
    bad = len(result.failures)
    print(f"{result.checked} file(s) checked in {store.inbox_dir}: "
          f"{bad} would fail intake, {result.checked - bad} would be taken in")
    return 1 if bad else 0
