"""The partitioning of the pipeline: one dynamic partition per recording."""

from dagster import DynamicPartitionsDefinition
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

# Keys come from voiceman_pipeline.inbox.partition_key_for: safe and unique.
audio_files = DynamicPartitionsDefinition(name="audio_files")


def contiguous_batches(all_keys: list[str], selected: list[str], batch_size: int) -> list[list[str]]:
    """Split ``selected`` into runs of at most ``batch_size`` keys that are
    contiguous in partition order (a run covers a partition *range*)."""
    wanted = set(selected)
    batches: list[list[str]] = []
    current: list[str] = []
    for key in all_keys:
        if key in wanted and len(current) < batch_size:
            current.append(key)
            continue
        if current:
            batches.append(current)
            current = []
        if key in wanted:
            current.append(key)
    if current:
        batches.append(current)
    return batches


def range_tags(batch: list[str]) -> dict[str, str]:
    """Run tags that make one run cover the partition range first..last."""
    return {ASSET_PARTITION_RANGE_START_TAG: batch[0], ASSET_PARTITION_RANGE_END_TAG: batch[-1]}
