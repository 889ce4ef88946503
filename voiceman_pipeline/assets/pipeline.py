"""The per-recording chain as one Dagster step per batch of recordings.

``recording_analysis`` is a multi-asset over the stages in ``stages.STAGES``
(``audio -> transcript -> forensic -> emotion -> report``). A run covers one or
more ``audio_files`` partitions (a backfill splits into runs of
``batch_size``). Inside the step the work goes stage by stage, so only one
model is in memory at a time and each is loaded once per (sub-)batch, and
only when some recording needs it:

    claim the recordings no other step is working on (``claims``; the
    others are waited for afterwards, then found current or computed)
    for each stage:
        the recordings this run should bring up to date (below), minus
        those whose result is already current (``checkpoint.is_current``)
        if any are left: memory check, load the stage's model, and for
        each, one after another: memory check (its own predicted peak: the
        recordings do not overlap), run the stage under a memory tracker,
        write its files atomically, log its materialization with its data
        version and predicted beside measured peak (or, on error, an
        observation with the reason)
        clean up if the stage holds a model (unload, GPU cache, gc)

Which stages a run brings up to date for a recording: the selected ones, and
any other stage of the chain that has no result for it (missing, failed, or
stopped by a Terminate, which Dagster shows as missing) or whose files are
gone or damaged. So materializing the failed or missing partitions of any one
stage, from any asset page, finishes the whole chain for them. A stage that
has a result which is merely out of date, and is not selected, is left as it
is and shows as stale.

A recording that fails drops out of the later stages, each of which gets an
observation saying which stage failed and why. At the end the step fails
listing the failed recordings, so Dagster marks exactly those partitions
failed and the rest materialized. Permanent errors are not retried; for the
others the step asks Dagster for a retry (``RetryRequested``, exponential
backoff with jitter), which again computes only what is not current.

Stop: an interrupt (UI *Terminate*, SIGTERM, SIGINT) ends the step at once,
unloads every engine (an interrupted model is never reused), marks the run
canceling so it ends CANCELED, and is never retried. Files are written
atomically, so nothing partial is left.
"""


import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass

from dagster import (
    AssetExecutionContext,
    AssetMaterialization,
    AssetObservation,
    AssetPartitionStatus,
    BackfillPolicy,
    Config,
    DagsterRunStatus,
    Failure,
    MetadataValue,
    RetryRequested,
    TableColumn,
    TableRecord,
    TableSchema,
    multi_asset,
)
from dagster._core.errors import DagsterExecutionInterruptedError
from dagster._core.storage.tags import BACKFILL_ID_TAG
from pydantic import Field

from voiceman_pipeline import evidence, provenance, runs
from voiceman_pipeline.assets import checkpoint
from voiceman_pipeline.assets.checkpoint import COMPUTED_KEY, ERROR_CATEGORY_KEY, ERROR_KEY, FAILED_STAGE_KEY
from voiceman_pipeline.assets.stages import STAGES, Stage, StageResources
from voiceman_pipeline.audio_io import declared_seconds, sha256_file
from voiceman_pipeline.claims import Claims
from voiceman_pipeline.devices import configured_pool
from voiceman_pipeline.distributed import step_tags
from voiceman_pipeline.engines.base import Engine
from voiceman_pipeline.error_policy import MAX_RETRIES, RETRY_POLICY, ErrorCategory, classify, shortage
from voiceman_pipeline.errors import ChainOfCustodyError, MissingUpstreamError, PermanentError
from voiceman_pipeline.inbox import find_recording
from voiceman_pipeline.partitions import audio_files
from voiceman_pipeline.recording_files import RecordingFiles
from voiceman_pipeline.resources import configured_resources
from voiceman_pipeline.resources.engines import AcousticAnalysis, EmotionModel, SpeechToText
from voiceman_pipeline.resources.memory import (MEMORY_KEY_PREFIX, HistoryRow, MemoryManager, Need,
                                                first_in_process, memory_history, model_loaded, predict)
from voiceman_pipeline.resources.outputs import RecordingStore
from voiceman_pipeline.retire import RETIRED_KEY, retirement_metadata
from voiceman_pipeline.settings import Settings

# Run tags with the outcome of a batch, shown in the Runs list.
RECORDINGS_OK_TAG = "voiceman/recordings_ok"
RECORDINGS_FAILED_TAG = "voiceman/recordings_failed"
RESULTS_COMPUTED_TAG = "voiceman/results_computed"  # (stage, recording) pairs computed
RESULTS_KEPT_TAG = "voiceman/results_kept"  # ... and current from earlier runs, kept
CLAIM_POLL_S = 0.5  # how often a step waiting for another's recordings looks again


