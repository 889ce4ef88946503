"""Where recordings come from (the inbox) and where results go (outputs/).

All writes are atomic: a file is written under a temporary name in the same
folder, flushed to disk, then renamed over the target. A crashed or killed
step (or a stale step process that outlives its run) can leave a stray
temporary file, never a half-written result. A write that fails (a full disk
included) removes its temporary file and leaves the target as it was.

Results describe people's phone calls, so they are owner-only by default
(files 0600, folders the store creates 0700); ``output_mode`` widens that.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
from dagster import ConfigurableResource
from pydantic import Field, field_validator

from voiceman_pipeline import results
from voiceman_pipeline.audio_io import DEFAULT_MAX_AUDIO_SECONDS
from voiceman_pipeline.errors import DiskFullError

DEFAULT_MAX_FILE_BYTES = 2 * 2**30  # 2 GiB: ~hours of WAV; over it, ask the user
DEFAULT_OUTPUT_MODE = 0o600
# Space left free on the outputs disk beyond what a write needs: Dagster's run
# storage, logs and the other steps' outputs share that disk.
FREE_SPACE_MARGIN_BYTES = 64 * 2**20
NPY_HEADER_BYTES = 128  # np.save pads its header to a multiple of 64 bytes
# numpy's tofile() reports a short write (disk full) with no errno, as
# "480000 requested and 146400 written" (counts of items, not bytes).
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


class RecordingStore(ConfigurableResource):
    """The data directory: inbox/ (recordings) and outputs/<recording>/ (results)."""

    data_dir: str = Field(
        default="data",
        description="Folder holding inbox/ and outputs/ (env VOICEMAN_DATA_DIR).",
    )
    max_file_bytes: int = Field(
        default=DEFAULT_MAX_FILE_BYTES,
        description="Larger inbox files are skipped by the sensor (a log line) and refused at intake.",
    )
    max_audio_seconds: float = Field(
        default=DEFAULT_MAX_AUDIO_SECONDS,
        description="Longer recordings fail at intake instead of exhausting memory.",
    )
    output_mode: str = Field(
        default=oct(DEFAULT_OUTPUT_MODE),
        description=(
            "Permissions of result files, in octal ('0600', '0o640'; an int such as "
            "0o640 from Python). Folders the store creates get the matching search "
            "bits (0600 -> 0700, 0640 -> 0750). The umask does not change them."
        ),
    )

    @field_validator("output_mode", mode="before")
    @classmethod
    def _octal_mode(cls, value: Any) -> str:
        return oct(parse_mode(value))

    @property
    def file_mode(self) -> int:
        return int(self.output_mode, 8)

    @property
    def inbox_dir(self) -> Path:
        return Path(self.data_dir) / "inbox"

    @property
    def outputs_dir(self) -> Path:
        return Path(self.data_dir) / "outputs"

    @property
    def claims_dir(self) -> Path:
        """Lock files: which step is working on which recording (``claims``)."""
        return Path(self.data_dir) / "claims"

    def file_dir(self, partition_key: str) -> Path:
        """Folder of one recording's results (keys are filesystem-safe)."""
        return self.outputs_dir / partition_key

    def remove_stale_temporaries(self, partition_key: str) -> list[str]:
        """Remove the temporary files (``.<name>.<random>.tmp``, ``PendingFile``)
        a writer killed mid-write left in a recording's folder (a decoded
        signal's can be GBs); returns their names. Only while holding the
        recording's claim (``claims.py``): then no writer there is alive."""
        removed = []
        try:
            entries = list(os.scandir(self.file_dir(partition_key)))
        except (FileNotFoundError, NotADirectoryError):  # none yet; a file in its place fails its stages
            return removed
        for entry in entries:
            if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file(
                follow_symlinks=False
            ):
                Path(entry.path).unlink(missing_ok=True)
                removed.append(entry.name)
        return removed

    def output_path(self, partition_key: str, name: str) -> Path:
        return self.file_dir(partition_key) / name

    def write_result(self, partition_key: str, name: str, result: Any) -> Path:
        """Write a result dataclass as JSON, atomically."""
        return self.write_text(partition_key, name, results.dumps(result))

    def write_json(self, partition_key: str, name: str, data: dict[str, Any]) -> Path:
        text = json.dumps(data, indent=2, ensure_ascii=False, default=str)
        return self.write_text(partition_key, name, text)

    def write_text(self, partition_key: str, name: str, text: str) -> Path:
        return self.write_bytes(partition_key, name, text.encode("utf-8"))

    def write_bytes(self, partition_key: str, name: str, data: bytes) -> Path:
        target = self.output_path(partition_key, name)
        return self.write_file(target, lambda handle: handle.write(data), len(data))

    def write_array(self, partition_key: str, name: str, array: np.ndarray) -> Path:
        """Write ``array`` as .npy; refused up front when the disk lacks the room."""
        def write(handle) -> None:
            np.save(handle, array, allow_pickle=False)

        target = self.output_path(partition_key, name)
        return self.write_file(target, write, array.nbytes + NPY_HEADER_BYTES)

    def pending_file(
        self, partition_key: str, name: str, expected_bytes: int | None = None
    ) -> "PendingFile":
        """A result file written in pieces (e.g. a recording decoded as it
        streams): a context manager whose ``handle`` the caller writes and whose
        ``commit()`` puts it in place atomically; left without ``commit()``, or
        on any error, nothing replaces the target."""
        target = self.output_path(partition_key, name)
        return PendingFile(target, mode=self.file_mode, expected_bytes=expected_bytes)

    def write_file(self, target: Path, write: Callable, expected_bytes: int | None = None) -> Path:
        """``atomic_write`` with this store's permissions (for files outside
        ``outputs/<key>/``, e.g. the summary tables)."""
        atomic_write(target, write, mode=self.file_mode, expected_bytes=expected_bytes)
        return target

    def read_array(self, partition_key: str, name: str) -> np.ndarray:
        # Memory-mapped: a long recording is paged in as engines read it.
        return np.load(self.output_path(partition_key, name), mmap_mode="r", allow_pickle=False)


