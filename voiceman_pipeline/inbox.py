"""The inbox: which files are recordings, their partition keys, and when they are ready.

Shared by the ``inbox_sensor`` and the ``voiceman ingest`` command, so a file
is judged the same way whether the daemon or a person registers it.

Partition keys are a pure function of a file's path relative to the inbox:
a name that is already safe (``[A-Za-z0-9._-]``, at most 200 characters, no
leading dot or dash, no ``..``) is its own key; any other name is cleaned and
gets a short hash of the original name as suffix, so two names that clean to
the same text still get distinct, deterministic keys. Because the mapping is a
function, every asset finds its file again from the key alone.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from voiceman_pipeline.audio_io import sha256_file

AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".mp3", ".m4a", ".ogg", ".opus", ".aac", ".webm"})
# Names that download tools and editors use while a file is still being written.
TEMPORARY_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".crdownload", ".download", "~")
TEMPORARY_PREFIXES = (".", "~$", "#")
MAX_KEY_LENGTH = 200
HASH_SUFFIX_LENGTH = 10
_SAFE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9._-]+")


def partition_key_for(relative_path: str) -> str:
    """Safe, unique Dagster partition key for a path relative to the inbox."""
    if _is_safe_key(relative_path):
        return relative_path
    name = relative_path.replace(os.sep, "/")
    stem, dot, ext = name.rpartition(".")
    if not dot or "/" in ext or not stem:
        stem, ext = name, ""
    ext = _clean(ext).lower()[:10]
    digest = hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()
    suffix = "-" + digest[:HASH_SUFFIX_LENGTH] + ("." + ext if ext else "")
    cleaned = _clean(stem)[: MAX_KEY_LENGTH - len(suffix)] or "recording"
    return cleaned + suffix


def _is_safe_key(key: str) -> bool:
    return (
        0 < len(key) <= MAX_KEY_LENGTH and _SAFE_KEY.fullmatch(key) is not None and ".." not in key
    )


def _clean(text: str) -> str:
    """Transliterate to ASCII where possible (é -> e), replace the rest with _."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    cleaned = _UNSAFE_RUN.sub("_", ascii_text)
    cleaned = re.sub(r"\.{2,}", ".", cleaned)  # ".." and "..." mean ranges to Dagster
    return cleaned.strip("._-")


@dataclass(frozen=True)
class InboxFile:
    """A candidate recording in the inbox, as seen by one scan."""

    key: str
    relative_path: str
    path: Path
    size: int
    mtime_ns: int

    @property
    def signature(self) -> tuple[int, int]:
        return (self.size, self.mtime_ns)


@dataclass
class Rejection:
    """A file in the inbox that will not be processed, and why."""

    relative_path: str
    reason: str


@dataclass
class InboxScan:
    files: list[InboxFile] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


def scan_inbox(inbox: Path, max_file_bytes: int) -> InboxScan:
    """List audio files under ``inbox`` (recursively), rejecting unsafe ones.

    Hidden and temporary files are skipped silently (they are expected);
    symlinks, files resolving outside the inbox, oversized files and key
    collisions are rejected with a reason, for the log.
    """
    inbox = Path(inbox)
    root = inbox.resolve()
    scan = InboxScan()
    seen_keys: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(inbox, followlinks=False):
        # Hidden folders (.git, .Trash) are not evidence; prune them.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            relative = path.relative_to(inbox).as_posix()
            if name.startswith(TEMPORARY_PREFIXES) or name.endswith(TEMPORARY_SUFFIXES):
                continue
            if path.suffix.lower() not in AUDIO_EXTENSIONS:
                continue
            if path.is_symlink():
                scan.rejected.append(
                    Rejection(relative, "is a symbolic link; copy the recording into the inbox")
                )
                continue
            try:
                resolved = path.resolve(strict=True)
                stat = resolved.stat()
            except OSError as exc:
                scan.rejected.append(Rejection(relative, f"cannot be read: {exc.strerror}"))
                continue
            # Symlinks are refused above and symlinked folders are not walked;
            # this catches what slips between those checks (a path swapped for
            # a link meanwhile, a bind mount), since evidence must stay inside.
            if not resolved.is_relative_to(root):
                scan.rejected.append(Rejection(relative, f"resolves outside the inbox ({resolved})"))
                continue
            if stat.st_size > max_file_bytes:
                scan.rejected.append(
                    Rejection(
                        relative,
                        f"is {_human_size(stat.st_size)}, over the "
                        f"{_human_size(max_file_bytes)} limit (max_file_bytes)",
                    )
                )
                continue
            key = partition_key_for(relative)
            if key in seen_keys:
                scan.rejected.append(
                    Rejection(relative, f"its key {key!r} is already used by {seen_keys[key]!r}")
                )
                continue
            seen_keys[key] = relative
            scan.files.append(InboxFile(key, relative, path, stat.st_size, stat.st_mtime_ns))
    return scan


