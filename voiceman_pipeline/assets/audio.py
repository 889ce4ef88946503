"""``audio``: intake of one recording (decode once, hash, describe)."""

from __future__ import annotations

import time

from dagster import MetadataValue

from voiceman_pipeline.recording_files import AUDIO_JSON, DECODED_NPY, RecordingFiles
from voiceman_pipeline.audio_io import NPY_HEADER_BYTES, declared_seconds, decode_to_npy, sha256_file
from voiceman_pipeline.errors import ChainOfCustodyError, InvalidAudioError
from voiceman_pipeline.inbox import find_recording, over_size_limit
from voiceman_pipeline.results import SAMPLE_RATE, AudioIntake, Timings


def take_in(files: RecordingFiles, engine: None = None, options: dict | None = None) -> dict:
    """Find the partition's recording, hash it, decode it, write audio.json.

    No engine and no options: PyAV decodes to 16 kHz mono whatever the input."""
    store, key = files.store, files.key
    try:
        source = find_recording(store.inbox_dir, key)
    except FileNotFoundError as exc:
        raise InvalidAudioError(str(exc)) from exc
    started = time.perf_counter()
    stat_before = source.stat()
    # The sensor skips such files; a retry or a hand-made run must not hash 25 GB to find out.
    if (too_big := over_size_limit(stat_before.st_size, store.max_file_bytes)) is not None:
        raise InvalidAudioError(f"{source.name}: not taken in: it {too_big}.")
    sha_before = sha256_file(source)
    # Decoded straight to disk, frame by frame (never the whole signal in
    # memory), into a temporary file that only replaces audio_16k.npy once
    # every check passed. The free-space check uses the length the header
    # states (capped at the limit); a file that states none is checked as it
    # writes (a full disk fails with DiskFullError).
    declared = declared_seconds(source)
    expected = None
    if declared is not None:
        seconds = min(declared, store.max_audio_seconds) + 1.0
        expected = int(seconds * SAMPLE_RATE) * 4 + NPY_HEADER_BYTES
    with store.pending_file(key, DECODED_NPY, expected) as pending:
        num_samples, info = decode_to_npy(source, pending.handle, max_seconds=store.max_audio_seconds)
        if sha256_file(source) != sha_before:
            raise ChainOfCustodyError(
                f"{key}: {source.name} changed while it was being decoded; it is probably "
                f"still being written. It will be taken in again once it is complete."
            )
        elapsed = time.perf_counter() - started
        # Imported here: evidence reads the stage list, which imports this module.
        from voiceman_pipeline.evidence import keep_earlier_results

        kept = keep_earlier_results(store, key, sha_before)  # before anything new is written
        npy_path = pending.commit()
    duration_s = num_samples / SAMPLE_RATE
    intake = AudioIntake(
        partition_key=key,
        source_path=str(source.resolve()),
        sha256=sha_before,
        size_bytes=stat_before.st_size,
        source_mtime_ns=stat_before.st_mtime_ns,
        container=info.container,
        codec=info.codec,
        original_sample_rate=info.sample_rate,
        channels=info.channels,
        duration_s=round(duration_s, 6),
        num_samples=num_samples,
        decoded_path=str(npy_path.resolve()),
        decoded_sha256=sha256_file(npy_path),
        timings=Timings(process_s=elapsed, audio_s=duration_s),
    )
    json_path = store.write_result(key, AUDIO_JSON, intake)
    files.remember_intake(intake)  # later stages in this run read the new one
    return {
        "source": MetadataValue.path(intake.source_path),
        "sha256": intake.sha256,
        "duration_s": intake.duration_s,
        "codec": intake.codec,
        "container": intake.container,
        "original_sample_rate": intake.original_sample_rate,
        "channels": intake.channels,
        "size_bytes": intake.size_bytes,
        "decode_s": round(elapsed, 4),
        "output": MetadataValue.path(str(json_path)),
        **kept,  # supersedes / superseded_results when earlier results were moved aside
    }
