"""Where recordings come from (the inbox) and where results go (outputs/).

All writes are atomic: a file is written under a temporary name in the same
folder, flushed to disk, then renamed over the target. A crashed or killed
step (or a stale step process that outlives its run) can leave a stray
temporary file, never a half-written result.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from dagster import ConfigurableResource
from pydantic import Field

from voiceman_pipeline import results

DEFAULT_MAX_FILE_BYTES = 2 * 2**30  # 2 GiB: ~hours of WAV; over it, ask the user
DEFAULT_MAX_AUDIO_SECONDS = 6 * 3600.0  # decoded at 16 kHz: ~1.4 GB of float32


class RecordingStore(ConfigurableResource):
    """The data directory: ``inbox/`` (recordings) and ``outputs/<key>/`` (results)."""

    data_dir: str = Field(
        default="data",
        description="Folder holding inbox/ and outputs/ (env VOICEMAN_DATA_DIR).",
    )
    max_file_bytes: int = Field(
        default=DEFAULT_MAX_FILE_BYTES,
        description="Larger inbox files are rejected with a log line, not processed.",
    )
    max_audio_seconds: float = Field(
        default=DEFAULT_MAX_AUDIO_SECONDS,
        description="Longer recordings fail at intake instead of exhausting memory.",
    )

    @property
    def inbox_dir(self) -> Path:
        return Path(self.data_dir) / "inbox"

    @property
    def outputs_dir(self) -> Path:
        return Path(self.data_dir) / "outputs"

    def file_dir(self, partition_key: str) -> Path:
        """Folder of one recording's results (keys are filesystem-safe)."""
        return self.outputs_dir / partition_key

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
        atomic_write(target, lambda handle: handle.write(data))
        return target

    def write_array(self, partition_key: str, name: str, array: np.ndarray) -> Path:
        target = self.output_path(partition_key, name)
        atomic_write(target, lambda handle: np.save(handle, array, allow_pickle=False))
        return target

    def read_array(self, partition_key: str, name: str) -> np.ndarray:
        # Memory-mapped: a long recording is paged in as engines read it.
        return np.load(self.output_path(partition_key, name), mmap_mode="r", allow_pickle=False)


def atomic_write(target: Path, write) -> None:
    """Write via a same-folder temporary file, fsync, then rename over ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600; results get the usual permissions (umask).
        os.chmod(tmp_name, 0o666 & ~_current_umask())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _current_umask() -> int:
    """The process umask, read without setting it (os.umask can only swap it,
    which would briefly affect files other threads create)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022  # the common default where /proc is not available
