"""The inbox: which files are recordings, their partition keys, and when they are ready.

Shared by the ``inbox_sensor`` and the ``voiceman ingest`` command, so a file
is judged the same way whether the daemon or a person registers it.

Partition keys are a pure function of a file's path relative to the inbox:
a name that is already safe (``[A-Za-z0-9._-]``, at most 200 characters, no
leading dot or dash, no ``..``) is its own key; any other name is cleaned and
gets a short hash of the original name as suffix, so two names that clean to
the same text still get distinct, deterministic keys. A safe name shaped like
such a key (``-`` and 10 hex digits, at least one of them a letter, before the
extension) is hashed too, and a hash suffix always holds a letter: so no file
can be named like another file's key. Because the mapping is a function and
one to one, every asset finds its file again from the key alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISLNK, S_ISREG

from voiceman_pipeline.audio_io import sha256_file
from voiceman_pipeline.errors import UnsafePathError

AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".mp3", ".m4a", ".ogg", ".opus", ".aac", ".webm"})
# Names that download tools and editors use while a file is still being written.
TEMPORARY_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".crdownload", ".download", "~")
# (Not "#": evidence is named "#4471 call.wav"; an editor's "#name#" has no audio extension.)
TEMPORARY_PREFIXES = (".", "~$")
MAX_KEY_LENGTH = 200
HASH_SUFFIX_LENGTH = 10
_SAFE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9._-]+")
# What ``partition_key_for`` appends to a name it cleans: "-", 10 hex digits (at least one of them a
# letter), then the extension, cleaned and in lower case, if any.
_HASHED_KEY = re.compile(r".*-(?=[0-9]*[a-f])[0-9a-f]{10}(\.[a-z0-9_-]{1,10})?")


def partition_key_for(relative_path: str) -> str:
    """Safe, unique Dagster partition key for a path relative to the inbox."""
    if _is_own_key(relative_path):
        return relative_path
    name = relative_path.replace(os.sep, "/")
    stem, dot, ext = name.rpartition(".")
    if not dot or "/" in ext or not stem:
        stem, ext = name, ""
    ext = _clean(ext).lower()[:10]
    digest = hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:HASH_SUFFIX_LENGTH]
    if digest.isdigit():  # 1 in 110: a letter tells a hash (_HASHED_KEY) from a phone number
        digest = "abcdef"[int(digest[0]) % 6] + digest[1:]
    suffix = "-" + digest + ("." + ext if ext else "")
    cleaned = _clean(stem)[: MAX_KEY_LENGTH - len(suffix)] or "recording"
    return cleaned + suffix


def _is_safe_key(key: str) -> bool:
    return (
        0 < len(key) <= MAX_KEY_LENGTH and _SAFE_KEY.fullmatch(key) is not None and ".." not in key
    )


def _is_own_key(name: str) -> bool:
    """Whether the file ``name`` (relative to the inbox) is its own key: safe, and not
    shaped like a key made for another name (that file would take its key)."""
    return _is_safe_key(name) and _HASHED_KEY.fullmatch(name) is None


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
    location: str  # the file's path as a string (a Path per file costs on big inboxes)
    size: int
    mtime_ns: int

    @property
    def path(self) -> Path:
        return Path(self.location)

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


def inbox_missing(inbox: Path) -> str | None:
    """Why ``inbox`` cannot be scanned (not there, or not a folder), or None. Said where it
    is scanned: a typo in VOICEMAN_DATA_DIR or an unmounted share must not read as an empty inbox."""
    if inbox.is_dir():
        return None
    return (f"the inbox {str(inbox)!r} is not there (or not a folder): nothing to take in; mount it,"
            " or check VOICEMAN_DATA_DIR")


def scan_inbox(inbox: Path, max_file_bytes: int) -> InboxScan:
    """List audio files under ``inbox`` (recursively), rejecting unsafe ones.

    Hidden and temporary files are skipped silently (they are expected);
    symlinks (to files or folders), pipes, sockets and devices, files
    resolving outside the inbox, names that are not UTF-8, oversized files
    and key collisions are rejected with a reason, for the log.
    """
    inbox = Path(inbox)
    root = inbox.resolve()
    scan = InboxScan()
    seen_keys: dict[str, str] = {}
    # Plain os calls per file, Path objects only for the files kept: a scan
    # runs on every sensor tick over the whole inbox (tens of thousands of files).
    for dirpath, dirnames, filenames in os.walk(inbox, followlinks=False):
        # Hidden folders (.git, .Trash) are not evidence; prune them.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        folder = os.path.relpath(dirpath, inbox)
        prefix = "" if folder == "." else folder.replace(os.sep, "/") + "/"
        scan.rejected += [
            Rejection(prefix + d, "is a symbolic link to a folder, whose recordings are not "
                      "taken in; copy them into the inbox")
            for d in _linked_folders(dirpath, dirnames)
        ]
        folder_inside = None  # resolved once per folder, when it holds a candidate
        for name in sorted(filenames):
            relative = prefix + name
            if name.startswith(TEMPORARY_PREFIXES) or name.endswith(TEMPORARY_SUFFIXES):
                continue
            if os.path.splitext(name)[1].lower() not in AUDIO_EXTENSIONS:
                continue
            path = os.path.join(dirpath, name)
            try:
                stat = os.lstat(path)  # the entry itself: a link is not followed
            except OSError as exc:
                scan.rejected.append(Rejection(relative, f"cannot be read: {exc.strerror}"))
                continue
            if S_ISLNK(stat.st_mode):
                scan.rejected.append(
                    Rejection(relative, "is a symbolic link; copy the recording into the inbox")
                )
                continue
            if not S_ISREG(stat.st_mode):  # reading a named pipe would block the scan
                scan.rejected.append(Rejection(
                    relative, "is not a regular file (a pipe, socket or device); "
                    "copy the recording into the inbox"))
                continue
            if not _is_utf8(relative):  # Dagster keeps keys and names as UTF-8 text
                scan.rejected.append(Rejection(
                    _printable(relative), "its name is not valid UTF-8 (shown with \\x escapes); "
                    "rename the file"))
                continue
            # Symlinks are refused above and symlinked folders are not walked;
            # this catches what slips between those checks (a folder swapped
            # for a link meanwhile), since evidence must stay inside: a file
            # that is no link, in a folder that resolves inside, is inside.
            if folder_inside is None:
                folder_inside = Path(os.path.realpath(dirpath)).is_relative_to(root)
            if not folder_inside:
                resolved = os.path.realpath(path)
                scan.rejected.append(Rejection(relative, f"resolves outside the inbox ({resolved})"))
                continue
            if (too_big := over_size_limit(stat.st_size, max_file_bytes)) is not None:
                scan.rejected.append(Rejection(relative, too_big))
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


def _linked_folders(dirpath: str, dirnames: list[str]) -> list[str]:
    """Those of an os.walk step's ``dirnames`` that are symbolic links to
    folders: os.walk lists them there and does not enter them."""
    return [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]


def _is_utf8(name: str) -> bool:
    """Whether ``name`` (as os.walk decodes it: bytes that are not UTF-8 become
    lone surrogates) is valid UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def quoted(name: str, quotes: str = "'") -> str:
    """``name`` for a message: as it is, between ``quotes``, or as ``repr`` where it
    holds a line break or other control (a file named "x.wav: fine\n300 file(s)
    checked" must not forge lines of a report). Not ``repr`` always: that would
    double the backslashes of ``_printable``'s escapes."""
    return f"{quotes}{name}{quotes}" if name.isprintable() else repr(name)


