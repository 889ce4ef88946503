"""Batch report: what one analysis run did, for the operator.

Written at the end of every analysis step (``Batch.finish``; ``Batch.stop``
for a stopped run) as ``<data>/outputs/runs/<run_id>.json`` (atomic,
owner-only), shown on the run page as run tags (``voiceman/...``) and as the
step's last log line (``render``), and on a failed step's failure event as
the ``batch_report`` metadata entry. ``voiceman report [RUN_ID]`` prints it.

A figure that cannot be measured is None, and ``missing`` says why.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from voiceman_pipeline.error_policy import ErrorCategory
from voiceman_pipeline.recording_files import RecordingFiles

if TYPE_CHECKING:
    from voiceman_pipeline.assets.pipeline import Batch
    from voiceman_pipeline.resources.outputs import RecordingStore

RUNS_FOLDER = "runs"  # under outputs/; partition keys always end in an audio extension
# Run tags added to the existing voiceman/recordings_ok etc. (values are strings).
SUCCESS_PCT_TAG = "voiceman/success_pct"
FAILURES_TAG = "voiceman/failures"  # "permanent=1,resource=2", or "none"
STEP_RETRIES_TAG = "voiceman/step_retries"
OOM_RECOVERIES_TAG = "voiceman/oom_recoveries"
REPORT_TAG = "voiceman/report"  # where the JSON is
METADATA_KEY = "batch_report"  # on a failed step's failure event
MIN_PREFIX = 4  # shortest run id prefix `voiceman report` accepts (it prints 8)


@dataclass
class BatchReport:
    """One analysis run's outcome. Recordings are partitions of the run's range;
    stage results are (stage, recording) pairs."""

    run_id: str
    status: str  # succeeded | failed | retrying (a step retry follows) | canceled
    first_key: str
    last_key: str
    recordings_total: int
    recordings_ok: int  # through the whole chain (computed or kept)
    recordings_failed: int
    recordings_not_done: int  # canceled: neither through the chain nor failed
    success_pct: float | None  # ok / total x 100, one decimal; None for no recordings
    failures_by_category: dict[str, int]  # every ErrorCategory value, 0 included
    failed_recordings: dict[str, str]  # key -> "stage [category] error"
    results_computed: int  # all attempts of the step
    results_kept: int  # selected results current from earlier runs, not computed again
    step_retries: int  # attempts of the step before the one that wrote this
    oom_recoveries: int  # emergency cleanups (out-of-memory error, critical reading or prediction)
    cleanups: int  # all cleanups during the step (between stages, emergency, stop)
    memory_freed_mb: float  # host: sum of each cleanup's process RSS drop (MB)
    gpu_memory_freed_mb: float | None  # device memory drop summed; None without a GPU reading
    duration_s: float | None  # the run's start to this report
    audio_seconds: float | None  # duration of the recordings ok (intake's decoded length)
    started_at: str | None  # the run's start, ISO 8601 UTC
    written_at: str
    missing: dict[str, str] = field(default_factory=dict)  # field -> why it is None/partial

    # --- serialisation ---

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> BatchReport:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    # --- what the operator sees ---

    def tags(self) -> dict[str, str]:
        """Run tags: the counts in the Runs list and on the run page."""
        from voiceman_pipeline.assets.pipeline import (  # noqa: PLC0415 (pipeline imports us)
            RECORDINGS_FAILED_TAG,
            RECORDINGS_OK_TAG,
            RESULTS_COMPUTED_TAG,
            RESULTS_KEPT_TAG,
        )

        failures = ",".join(f"{c}={n}" for c, n in self.failures_by_category.items() if n)
        return {
            RECORDINGS_OK_TAG: str(self.recordings_ok),
            RECORDINGS_FAILED_TAG: str(self.recordings_failed),
            RESULTS_COMPUTED_TAG: str(self.results_computed),
            RESULTS_KEPT_TAG: str(self.results_kept),
            SUCCESS_PCT_TAG: _pct(self.success_pct),
            FAILURES_TAG: failures or "none",
            STEP_RETRIES_TAG: str(self.step_retries),
            OOM_RECOVERIES_TAG: str(self.oom_recoveries),
        }

    def render(self) -> str:
        failures = ", ".join(f"{c} {n}" for c, n in self.failures_by_category.items() if n)
        not_done = f", {self.recordings_not_done} not done" if self.recordings_not_done else ""
        gpu = (
            f", GPU {self.gpu_memory_freed_mb:.1f} MB"
            if self.gpu_memory_freed_mb is not None
            else f"; GPU: {self.missing.get('gpu_memory_freed_mb', 'not measured')}"
        )
        lines = [
            f"Batch report, run {self.run_id[:8]} ({self.status}): "
            f"recordings {self.first_key} .. {self.last_key}",
            f"  recordings:        {self.recordings_total} total, {self.recordings_ok} ok, "
            f"{self.recordings_failed} failed{not_done} ({_pct(self.success_pct)}% ok)",
            f"  failures:          {failures or 'none'}",
            *(f"    {key}: {why}" for key, why in self.failed_recordings.items()),
            f"  stage results:     {self.results_computed} computed, {self.results_kept} kept "
            f"(current from earlier runs)",
            f"  step retries:      {self.step_retries}",
            f"  OOM recoveries:    {self.oom_recoveries} (emergency cleanups)",
            f"  memory freed:      {self.memory_freed_mb:.1f} MB host in {self.cleanups} "
            f"cleanup(s){gpu}",
            f"  duration:          {_seconds(self.duration_s, self.missing.get('duration_s'))}",
            f"  audio (ok):        {_seconds(self.audio_seconds, self.missing.get('audio_seconds'))}",
        ]
        return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _seconds(value: float | None, why: str | None) -> str:
    if value is None:
        return f"n/a ({why or 'not measured'})"
    return f"{value:.1f} s" + (f" ({why})" if why else "")


# --- building and recording it (Batch.finish / Batch.stop) -------------------


def report_path(store: RecordingStore, run_id: str) -> Path:
    return store.outputs_dir / RUNS_FOLDER / f"{run_id}.json"


def build_report(batch: Batch, status: str, computed: int, kept: int) -> BatchReport:
    """The report of ``batch`` now. ``computed``/``kept``: as the run tags count
    them (all attempts). A canceled batch counts as ok only the recordings
    whose last stage has a result; the rest not failed are "not done"."""
    from voiceman_pipeline.assets.stages import STAGES  # noqa: PLC0415

    context, store = batch.context, batch.resources.store
    keys, failures = batch.keys, batch.failures
    if status == "canceled":
        last = batch.recorded[STAGES[-1].name]
        ok_keys = [k for k in keys if k in last and k not in failures]
    else:  # retired ones are skipped: "not done"
        ok_keys = [k for k in keys if k not in failures and k not in batch.retired]
    missing: dict[str, str] = {}
    categories = Counter(f.category.value for f in failures.values())

    # Cleanups of this attempt (the resource's reports since the Batch began),
    # plus those of earlier attempts, read back from their report.
    cleanups = batch.memory.cleanup_reports[batch.cleanups_before :]
    earlier = _earlier_attempt(store, context.run_id) if context.retry_number else None
    freed = sum(r.freed_mb for r in cleanups) + (earlier.memory_freed_mb if earlier else 0.0)
    gpu_drops = [max(0.0, r.gpu_freed_mb) for r in cleanups if r.gpu_freed_mb is not None]
    if earlier and earlier.gpu_memory_freed_mb is not None:
        gpu_drops.append(earlier.gpu_memory_freed_mb)
    gpu = sum(gpu_drops) if gpu_drops else None
    if gpu is None:
        missing["gpu_memory_freed_mb"] = "no GPU reading (no NVIDIA GPU, or NVML unavailable)"

    record = context.instance.get_run_record_by_id(context.run_id)
    start = record.start_time if record is not None else None
    now = time.time()
    if start is None:
        missing["duration_s"] = "the run's start time is not recorded"

    audio = 0.0
    unreadable = []
    for key in ok_keys:
        try:
            audio += RecordingFiles(store, key).intake().duration_s
        except Exception:  # noqa: BLE001 (missing, damaged: said in `missing`)
            unreadable.append(key)
    if unreadable:
        missing["audio_seconds"] = (
            f"without {len(unreadable)} recording(s) whose intake result is unreadable"
        )

    total = len(keys)
    return BatchReport(
        run_id=context.run_id,
        status=status,
        first_key=keys[0] if keys else "",
        last_key=keys[-1] if keys else "",
        recordings_total=total,
        recordings_ok=len(ok_keys),
        recordings_failed=len(failures),
        recordings_not_done=total - len(ok_keys) - len(failures),
        success_pct=round(100.0 * len(ok_keys) / total, 1) if total else None,
        failures_by_category={c.value: categories.get(c.value, 0) for c in ErrorCategory},
        failed_recordings={
            key: f"{f.stage} [{f.category.value}] {f.message}"[:500] for key, f in failures.items()
        },
        results_computed=computed,
        results_kept=kept,
        step_retries=context.retry_number,
        oom_recoveries=sum(1 for r in cleanups if r.emergency)
        + (earlier.oom_recoveries if earlier else 0),
        cleanups=len(cleanups) + (earlier.cleanups if earlier else 0),
        memory_freed_mb=round(freed, 1),
        gpu_memory_freed_mb=round(gpu, 1) if gpu is not None else None,
        duration_s=round(now - start, 1) if start is not None else None,
        audio_seconds=round(audio, 2),
        started_at=_iso(start) if start is not None else None,
        written_at=_iso(now),
        missing=missing,
    )


def _earlier_attempt(store: RecordingStore, run_id: str) -> BatchReport | None:
    """The report an earlier attempt of this step wrote before asking for a retry."""
    try:
        return BatchReport.from_json(report_path(store, run_id).read_text())
    except (OSError, ValueError, TypeError):
        return None


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


def record_report(batch: Batch, report: BatchReport) -> None:
    """Write the JSON, tag the run, log the rendered report. A report that
    cannot be written (a full disk) is a warning: the run's outcome stands."""
    context, store = batch.context, batch.resources.store
    tags = report.tags()
    path = report_path(store, report.run_id)
    try:
        data = report.to_json().encode("utf-8")
        store.write_file(path, lambda handle: handle.write(data), len(data))
        tags[REPORT_TAG] = str(path)
    except Exception as exc:  # noqa: BLE001 (never hide the run's own outcome)
        context.log.warning(f"batch report not written to {path}: {type(exc).__name__}: {exc}")
    context.instance.add_run_tags(context.run_id, tags)
    context.log.info(report.render())


