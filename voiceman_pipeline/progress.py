"""A progress bar for ``voiceman run`` / ``retry-failed`` on a terminal.

Recordings done (and failed) of those the command asked for, audio hours
taken in, rate, ETA and this process's memory, drawn with ``rich``. Batches
run inside the command's own process, so the bar follows Dagster's events as
they are logged (the ``progress`` logger, which only the CLI configures), not
by polling the storage. Not a terminal (a pipe, a file, CI): nothing is drawn.
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
        self.audio_s = 0.0
        self.started = time.monotonic()
        self.progress = progress
        self.task = progress.add_task("recordings", total=len(keys), **self._fields()) if progress else None

    def _fields(self) -> dict[str, str]:
        rss = psutil.Process().memory_info().rss / 2**20
        elapsed = max(time.monotonic() - self.started, 1e-3)
        finished = len(self.done | self.failed)
        return {
            "rate": f"{60 * finished / elapsed:.1f}/min",
            "audio": f"{_hms(self.audio_s)} of audio ({self.audio_s / elapsed:.1f}x real time)",
            "failed": f"{len(self.failed)} failed" if self.failed else "",
            "memory": f"{rss:.0f} MB",
        }

    def on_event(self, event) -> None:
        """One Dagster event of a run: a recording's report materialized (done),
        its failure observed at the stage that failed, or its intake (audio length)."""
        if event.event_type_value == "ASSET_MATERIALIZATION":
            materialization = event.event_specific_data.materialization
            key, asset = materialization.partition, materialization.asset_key
            if key not in self.wanted:
                return
            if asset == AUDIO.key and "duration_s" in materialization.metadata:
                self.audio_s += float(materialization.metadata["duration_s"].value)
            if asset == REPORT.key:
                self.done.add(key)
        elif event.event_type_value == "ASSET_OBSERVATION":
            observation = event.event_specific_data.asset_observation
            stage = observation.metadata.get(FAILED_STAGE_KEY)
            key = observation.partition
            if key in self.wanted and stage is not None and stage.value == observation.asset_key.to_user_string():
                self.failed.add(key)
        else:
            return
        if self.progress is not None:
            finished = len(self.done | self.failed)
            self.progress.update(self.task, completed=finished, **self._fields())


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


_CURRENT: dict[str, BatchProgress | None] = {"bar": None}


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
            TextColumn("[bold]{task.description}"),
            BarColumn(),
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
