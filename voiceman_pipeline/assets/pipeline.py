"""The per-recording chain as one Dagster step per batch of recordings.

``recording_analysis`` is a multi-asset over ``audio -> transcript -> forensic
-> emotion -> report``. A run covers one or more ``audio_files`` partitions (a
backfill splits into runs of ``batch_size``). Inside the step the work goes
stage by stage, so only one model is in memory at a time and each is loaded
once per run:

    for each selected stage:
        memory check before loading the stage's model
        for each recording still alive: check memory, run the stage under a
            memory tracker, write its output atomically, log its
            materialization for that partition
        clean up (unload the model, GPU cache, gc)

A recording that fails drops out of the later stages; the others go on. At
the end the step fails, listing the failed recordings, so Dagster marks
exactly those partitions failed and the rest materialized (the
materializations were logged per partition). How the failure is raised
depends on its error class (``voiceman_pipeline.error_policy``): permanent
errors are never retried; out-of-memory retries with a smaller sub-batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    BackfillPolicy,
    multi_asset,
)

from voiceman_pipeline.assets import audio, emotion, forensic, report, transcript
from voiceman_pipeline.assets.recording import RecordingFiles
from voiceman_pipeline.assets.specs import AUDIO, EMOTION, FORENSIC, REPORT, TRANSCRIPT
from voiceman_pipeline.engines.base import Engine
from voiceman_pipeline.error_policy import RETRY_POLICY, batch_failure
from voiceman_pipeline.partitions import audio_files
from voiceman_pipeline.resources.engines import AcousticAnalysis, EmotionModel, SpeechToText
from voiceman_pipeline.resources.memory import MemoryManager
from voiceman_pipeline.resources.outputs import RecordingStore
from voiceman_pipeline.settings import Settings


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


STAGES = [
    Stage(AUDIO.key, lambda f, r: audio.take_in(f)),
    Stage(
        TRANSCRIPT.key,
        lambda f, r: transcript.transcribe(f, r.stt.transcriber()),
        engine=lambda r: r.stt.transcriber(),
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
    ) -> Iterator[AssetMaterialization]:
        resources = StageResources(store=store, stt=stt, ser=ser, acoustic=acoustic)
        keys = list(context.partition_keys)
        failures: dict[str, BaseException] = {}
        for stage in STAGES:
            if stage.key not in context.selected_asset_keys:
                continue
            alive = [key for key in keys if key not in failures]
            if not alive:
                break
            yield from _run_stage(context, stage, alive, resources, memory, failures)
        if failures:
            raise batch_failure(failures, retry_number=context.retry_number)

    return recording_analysis


def _run_stage(
    context: AssetExecutionContext,
    stage: Stage,
    keys: list[str],
    resources: StageResources,
    memory: MemoryManager,
    failures: dict[str, BaseException],
) -> Iterator[AssetMaterialization]:
    name = stage.key.to_user_string()
    engine = stage.engine(resources)
    if engine is not None:
        memory.register(engine)
    for key in keys:
        files = RecordingFiles(resources.store, key)
        try:
            with memory.track_file(key, name) as stats:
                metadata = stage.run(files, resources)
        except Exception as exc:  # recorded per file; raised for the batch below
            context.log.error(f"{name} failed for {key}: {type(exc).__name__}: {exc}")
            failures[key] = exc
            continue
        yield AssetMaterialization(
            asset_key=stage.key, partition=key, metadata={**metadata, **stats.to_metadata()}
        )
    # Free this stage's model before the next stage loads its own.
    memory.cleanup(f"after {name}")


recording_analysis = build_recording_analysis(Settings.from_env().batch_size)