# --- reading it back (voiceman report) ----------------------------------------


def find_report(instance, store: RecordingStore, run_id: str | None) -> BatchReport:
    """The report of the run ``run_id`` (or a prefix of it), default the latest
    analysis run that has one. Raises LookupError saying why there is none."""
    from dagster import RunsFilter  # noqa: PLC0415

    folder = store.outputs_dir / RUNS_FOLDER
    ids = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
    if run_id is None:
        if not ids:
            raise LookupError(f"no batch reports under {folder} yet: no analysis run has written one"
                              " (a run that ended on a full disk writes none; its log says why)")
        newest = instance.get_runs(filters=RunsFilter(run_ids=ids), limit=1)
        if newest:
            chosen = newest[0].run_id
        else:  # runs deleted from Dagster: the last written
            chosen = max(ids, key=lambda i: _load(folder / f"{i}.json").written_at)
        return _load(folder / f"{chosen}.json")
    run_id = run_id.strip().lower()
    if len(run_id) < MIN_PREFIX:
        raise LookupError(f"run id {run_id!r} is too short: give at least {MIN_PREFIX} characters")
    matches = [i for i in ids if i.startswith(run_id)]
    if len(matches) > 1:
        raise LookupError(f"run id {run_id!r} is ambiguous: {', '.join(m[:12] for m in matches)}")
    if matches:
        return _load(folder / f"{matches[0]}.json")
    known = [r.run_id for r in instance.get_runs(limit=10_000) if r.run_id.startswith(run_id)]
    if known:
        raise LookupError(
            f"run {known[0][:8]} has no batch report (not an analysis run, or it ended "
            f"before its step wrote one)"
        )
    raise LookupError(f"no run with id {run_id!r}")


def _load(path: Path) -> BatchReport:
    try:
        return BatchReport.from_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError) as exc:
        raise LookupError(f"cannot read the batch report {path}: {exc}") from exc


def report_command(instance, store: RecordingStore, run_id: str | None) -> int:
    """``voiceman report [RUN_ID]``: print the report; 1 when there is none."""
    import sys  # noqa: PLC0415

    try:
        report = find_report(instance, store, run_id)
    except LookupError as exc:
        print(f"voiceman report: {exc}", file=sys.stderr)
        return 1
    print(report.render())
    print(f"  file:              {report_path(store, report.run_id)}")
    return 0