def parse_mode(value: Any) -> int:
    """File permissions from an int or an octal string ('600', '0600', '0o600')."""
    if isinstance(value, str):
        text = value.strip().lower().removeprefix("0o")
        if not re.fullmatch(r"[0-7]{1,4}", text):
            raise ValueError(f"output_mode {value!r} is not an octal mode such as '0600'")
        value = int(text, 8)
    if not isinstance(value, int) or not 0 <= value <= 0o777:
        raise ValueError(f"output_mode {value!r} must be a permission mode from 0 to 0o777")
    if value & 0o600 != 0o600:
        raise ValueError(f"output_mode {oct(value)} must let the owner read and write (0o600)")
    return value


def folder_mode(file_mode: int) -> int:
    """A folder mode matching ``file_mode``: search (x) wherever read is allowed."""
    return file_mode | (file_mode & 0o444) >> 2


def atomic_write(
    target: Path,
    write: Callable,
    *,
    mode: int = DEFAULT_OUTPUT_MODE,
    expected_bytes: int | None = None,
) -> None:
    """Write via a same-folder temporary file, fsync, then rename over ``target``.

    Args:
        write: called with the open binary file.
        mode: the file's permissions, exactly (whatever the umask); folders
            this creates get ``folder_mode(mode)``.
        expected_bytes: about how much ``write`` writes. When given, the free
            space is checked first: it must exceed this plus
            ``FREE_SPACE_MARGIN_BYTES``.

    Raises:
        DiskFullError: too little free space up front, or the disk filled up
            while writing (ENOSPC, EDQUOT, or numpy's short write, which has no
            errno). The message names the folder, its disk, and the space
            needed and free. The temporary file is removed; the target is
            left as it was.
    """
    with PendingFile(target, mode=mode, expected_bytes=expected_bytes) as pending:
        write(pending.handle)
        pending.commit()


class PendingFile:
    """A file being written under a temporary name beside ``target``.

    ``with PendingFile(target) as pending:`` creates the folders and the
    temporary file (checking free space first when ``expected_bytes`` is
    given); ``pending.handle`` is open for binary writing; ``pending.commit()``
    flushes, fsyncs and renames it over ``target``. Leaving the block without
    committing, or with an exception, removes the temporary file and leaves
    ``target`` as it was; a full disk becomes ``DiskFullError`` (see
    ``atomic_write``)."""

    def __init__(self, target: Path, *, mode: int = DEFAULT_OUTPUT_MODE, expected_bytes: int | None = None):
        self.target = Path(target)
        self.mode = mode
        self.expected_bytes = expected_bytes
        self.handle = None
        self.tmp_name: str | None = None

    def __enter__(self) -> "PendingFile":
        target = self.target
        _make_folders(target.parent, folder_mode(self.mode))
        if self.expected_bytes is not None:
            _check_free_space(target, self.expected_bytes)
        fd, self.tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
        )
        try:
            os.fchmod(fd, self.mode)
            self.handle = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            Path(self.tmp_name).unlink(missing_ok=True)
            raise
        return self

    def commit(self) -> Path:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.tmp_name, self.target)
        self.tmp_name = None
        return self.target

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.handle.closed:
            try:
                self.handle.close()  # may flush buffered bytes: a full disk shows here too
            except OSError as close_exc:
                exc = exc or close_exc
        if self.tmp_name is not None:
            Path(self.tmp_name).unlink(missing_ok=True)
        if isinstance(exc, OSError) and _is_disk_full(exc):
            target, expected_bytes = self.target, self.expected_bytes
            free = shutil.disk_usage(target.parent).free
            needed = f"{_size(expected_bytes)} needed, " if expected_bytes else ""
            raise DiskFullError(
                f"the disk filled up while writing {target.name} in {target.parent} "
                f"({_disk_of(target.parent)}): {needed}{_size(free)} free now ({exc}). "
                f"{_FREE_SOME}"
            ) from exc
        if exc is not None and exc_type is None:
            raise exc  # closing failed after the block ended normally


_FREE_SOME = "Free space on that disk (or set VOICEMAN_DATA_DIR to a larger one), then retry."


def _make_folders(folder: Path, mode: int) -> None:
    """Create ``folder`` and its missing parents with ``mode`` exactly."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=mode)
        except FileExistsError:
            continue  # created meanwhile by another step: its mode stands
        os.chmod(path, mode)  # mkdir applied the umask


def _check_free_space(target: Path, expected_bytes: int) -> None:
    free = shutil.disk_usage(target.parent).free
    if expected_bytes + FREE_SPACE_MARGIN_BYTES > free:
        raise DiskFullError(
            f"not enough disk space to write {target.name} in {target.parent} "
            f"({_disk_of(target.parent)}): it needs {_size(expected_bytes)} plus "
            f"{_size(FREE_SPACE_MARGIN_BYTES)} kept free, and {_size(free)} is free. {_FREE_SOME}"
        )


def _is_disk_full(exc: OSError) -> bool:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return exc.errno is None and _SHORT_WRITE.search(str(exc)) is not None


def _disk_of(folder: Path) -> str:
    """Which disk holds ``folder``: its mount point, as an operator looks it up."""
    path = folder.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return f"the disk mounted at {path}"


def _size(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"