def _human_size(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def find_recording(inbox: Path, key: str) -> Path:
    """The inbox file whose partition key is ``key``.

    Raises:
        FileNotFoundError: no file in the inbox maps to the key (moved or deleted).
    """
    direct = Path(inbox) / key
    if _is_safe_key(key) and direct.is_file() and not direct.is_symlink():
        return direct  # safe names are their own key
    for dirpath, dirnames, filenames in os.walk(inbox, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath) / name
            if partition_key_for(path.relative_to(inbox).as_posix()) == key:
                return path
    raise FileNotFoundError(
        f"No recording in the inbox {str(inbox)!r} has the partition key {key!r}; "
        f"was it moved, renamed or deleted after it was registered?"
    )


# --- deciding what to register ----------------------------------------------


@dataclass
class SeenFile:
    """Cursor entry of a registered file: how it looked when it was hashed."""

    size: int
    mtime_ns: int
    sha256: str


@dataclass
class IntakeState:
    """What the sensor remembers between ticks (its cursor, as JSON).

    ``registered``: key -> the file as it was hashed and requested.
    ``pending``: relative path -> (size, mtime_ns) seen last tick; a file is
    ready once two consecutive looks agree (it is no longer being written).
    """

    registered: dict[str, SeenFile] = field(default_factory=dict)
    pending: dict[str, tuple[int, int]] = field(default_factory=dict)

    def to_json(self) -> str:
        import json

        return json.dumps(
            {
                "registered": {k: asdict(v) for k, v in self.registered.items()},
                "pending": {k: list(v) for k, v in self.pending.items()},
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | None) -> IntakeState:
        import json

        if not text:
            return cls()
        data = json.loads(text)
        return cls(
            registered={k: SeenFile(**v) for k, v in data.get("registered", {}).items()},
            pending={k: tuple(v) for k, v in data.get("pending", {}).items()},
        )


@dataclass(frozen=True)
class ReadyFile:
    """A stable file to process: new, or registered before with other content."""

    file: InboxFile
    sha256: str
    is_new_key: bool

    @property
    def run_key(self) -> str:
        # The hash makes a replaced file run again and an identical re-drop not.
        return f"{self.file.key}:{self.sha256[:16]}"


@dataclass
class IntakePlan:
    ready: list[ReadyFile] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)  # re-dropped, same bytes
    waiting: list[str] = field(default_factory=list)  # still being written
    deferred: int = 0  # stable but over this tick's cap or time budget
    state: IntakeState = field(default_factory=IntakeState)


def plan_intake(
    scan: InboxScan,
    state: IntakeState,
    *,
    max_new_per_tick: int,
    time_budget_s: float = 30.0,
    recorded_sha256: Callable[[str], str | None] = lambda key: None,
) -> IntakePlan:
    """Decide which scanned files are ready to register and run.

    A file is ready when its size and mtime equal those seen on the previous
    look. Files already registered with the same size and mtime are skipped
    without hashing; a changed signature is re-hashed, and only different
    content yields a run. At most ``max_new_per_tick`` files are returned and
    hashing stops after ``time_budget_s``; the rest wait for the next tick.
    ``recorded_sha256(key)`` gives the hash Dagster's storage holds for a key
    this state has not seen (registered by another route, e.g. the CLI).
    """
    registered = dict(state.registered)
    pending: dict[str, tuple[int, int]] = {}
    plan = IntakePlan()
    started = time.monotonic()
    for file in scan.files:
        known = registered.get(file.key)
        if known is not None and (known.size, known.mtime_ns) == file.signature:
            continue  # registered and untouched: the common case, no hashing
        if state.pending.get(file.relative_path) != file.signature:
            pending[file.relative_path] = file.signature  # new or still changing
            plan.waiting.append(file.relative_path)
            continue
        if len(plan.ready) >= max_new_per_tick or time.monotonic() - started > time_budget_s:
            pending[file.relative_path] = file.signature  # stable; next tick
            plan.deferred += 1
            continue
        sha = sha256_file(file.path)
        registered[file.key] = SeenFile(file.size, file.mtime_ns, sha)
        previous_sha = known.sha256 if known is not None else recorded_sha256(file.key)
        if previous_sha == sha:
            plan.unchanged.append(file.key)  # identical re-drop: nothing to do
            continue
        plan.ready.append(ReadyFile(file, sha, is_new_key=previous_sha is None))
    plan.state = IntakeState(registered=registered, pending=pending)
    return plan