class AnalysisConfig(Config):
    recompute: bool = Field(
        default=False,
        description="Compute the selected stages again even where a current result "
        "exists (same recording, inputs, engine and options).",
    )


@dataclass(frozen=True)
class StageFailure:
    """Why a recording dropped out of this run."""

    stage: str
    error: BaseException
    earlier_attempt: bool = False  # failed in an earlier attempt of this step

    @property
    def category(self) -> ErrorCategory:
        return classify(self.error)

    @property
    def message(self) -> str:
        return f"{type(self.error).__name__}: {self.error}"


def build_recording_analysis(batch_size: int, configured: StageResources | None = None):
    """The multi-asset, with backfills split into runs of ``batch_size`` recordings.

    ``configured``: the resources as deployed, for the stages' code versions
    (default: as the environment configures them).
    """
    if configured is None:
        resources = configured_resources(Settings.from_env())
        configured = StageResources(
            **{name: resources[name] for name in ("store", "stt", "ser", "acoustic")}
        )
    code_versions = {stage.name: stage.versioned_code(configured) for stage in STAGES}

    @multi_asset(
        name="recording_analysis",
        specs=[stage.spec(configured) for stage in STAGES],
        partitions_def=audio_files,
        can_subset=True,  # any selection: see "Which stages a run brings up to date"
        backfill_policy=BackfillPolicy.multi_run(max_partitions_per_run=batch_size),
        # No retry_policy: Dagster turns an interrupt into a retry when a step has
        # one. Retries are requested explicitly at the end of the step instead.
        # In pool "gpu" (one such step at a time, dagster.yaml) only when an
        # engine uses the GPU; CPU-only steps run side by side (devices.py).
        pool=configured_pool(configured.stt, configured.ser),
        # With VOICEMAN_CELERY_BROKER set: its Celery queue, "gpu" or "cpu".
        op_tags=step_tags(configured.stt, configured.ser),
    )
    def recording_analysis(
        context: AssetExecutionContext,
        config: AnalysisConfig,
        store: RecordingStore,
        stt: SpeechToText,
        ser: EmotionModel,
        acoustic: AcousticAnalysis,
        memory: MemoryManager,
    ) -> Iterator[AssetMaterialization | AssetObservation]:
        runs.own_run(context)  # its source, and its process: a killed one is then found and cleaned up
        batch = Batch(
            context,
            StageResources(store=store, stt=stt, ser=ser, acoustic=acoustic),
            memory,
            code_versions,
            recompute=config.recompute,
        )
        try:
            yield from batch.run()
        except (KeyboardInterrupt, DagsterExecutionInterruptedError):
            batch.stop()
            raise
        yield from batch.finish()

    return recording_analysis


