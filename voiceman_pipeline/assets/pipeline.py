"""The per-recording chain as one Dagster step per batch of recordings.

``recording_analysis`` is a multi-asset over ``audio -> transcript -> forensic
-> emotion -> report``. A run covers one or more ``audio_files`` partitions (a
backfill splits into runs of ``batch_size``). Inside the step the work goes
stage by stage, so only one model is in memory at a time and each is loaded
once per (sub-)batch:

    for each sub-batch that the memory check lets through (normally all):
        for each selected stage:
            memory check, then load the stage's model
            for each recording still alive: memory check, run the stage under
                a memory tracker, write its output atomically, log its
                materialization (or, on error, an observation) for that partition
            clean up if the stage holds a model (unload, GPU cache, gc)

A recording that fails drops out of the later stages; the others go on. Its
failure is logged as an observation of that stage's partition (error and
error class, shown in the UI). At the end the step fails, listing the failed
recordings, so Dagster marks exactly those partitions failed and the rest
materialized. Whether Dagster retries the step depends on the error classes
(``voiceman_pipeline.error_policy``): permanent errors are never retried; the
others are, with backoff, halved sub-batches, and what earlier attempts
settled (materialized or permanently failed) kept.
"""


from collections.abc import Callable, Iterator
from dataclasses import dataclass

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    AssetObservation,
    BackfillPolicy,
    Failure,
    RetryRequested,
    multi_asset,
)

from voiceman_pipeline.assets import audio, emotion, forensic, report, transcript
from voiceman_pipeline.assets.recording import RecordingFiles
from voiceman_pipeline.assets.specs import AUDIO, EMOTION, FORENSIC, REPORT, TRANSCRIPT
from voiceman_pipeline.engines.base import Engine
from voiceman_pipeline.error_policy import RETRY_POLICY, ErrorCategory, classify
from voiceman_pipeline.errors import MissingUpstreamError, PermanentError
from voiceman_pipeline.partitions import audio_files
from voiceman_pipeline.resources.engines import AcousticAnalysis, EmotionModel, SpeechToText
from voiceman_pipeline.resources.memory import MemoryManager, memory_history_from_instance
from voiceman_pipeline.resources.outputs import RecordingStore
from voiceman_pipeline.settings import Settings


# Metadata of the observation logged when a recording fails at a stage.
ERROR_KEY = "error"
ERROR_CATEGORY_KEY = "error_category"


@dataclass
class StageResources:
    """What a stage may use; engines are built lazily on first access."""

    store: RecordingStore
    stt: SpeechToText
    ser: EmotionModel
    acoustic: AcousticAnalysis


@dataclass(frozen=True)
class Stage:
    key: AssetKey
    run: Callable[[RecordingFiles, StageResources], dict]
    engine: Callable[[StageResources], Engine | None] = lambda r: None
    # Replace a GPU engine that failed on its device with the CPU one.
    cpu_fallback: Callable[[StageResources], Engine] | None = None


STAGES = [
    Stage(AUDIO.key, lambda f, r: audio.take_in(f)),
    Stage(
        TRANSCRIPT.key,
        lambda f, r: transcript.transcribe(f, r.stt.transcriber()),
        engine=lambda r: r.stt.transcriber(),
        cpu_fallback=lambda r: r.stt.fall_back_to_cpu(),
    ),
    Stage(
        FORENSIC.key,
        lambda f, r: forensic.analyze(f, r.acoustic.analyzer(), r.acoustic.low_confidence_threshold),
        engine=lambda r: r.acoustic.analyzer(),
    ),
    Stage(
        EMOTION.key,
        lambda f, r: emotion.recognize(f, r.ser.recognizer()),
        engine=lambda r: r.ser.recognizer(),
        cpu_fallback=lambda r: r.ser.fall_back_to_cpu(),
    ),
    Stage(REPORT.key, lambda f, r: report.build_report(f)),
]


