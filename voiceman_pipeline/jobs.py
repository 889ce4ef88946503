"""The jobs every analysis and summary run goes through, and where a run came from.

The inbox sensor, ``voiceman`` and the analysis job's Partitions tab launch
``analysis_job``; the summary sensor and ``voiceman`` launch ``summary_job``;
Dagster itself launches the runs of an asset backfill (asset pages, the asset
graph) as its implicit asset job, which cannot be renamed, so every run also
carries ``voiceman/source``.
"""

from dagster import AssetKey, define_asset_job
from dagster._core.storage.tags import BACKFILL_ID_TAG, PARENT_RUN_ID_TAG

from voiceman_pipeline.assets.stages import STAGE_KEYS
from voiceman_pipeline.partitions import audio_files

# Where a run came from: sensor, cli, retry (voiceman retry-failed), backfill,
# re-execution, automation (summary_sensor's runs) or ui (launched by hand: the UI,
# `dagster asset materialize`). A step adds it where Dagster or a hand launched the
# run (runs.own_run).
SOURCE_TAG = "voiceman/source"

analysis_job = define_asset_job(
    "analysis_job",
    selection=STAGE_KEYS,
    partitions_def=audio_files,
    description="Intake, transcript, forensic, emotion and report for the selected recordings.",
)

summary_job = define_asset_job(
    "summary_job",
    selection=[AssetKey("summary")],
    description="One table of every recording: its status and, when done, its results.",
)


def source_tags(source: str) -> dict[str, str]:
    return {SOURCE_TAG: source}


def run_source(tags: dict[str, str]) -> str:
    """The source of a run from its tags: ours when a launcher set one, else
    what Dagster's own tags say (a backfill, a re-execution, or by hand)."""
    if PARENT_RUN_ID_TAG in tags:
        return "re-execution"
    if SOURCE_TAG in tags:
        return tags[SOURCE_TAG]
    return "backfill" if BACKFILL_ID_TAG in tags else "ui"
