"""One run at a time per recording, whatever launched the runs.

A step works on a recording only while it holds that recording's claim: an
exclusive ``flock`` on ``<data>/claims/<digest>.lock``. The kernel drops the
lock when the holder's process ends, ``kill -9`` and the OOM killer included,
so a crash never strands a claim. (Dagster's ``gpu`` pool serialises analysis
steps whose engines use the GPU, on one instance; CPU-only analysis steps are
in no pool and run side by side, so there claims are what keeps two runs off
the same recording. They also hold with several workers on one shared data
folder, where ``flock`` is honoured across machines by NFSv4 and CephFS.)

A step takes the claims it can, works on those recordings, releases them,
then waits for the rest: it never waits while holding a claim, so two steps
cannot deadlock. A recording another step has just finished is then current
and is not computed again (``checkpoint.is_current``).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path


class Claims:
    """The claims one step holds."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.held: dict[str, int] = {}  # key -> open file descriptor holding its lock

    def _path(self, key: str) -> Path:
        # A digest: partition keys may be long or hold characters a name may not.
        return self.folder / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".lock")

    def take(self, keys: list[str]) -> list[str]:
        """Claim every key of ``keys`` that no other step holds; returns those
        now held (in order). Never waits."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        taken = []
        for key in keys:
            if key in self.held:
                taken.append(key)
                continue
            fd = os.open(self._path(key), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.held[key] = fd
            taken.append(key)
        return taken

    def release(self, keys: list[str]) -> None:
        for key in keys:
            fd = self.held.pop(key, None)
            if fd is not None:
                os.close(fd)  # closing the descriptor drops its lock

    def release_all(self) -> None:
        self.release(list(self.held))