def _printable(name: str) -> str:
    """``name`` with bytes that are not UTF-8 shown as ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def over_size_limit(size: int, max_file_bytes: int) -> str | None:
    """Why a file of ``size`` bytes is not taken in, or None if it may be."""
    if size <= max_file_bytes:
        return None
    return (f"is {_human_size(size)}, over the {_human_size(max_file_bytes)} limit "
            "(VOICEMAN_MAX_FILE_MB, the resource's max_file_bytes)")


def _human_size(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def find_recording(inbox: Path, key: str) -> Path:
    """The inbox file whose partition key is ``key``, checked safe to open.

    Only a regular file inside the inbox, reached without any symbolic link
    below the inbox folder, is returned: a recording replaced by a link (to
    anything, inside the inbox or out) is refused rather than followed, so no
    file outside the inbox is ever opened through a key. (The inbox folder
    itself may be a link; it is resolved once as the root.)

    Raises:
        FileNotFoundError: no file in the inbox maps to the key (moved or deleted).
        UnsafePathError: the file for the key is a symbolic link, lies in a
            linked folder, resolves outside the inbox, or is not a regular file.
    """
    inbox = Path(inbox)
    direct = inbox / key
    if _is_own_key(key) and os.path.lexists(direct):
        return _checked_recording(inbox, direct)  # safe names are their own key
    linked_folders = []
    for dirpath, dirnames, filenames in os.walk(inbox, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        linked_folders += [
            Path(dirpath, d).relative_to(inbox).as_posix() for d in _linked_folders(dirpath, dirnames)
        ]
        for name in filenames:
            path = Path(dirpath) / name
            if partition_key_for(path.relative_to(inbox).as_posix()) == key:
                return _checked_recording(inbox, path)
    hint = ""
    if linked_folders:
        hint = (
            " Folders that are symbolic links are not searched: "
            f"{', '.join(sorted(linked_folders))}; copy the recordings into the inbox instead."
        )
    raise FileNotFoundError(
        f"No recording in the inbox {str(inbox)!r} has the partition key {key!r}; "
        f"was it moved, renamed or deleted after it was registered?{hint}"
    )


def _checked_recording(inbox: Path, path: Path) -> Path:
    """``path`` if it is a regular file inside ``inbox`` reached without links.

    Checked with lstat and resolve, never by opening the file: a link or a
    device is refused before anything reads it."""
    relative = path.relative_to(inbox).as_posix()
    root = inbox.resolve()
    if path.is_symlink():
        reason = f"is a symbolic link (to {os.readlink(path)!r})"
    else:
        resolved = path.resolve(strict=True)
        if not resolved.is_relative_to(root):
            reason = f"resolves outside the inbox (to {str(resolved)!r})"
        elif resolved != root / relative:
            # Inside, but through a linked folder: a later swap of that link
            # would redirect the key to any file.
            reason = f"is reached through a symbolic-link folder (it resolves to {str(resolved)!r})"
        elif not resolved.is_file():  # resolved: no link left to follow
            reason = "is not a regular file (a folder, pipe, socket or device)"
        else:
            return path
    raise UnsafePathError(
        f"{relative}: refused: it {reason}. Only regular files copied into the inbox "
        f"are analysed; replace it with the recording itself."
    )


# --- deciding what to register ----------------------------------------------


@dataclass(frozen=True)
class Known:
    """What Dagster's storage recorded for a key: the content its last intake
    took in (or tried to and failed), and how the file looked then."""

    sha256: str
    size: int | None
    mtime_ns: int | None
    failed_permanently: bool = False  # that intake failed, and retrying cannot help

    def matches(self, file: InboxFile) -> bool:
        return (self.size, self.mtime_ns) == file.signature


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
    unchanged: list[str] = field(default_factory=list)  # touched, same bytes as recorded: newly found
    waiting: list[str] = field(default_factory=list)  # still being written
    deferred: int = 0  # stable but over this tick's cap or time budget
    refused: list[Rejection] = field(default_factory=list)  # changed under the scan: unreadable
    # The cursor holds only files not yet settled, so it stays small however big
    # the inbox: ``pending``, relative path -> (size, mtime_ns) of files seen
    # changing on the last look; ``requested``, key -> (SHA-256, time, size,
    # mtime_ns) of files handed to a run whose intake Dagster has not recorded
    # yet (size and mtime: such a file still as it was is not hashed again).
    pending: dict[str, tuple[int, int]] = field(default_factory=dict)
    requested: dict[str, Requested] = field(default_factory=dict)

    def cursor(self) -> str:
        return json.dumps(
            {
                "pending": {k: list(v) for k, v in self.pending.items()},
                "requested": {k: list(v) for k, v in self.requested.items()},
            }
        )


# A requested file: (SHA-256, when, size, mtime_ns); size and mtime are None in
# a cursor written before they were kept (that file is hashed once more).
Requested = tuple[str, float, "int | None", "int | None"]


@dataclass
class Cursor:
    pending: dict[str, tuple[int, int]] = field(default_factory=dict)
    requested: dict[str, Requested] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str | None) -> Cursor:
        """The sensor's cursor; an unreadable or older one starts afresh."""
        if not text:
            return cls()
        try:
            data = json.loads(text)
            return cls(
                pending={k: (int(v[0]), int(v[1])) for k, v in data.get("pending", {}).items()},
                requested={
                    k: (str(v[0]), float(v[1]), *((int(v[2]), int(v[3])) if len(v) >= 4 else (None, None)))
                    for k, v in data.get("requested", {}).items()
                },
            )
        except (ValueError, TypeError, AttributeError, IndexError):
            return cls()