class Batch:
    """One step's work: its recordings through the chain, and what became of each."""

    def __init__(
        self,
        context: AssetExecutionContext,
        resources: StageResources,
        memory: MemoryManager,
        code_versions: dict[str, str],
        recompute: bool,
    ):
        self.context = context
        self.resources = resources
        self.memory = memory
        self.code_versions = code_versions
        self.recompute = recompute
        self.keys = list(context.partition_keys)
        self.claims = Claims(resources.store.claims_dir)
        # An asset backfill counts a partition done only when one of its own
        # runs logs a materialization for it (dagster.yaml's runs do not).
        self.in_backfill = BACKFILL_ID_TAG in context.run.tags
        self.selected = {s.name for s in STAGES if s.key in context.selected_asset_keys}
        self.failures: dict[str, StageFailure] = _permanent_failures_of_earlier_attempts(context)
        self.retired: dict[str, str] = {}  # set aside by `voiceman retire`: reason (see run)
        self.recorded: dict[str, dict[str, checkpoint.Recorded]] = {s.name: {} for s in STAGES}
        self.sources: dict[str, dict[str, str | int]] = {}  # audio: the file as hashed
        self.computed = 0
        self.kept = 0  # current results found (finish: only those from earlier runs)
        self.confirmed = 0
        # Selected results kept from earlier runs: confirmed if this run fails,
        # since Dagster marks every partition a failed run planned and did not
        # materialize as failed, current or not.
        self.kept_from_earlier: list[tuple[Stage, str, checkpoint.Recorded]] = []
        # The batch report counts the memory resource's cleanups from here on.
        self.cleanups_before = len(memory.cleanup_reports)

    # --- the loop ---------------------------------------------------------

    def run(self) -> Iterator[AssetMaterialization | AssetObservation]:
        context = self.context
        if context.retry_number:
            context.log.info(
                f"Retry {context.retry_number}: {len(self.failures)} permanent failure(s) not retried."
            )
        self.retired = self._retired([key for key in self.keys if key not in self.failures])
        for key, reason in self.retired.items():
            context.log.warning(
                f"{key}: retired ({reason}); not processed while its file has the content retired. "
                f"`voiceman retire --undo {key}` puts it back; new content in its file is taken in."
            )
        pending = [key for key in self.keys if key not in self.failures and key not in self.retired]
        while pending:
            mine = self._claim(pending)
            try:
                self._remove_stale_temporaries(mine)
                for stage in STAGES:
                    yield from self._stage(stage, mine)
            finally:
                self.claims.release(mine)
            pending = [key for key in pending if key not in mine]

    def _retired(self, keys: list[str]) -> dict[str, str]:
        """Reason per recording of ``keys`` set aside by ``voiceman retire`` whose
        file is gone or still has the content retired: a run launched for it
        anyway (the UI lists it among the failed) would fail it again and, with
        that newer failure, un-retire it. New content is taken in as usual."""
        found = {}
        for key, metadata in retirement_metadata(self.context.instance, keys).items():
            source = self._source(key)
            retired_sha = getattr(metadata.get(checkpoint.SOURCE_SHA256), "value", None)
            if source is None or source[checkpoint.SOURCE_SHA256] == retired_sha:
                found[key] = str(metadata[RETIRED_KEY].value)
        return found

    def _remove_stale_temporaries(self, keys: list[str]) -> None:
        """What a writer killed mid-write (kill -9, power cut) left in these
        recordings' folders: never a result (results are renamed into place
        whole), only its temporary file."""
        for key in keys:
            removed = self.resources.store.remove_stale_temporaries(key)
            if removed:
                self.context.log.warning(
                    f"{key}: removed {len(removed)} temporary file(s) an interrupted write left: "
                    f"{', '.join(removed)}"
                )

    def _claim(self, keys: list[str]) -> list[str]:
        """The recordings of ``keys`` no other step is working on, claimed for
        this one; waits (holding none) while another step has them all."""
        said = False
        while True:
            mine = self.claims.take(keys)
            if mine:
                return mine
            if not said:
                self.context.log.info(
                    f"{len(keys)} recording(s) are being processed by another run; waiting "
                    f"for it, then computing only what it did not"
                )
                said = True
            time.sleep(CLAIM_POLL_S)

    def _stage(self, stage: Stage, chunk: list[str]) -> Iterator[AssetMaterialization | AssetObservation]:
        instance = self.context.instance
        recorded = self.recorded[stage.name]
        recorded.update(checkpoint.latest_materializations(instance, stage, chunk))
        # Dagster's partition statuses, read only where needed (a stage not
        # selected; which are marked failed: a result found current): a fresh
        # recording in a run of the whole chain needs neither, and each query
        # costs ~0.1 s per stage.
        statuses = functools.cache(
            lambda: instance.get_status_by_partition(stage.key, chunk, audio_files) or {}
        )
        marked_failed = functools.cache(lambda: checkpoint.marked_failed(instance, stage.key, chunk))

        options = stage.options(self.resources)
        wanted = self._wanted(stage, chunk, statuses, options)
        for key in wanted:
            earlier = self.failures.get(key)
            if earlier is not None and earlier.stage != stage.name and not earlier.earlier_attempt:
                yield _not_run(stage, key, earlier)
        todo: dict[str, str | None] = {}  # key -> data version it will have
        for key in wanted:
            if key in self.failures:
                continue
            missing = [name for name in stage.reads if key not in self.recorded[name]]
            if missing:  # an unselected upstream stage with no recorded result
                yield self._failed(stage, key, MissingUpstreamError(
                    f"{key}: no result of '{missing[0]}' is recorded; materialize it first."
                ))
                continue
            broken = stage.reads and self._custody_broken(key)
            if broken:  # the evidence is not what the results were computed from
                yield self._failed(stage, key, ChainOfCustodyError(broken))
                continue
            data_version = self._data_version(stage, key, options)
            folder = self.resources.store.file_dir(key)
            forced = self.recompute and stage.name in self.selected
            previous = recorded.get(key)
            upstream = {name: self.recorded[name][key] for name in stage.reads}
            if not forced and data_version is not None and checkpoint.is_current(
                previous, self.code_versions[stage.name], data_version, folder, stage, upstream
            ):
                self.kept += 1
                if (self.in_backfill and stage.name in self.selected) or key in marked_failed():
                    # A backfill counts only its own runs' materializations; a
                    # partition marked failed (by a run that failed on another
                    # recording, or on content since put back as it was) turns
                    # green only with a newer one.
                    yield self._confirmed(stage, key, previous)  # type: ignore[arg-type]
                    self.confirmed += 1
                elif stage.name in self.selected and previous.run_id != self.context.run_id:  # type: ignore[union-attr]
                    self.kept_from_earlier.append((stage, key, previous))  # type: ignore[arg-type]
                continue
            same = previous is not None and previous.data_version == data_version
            # Files edited or damaged since they were written are kept aside, never
            # computed over (each hashed here once). Intake of new content moves its
            # results to superseded/ instead.
            kept = None
            if previous is not None and (same or stage.reads):
                try:
                    kept = evidence.set_aside_altered(self.resources.store, key, stage.name, previous.outputs)
                except OSError as exc:  # no room, no permission: this recording alone, nothing overwritten
                    yield self._failed(stage, key, OSError(exc.errno, (
                        f"{key}: the {stage.name} files found altered could not be set aside, so they are "
                        f"not computed again over: {exc}")))
                    continue
            altered = f"; the altered files are kept in {kept}" if kept else ""
            if same and not forced:
                # A result that would otherwise be current: say why it is computed again.
                if kept or not checkpoint.outputs_present(folder, previous.outputs):
                    self.context.log.warning(
                        f"{stage.name} of {key}: its files no longer match the digests recorded "
                        f"when they were written (deleted, damaged or edited); computing them again{altered}"
                    )
                elif changed := checkpoint.changed_inputs(folder, stage, upstream):
                    self.context.log.warning(
                        f"{stage.name} of {key}: {checkpoint.why_inputs_changed(changed)}; "
                        f"computing it again from the upstream results there now"
                    )
            elif kept:  # computed again anyway (asked to, or its inputs changed)
                self.context.log.warning(
                    f"{stage.name} of {key}: its files no longer matched the digests recorded when "
                    f"they were written (edited or damaged){altered}"
                )
            todo[key] = data_version
        if todo:
            if len(todo) < len(wanted):  # else each result's materialization says it all
                # (every log line is an event-log write: ~30 ms each on sqlite)
                self.context.log.info(
                    f"{stage.name}: {len(todo)} to compute, {len(wanted) - len(todo)} current or failed"
                )
            yield from self._compute(stage, todo, options)
            recorded.update(checkpoint.latest_materializations(instance, stage, list(todo)))

    def _confirmed(self, stage: Stage, key: str, previous: checkpoint.Recorded) -> AssetMaterialization:
        """A result that is already current, logged as materialized again where
        Dagster's partition status or a backfill needs it (see the callers),
        with nothing computed or written: same data version, same files;
        ``computed`` False says so in the UI. It carries what the result's
        materialization showed (risk, plot, ...: the UI shows the latest one of
        a partition), but not its memory figures: nothing was measured, and
        memory history would count that recording twice."""
        upstream = {name: self.recorded[name][key] for name in stage.reads}
        shown = {k: v for k, v in previous.metadata.items() if not k.startswith(MEMORY_KEY_PREFIX)}
        return AssetMaterialization(
            asset_key=stage.key,
            partition=key,
            metadata={
                **shown,
                COMPUTED_KEY: False,
                # The run that computed it, where known (older confirmations named none).
                **({checkpoint.COMPUTED_IN_RUN: MetadataValue.text(previous.computed_in)}
                   if previous.computed_in else {}),
                "kept": MetadataValue.text(
                    f"current result kept: same recording, inputs, engine and options ("
                    + (f"computed in run {previous.computed_in[:8]}, " if previous.computed_in else "")
                    + f"event {previous.storage_id}); nothing was computed or written"
                ),
                checkpoint.OUTPUTS_KEY: MetadataValue.json(previous.outputs),
                # Intake: the file as found (the sensor compares the inbox with
                # the latest audio materialization, so it must say what it holds).
                **(self.sources.get(key, {}) if not stage.reads else {}),
            },
            tags=checkpoint.version_tags(
                stage, self.code_versions[stage.name], previous.data_version or "", upstream
            ),
        )

    def _wanted(self, stage: Stage, chunk: list[str], read_statuses, options: dict) -> list[str]:
        """Recordings this run brings up to date for ``stage``: all when it is
        selected; otherwise those with no result (missing or failed), or whose
        files are gone or damaged, or that were computed from an upstream file
        since computed again with the same data version (a damaged result
        derived again, or ``recompute``: Dagster cannot see that; a new data
        version upstream, it shows as "out of date" and leaves to the user).
        (In progress: another run is at it.)
        ``read_statuses()``: Dagster's status of each of ``chunk``."""
        if stage.name in self.selected:
            return chunk
        folder, statuses = self.resources.store.file_dir, read_statuses()

        def broken(key: str) -> bool:
            """Its files gone or damaged, or read from an upstream file computed
            again since with the same data version."""
            previous = self.recorded[stage.name].get(key)
            if previous is None or not checkpoint.outputs_intact(folder(key), previous.outputs):
                return True
            upstream = {name: self.recorded[name].get(key) for name in stage.reads}
            return (
                bool(upstream)
                and None not in upstream.values()
                and checkpoint.derived_data_version(stage, options, upstream) == previous.data_version  # type: ignore[arg-type]
                and bool(checkpoint.changed_inputs(folder(key), stage, upstream))  # type: ignore[arg-type]
            )

        return [
            key
            for key in chunk
            if statuses.get(key) in (None, AssetPartitionStatus.FAILED)
            or (statuses.get(key) == AssetPartitionStatus.MATERIALIZED and broken(key))
        ]

    def _data_version(self, stage: Stage, key: str, options: dict) -> str | None:
        """The data version (stage, key) gets if computed now; None when it cannot
        be known before running (the recording is gone: intake will say why)."""
        if not stage.reads:  # intake: the recording's own SHA-256
            source = self._source(key)
            return source[checkpoint.SOURCE_SHA256] if source else None  # type: ignore[return-value]
        upstream = {name: self.recorded[name][key] for name in stage.reads}
        return checkpoint.derived_data_version(stage, options, upstream)

    def _source(self, key: str) -> dict[str, str | int] | None:
        """The recording in the inbox as this run found it (hashed once per run),
        or None when it is gone or unsafe to read."""
        if key not in self.sources:
            try:
                path = find_recording(self.resources.store.inbox_dir, key)
                stat = path.stat()
                sha = sha256_file(path)
            except (OSError, PermanentError):
                return None
            self.sources[key] = {
                checkpoint.SOURCE_SHA256: sha,
                checkpoint.SOURCE_SIZE: stat.st_size,
                checkpoint.SOURCE_MTIME_NS: stat.st_mtime_ns,
            }
        return self.sources[key]

    def _custody_broken(self, key: str) -> str | None:
        """Why the recording in the inbox is not the one its intake took in, if it
        is not: no later stage may run, or be called current, on other evidence."""
        taken_in = self.recorded["audio"][key].data_version
        source = self._source(key)
        if source is None:
            return (
                f"{key}: the recording taken in at intake is gone from the inbox (or is no "
                f"longer a regular file there); its results cannot be tied to evidence any more."
            )
        if source[checkpoint.SOURCE_SHA256] != taken_in:
            return (
                f"{key}: chain of custody broken: the recording now has SHA-256 "
                f"{str(source[checkpoint.SOURCE_SHA256])[:16]}…, but intake recorded "
                f"{str(taken_in)[:16]}…. It changed after intake; re-materialize 'audio' "
                f"to take in the new version."
            )
        return None

    def _compute(
        self, stage: Stage, todo: dict[str, str | None], options: dict
    ) -> Iterator[AssetMaterialization | AssetObservation]:
        context, memory, store = self.context, self.memory, self.resources.store
        try:
            engine = _loaded_engine(context, stage, self.resources, memory)
        except RetryRequested:
            raise  # memory already critical: Dagster waits and retries the step
        except Exception as exc:  # no engine, no stage: each recording fails with why
            if classify(exc) is ErrorCategory.PERMANENT:
                exc = PermanentError(f"cannot set up the {stage.name} engine: {type(exc).__name__}: {exc}")
            for key in todo:  # a transient set-up error stays transient: retried
                yield self._failed(stage, key, exc)
            return
        engine_name = memory_name(engine)
        history = memory_history(context.instance, stage.key, engine_name)
        for key, data_version in todo.items():
            files = RecordingFiles(store, key)
            upstream = {name: self.recorded[name][key] for name in stage.reads}
            files.produced_by = provenance.produced_by(
                stage.name, context.run_id, self.code_versions[stage.name],
                {name: (rec.code_version, rec.computed_in) for name, rec in upstream.items()})
            audio_s = _size_of(files)[1]
            grown = engine.grown_for_s() if engine is not None else None
            need = predict(audio_s, history, stage.memory_default, first_in_process(stage.name, engine_name), grown)
            # Warns, or waits when memory is already critical; an emergency
            # cleanup frees everything but the model in use (its report goes
            # with this recording's result).
            checked = memory.check(f"{stage.name} of {key}", need, keep=engine)
            cleanups = [checked.cleanup] if checked.cleanup else []
            try:
                with memory.track(stage.name, audio_s, engine_name, need, grown) as stats:
                    try:
                        metadata = stage.run(files, engine, options)
                    except Exception as exc:
                        engine = _cpu_twin(context, stage, self.resources, memory, exc, f"processing {key}")
                        # Its model loaded during this recording, which counts as its first.
                        stats.engine = memory_name(engine)
                        stats.first_in_process = first_in_process(stage.name, stats.engine)
                        stats.grown_s = engine.grown_for_s()
                        metadata = stage.run(files, engine, options)
                    if not stage.reads:  # intake: the duration is known only now
                        intake = files.intake()
                        stats.audio_seconds = intake.duration_s
                        data_version = intake.sha256  # what was actually taken in
                        metadata.update(self.sources.get(key, {}))
                        metadata[checkpoint.SOURCE_SHA256] = intake.sha256
                        metadata[checkpoint.SOURCE_SIZE] = intake.size_bytes
                    tags = checkpoint.version_tags(
                        stage, self.code_versions[stage.name], data_version or "", upstream
                    )
            except Exception as exc:  # recorded per file; raised for the batch at the end
                extra = {}
                # Memory (or descriptors): free now, not after the stage. A full disk: a
                # memory cleanup frees none of it; Dagster's retry waits for space.
                if classify(exc) is ErrorCategory.RESOURCE and (short := shortage(exc)) != "disk":
                    extra = memory.cleanup(f"emergency: out of {short}", keep=engine).to_metadata()
                yield self._failed(stage, key, exc, extra)
                continue
            if stats.critical_reached:  # the watchdog saw critical pressure: free the rest
                cleanups.append(memory.cleanup("emergency: critical reading", keep=engine))
            if stats.engine != engine_name:  # a CPU twin took over: its own history from now on
                engine_name, history = stats.engine, memory_history(context.instance, stage.key, stats.engine)
            # The next recording's prediction learns from this one too (newest first).
            history.insert(0, HistoryRow(stats.audio_seconds, stats.peak_delta_mb, stats.gpu_peak_delta_mb,
                                         stats.first_in_process, stats.grown_s))
            self.computed += 1
            yield AssetMaterialization(
                asset_key=stage.key,
                partition=key,
                metadata={
                    COMPUTED_KEY: True,
                    **metadata,
                    # Predicted (memory_predicted_mb) beside measured peak above the
                    # baseline (memory_peak_delta_mb), and any cleanup run for it.
                    **stats.to_metadata(),
                    **{k: v for c in cleanups for k, v in c.to_metadata().items()},
                    checkpoint.OUTPUTS_KEY: checkpoint.output_digests(stage, files.folder),
                },
                tags=tags,
            )
        if engine is not None and any(engine.expected_load_mb()):
            # Free this stage's model before the next stage loads its own. (Stages
            # whose engine holds no model skip it: a full gc costs ~0.3-0.5 s and
            # frees next to nothing there.)
            memory.cleanup(f"after {stage.name}")

    def _failed(
        self, stage: Stage, key: str, exc: BaseException, extra: dict | None = None
    ) -> AssetObservation:
        """Record one recording's failure: in the log, and as an observation of the
        stage's partition (the UI shows why; a retry reads which were permanent)."""
        failure = StageFailure(stage.name, exc)
        self.failures[key] = failure
        self.context.log.error(
            f"{stage.name} failed for {key}: [{failure.category.value}] {failure.message}"
        )
        tried = self.sources.get(key, {}) if not stage.reads else {}
        return AssetObservation(
            asset_key=stage.key,
            partition=key,
            metadata={
                ERROR_KEY: failure.message,
                ERROR_CATEGORY_KEY: failure.category.value,
                FAILED_STAGE_KEY: stage.name,
                **tried,  # the content intake tried: the sensor does not retry it
                **(extra or {}),  # the emergency cleanup after an out-of-memory error
            },
        )

    # --- the end ----------------------------------------------------------

    def finish(self) -> Iterator[AssetMaterialization]:
        """Record the batch report (run tags, JSON, log); fail the step (or ask
        for a retry) if any recording failed, first confirming the results it
        kept (see ``kept_from_earlier``)."""
        from voiceman_pipeline import batch_report  # it reads Batch: imported late

        if self.context.retry_number:  # earlier attempts of this step computed some too
            tags = self.context.instance.get_run_by_id(self.context.run_id).tags
            self.computed += int(tags.get(RESULTS_COMPUTED_TAG, 0))
        self.kept = len(self.kept_from_earlier) + self.confirmed
        retryable = any(f.category is not ErrorCategory.PERMANENT for f in self.failures.values())
        retrying = retryable and self.context.retry_number < MAX_RETRIES
        status = "retrying" if retrying else "failed" if self.failures else "succeeded"
        # Run tags (recordings_ok etc. included), the JSON, and the rendered log line.
        # (The report's log line says how many were done, computed and kept.)
        report = batch_report.build_report(self, status, self.computed, self.kept)
        batch_report.record_report(self, report)
        if not self.failures:
            return
        failure = batch_failure(self.failures, total=len(self.keys))
        failure.metadata[batch_report.METADATA_KEY] = MetadataValue.json(report.to_dict())
        if retrying:
            raise RetryRequested(
                max_retries=MAX_RETRIES,
                seconds_to_wait=RETRY_POLICY.calculate_delay(self.context.retry_number + 1),
            ) from failure
        for stage, key, previous in self.kept_from_earlier:
            yield self._confirmed(stage, key, previous)
        raise failure

    def stop(self) -> None:
        """An interrupt: free every engine (an interrupted model is not reused) and
        mark the run canceling, so Dagster ends it CANCELED instead of failed
        (the UI's Terminate, and `voiceman` stopping a worker, have already done so; a signal alone has not). Then record
        the batch report of what was done until the stop."""
        from voiceman_pipeline import batch_report

        self.memory.cleanup("stopped")
        instance, run_id = self.context.instance, self.context.run_id
        run = instance.get_run_by_id(run_id)
        if run is not None and run.status in (DagsterRunStatus.STARTED, DagsterRunStatus.STARTING):
            instance.report_run_canceling(run, message="Stopped by an interrupt signal.")
        try:  # after canceling: a report that fails must not keep the run from ending CANCELED
            computed = self.computed
            if self.context.retry_number:  # as finish counts them
                computed += int(instance.get_run_by_id(run_id).tags.get(RESULTS_COMPUTED_TAG, 0))
            kept = len(self.kept_from_earlier) + self.confirmed
            batch_report.record_report(
                self, batch_report.build_report(self, "canceled", computed, kept)
            )
        except Exception as exc:  # noqa: BLE001
            self.context.log.warning(f"batch report of the stopped run failed: {exc}")