def build_recording_analysis(batch_size: int):
    """The multi-asset, with backfills split into runs of ``batch_size`` recordings."""

    @multi_asset(
        name="recording_analysis",
        specs=[AUDIO, TRANSCRIPT, FORENSIC, EMOTION, REPORT],
        partitions_def=audio_files,
        can_subset=True,  # e.g. `--select audio` runs only the intake
        backfill_policy=BackfillPolicy.multi_run(max_partitions_per_run=batch_size),
        retry_policy=RETRY_POLICY,
        pool="gpu",  # GPU engines: one such step at a time (dagster.yaml)
    )
    def recording_analysis(
        context: AssetExecutionContext,
        store: RecordingStore,
        stt: SpeechToText,
        ser: EmotionModel,
        acoustic: AcousticAnalysis,
        memory: MemoryManager,
    ) -> Iterator[AssetMaterialization | AssetObservation]:
        resources = StageResources(store=store, stt=stt, ser=ser, acoustic=acoustic)
        keys = list(context.partition_keys)
        done, failures = _earlier_attempts(context)
        sub_batch = sub_batch_size(len(keys), context.retry_number)
        if context.retry_number:
            context.log.info(
                f"Retry {context.retry_number}: {len(done)} stage result(s) kept and "
                f"{len(failures)} permanent failure(s) not retried from earlier attempts; "
                f"sub-batches of {sub_batch} recording(s)."
            )
        pending = [key for key in keys if key not in failures]
        while pending:
            chunk = _fitting_chunk(context, memory, store, pending[:sub_batch])
            for stage in STAGES:
                if stage.key not in context.selected_asset_keys:
                    continue
                todo = [k for k in chunk if k not in failures and (stage.key, k) not in done]
                if todo:
                    yield from _run_stage(context, stage, todo, resources, memory, failures)
            pending = pending[len(chunk) :]
            if pending:
                memory.cleanup(f"after sub-batch of {len(chunk)}")
        if failures:
            raise batch_failure(failures)

    return recording_analysis


def sub_batch_size(batch: int, retry_number: int) -> int:
    """Recordings per sub-batch: the whole batch, halved on every retry, down to 1.

    A retry follows a failure that may be memory pressure; smaller sub-batches
    (with cleanup between them) lower the peak, at the cost of reloading models.
    """
    return max(1, batch >> retry_number)


def _fitting_chunk(
    context: AssetExecutionContext, memory: MemoryManager, store: RecordingStore, chunk: list[str]
) -> list[str]:
    """Pre-allocation check for a sub-batch: the recordings that fit in memory now.

    Each recording is predicted from its duration and the memory history of
    the heaviest selected stage (stages run one after another, so the
    heaviest one sets the peak). Above the critical threshold the
    MemoryManager cleans up and allows fewer recordings (the rest follow in
    later sub-batches), at least one; it raises RetryRequested (wait) only when
    memory is already critical after the cleanup. It logs its own warnings.
    """
    histories = [
        memory_history_from_instance(context.instance, stage.key)
        for stage in STAGES
        if stage.key in context.selected_asset_keys
    ]
    per_file = max(
        memory.per_file_estimate_mb(_size_of(RecordingFiles(store, key))[1], history)
        for key in chunk
        for history in histories
    )
    decision = memory.check_before(
        f"batch of {len(chunk)} recording(s)", files=len(chunk), mb_per_file=per_file
    )
    return chunk[: decision.files_allowed]


def _earlier_attempts(
    context: AssetExecutionContext,
) -> tuple[set[tuple[AssetKey, str]], dict[str, BaseException]]:
    """What earlier attempts of this step, in this run, already settled.

    Returns the (asset, partition) pairs materialized (not computed again) and
    the recordings that failed permanently (not retried: a corrupt file stays
    corrupt). Both come from the run's own events; Dagster's event log is the
    checkpoint.
    """
    if not context.retry_number:
        return set(), {}
    records = context.instance.get_records_for_run(context.run.run_id).records
    done: set[tuple[AssetKey, str]] = set()
    failed: dict[str, BaseException] = {}
    for record in records:
        entry = record.event_log_entry
        if entry.asset_materialization is not None and entry.asset_materialization.partition:
            done.add((entry.asset_materialization.asset_key, entry.asset_materialization.partition))
        observation = entry.asset_observation
        if observation is None or observation.partition is None:
            continue
        category = observation.metadata.get(ERROR_CATEGORY_KEY)
        if category is not None and category.value == ErrorCategory.PERMANENT.value:
            message = observation.metadata[ERROR_KEY].value
            failed[observation.partition] = PermanentError(f"{message} (earlier attempt)")
    return done, failed


