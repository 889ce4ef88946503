"""The partitioning of the pipeline: one dynamic partition per recording."""

from dagster import DynamicPartitionsDefinition

# Keys come from voiceman_pipeline.inbox.partition_key_for: safe and unique.
audio_files = DynamicPartitionsDefinition(name="audio_files")