def _not_run(stage: Stage, key: str, earlier: StageFailure) -> AssetObservation:
    """A later stage's partition says why it did not run (and is not green)."""
    return AssetObservation(
        asset_key=stage.key,
        partition=key,
        metadata={
            ERROR_KEY: f"not run: '{earlier.stage}' failed for this recording: {earlier.message}",
            ERROR_CATEGORY_KEY: earlier.category.value,
            FAILED_STAGE_KEY: earlier.stage,
        },
    )


def _permanent_failures_of_earlier_attempts(context: AssetExecutionContext) -> dict[str, StageFailure]:
    """Recordings that failed permanently in an earlier attempt of this step, in
    this run: a step retry is for the transient failures; a corrupt file stays
    corrupt. (Finished work needs no such list: it is current, see checkpoint.)"""
    if not context.retry_number:
        return {}
    failed: dict[str, StageFailure] = {}
    for record in context.instance.get_records_for_run(context.run.run_id).records:
        observation = record.event_log_entry.asset_observation
        if observation is None or observation.partition is None:
            continue
        category = observation.metadata.get(ERROR_CATEGORY_KEY)
        stage = observation.metadata.get(FAILED_STAGE_KEY)
        if category is None or category.value != ErrorCategory.PERMANENT.value:
            continue
        message = observation.metadata[ERROR_KEY].value
        failed.setdefault(
            observation.partition,
            StageFailure(
                stage.value if stage else "?",
                PermanentError(f"{message} (earlier attempt)"),
                earlier_attempt=True,
            ),
        )
    return failed


