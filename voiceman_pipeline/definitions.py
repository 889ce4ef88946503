"""Code location entry point: assembles the pipeline's definitions, nothing else.

Importing this module loads no model and touches no file: engines load
inside runs, in the resources' lifetimes.
"""

from dagster import (
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    Definitions,
    define_asset_job,
    in_process_executor,
)

from voiceman_pipeline.assets.pipeline import recording_analysis
from voiceman_pipeline.assets.specs import STAGE_KEYS
from voiceman_pipeline.assets.summary import summary
from voiceman_pipeline.partitions import audio_files
from voiceman_pipeline.resources.engines import AcousticAnalysis, EmotionModel, SpeechToText
from voiceman_pipeline.resources.memory import MemoryManager
from voiceman_pipeline.resources.outputs import RecordingStore
from voiceman_pipeline.sensors import inbox_sensor
from voiceman_pipeline.settings import Settings

settings = Settings.from_env()

analysis_job = define_asset_job(
    "analysis_job",
    selection=STAGE_KEYS,
    partitions_def=audio_files,
    description="Intake, transcript, forensic, emotion and report for the selected recordings.",
)

# Evaluates summary's automation condition: refresh after reports change.
summary_automation_sensor = AutomationConditionSensorDefinition(
    "summary_automation_sensor",
    target=[summary],
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
)

defs = Definitions(
    assets=[recording_analysis, summary],
    jobs=[analysis_job],
    sensors=[inbox_sensor, summary_automation_sensor],
    resources={
        "store": RecordingStore(
            data_dir=settings.data_dir, max_file_bytes=int(settings.max_file_mb * 2**20)
        ),
        "stt": SpeechToText(
            engine=settings.stt_engine,
            model=settings.stt_model,
            device=settings.stt_device,
            language=settings.stt_language,
        ),
        "ser": EmotionModel(model=settings.ser_model, device=settings.ser_device),
        "acoustic": AcousticAnalysis(),
        "memory": MemoryManager(
            system_threshold_pct=settings.memory_threshold_pct,
            gpu_threshold_pct=settings.gpu_threshold_pct,
            critical_threshold_pct=settings.critical_threshold_pct,
            safety_margin=settings.safety_margin,
        ),
    },
    # One process per run: resources (and so models) are set up once per run,
    # not once per step process as with the multiprocess executor.
    executor=in_process_executor,
)
