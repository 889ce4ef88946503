"""Each run's raw stdout and stderr: captured to files for the UI, echoed to the terminal.

Dagster captures per process that executes steps (a run executed in
process, as ``voiceman`` does: once for the run; under the multiprocess
executor: once per step). Its ``LocalComputeLogManager`` points the
process's stdout and stderr descriptors at one file each meanwhile (so C
libraries' output is caught too) and echoes each file back to the terminal
with a ``tail -F`` process, plus a Python ``watch_orphans.py`` process per
``tail`` that kills it if the run's process dies: four processes per
capture. ``tail -F`` reads once a second and is killed when the capture
ends, so the last second of output can miss the terminal
(dagster-io/dagster#23336).

``ComputeLogManager`` here keeps the same files, paths and completion
markers (the UI, ``dagster dev`` and log deletion read them exactly as
before) and echoes with a thread of the captured process instead: no
child process to start or to strand, and everything written reaches
the terminal before the descriptors are put back. Writing still goes
straight to a file, never to a pipe, so a library that writes from C while
holding the GIL cannot block on a reader that needs the GIL.
"""

from __future__ import annotations

import io
import os
import sys
import threading
from collections.abc import Generator, Sequence
from contextlib import contextmanager
from typing import TextIO

from dagster._core.storage.compute_log_manager import CapturedLogContext, ComputeIOType
from dagster._core.storage.local_compute_log_manager import (
    IO_TYPE_EXTENSION,
    LocalComputeLogManager,
)
from dagster._utils import ensure_file, touch_file

# How often the echo thread copies what was written (tail -F: once a second).
ECHO_INTERVAL_S = 0.2


class ComputeLogManager(LocalComputeLogManager):
    """``LocalComputeLogManager`` with the terminal echo in a thread, not processes."""

    @classmethod
    def from_config_value(cls, inst_data, config_value) -> ComputeLogManager:
        from voiceman_pipeline.storage import from_home

        return cls(inst_data=inst_data, **{**config_value, "base_dir": from_home(config_value["base_dir"])})

    @contextmanager
    def capture_logs(self, log_key: Sequence[str]) -> Generator[CapturedLogContext, None, None]:
        out_path = self.get_captured_local_path(log_key, IO_TYPE_EXTENSION[ComputeIOType.STDOUT])
        err_path = self.get_captured_local_path(log_key, IO_TYPE_EXTENSION[ComputeIOType.STDERR])
        with captured(sys.stdout, out_path), captured(sys.stderr, err_path):
            yield CapturedLogContext(log_key)
        touch_file(self.complete_artifact_path(log_key))  # capture complete (the UI reads this)


@contextmanager
def captured(stream: TextIO, path: str) -> Generator[None, None, None]:
    """Point ``stream``'s descriptor at the end of ``path`` and echo what lands there.

    A stream with no descriptor (a test runner's) is left alone, as Dagster does.
    """
    ensure_file(path)
    fd = _fileno(stream)
    if fd is None:
        yield
        return
    stream.flush()
    terminal = os.dup(fd)
    echo = None
    try:
        with open(path, "ab") as log:
            # Echo only this capture's output, not an earlier attempt's.
            echo = _Echo(path, log.tell(), terminal)
            os.dup2(log.fileno(), fd)
        yield
    finally:
        try:
            stream.flush()
        finally:
            os.dup2(terminal, fd)
            if echo is not None:
                echo.finish()
            os.close(terminal)  # after the echo's last write to it


class _Echo(threading.Thread):
    """Copies what is appended to a file, from ``start`` on, to a descriptor."""

    def __init__(self, path: str, start: int, fd: int):
        super().__init__(name="voiceman-log-echo", daemon=True)
        self._file = open(path, "rb")  # noqa: SIM115 (closed by the thread)
        self._file.seek(start)
        self._fd = fd
        self._done = threading.Event()
        self.start()

    def finish(self) -> None:
        """Copy the rest and stop (called once the descriptors are put back)."""
        self._done.set()
        self.join()

    def run(self) -> None:
        with self._file:
            while not self._done.wait(ECHO_INTERVAL_S):
                if not self._copy():
                    return  # the terminal is gone; the file keeps everything
            self._copy()

    def _copy(self) -> bool:
        """Write what is new; False once the terminal is gone (the file keeps everything)."""
        while chunk := self._file.read(1 << 16):
            view = memoryview(chunk)
            try:
                while view:
                    view = view[os.write(self._fd, view):]
            except OSError:
                return False
        return True


def _fileno(stream: TextIO) -> int | None:
    try:
        fd = stream.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return None
    return fd if isinstance(fd, int) else None