def _loaded_engine(
    context: AssetExecutionContext, stage: Stage, resources: StageResources, memory: MemoryManager
) -> Engine | None:
    """Build and load the stage's engine, after a memory check for its model.

    Loading here, before any recording, keeps the model's own memory out of
    the first recording's figures (which the per-file prediction learns from).
    """
    engine = stage.engine(resources)
    if engine is None:
        return None
    memory.register(engine)
    if not engine.loaded:
        try:
            _load(engine, stage, memory)
        except Exception as exc:
            engine = _cpu_twin(context, stage, resources, memory, exc, f"loading {engine.info.name}")
    return engine


def _load(engine: Engine, stage: Stage, memory: MemoryManager) -> None:
    """Load ``engine``'s model after a memory check for it; its next recording is a first."""
    host_mb, gpu_mb = engine.expected_load_mb()
    # keep=None: an emergency cleanup here may free any other model.
    memory.check(f"loading {engine.info.name} for {stage.name}", Need(host_mb, gpu_mb))
    engine.load()
    if host_mb or gpu_mb:  # a model: its first recording pays its warm-up
        model_loaded(stage.name, memory_name(engine))


def memory_name(engine: Engine | None) -> str | None:
    """The engine as its memory history knows it (``memory_engine``): its name, and
    its device where that is not the CPU. A model on a GPU keeps its weights out of
    host memory, so its host peaks say nothing of its CPU twin's, which runs under
    the same name."""
    if engine is None:
        return None
    info = engine.info
    return info.name if info.device == "cpu" else f"{info.name} on {info.device}"


