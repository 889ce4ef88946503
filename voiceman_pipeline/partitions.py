"""The partitioning of the pipeline: one dynamic partition per recording."""

import math

from dagster import DynamicPartitionsDefinition
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

# Keys come from voiceman_pipeline.inbox.partition_key_for: safe and unique.
audio_files = DynamicPartitionsDefinition(name="audio_files")


def balanced_batch_size(count: int, batch_size: int, parallel: int) -> int:
    """Recordings per run for ``count`` recordings run ``parallel`` runs at a time:
    at most ``batch_size``, as few rounds of ``parallel`` runs as that allows, and
    runs of nearly equal size, so that no worker or run slot idles while another
    has a long batch (6 recordings on 2 workers: 3 and 3, not 6 and none)."""
    if count < 1 or parallel < 1:
        return batch_size
    runs = parallel * math.ceil(count / (parallel * batch_size))
    return max(1, math.ceil(count / runs))


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


def spanning_batches(
    all_keys: list[str], selected: list[str], batch_size: int, max_span: int,
    unspannable: frozenset[str] | set[str] = frozenset(),
) -> list[list[str]]:
    """Partition ranges that together cover ``selected``, each holding at most
    ``batch_size`` selected keys and at most ``max_span`` keys in all.

    A run covers a range, not a set, so scattered recordings (the failed ones
    among many done) would otherwise need one run each. The keys in between
    are covered too; their results must be current, so that a run only checks
    them (see ``assets/checkpoint.py``) and computes nothing for them. A key
    of ``unspannable`` (failed or not done: a run would try it again) is
    never in between: a range ends before it.
    """
    wanted = set(selected)
    order = [i for i, key in enumerate(all_keys) if key in wanted]
    # blocked[i]: how many unspannable keys come before position i.
    blocked = [0]
    for key in all_keys:
        blocked.append(blocked[-1] + (key in unspannable and key not in wanted))
    batches: list[list[str]] = []
    start = count = 0
    for n, index in enumerate(order):
        if n == 0:
            start, count = index, 1
            continue
        clear = blocked[index] == blocked[order[n - 1] + 1]  # nothing unspannable between
        if count < batch_size and index - start < max_span and clear:
            count += 1
            continue
        batches.append(all_keys[start : order[n - 1] + 1])
        start, count = index, 1
    if order:
        batches.append(all_keys[start : order[-1] + 1])
    return batches


def range_tags(batch: list[str]) -> dict[str, str]:
    """Run tags that make one run cover the partition range first..last."""
    return {ASSET_PARTITION_RANGE_START_TAG: batch[0], ASSET_PARTITION_RANGE_END_TAG: batch[-1]}