# A request whose intake is still not recorded after this long (its run was
# lost or crashed before intake) may be made again; Dagster still skips a
# repeated run key, so this never runs the same content twice.
REQUEST_TTL_S = 6 * 3600.0


def plan_intake(
    scan: InboxScan,
    cursor: Cursor,
    known: dict[str, Known],
    registered: set[str],
    *,
    max_new_per_tick: int,
    settled_after_s: float | None = None,
    time_budget_s: float = 30.0,
) -> IntakePlan:
    """Decide which scanned files are ready to register and run.

    ``known`` is what Dagster recorded per key (``sensors.recorded_intakes``):
    a file that still looks as it did at its last intake is settled without
    hashing; one that was taken in (or failed) with the same SHA-256 is not
    run again, whichever path processed it. Any other file is ready once two
    looks agree on its size and mtime (it is no longer being written), or at
    once when this process already hashed it at that size and mtime, or when
    its mtime is more than ``settled_after_s`` old (nothing has written to it
    for that long: a copy in progress keeps its mtime current). A file
    already requested with the same content is not requested again while its
    run is on its way, and one still at the size and mtime it was requested
    with is not even read again (a restarted sensor has no SHA cache). At
    most ``max_new_per_tick`` files are returned and hashing stops after
    ``time_budget_s``; the rest wait for the next tick.
    """
    plan = IntakePlan()
    started, now = time.monotonic(), time.time()
    in_inbox = {file.key for file in scan.files}
    plan.requested = {  # requests whose intake Dagster has not recorded yet
        key: asked
        for key, asked in cursor.requested.items()
        if key in in_inbox
        and now - asked[1] < REQUEST_TTL_S
        and (key not in known or known[key].sha256 != asked[0])
    }
    for file in scan.files:
        recorded = known.get(file.key)
        if recorded is not None and recorded.matches(file):
            continue  # as it was taken in: the common case, no hashing
        asked = plan.requested.get(file.key)
        if asked is not None and asked[2:] == file.signature:
            continue  # requested as it is now: its run is on its way, no hashing
        sha = _SHA_CACHE.get((file.location, *file.signature))
        hashed_before = sha is not None  # by this process, as it is now
        quiet = settled_after_s is not None and now - file.mtime_ns / 1e9 > settled_after_s
        if sha is None and not quiet and cursor.pending.get(file.relative_path) != file.signature:
            plan.pending[file.relative_path] = file.signature  # new or still changing
            plan.waiting.append(file.relative_path)
            continue
        if len(plan.ready) >= max_new_per_tick or time.monotonic() - started > time_budget_s:
            plan.pending[file.relative_path] = file.signature  # stable; next tick
            plan.deferred += 1
            continue
        try:
            sha = sha or cached_sha256(file)
        except (OSError, UnsafePathError) as exc:  # gone, swapped for a link or pipe, unreadable
            said = str(exc).partition("refused: ")[2]  # UnsafePathError: "<name>: refused: it ..."
            reason = said or f"cannot be read: {getattr(exc, 'strerror', None) or exc}"
            plan.refused.append(Rejection(file.relative_path, reason))
            continue
        if recorded is not None and recorded.sha256 == sha:
            if not hashed_before:
                plan.unchanged.append(file.key)  # touched or copied again: same bytes (said once)
            continue
        if asked is not None and asked[0] == sha:
            plan.requested[file.key] = (*asked[:2], *file.signature)  # touched: same bytes
            continue  # requested already: its run is on its way
        plan.ready.append(ReadyFile(file, sha, is_new_key=file.key not in registered))
        plan.requested[file.key] = (sha, now, *file.signature)
    return plan


# (path, size, mtime_ns) -> SHA-256 of files this process hashed: a touched but
# unchanged file is hashed once, not on every tick. A cache, not state: losing
# it (a restart) costs one more hash per such file.
_SHA_CACHE: dict[tuple[str, int, int], str] = {}
_SHA_CACHE_LIMIT = 20_000
HASHES_DONE = 0  # files this process hashed for intake (bench/scale.py reads it)


def cached_sha256(file: InboxFile) -> str:
    global HASHES_DONE
    sha = sha256_file(file.path)
    HASHES_DONE += 1
    if len(_SHA_CACHE) >= _SHA_CACHE_LIMIT:
        _SHA_CACHE.pop(next(iter(_SHA_CACHE)))  # oldest first
    _SHA_CACHE[(file.location, *file.signature)] = sha
    return sha
