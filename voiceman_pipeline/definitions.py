"""Code location entry point: assembles the pipeline's definitions, nothing else.

Importing this module loads no model and writes nothing: engines load
inside runs, in the resources' lifetimes. (It reads the text-risk pattern
files, whose digest is part of a stage's code version, and may ask NVML
whether a GPU is visible, to choose the analysis step's pool.)
"""

from dagster import Definitions, colored_console_logger, in_process_executor

from voiceman_pipeline import distributed
from voiceman_pipeline.assets.pipeline import build_recording_analysis
from voiceman_pipeline.assets.stages import StageResources
from voiceman_pipeline.assets.summary import summary
from voiceman_pipeline.brake import failure_brake_sensor
from voiceman_pipeline.jobs import analysis_job, summary_job
from voiceman_pipeline.progress import progress_logger
from voiceman_pipeline.resources import configured_resources
from voiceman_pipeline.sensors import dead_cli_runs_sensor, inbox_sensor, summary_sensor
from voiceman_pipeline.settings import Settings

settings = Settings.from_env()
resources = configured_resources(settings)
recording_analysis = build_recording_analysis(
    settings.batch_size,
    StageResources(**{name: resources[name] for name in ("store", "stt", "ser", "acoustic")}),
)

defs = Definitions(
    assets=[recording_analysis, summary],
    jobs=[analysis_job, summary_job],
    sensors=[inbox_sensor, dead_cli_runs_sensor, failure_brake_sensor, summary_sensor],
    resources=resources,
    # Dagster's console logger, and the voiceman command's progress bar (used
    # only when a run's config names it).
    loggers={"console": colored_console_logger, "progress": progress_logger},
    # One process per run: resources (and so models) are set up once per run,
    # not once per step process as with the multiprocess executor.
    # With VOICEMAN_CELERY_BROKER set: dagster-celery's executor (distributed.py).
    executor=distributed.executor(in_process_executor),
)