def _cpu_twin(
    context: AssetExecutionContext,
    stage: Stage,
    resources: StageResources,
    memory: MemoryManager,
    exc: Exception,
    doing: str,
) -> Engine:
    """The stage's engine rebuilt on the CPU and loaded, after it failed on its device
    (a service error); any other error, or a stage without a CPU twin, re-raises."""
    if classify(exc) is not ErrorCategory.SERVICE or stage.cpu_fallback is None:
        raise exc
    context.log.warning(f"{stage.name}: {doing} failed on its device ({exc}); using the CPU")
    engine = stage.cpu_fallback(resources)
    memory.register(engine)
    _load(engine, stage, memory)
    return engine


def _size_of(files: RecordingFiles) -> tuple[float, float]:
    """(file MB, audio seconds) of a recording, as its intake recorded them;
    before intake, the inbox file's size and the length its container header
    states (read without decoding: a 3-hour call is predicted as one, not at
    the floor); (0, 0) where neither is known."""
    try:
        intake = files.intake()
    except MissingUpstreamError:
        try:
            path = find_recording(files.store.inbox_dir, files.key)
            return path.stat().st_size / 2**20, declared_seconds(path) or 0.0
        except (OSError, PermanentError):
            return 0.0, 0.0  # gone or unsafe: intake says why
    return intake.size_bytes / 2**20, intake.duration_s


