"""A progress bar for ``voiceman run`` / ``retry-failed`` on a terminal.

Recordings done (and failed) of those the command asked for, rate, the
audio of the recordings done and its multiple of real time, the memory of
this process and its workers, elapsed time and ETA, drawn with ``rich`` on
one line that fits an 80-column terminal (the bar takes what is left). The
bar follows Dagster's events as they are logged (the ``progress`` logger,
which only the CLI configures), not by polling the storage: in the
command's own process, or in a worker process
(``workers.py``), which forwards each recording's note to the command. Not
a terminal (a pipe, a file, CI): nothing is drawn.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
from dagster import logger
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from voiceman_pipeline.assets.checkpoint import FAILED_STAGE_KEY
from voiceman_pipeline.assets.stages import AUDIO, REPORT

# Run config that turns the bar on for the runs of a command (with the console's).
PROGRESS_LOGGER = {"progress": {"config": {}}}


class BatchProgress:
    """What the bar shows: the command's recordings, as their events arrive."""

    def __init__(self, keys: list[str], progress: Progress | None):
        self.wanted = set(keys)
        self.done: set[str] = set()
        self.failed: set[str] = set()
        self.audio_s: dict[str, float] = {}  # length of each recording taken in (intake)
        self.started = time.monotonic()
        self.progress = progress
        self.task = progress.add_task("recordings", total=len(keys), **self._fields()) if progress else None

    def _fields(self) -> dict[str, str]:
        rss = _memory_mb()
        elapsed = max(time.monotonic() - self.started, 1e-3)
        finished = len(self.done | self.failed)
        # Of the recordings done, not of those taken in: intake runs ahead of the
        # analysis, and its length over the time so far would claim a speed not reached.
        audio_done = sum(self.audio_s.get(key, 0.0) for key in self.done)
        return {
            "rate": f"{60 * finished / elapsed:.1f}/min",
            "audio": f"{_hms(audio_done)} audio at {audio_done / elapsed:.1f}x",
            "failed": f"{len(self.failed)} failed" if self.failed else "",
            "memory": f"{rss:.0f} MB",
        }

    def on_event(self, event) -> None:
        """One Dagster event of a run of this process."""
        note = progress_note(event)
        if note is not None:
            self.note(*note)

    def note(self, kind: str, key: str, audio_s: float = 0.0) -> None:
        """A recording's progress (``progress_note``), from this process's runs
        or from a worker's (``workers.py``)."""
        if key not in self.wanted:
            return
        if kind == "audio":
            self.audio_s[key] = audio_s
        elif kind == "done":
            self.done.add(key)
        elif kind == "failed":
            self.failed.add(key)
        if self.progress is not None:
            finished = len(self.done | self.failed)
            # A recording finished: drawn now, not at the next of the 2 refreshes a
            # second, which two recordings finishing close together would skip.
            self.progress.update(self.task, completed=finished, refresh=kind != "audio",
                                 **self._fields())


def progress_note(event) -> tuple | None:
    """What a Dagster event says about a recording's progress: ("audio", key,
    seconds) for its intake, ("done", key) for its report, ("failed", key) at
    the stage that failed; None for anything else."""
    if event.event_type_value == "ASSET_MATERIALIZATION":
        materialization = event.event_specific_data.materialization
        key, asset = materialization.partition, materialization.asset_key
        if asset == AUDIO.key and "duration_s" in materialization.metadata:
            return ("audio", key, float(materialization.metadata["duration_s"].value))
        if asset == REPORT.key:
            return ("done", key)
    elif event.event_type_value == "ASSET_OBSERVATION":
        observation = event.event_specific_data.asset_observation
        stage = observation.metadata.get(FAILED_STAGE_KEY)
        if stage is not None and stage.value == observation.asset_key.to_user_string():
            return ("failed", observation.partition)
    return None


class Forwarder:
    """In a worker process: passes each progress note to ``send`` (to the command)."""

    def __init__(self, send):
        self.send = send

    def on_event(self, event) -> None:
        note = progress_note(event)
        if note is not None:
            self.send(note)


def _memory_mb() -> float:
    """This process's memory and its workers' (``workers.py``), in MB."""
    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            continue  # ended meanwhile
    return total / 2**20


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


_CURRENT: dict[str, BatchProgress | Forwarder | None] = {"bar": None}


class _ToProgress(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        bar, event = _CURRENT["bar"], getattr(record, "dagster_event", None)
        if bar is not None and event is not None:
            bar.on_event(event)


@logger(description="voiceman's progress bar (configured by the voiceman command only).")
def progress_logger(_init_context) -> logging.Logger:
    log = logging.getLogger("voiceman.progress")
    log.setLevel(logging.DEBUG)  # materializations are logged at DEBUG
    log.propagate = False
    if not any(isinstance(handler, _ToProgress) for handler in log.handlers):
        log.addHandler(_ToProgress())
    return log


@contextmanager
def batch_progress(keys: list[str], stream=None) -> Iterator[BatchProgress]:
    """The bar for ``keys`` while the block runs; drawn only on a terminal."""
    stream = stream or sys.stderr
    progress = None
    if stream.isatty():
        progress = Progress(
            BarColumn(bar_width=None),  # what the text leaves; the text is never cut
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]}"),
            TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[audio]}"),
            TextColumn("{task.fields[memory]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(file=stream),
            refresh_per_second=2,
        )
    bar = BatchProgress(keys, progress)
    _CURRENT["bar"] = bar
    try:
        if progress is None:
            yield bar
        else:
            with progress:
                yield bar
    finally:
        _CURRENT["bar"] = None