def _run_stage(
    context: AssetExecutionContext,
    stage: Stage,
    keys: list[str],
    resources: StageResources,
    memory: MemoryManager,
    failures: dict[str, BaseException],
) -> Iterator[AssetMaterialization | AssetObservation]:
    name = stage.key.to_user_string()
    try:
        engine = _loaded_engine(context, stage, resources, memory)
    except RetryRequested:
        raise  # memory already critical: Dagster waits and retries the step
    except Exception as exc:  # no engine, no stage: each recording fails with why
        if classify(exc) is ErrorCategory.PERMANENT:
            exc = PermanentError(f"cannot set up the {name} engine: {type(exc).__name__}: {exc}")
        for key in keys:  # a transient set-up error stays transient: retried
            yield from _failed(context, stage, key, exc, failures)
        return
    engine_name = engine.info.name if engine is not None else None
    history = memory_history_from_instance(context.instance, stage.key, engine_name)
    for key in keys:
        files = RecordingFiles(resources.store, key)
        size_mb, audio_s = _size_of(files)
        memory.check_before(  # warns, or waits when memory is already critical
            f"{name} of {key}",
            files=1,
            mb_per_file=memory.per_file_estimate_mb(audio_s, history),
            keep=engine,  # an emergency cleanup frees the others, not the model in use
        )
        try:
            with memory.track_file(key, name, size_mb, audio_s, engine=engine_name) as stats:
                try:
                    metadata = stage.run(files, resources)
                except Exception as exc:
                    engine = _cpu_twin(context, stage, resources, memory, exc, f"processing {key}")
                    metadata = stage.run(files, resources)
                if stage.key == AUDIO.key:  # intake: the duration is known only now
                    stats.audio_seconds = files.intake().duration_s
        except Exception as exc:  # recorded per file; raised for the batch at the end
            yield from _failed(context, stage, key, exc, failures)
            if classify(exc) is ErrorCategory.RESOURCE:
                memory.emergency_cleanup()  # now, not after the rest of the stage
            continue
        yield AssetMaterialization(
            asset_key=stage.key, partition=key, metadata={**metadata, **stats.to_metadata()}
        )
        if stats.critical_reached:
            memory.emergency_cleanup()  # the watchdog saw critical pressure during the file
    if engine is not None and any(engine.expected_load_mb()):
        # Free this stage's model before the next stage loads its own. (Stages
        # whose engine holds no model skip it: a full gc costs ~0.3-0.5 s and
        # frees next to nothing there.)
        memory.cleanup(f"after {name}")


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
        host_mb, gpu_mb = engine.expected_load_mb()
        memory.check_before(
            f"loading {engine.info.name} for {stage.key.to_user_string()}",
            files=1,
            mb_per_file=host_mb,
            gpu_mb_per_file=gpu_mb,
        )
        try:
            engine.load()
        except Exception as exc:
            engine = _cpu_twin(context, stage, resources, memory, exc, f"loading {engine.info.name}")
            engine.load()
    return engine


def _cpu_twin(
    context: AssetExecutionContext,
    stage: Stage,
    resources: StageResources,
    memory: MemoryManager,
    exc: Exception,
    doing: str,
) -> Engine:
    """The stage's engine rebuilt on the CPU after it failed on its device (a
    service error); any other error, or a stage without a CPU twin, re-raises."""
    if classify(exc) is not ErrorCategory.SERVICE or stage.cpu_fallback is None:
        raise exc
    context.log.warning(
        f"{stage.key.to_user_string()}: {doing} failed on its device ({exc}); using the CPU"
    )
    engine = stage.cpu_fallback(resources)
    memory.register(engine)
    return engine


def _failed(
    context: AssetExecutionContext,
    stage: Stage,
    key: str,
    exc: BaseException,
    failures: dict[str, BaseException],
) -> Iterator[AssetObservation]:
    """Record one recording's failure: in the log, and as an observation of the
    stage's partition (the UI shows why; a retry reads which were permanent)."""
    category = classify(exc)
    message = f"{type(exc).__name__}: {exc}"
    context.log.error(f"{stage.key.to_user_string()} failed for {key}: [{category.value}] {message}")
    failures[key] = exc
    yield AssetObservation(
        asset_key=stage.key,
        partition=key,
        metadata={ERROR_KEY: message, ERROR_CATEGORY_KEY: category.value},
    )


def _size_of(files: RecordingFiles) -> tuple[float, float]:
    """(file MB, audio seconds) of a recording; (0, 0) before its intake."""
    try:
        intake = files.intake()
    except MissingUpstreamError:
        return 0.0, 0.0
    return intake.size_bytes / 2**20, intake.duration_s


def batch_failure(failures: dict[str, BaseException]) -> Failure:
    """One Failure for the step, listing every failed recording and its reason.

    Permanent errors only (bad audio, broken custody, model misconfigured):
    no retry. Anything else (transient, out of memory, device failure) is
    retried by the step's RetryPolicy with exponential backoff and jitter; the
    retry skips what this run already materialized or failed permanently, and
    uses smaller sub-batches.
    """
    categories = {key: classify(exc) for key, exc in failures.items()}
    lines = [
        f"- {key}: [{categories[key].value}] {type(exc).__name__}: {exc}"
        for key, exc in failures.items()
    ]
    return Failure(
        description=f"{len(failures)} recording(s) failed:\n" + "\n".join(lines),
        metadata={
            "failed_partitions": sorted(failures),
            "error_classes": {k: c.value for k, c in categories.items()},
        },
        allow_retries=any(c is not ErrorCategory.PERMANENT for c in categories.values()),
    )


recording_analysis = build_recording_analysis(Settings.from_env().batch_size)