RESULT_SCHEMA = TableSchema(
    columns=[
        TableColumn("recording", "string"),
        TableColumn("status", "string"),
        TableColumn("failed_stage", "string"),
        TableColumn("error_class", "string"),
        TableColumn("reason", "string"),
    ]
)


def batch_failure(failures: dict[str, StageFailure], total: int) -> Failure:
    """One Failure for the step: counts, and a table of each failed recording,
    the stage it failed at and why (so 5 of 6 done does not read as nothing done).

    Permanent errors only (bad audio, broken custody, misconfiguration) are
    final; for the others the step first asks for a retry (see ``Batch.finish``).
    """
    lines = [
        f"- {key}: {f.stage} [{f.category.value}] {f.message}" for key, f in failures.items()
    ]
    rows = [
        TableRecord(
            {
                "recording": key,
                "status": "failed",
                "failed_stage": f.stage,
                "error_class": f.category.value,
                "reason": f.message[:500],
            }
        )
        for key, f in failures.items()
    ]
    return Failure(
        description=f"{len(failures)} of {total} recording(s) failed:\n" + "\n".join(lines),
        metadata={
            "recordings": total,
            "recordings_ok": total - len(failures),
            "recordings_failed": len(failures),
            "failed_recordings": MetadataValue.table(rows, schema=RESULT_SCHEMA),
        },
        allow_retries=False,  # retries are requested explicitly (Batch.finish)
    )
