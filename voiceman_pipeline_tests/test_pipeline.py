"""The whole chain through Dagster on real recordings with the real engines.

Fault injection only at true edges: an out-of-memory error raised once by a
real engine (a memory condition that must be forced).
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import importlib.metadata
import json
import os
import socket
import subprocess
from pathlib import Path

import pandas as pd
import psutil
import pytest
from dagster import (
    AssetKey,
    AssetPartitionStatus,
    DagsterEventType,
    materialize,
)
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG
from pydantic import PrivateAttr

from voiceman_pipeline.assets.pipeline import build_recording_analysis
from voiceman_pipeline.assets.stages import STAGE_BY_NAME, STAGE_KEYS
from voiceman_pipeline.assets.summary import summary
from voiceman_pipeline.audio_io import sha256_file
from voiceman_pipeline.cli import failed_recordings, print_status
from voiceman_pipeline.definitions import defs
from voiceman_pipeline.engines.forensic.text_risk import shown_score
from voiceman_pipeline.engines.stt.pocketsphinx_engine import PocketsphinxTranscriber
from voiceman_pipeline.evidence import verify_all
from voiceman_pipeline.partitions import audio_files
from voiceman_pipeline.resources.engines import SpeechToText
from voiceman_pipeline.resources.memory import HistoryRow, memory_history, predict
from voiceman_pipeline.status import recording_statuses
from voiceman_pipeline_tests.conftest import REPO, SAMPLE_WAVS, drop

STAGES = ["audio", "transcript", "forensic", "emotion", "report"]
recording_analysis = build_recording_analysis(batch_size=8)


def resources(store, **overrides):
    return {**defs.resources, "store": store, **overrides}


def run_batch(instance, store, keys, selection=STAGE_KEYS, assets=None, **overrides):
    """One run over the partition range ``keys[0]..keys[-1]``."""
    return materialize(
        assets or [recording_analysis],
        selection=selection,
        instance=instance,
        resources=resources(store, **overrides),
        tags={ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]},
        raise_on_error=False,
    )


def latest_metadata(instance, asset: str, key: str) -> dict:
    records = instance.fetch_materializations(AssetKey(asset), limit=1000).records
    matching = [r for r in records if r.partition_key == key]
    assert matching, f"no {asset} materialization for {key}"
    return {k: v.value for k, v in matching[0].asset_materialization.metadata.items()}


def event_types(instance, run_id) -> list[DagsterEventType]:
    records = instance.get_records_for_run(run_id).records
    return [r.event_log_entry.dagster_event.event_type for r in records if r.event_log_entry.dagster_event]


def test_whole_chain_on_real_samples_then_summary(instance, store):
    keys = [drop(store, path).name for path in SAMPLE_WAVS[:2]]
    instance.add_dynamic_partitions("audio_files", keys)
    result = run_batch(instance, store, keys)
    assert result.success

    key = keys[0]
    folder = store.file_dir(key)
    transcript = json.loads((folder / "transcript.json").read_text())
    assert {"text", "segments", "words"} <= transcript.keys()
    assert transcript["words"] and transcript["text"]
    sha = json.loads((folder / "audio.json").read_text())["sha256"]
    for name in ("transcript.json", "forensic.json", "emotion.json"):
        assert json.loads((folder / name).read_text())["source_sha256"] == sha
    report = json.loads((folder / "report.json").read_text())
    assert report["source_sha256"] == sha and Path(report["plot"]).is_file()
    assert (folder / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # What a person sees in the UI, per stage.
    meta = latest_metadata(instance, "transcript", key)
    assert meta["engine"] == "pocketsphinx" and meta["word_count"] > 0
    assert 0 < meta["real_time_factor"] < 5
    meta = latest_metadata(instance, "forensic", key)
    assert meta["risk_level"] in {"minimal", "low", "moderate", "high", "critical"}
    assert 0 <= meta["risk_score"] <= 100 and "top_evidence" in meta
    meta = latest_metadata(instance, "emotion", key)
    assert meta["status"] == "unavailable" and meta["dominant_label"] == "n/a"
    meta = latest_metadata(instance, "report", key)
    assert meta["plot"].startswith("![timeline](data:image/png;base64,")
    for stage in STAGES:  # memory figures on every materialization
        meta = latest_metadata(instance, stage, key)
        assert meta["memory_peak_mb"] >= max(meta["memory_start_mb"], meta["memory_end_mb"]) - 1

    assert materialize([summary], instance=instance, resources={"store": store}).success
    table = pd.read_parquet(store.outputs_dir / "summary.parquet")
    assert sorted(table["partition_key"]) == sorted(keys)  # one row per materialized file
    csv = pd.read_csv(store.outputs_dir / "summary.csv")
    assert list(csv["partition_key"]) == list(table["partition_key"])
    assert list(csv["sha256"]) == list(table["sha256"])
    assert (table["word_count"] > 0).all() and table["risk_level"].notna().all()


def test_the_report_names_the_software_host_and_runs_that_produced_each_result(instance, store):
    key = drop(store, SAMPLE_WAVS[0]).name
    instance.add_dynamic_partitions("audio_files", [key])
    first = run_batch(instance, store, [key])
    # A run that fails on another recording logs this one's results again, as
    # current (computed False): they were still computed by the first run.
    (store.inbox_dir / "broken.wav").write_bytes(b"not audio" * 100)
    instance.add_dynamic_partitions("audio_files", ["broken.wav"])
    confirming = run_batch(instance, store, [key, "broken.wav"])
    store.output_path(key, "transcript.json").unlink()  # computed again, and what reads it
    second = run_batch(instance, store, [key])
    assert first.success and not confirming.success and second.success
    audio = instance.fetch_materializations(AssetKey("audio"), limit=1).records[0]
    assert audio.run_id == confirming.run_id  # the latest, a confirmation, which names the first
    shown = audio.asset_materialization.metadata
    assert shown["computed"].value is False and shown["computed_in_run"].value == first.run_id
    assert f"(computed in run {first.run_id[:8]}, event " in shown["kept"].value

    produced_by = json.loads(store.output_path(key, "report.json").read_text())["produced_by"]
    ran_in = {"audio": first.run_id}  # the rest in the second run
    for stage in STAGES:  # as Dagster's storage recorded each result
        record = instance.fetch_materializations(AssetKey(stage), limit=1).records[0]
        tags = record.asset_materialization.tags
        assert produced_by["stages"][stage] == {
            "code_version": tags["dagster/code_version"], "run_id": ran_in.get(stage, second.run_id)}
    software = produced_by["software"]
    assert software["version"] == importlib.metadata.version("voiceman-pipeline")
    assert software["libraries"]["pocketsphinx"] == importlib.metadata.version("pocketsphinx")
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if git.returncode == 0:
        assert software["commit"] == git.stdout.strip() and isinstance(software["local_changes"], bool)
    else:  # not a checkout: no commit, and why
        assert software["commit"] is None and software["commit_unknown"].startswith("git could not say")
    assert produced_by["host"] == socket.gethostname()


def test_recording_replaced_after_intake_breaks_the_chain_of_custody(instance, store):
    path = drop(store, SAMPLE_WAVS[0], "evidence.wav")
    instance.add_dynamic_partitions("audio_files", ["evidence.wav"])
    assert run_batch(instance, store, ["evidence.wav"], selection=[AssetKey("audio")]).success
    transcript = store.output_path("evidence.wav", "transcript.json").read_bytes()
    path.write_bytes(SAMPLE_WAVS[1].read_bytes())  # swapped after intake
    # The transcript is current for the evidence taken in, but the evidence is
    # no longer there: the run must not call it current.
    result = run_batch(instance, store, ["evidence.wav"], selection=[AssetKey("transcript")])
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.user_failure_data
    assert "chain of custody broken" in failure.description
    assert "ChainOfCustodyError" in failure.description
    assert DagsterEventType.STEP_UP_FOR_RETRY not in event_types(instance, result.run_id)
    assert store.output_path("evidence.wav", "transcript.json").read_bytes() == transcript


@pytest.mark.storage
def test_batch_of_six_with_one_corrupt_file(instance, store):
    keys = [drop(store, SAMPLE_WAVS[i % 2], f"call{i}.wav").name for i in range(5)]
    (store.inbox_dir / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage" * 100)
    keys.insert(3, "corrupt.wav")
    instance.add_dynamic_partitions("audio_files", keys)
    result = run_batch(instance, store, keys)
    assert not result.success
    good = [k for k in keys if k != "corrupt.wav"]
    for stage in STAGES:
        status = instance.get_status_by_partition(AssetKey(stage), keys, audio_files)
        assert {status[k] for k in good} == {AssetPartitionStatus.MATERIALIZED}, stage
        assert status["corrupt.wav"] == AssetPartitionStatus.FAILED, stage
    assert DagsterEventType.STEP_UP_FOR_RETRY not in event_types(instance, result.run_id)
    failure = result.get_step_failure_events()[0].step_failure_data.user_failure_data
    assert "corrupt.wav" in failure.description and "[permanent]" in failure.description
    # 5 of 6 done does not read as nothing done: counts and a table, and run tags.
    assert failure.description.startswith("1 of 6 recording(s) failed")
    assert failure.metadata["recordings_ok"].value == 5
    assert failure.metadata["recordings_failed"].value == 1
    (row,) = failure.metadata["failed_recordings"].value.records
    assert row.data["recording"] == "corrupt.wav" and row.data["failed_stage"] == "audio"
    tags = instance.get_run_by_id(result.run_id).tags
    assert tags["voiceman/recordings_ok"] == "5" and tags["voiceman/recordings_failed"] == "1"


def test_silence_has_no_stress_figure_anywhere(instance, store):
    """No voice, no measure: the stress index is absent, never a made-up 0; no
    words, no risk score: the level says "no words", never "minimal"."""
    import soundfile as sf
    import numpy as np

    sf.write(store.inbox_dir / "silence.wav", np.zeros(16_000 * 3, dtype=np.float32), 16_000)
    instance.add_dynamic_partitions("audio_files", ["silence.wav"])
    assert run_batch(instance, store, ["silence.wav"]).success
    meta = latest_metadata(instance, "forensic", "silence.wav")
    assert "stress_index" not in meta and meta["stress_level"] == "not measurable"
    forensic = json.loads(store.output_path("silence.wav", "forensic.json").read_text())
    assert forensic["stress"]["value"] is None and forensic["stress"]["level"] == "not measurable"
    assert forensic["risk_score"] is None and forensic["risk_level"] == "no words"
    assert "risk_score" not in meta and meta["risk_level"] == "no words"
    assert "risk_score" not in latest_metadata(instance, "report", "silence.wav")
    assert materialize([summary], instance=instance, resources={"store": store}).success
    row = pd.read_csv(store.outputs_dir / "summary.csv").iloc[0]
    assert pd.isna(row["stress_index"]) and row["stress_level"] == "not measurable"
    assert pd.isna(row["risk_score"]) and row["risk_level"] == "no words" and row["word_count"] == 0
    # No category has evidence: said as the forensic metadata says it, not left blank.
    meta = latest_metadata(instance, "forensic", "silence.wav")
    strongest = (row["highest_category"], row["highest_category_score"], row["highest_category_level"])
    assert strongest == ("none", 0.0, "none") == (
        meta["highest_category"], meta["highest_category_score"], meta["highest_category_level"])
    (status,) = recording_statuses(instance, store, ["silence.wav"])
    assert status.risk == "none (no words)"


# --- memory recovery and model lifetime -------------------------------------


class CountingTranscriber(PocketsphinxTranscriber):
    """The real pocketsphinx engine, counting model loads across the process."""

    loads = 0

    def load(self) -> None:
        was_loaded = self.loaded
        super().load()
        if not was_loaded:
            type(self).loads += 1


STRANDED_NODES = 50_000  # the rest of such a run leaves about 6,000 unreachable objects


def strand_garbage(nodes: int) -> None:
    """What a failed allocation strands: a half-built structure whose nodes
    point at themselves, unreachable on return, which only a garbage
    collection frees."""
    for node in [[] for _ in range(nodes)]:
        node.append(node)


class OutOfMemoryOnce(CountingTranscriber):
    """Raises MemoryError (or, with ``descriptors``, the error of a process out of
    file descriptors) on the first file named in a marker file, once; notes the
    process of every call."""

    marker: Path
    descriptors = False
    pids: list[int] = []

    def transcribe(self, audio, source_sha256):
        type(self).pids.append(os.getpid())
        if not self.marker.exists():
            self.marker.write_text("raised")
            strand_garbage(STRANDED_NODES)
            if self.descriptors:
                raise OSError(errno.EMFILE, "Too many open files", "injected")
            raise MemoryError("injected: cannot allocate decoder lattice")
        return super().transcribe(audio, source_sha256)


class InjectedSpeechToText(SpeechToText):
    """SpeechToText that builds one of the test transcribers above."""

    kind: str = "counting"
    marker: str = ""
    _injected = PrivateAttr(default=None)

    def transcriber(self):
        if self._injected is None:
            self._injected = OutOfMemoryOnce() if self.kind in ("oom", "emfile") else CountingTranscriber()
            self._injected.descriptors = self.kind == "emfile"
            self._injected.marker = Path(self.marker)
        return self._injected


def test_each_model_loads_once_per_run_across_a_batch(instance, store):
    keys = [drop(store, SAMPLE_WAVS[i % 3], f"c{i}.wav").name for i in range(4)]
    instance.add_dynamic_partitions("audio_files", keys)
    CountingTranscriber.loads = 0
    result = run_batch(instance, store, keys, stt=InjectedSpeechToText(kind="counting"))
    assert result.success
    assert CountingTranscriber.loads == 1
    history = [latest_metadata(instance, "transcript", k)["memory_engine"] for k in keys]
    assert history == ["pocketsphinx"] * 4


@pytest.mark.parametrize("kind, short", [("oom", "memory"), ("emfile", "file descriptors")])
def test_out_of_memory_cleans_up_keeping_the_model_and_the_retry_computes_the_rest(
    instance, store, tmp_path, kind, short
):
    keys = [drop(store, SAMPLE_WAVS[i], f"m{i}.wav").name for i in range(2)]
    instance.add_dynamic_partitions("audio_files", keys)
    marker = tmp_path / "oom-raised"
    OutOfMemoryOnce.loads, OutOfMemoryOnce.pids = 0, []
    # Automatic collections paused: the garbage the fault strands is then
    # found only by the emergency cleanup's own collection.
    gc.disable()
    try:
        result = run_batch(instance, store, keys, selection=STAGE_KEYS[:2],
                           stt=InjectedSpeechToText(kind=kind, marker=str(marker)))
    finally:
        gc.enable()
    assert marker.exists()  # the fault did fire
    assert result.success  # ... and the retry recovered it
    assert event_types(instance, result.run_id).count(DagsterEventType.STEP_UP_FOR_RETRY) == 1
    # The retry ran in this very process (the in-process executor, as on a
    # Celery worker): what the first attempt held is still held, and only the
    # cleanup frees it.
    assert len(OutOfMemoryOnce.pids) >= 2 and set(OutOfMemoryOnce.pids) == {os.getpid()}
    # The failed recording's observation carries the emergency cleanup's report;
    # the model in use was not among what it freed.
    failed = [
        r.event_log_entry.asset_observation.metadata
        for r in instance.get_records_for_run(result.run_id).records
        if r.event_log_entry.asset_observation is not None
        and r.event_log_entry.asset_observation.asset_key == AssetKey("transcript")
    ]
    assert [m["memory_cleanup_reason"].value for m in failed] == [f"emergency: out of {short}"]
    assert "Transcriber" not in failed[0]["memory_cleanup_services"].value
    assert failed[0]["memory_cleanup_objects"].value >= STRANDED_NODES  # collected right there
    assert OutOfMemoryOnce.loads == 2, OutOfMemoryOnce.loads  # once per attempt, not per recording
    # The first attempt's transcripts were kept, not recomputed: one per file.
    records = instance.fetch_materializations(AssetKey("transcript"), limit=100).records
    assert sorted(r.partition_key for r in records) == sorted(keys)


class CriticalWhileProcessing:
    """A machine at 50 %, seen at 97 % by the watchdog (the thread that reads
    while a recording is processed): critical pressure mid-recording only."""

    def read(self):
        import threading

        from voiceman_pipeline.resources.memory import MemoryReading

        busy = threading.current_thread().name.startswith("memory-watchdog")
        used = 97_000.0 if busy else 50_000.0
        return MemoryReading(100_000.0, used, psutil.Process().memory_info().rss / 2**20)


def test_critical_pressure_mid_recording_cleans_up_without_reloading_the_model(instance, store):
    from voiceman_pipeline.resources.memory import PEAK_KEY, PREDICTED_MB_KEY, MemoryManager

    keys = [drop(store, SAMPLE_WAVS[i % 2], f"p{i}.wav").name for i in range(3)]
    instance.add_dynamic_partitions("audio_files", keys)
    CountingTranscriber.loads = 0
    result = run_batch(instance, store, keys, selection=STAGE_KEYS[:2],
                       stt=InjectedSpeechToText(kind="counting"),
                       memory=MemoryManager(probe=CriticalWhileProcessing()))
    assert result.success
    assert CountingTranscriber.loads == 1  # 3 recordings, 3 emergency cleanups, one load
    for key in keys:
        meta = latest_metadata(instance, "transcript", key)
        assert meta["memory_critical_reached"] is True
        assert meta["memory_cleanup_reason"] == "emergency: critical reading"
        assert "Transcriber" not in meta["memory_cleanup_services"]
        assert meta[PREDICTED_MB_KEY] > 0 and meta[PEAK_KEY] >= 0  # side by side
    status = instance.get_status_by_partition(AssetKey("transcript"), keys, audio_files)
    assert set(status.values()) == {AssetPartitionStatus.MATERIALIZED}


class SpokenThreatTranscriber(PocketsphinxTranscriber):
    """The real pocketsphinx transcript with its first words replaced by a threat
    (STT of a real threat is not available offline): real timings, known words."""

    SPOKEN = "i will kill you and nobody will find you".split()

    def transcribe(self, audio, source_sha256):
        transcript = super().transcribe(audio, source_sha256)
        words = transcript.words[: len(self.SPOKEN)]
        for word, text in zip(words, self.SPOKEN):
            word.text, word.confidence = text, 0.9
        segment = transcript.segments[0]
        segment.words, segment.text, segment.end = words, " ".join(self.SPOKEN), words[-1].end
        transcript.words, transcript.segments = words, [segment]
        transcript.text, transcript.confidence = " ".join(self.SPOKEN), 0.9
        return transcript


class ThreatSpeechToText(SpeechToText):
    _injected = PrivateAttr(default=None)

    def transcriber(self):
        if self._injected is None:
            self._injected = SpokenThreatTranscriber()
        return self._injected


def test_risk_evidence_flows_from_transcript_to_report_and_summary(instance, store):
    key = drop(store, SAMPLE_WAVS[2], "threat.wav").name  # 7 s of real speech
    instance.add_dynamic_partitions("audio_files", [key])
    assert run_batch(instance, store, [key], stt=ThreatSpeechToText()).success
    words = json.loads(store.output_path(key, "transcript.json").read_text())["words"]
    meta = latest_metadata(instance, "forensic", key)
    assert meta["highest_category"] == "threat" and meta["highest_category_score"] >= 90
    assert meta["highest_category_level"] == "critical"  # whatever the weighted overall score
    assert meta["evidence_count"] >= 2 and "i will kill you" in meta["top_evidence"]
    forensic = json.loads(store.output_path(key, "forensic.json").read_text())
    threat = next(c for c in forensic["categories"] if c["category"] == "threat")
    kill = next(e for e in threat["evidence"] if e["matched_text"] == "i will kill you")
    assert kill["time_start"] == words[0]["start"] and kill["time_end"] == words[3]["end"]
    # The report joins the forensic result as written, evidence and times included.
    report = json.loads(store.output_path(key, "report.json").read_text())
    assert report["forensic"]["categories"] == forensic["categories"]
    assert report["forensic"]["risk_score"] == forensic["risk_score"]
    assert materialize([summary], instance=instance, resources={"store": store}).success
    row = pd.read_csv(store.outputs_dir / "summary.csv").iloc[0]
    assert row["highest_category"] == "threat" and row["evidence_count"] == meta["evidence_count"]
    assert row["highest_category_level"] == "critical"
    (status,) = recording_statuses(instance, store, [key])
    caveat = ", low-confidence transcript" if forensic["low_confidence_transcript"] else ""
    assert status.risk == f"{shown_score(forensic['risk_score'])} ({forensic['risk_level']}), threat" \
        f" {shown_score(threat['score'])} (critical){caveat}"


def test_status_by_risk_lists_the_strongest_category_first(instance, store, capsys):
    # Registered in this order: calm and a copy of it (the sample's own words), threat,
    # then one not run.
    keys = [drop(store, SAMPLE_WAVS[0], "calm.wav").name, drop(store, SAMPLE_WAVS[0], "another-calm.wav").name,
            drop(store, SAMPLE_WAVS[2], "threat.wav").name, drop(store, SAMPLE_WAVS[1], "waiting.wav").name]
    instance.add_dynamic_partitions("audio_files", keys)
    assert run_batch(instance, store, keys[:2]).success
    assert run_batch(instance, store, keys[2:3], stt=ThreatSpeechToText()).success

    def listed(**by) -> list[str]:
        print_status(instance, store, keys, **by)
        lines = capsys.readouterr().out.splitlines()[2:]  # under the header and its rule
        return [line.split()[0] for line in lines]

    assert listed() == keys  # as registered
    # Not done first (as the UI's table), then the threat above the calm calls, which
    # tie: in key order, as the summary's table.
    assert listed(by_risk=True) == ["waiting.wav", "threat.wav", "another-calm.wav", "calm.wav"]
    calm, threat = (json.loads(store.output_path(k, "forensic.json").read_text()) for k in keys[1:3])
    strongest = [max((c["score"] for c in f["categories"]), default=0) for f in (calm, threat)]
    assert strongest[1] > strongest[0]  # what the order rests on, as computed


# --- error classes through real runs -----------------------------------------


class FailsOnGpuOnce(CountingTranscriber):
    """A transcriber on a GPU (as it reports itself) whose device fails (as a
    CUDA error would) on its call number ``fails_on`` (counting from 1); the
    calls before it work."""

    fails_on = 1
    calls = 0

    @property
    def info(self):
        return dataclasses.replace(super().info, device="cuda")

    def transcribe(self, audio, source_sha256):
        from voiceman_pipeline.errors import ServiceError

        self.calls += 1
        if self.calls >= self.fails_on:
            raise ServiceError("CUDA error: an illegal memory access was encountered")
        return super().transcribe(audio, source_sha256)


class FlakyDiskOnce(CountingTranscriber):
    """Raises an I/O error (EIO) once, as a flaky network share would."""

    marker: Path

    def transcribe(self, audio, source_sha256):
        import errno

        if not self.marker.exists():
            self.marker.write_text("raised")
            raise OSError(errno.EIO, "Input/output error", "/mnt/share/recording")
        return super().transcribe(audio, source_sha256)


class FaultyDevice(InjectedSpeechToText):
    """Builds the failing engine; its CPU fallback is the real pocketsphinx."""

    fails_on: int = 1  # the device's call that fails (kind "gpu")

    def transcriber(self):
        if self._injected is None:
            self._injected = FailsOnGpuOnce() if self.kind == "gpu" else FlakyDiskOnce()
            self._injected.marker = Path(self.marker)
            self._injected.fails_on = self.fails_on
        return self._injected

    def fall_back_to_cpu(self):
        self._injected = CountingTranscriber()
        return self._injected


def run_logs(instance, run_id) -> list[str]:
    return [
        r.event_log_entry.user_message
        for r in instance.get_records_for_run(run_id).records
        if r.event_log_entry.dagster_event is None
    ]


def test_a_model_failing_on_its_device_falls_back_to_the_cpu(instance, store):
    # The step's side of a device failure in the middle of a recording: the
    # engine raises ServiceError once and the engine the resource falls back to
    # finishes it (both injected here; the real fallback is tested below).
    keys = [drop(store, SAMPLE_WAVS[0], "g.wav").name]
    instance.add_dynamic_partitions("audio_files", keys)
    result = run_batch(instance, store, keys, stt=FaultyDevice(kind="gpu"))
    assert result.success
    assert DagsterEventType.STEP_UP_FOR_RETRY not in event_types(instance, result.run_id)
    assert any("using the CPU" in m for m in run_logs(instance, result.run_id))
    assert latest_metadata(instance, "transcript", "g.wav")["word_count"] > 0


def test_a_cpu_twin_taking_over_mid_stage_is_measured_as_a_fresh_load(instance, store):
    """The device fails on the second of three recordings: the CPU twin is
    loaded during that recording, which is then a first of its engine (its
    peak holds the model's load and warm-up, learnt apart from the steady
    line); the third is not. Each model loaded once."""
    keys = [drop(store, SAMPLE_WAVS[i], f"m{i}.wav").name for i in range(3)]
    instance.add_dynamic_partitions("audio_files", keys)
    CountingTranscriber.loads = FailsOnGpuOnce.loads = 0
    result = run_batch(instance, store, keys, selection=STAGE_KEYS[:2], stt=FaultyDevice(kind="gpu", fails_on=2))
    assert result.success
    transcripts = [latest_metadata(instance, "transcript", k) for k in keys]
    assert [t["memory_first_in_process"] for t in transcripts] == [True, True, False]
    assert all(t["word_count"] > 0 for t in transcripts)
    assert FailsOnGpuOnce.loads == CountingTranscriber.loads == 1  # the device's engine, then its CPU twin
    # The GPU engine's host peaks are kept apart from its CPU twin's, which has the same name:
    # the third recording is predicted from the twin's own first recording alone.
    assert [t["memory_engine"] for t in transcripts] == ["pocketsphinx on cuda", "pocketsphinx", "pocketsphinx"]
    assert [len(memory_history(instance, "transcript", name)) for name in ("pocketsphinx on cuda", "pocketsphinx")] == [1, 2]
    twin_first = HistoryRow(transcripts[1]["memory_audio_seconds"], transcripts[1]["memory_peak_delta_mb"], None, True,
                            transcripts[1]["memory_model_grown_s"])
    expected = predict(transcripts[2]["memory_audio_seconds"], [twin_first], STAGE_BY_NAME["transcript"].memory_default,
                       grown_s=transcripts[2]["memory_model_grown_s"])
    assert transcripts[2]["memory_predicted_mb"] == pytest.approx(expected.host_mb, abs=0.11)


def test_a_model_that_cannot_load_on_the_gpu_runs_on_the_cpu_through_the_resource(
    instance, store, tiny_whisper
):
    """faster-whisper set to "cuda" on a machine without one: its load fails
    with a ServiceError and the real ``SpeechToText.fall_back_to_cpu`` rebuilds
    it on the CPU for the recording, with no step retry. (The test above
    injects the failing engine and its fallback; this one injects nothing.)"""
    import ctranslate2

    if ctranslate2.get_cuda_device_count() > 0:
        pytest.skip("this machine has a GPU: the CUDA load succeeds, nothing falls back")
    keys = [drop(store, SAMPLE_WAVS[0], "w.wav").name]
    instance.add_dynamic_partitions("audio_files", keys)
    stt = SpeechToText(engine="faster-whisper", model=str(tiny_whisper), language="en", device="cuda")
    result = run_batch(instance, store, keys, selection=STAGE_KEYS[:2], stt=stt)
    assert result.success
    assert DagsterEventType.STEP_UP_FOR_RETRY not in event_types(instance, result.run_id)
    engine = json.loads(store.output_path(keys[0], "transcript.json").read_text())["engine"]
    assert engine["name"] == "faster-whisper" and engine["device"] == "cpu"
    assert latest_metadata(instance, "transcript", keys[0])["memory_engine"] == "faster-whisper"


def test_a_transient_error_is_retried_by_dagster_and_recovers(instance, store, tmp_path):
    keys = [drop(store, SAMPLE_WAVS[i], f"t{i}.wav").name for i in range(2)]
    instance.add_dynamic_partitions("audio_files", keys)
    marker = tmp_path / "eio-raised"
    result = run_batch(instance, store, keys, stt=FaultyDevice(kind="disk", marker=str(marker)))
    assert marker.exists() and result.success
    retries = [e.dagster_event for e in instance.all_logs(result.run_id)
               if e.dagster_event and e.dagster_event.event_type == DagsterEventType.STEP_UP_FOR_RETRY]
    assert len(retries) == 1
    # The first wait: 2 s with up to 2 s of jitter either way (error_policy.RETRY_POLICY).
    assert 0 <= retries[0].event_specific_data.seconds_to_wait <= 4
    status = instance.get_status_by_partition(AssetKey("report"), keys, audio_files)
    assert set(status.values()) == {AssetPartitionStatus.MATERIALIZED}


def test_a_retry_does_not_repeat_permanent_failures(instance, store, tmp_path):
    keys = [drop(store, SAMPLE_WAVS[0], "ok.wav").name, "corrupt.wav"]
    (store.inbox_dir / "corrupt.wav").write_bytes(b"not audio at all" * 100)
    instance.add_dynamic_partitions("audio_files", keys)
    marker = tmp_path / "eio-raised"
    result = run_batch(instance, store, keys, stt=FaultyDevice(kind="disk", marker=str(marker)))
    assert not result.success  # corrupt.wav still fails ...
    assert event_types(instance, result.run_id).count(DagsterEventType.STEP_UP_FOR_RETRY) == 1
    observations = [
        r.event_log_entry.asset_observation
        for r in instance.get_records_for_run(result.run_id).records
        if r.event_log_entry.asset_observation is not None
    ]
    corrupt = [o for o in observations if o.partition == "corrupt.wav"]
    intake = [o for o in corrupt if o.asset_key == AssetKey("audio")]
    assert len(intake) == 1  # ... once: its intake was not run again on the retry
    assert intake[0].metadata["error_category"].value == "permanent"
    assert "not a readable audio file" in intake[0].metadata["error"].value
    # Each later stage says why it did not run, once.
    later = sorted(o.asset_key.to_user_string() for o in corrupt if o.asset_key != AssetKey("audio"))
    assert later == sorted(STAGES[1:])
    assert all("'audio' failed" in o.metadata["error"].value for o in corrupt[1:])
    status = instance.get_status_by_partition(AssetKey("report"), keys, audio_files)
    assert status["ok.wav"] == AssetPartitionStatus.MATERIALIZED


def test_an_engine_that_cannot_be_set_up_fails_each_recording_without_retry(instance, store):
    keys = [drop(store, SAMPLE_WAVS[0], "w.wav").name]
    instance.add_dynamic_partitions("audio_files", keys)
    missing = SpeechToText(engine="faster-whisper", model=str(store.outputs_dir / "no-model"))
    result = run_batch(instance, store, keys, stt=missing)
    assert not result.success
    assert DagsterEventType.STEP_UP_FOR_RETRY not in event_types(instance, result.run_id)
    failure = result.get_step_failure_events()[0].step_failure_data.user_failure_data
    assert "cannot set up the transcript engine" in failure.description
    assert "does not exist" in failure.description and "VOICEMAN_STT_MODEL" in failure.description
    status = instance.get_status_by_partition(AssetKey("audio"), keys, audio_files)
    assert status["w.wav"] == AssetPartitionStatus.MATERIALIZED  # intake still done


def test_a_damaged_decoded_signal_is_derived_again_from_the_evidence(instance, store):
    keys = [drop(store, SAMPLE_WAVS[0], "npy.wav").name]
    instance.add_dynamic_partitions("audio_files", keys)
    assert run_batch(instance, store, keys, selection=[AssetKey("audio")]).success
    npy = store.output_path("npy.wav", "audio_16k.npy")
    good = npy.read_bytes()
    data = bytearray(good)
    data[-4:] = b"\x00\x00\x80\x3f"  # the last sample becomes 1.0
    npy.write_bytes(bytes(data))
    # Only the transcript is asked for; the damaged intake output is noticed
    # (its digest no longer matches the one recorded) and re-derived first.
    result = run_batch(instance, store, keys, selection=[AssetKey("transcript")])
    assert result.success
    assert npy.read_bytes() == good
    assert materialization_count(instance, "audio", "npy.wav") == 2
    # Its audio.json is new bytes (timings), and every later result named the
    # old one among its inputs: each is computed again from the one there now,
    # asked for or not, so the whole chain reads from what is on disk.
    assert [materialization_count(instance, s, "npy.wav") for s in STAGES] == [2] * 5
    assert verify_all(instance, store) == []
    (kept,) = (store.file_dir("npy.wav") / "altered").glob("*-audio/audio_16k.npy")
    assert kept.read_bytes() == bytes(data)  # the damaged signal, kept as found


def test_an_edited_result_is_kept_aside_before_it_is_computed_again(instance, store, capsys):
    keys = [drop(store, SAMPLE_WAVS[0], "edit.wav").name]
    instance.add_dynamic_partitions("audio_files", keys)
    assert run_batch(instance, store, keys).success
    forensic = store.output_path("edit.wav", "forensic.json")
    recorded = latest_metadata(instance, "forensic", "edit.wav")["output_sha256"]["forensic.json"]
    edited = forensic.read_text().replace('"risk_level": "', '"risk_level": "critical-', 1)
    forensic.write_text(edited)
    assert [m.what for m in verify_all(instance, store)] == ["forensic/forensic.json"]

    # What verify's advice runs: `dagster asset materialize --select forensic --partition edit.wav`.
    assert run_batch(instance, store, keys, selection=[AssetKey("forensic")]).success
    (note_path,) = (store.file_dir("edit.wav") / "altered").glob("*-forensic/altered.json")
    assert (note_path.parent / "forensic.json").read_text() == edited  # as found, not overwritten
    note = json.loads(note_path.read_text())
    assert note["stage"] == "forensic" and note["recorded_sha256"] == {"forensic.json": recorded}
    assert note["sha256"] == {"forensic.json": sha256_file(note_path.parent / "forensic.json")}
    assert "critical-" not in forensic.read_text()  # computed again in its place
    assert verify_all(instance, store) == []  # the set-aside copy is not a result
    print_status(instance, store, keys)
    assert "ALTERED 1 result(s) found edited or damaged: kept in altered/" in capsys.readouterr().out
    # The copy set aside is checked as superseded/ ones are: changed since, verify says so.
    (note_path.parent / "forensic.json").write_text("{}")
    (mismatch,) = verify_all(instance, store)
    assert mismatch.what == f"altered/{note_path.parent.name}/forensic.json"
    assert mismatch.expected == note["sha256"]["forensic.json"]
    assert materialize([summary], instance=instance, resources={"store": store}).success
    (row,) = pd.read_csv(store.outputs_dir / "summary.csv").to_dict("records")
    assert row["altered_results"] == note_path.parent.name and row["status"] == "done"
    (built,) = instance.fetch_materializations(AssetKey("summary"), limit=1).records
    (shown,) = built.asset_materialization.metadata["recordings"].records  # the UI's table
    assert shown.data["altered_results"] == note_path.parent.name


def test_an_edited_result_that_cannot_be_set_aside_is_not_computed_over(instance, store):
    keys = [drop(store, SAMPLE_WAVS[0], "stuck.wav").name, drop(store, SAMPLE_WAVS[1], "fine.wav").name]
    instance.add_dynamic_partitions("audio_files", keys)
    assert run_batch(instance, store, keys).success
    for key in keys:
        path = store.output_path(key, "forensic.json")
        path.write_text(path.read_text().replace('"risk_level": "', '"risk_level": "edited-', 1))
    (store.file_dir("stuck.wav") / "altered").write_text("a file where the altered/ folder would go")

    result = run_batch(instance, store, keys, selection=[AssetKey("forensic")])
    assert not result.success
    (failure,) = [
        r.event_log_entry.asset_observation.metadata
        for r in instance.get_records_for_run(result.run_id).records
        if r.event_log_entry.asset_observation is not None
        and r.event_log_entry.asset_observation.asset_key == AssetKey("forensic")
    ]
    assert failure["error_category"].value == "permanent"  # never retried
    assert "stuck.wav: the forensic files found altered could not be set aside" in failure["error"].value
    assert "edited-" in store.output_path("stuck.wav", "forensic.json").read_text()  # as found
    # The other recording was set aside and computed again as usual.
    assert "edited-" not in store.output_path("fine.wav", "forensic.json").read_text()
    assert len(list((store.file_dir("fine.wav") / "altered").glob("*-forensic/forensic.json"))) == 1


@pytest.mark.parametrize("deleted", ["transcript", "emotion"])
def test_a_deleted_result_computed_again_brings_what_was_built_on_it_along(instance, store, deleted):
    """A result file deleted, then its stage alone materialized (the UI, or the
    command ``voiceman verify`` prints): it is computed again with the same data
    version but new bytes (timings), so every later result, which names the old
    file among its inputs, is computed again in that run; nothing is left that
    a later stage or the summary would refuse."""
    keys = [drop(store, SAMPLE_WAVS[0], "del.wav").name]
    instance.add_dynamic_partitions("audio_files", keys)
    assert run_batch(instance, store, keys).success
    store.output_path("del.wav", f"{deleted}.json").unlink()

    assert run_batch(instance, store, keys, selection=[AssetKey(deleted)]).success
    later = STAGES[STAGES.index(deleted):]  # it, and what reads it
    assert {s: materialization_count(instance, s, "del.wav") for s in STAGES} == {
        s: 2 if s in later else 1 for s in STAGES
    }
    assert verify_all(instance, store) == []
    assert materialize([summary], instance=instance, resources={"store": store}).success
    (row,) = pd.read_csv(store.outputs_dir / "summary.csv").to_dict("records")
    assert row["status"] == "done" and not pd.isna(row["risk_score"])
    # And all of it current now: the same selection again computes nothing.
    assert run_batch(instance, store, keys, selection=[AssetKey(deleted)]).success
    assert materialization_count(instance, "report", "del.wav") == 2


def test_rerunning_one_stage_with_other_options_makes_the_later_ones_stale(instance, store, tiny_whisper):
    keys = [drop(store, SAMPLE_WAVS[0], "old.wav").name]
    instance.add_dynamic_partitions("audio_files", keys)
    assert run_batch(instance, store, keys).success
    (row,) = recording_statuses(instance, store, keys)
    assert row.status == "done"
    # The same selection again is all current: nothing is computed.
    assert run_batch(instance, store, keys).success
    assert {s: materialization_count(instance, s, "old.wav") for s in STAGES} == dict.fromkeys(STAGES, 1)

    # Re-transcribe with another engine (a tiny Whisper built by the test): a new
    # transcript data version; what reads the old transcript is out of date.
    english = SpeechToText(engine="faster-whisper", model=str(tiny_whisper), language="en", device="cpu")
    assert run_batch(instance, store, keys, selection=[AssetKey("transcript")], stt=english).success
    assert materialization_count(instance, "transcript", "old.wav") == 2
    (row,) = recording_statuses(instance, store, keys)
    assert row.status == "stale: re-run forensic"
    stale = stale_statuses(instance, "old.wav")
    assert stale == {"audio": "FRESH", "transcript": "FRESH", "forensic": "STALE",
                     "emotion": "STALE", "report": "STALE"}
    assert materialize([summary], instance=instance, resources={"store": store}).success
    (row,) = pd.read_csv(store.outputs_dir / "summary.csv").to_dict("records")
    assert row["status"] == "stale: re-run forensic"  # listed, with no figures while stale
    assert pd.isna(row["risk_score"]) and pd.isna(row["word_count"])
    assert row["sha256"] == json.loads(store.output_path("old.wav", "audio.json").read_text())["sha256"]

    # The report alone cannot be built on a forensic result of the old transcript.
    result = run_batch(instance, store, keys, selection=[AssetKey("report")], stt=english)
    failure = result.get_step_failure_events()[0].step_failure_data.user_failure_data
    assert "forensic.json was computed from a different transcript.json" in failure.description
    (row,) = recording_statuses(instance, store, keys)
    assert row.status.startswith("failed at report: ")
    assert "re-materialize 'forensic'" in row.status

    # The whole chain: only what is out of date or failed is computed.
    assert run_batch(instance, store, keys, stt=english).success
    counts = {s: materialization_count(instance, s, "old.wav") for s in STAGES}
    assert counts == {"audio": 1, "transcript": 2, "forensic": 2, "emotion": 2, "report": 2}
    (row,) = recording_statuses(instance, store, keys)
    assert row.status == "done"


def test_status_says_a_replaced_inbox_file_changed_before_any_run(instance, store):
    from voiceman_pipeline.status import recording_statuses

    path = drop(store, SAMPLE_WAVS[0], "swap.wav")
    instance.add_dynamic_partitions("audio_files", ["swap.wav"])
    assert run_batch(instance, store, ["swap.wav"]).success
    (row,) = recording_statuses(instance, store, ["swap.wav"])
    assert row.status == "done"
    path.write_bytes(SAMPLE_WAVS[1].read_bytes())  # replaced; no sensor tick, no run
    (row,) = recording_statuses(instance, store, ["swap.wav"])
    assert row.status == "changed in inbox: re-run audio"


def test_a_run_failing_on_one_recording_does_not_mark_the_current_others_failed(instance, store):
    from voiceman_pipeline.sensors import plan_for_inbox

    keys = [drop(store, SAMPLE_WAVS[i], f"r{i}.wav").name for i in range(2)]
    instance.add_dynamic_partitions("audio_files", keys)
    assert run_batch(instance, store, keys).success
    (store.inbox_dir / "r1.wav").write_bytes(b"garbage" * 100)  # replaced by a broken file
    assert not run_batch(instance, store, keys).success
    for stage in STAGES:
        status = instance.get_status_by_partition(AssetKey(stage), keys, audio_files)
        assert status == {"r0.wav": AssetPartitionStatus.MATERIALIZED,
                          "r1.wav": AssetPartitionStatus.FAILED}, stage
        # r0's results were confirmed (computed False), not computed again.
        records = instance.fetch_materializations(AssetKey(stage), limit=100).records
        r0 = {r.asset_materialization.metadata["computed"].value: r.asset_materialization.metadata
              for r in records if r.partition_key == "r0.wav"}
        assert sorted(r0) == [False, True]
        # The confirmation, now the partition's latest in the UI, still shows
        # the result (risk, plot, ...), but no memory figures: none were measured.
        shown = {k for k in r0[True] if not k.startswith("memory_")} - {"computed"}
        assert {k: r0[False][k] for k in shown} == {k: r0[True][k] for k in shown}
        assert not [k for k in r0[False] if k.startswith("memory_")]
    # The confirmed intake says what it holds: the sensor does not run r0 again.
    plan, _, _ = plan_for_inbox(instance, store, None, max_new=100, settled_after_s=0)
    assert [ready.file.key for ready in plan.ready] == []


def test_a_recording_put_back_as_it_was_after_failing_turns_green_without_computing(instance, store):
    """Replaced by a broken file, the recording fails; the original bytes put
    back, its results are current again, and the next run confirms them (a
    partition Dagster marked failed turns green only with a newer
    materialization), computing nothing."""
    from voiceman_pipeline.sensors import plan_for_inbox
    from voiceman_pipeline.status import recording_statuses

    original = drop(store, SAMPLE_WAVS[0], "back.wav")
    instance.add_dynamic_partitions("audio_files", ["back.wav"])
    assert run_batch(instance, store, ["back.wav"]).success
    original.write_bytes(b"garbage" * 100)
    assert not run_batch(instance, store, ["back.wav"]).success
    (row,) = recording_statuses(instance, store, ["back.wav"])
    assert row.status.startswith("failed at audio")
    files_before = {p: p.stat().st_mtime_ns for p in store.file_dir("back.wav").glob("*.json")}

    original.write_bytes(SAMPLE_WAVS[0].read_bytes())
    plan, _, _ = plan_for_inbox(instance, store, None, max_new=100, settled_after_s=0)
    assert [ready.file.key for ready in plan.ready] == ["back.wav"]  # the failed content is on record
    assert run_batch(instance, store, ["back.wav"]).success
    for stage in STAGES:
        status = instance.get_status_by_partition(AssetKey(stage), ["back.wav"], audio_files)
        assert status == {"back.wav": AssetPartitionStatus.MATERIALIZED}, stage
        records = instance.fetch_materializations(AssetKey(stage), limit=100).records
        assert sorted(r.asset_materialization.metadata["computed"].value for r in records) == [False, True]
    assert {p: p.stat().st_mtime_ns for p in store.file_dir("back.wav").glob("*.json")} == files_before
    (row,) = recording_statuses(instance, store, ["back.wav"])
    assert row.status == "done"
    plan, _, _ = plan_for_inbox(instance, store, None, max_new=100, settled_after_s=0)
    assert plan.ready == []  # the confirmed intake says what the inbox holds


def test_a_temporary_file_an_interrupted_write_left_is_removed_by_the_next_run(instance, store):
    """kill -9 in the middle of writing a result leaves its temporary file
    (the result itself is renamed into place whole); the next step to claim
    the recording removes it, whatever it computes, and touches nothing else."""
    drop(store, SAMPLE_WAVS[0], "t.wav")
    instance.add_dynamic_partitions("audio_files", ["t.wav"])
    assert run_batch(instance, store, ["t.wav"]).success
    folder = store.file_dir("t.wav")
    results_before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    stale = folder / ".audio_16k.npy.k2x9w1q0.tmp"
    stale.write_bytes(b"\0" * 4096)  # as a writer killed mid-write leaves it
    assert run_batch(instance, store, ["t.wav"]).success  # all current: nothing computed
    assert not stale.exists()
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == results_before


def materialization_count(instance, stage: str, key: str) -> int:
    records = instance.fetch_materializations(AssetKey(stage), limit=10_000).records
    return sum(1 for r in records if r.partition_key == key)


def stale_statuses(instance, key: str) -> dict[str, str]:
    """Dagster's own staleness per stage (what the UI shows), from its resolver."""
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._core.loader import LoadingContextForTest

    resolver = CachingStaleStatusResolver(
        instance, defs.resolve_asset_graph(), LoadingContextForTest(instance)
    )
    return {s: resolver.get_status(AssetKey(s), key).value for s in STAGES}


def test_summary_shows_no_figures_for_a_recording_replaced_by_a_corrupt_file(instance, store):
    keys = [drop(store, SAMPLE_WAVS[i], f"s{i}.wav").name for i in range(2)]
    instance.add_dynamic_partitions("audio_files", keys)
    assert run_batch(instance, store, keys).success
    (store.inbox_dir / "s1.wav").write_bytes(b"garbage" * 100)  # replaced, then re-run
    assert not run_batch(instance, store, ["s1.wav"]).success
    assert materialize([summary], instance=instance, resources={"store": store}).success
    table = pd.read_csv(store.outputs_dir / "summary.csv").set_index("partition_key")
    assert table.loc["s0.wav", "status"] == "done" and table.loc["s0.wav", "risk_level"]
    assert table.loc["s1.wav", "status"].startswith("failed at audio: ")
    assert pd.isna(table.loc["s1.wav", "risk_score"])  # its old figures are not shown


# --- memory pressure around model loads --------------------------------------


class MachineFillsUpAtModelLoad(SpeechToText):
    """Another process takes memory just as the transcript model is about to load."""

    def transcriber(self):
        CriticalOnceFilled.filled = True
        return super().transcriber()


class CriticalOnceFilled:
    """Readings of a machine at 30 %, or 97 % once MachineFillsUpAtModelLoad fired."""

    filled = False

    def read(self):
        from voiceman_pipeline.resources.memory import MemoryReading

        used = 97_000.0 if self.filled else 30_000.0
        return MemoryReading(100_000.0, used, psutil.Process().memory_info().rss / 2**20)


def test_memory_critical_at_model_load_waits_and_retries_instead_of_failing_for_good(instance, store):
    from voiceman_pipeline.resources.memory import MemoryManager

    keys = [drop(store, SAMPLE_WAVS[0], "wait.wav").name]
    instance.add_dynamic_partitions("audio_files", keys)
    CriticalOnceFilled.filled = False
    memory = MemoryManager(wait_seconds=0.1, probe=CriticalOnceFilled())
    result = run_batch(instance, store, keys, stt=MachineFillsUpAtModelLoad(), memory=memory)
    assert not result.success  # the memory never came back in this test ...
    types = event_types(instance, result.run_id)
    # ... but the step waited and retried as often as it may
    assert types.count(DagsterEventType.STEP_UP_FOR_RETRY) == memory.max_wait_retries
    observations = [
        r.event_log_entry.asset_observation
        for r in instance.get_records_for_run(result.run_id).records
        if r.event_log_entry.asset_observation is not None
    ]
    # Waiting is the step's, not a recording's failure: no recording was given
    # a failure verdict (a permanent one would keep `voiceman run` from it).
    assert observations == []
    (failure,) = [e.dagster_event for e in instance.all_logs(result.run_id)
                  if e.dagster_event and e.dagster_event.event_type == DagsterEventType.STEP_FAILURE]
    error = failure.event_specific_data.error
    # It ends when the retries run out, saying why: memory, not the recording.
    assert error.cls_name == "RetryRequested" and "Exceeded max_retries" in error.message
    assert error.cause.cls_name == "ResourceError" and "memory is critical" in error.cause.message


def test_a_calls_memory_is_predicted_from_its_header_and_shown_beside_what_it_took(
    instance, store, tmp_path
):
    """Before intake, the length comes from the container header (no decoding),
    so a 37 s call is predicted as 37 s, not at the floor; every computed
    result shows the prediction beside the measured peak."""
    import numpy as np
    import soundfile

    from voiceman_pipeline.assets.pipeline import RecordingFiles, _size_of
    from voiceman_pipeline.audio_io import declared_seconds
    from voiceman_pipeline.resources.memory import PEAK_KEY, PREDICTED_MB_KEY, SECONDS_KEY

    parts = [soundfile.read(str(path), dtype="int16")[0] for path in SAMPLE_WAVS] * 2
    call = store.inbox_dir / "call.wav"
    soundfile.write(str(call), np.concatenate(parts), 16000, subtype="PCM_16")
    seconds = sum(len(part) for part in parts) / 16000
    assert declared_seconds(call) == pytest.approx(seconds)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(call.read_bytes()[:50_000])
    assert declared_seconds(cut) == pytest.approx(seconds)  # what the header claims
    (tmp_path / "text.wav").write_text("not audio")
    assert declared_seconds(tmp_path / "text.wav") is None
    soundfile.write(str(tmp_path / "empty.wav"), np.zeros(0, dtype=np.int16), 16000)
    assert declared_seconds(tmp_path / "empty.wav") is None  # 0 frames: no length stated
    flac = tmp_path / "call.flac"  # not a WAV: the length comes through FFmpeg's probe
    soundfile.write(str(flac), np.concatenate(parts), 16000)
    assert declared_seconds(flac) == pytest.approx(seconds)

    instance.add_dynamic_partitions("audio_files", ["call.wav"])
    assert _size_of(RecordingFiles(store, "call.wav"))[1] == pytest.approx(seconds)
    assert run_batch(instance, store, ["call.wav"]).success
    for stage in STAGES:
        metadata = latest_metadata(instance, stage, "call.wav")
        assert metadata[PREDICTED_MB_KEY] > 0 and PEAK_KEY in metadata, stage
    # No history yet: intake is predicted from its default for the header's length.
    audio = latest_metadata(instance, "audio", "call.wav")
    from voiceman_pipeline.assets.stages import AUDIO

    fixed, rate = AUDIO.memory_default
    assert audio[PREDICTED_MB_KEY] == pytest.approx(fixed + rate * seconds, abs=0.1)
    # The transcript's prediction grows with the length intake measured.
    from voiceman_pipeline.assets.stages import STAGE_BY_NAME

    fixed, rate = STAGE_BY_NAME["transcript"].memory_default
    transcript = latest_metadata(instance, "transcript", "call.wav")
    assert rate > 0
    assert transcript[SECONDS_KEY] == pytest.approx(seconds, abs=0.01)  # intake's measured length
    assert transcript[PREDICTED_MB_KEY] == pytest.approx(fixed + rate * seconds, abs=0.1)


def test_the_plots_binning_keeps_each_bins_loudest_frame_and_a_short_calls_every_frame():
    import numpy as np

    from voiceman_pipeline.report_plot import bin_step, binned_max

    short = np.array([0.1, 0.5, 0.2], dtype=np.float32)
    first, loudest = binned_max(short, bin_step(short.size, max_points=4000))
    assert first.tolist() == [0, 1, 2] and loudest.tolist() == short.tolist()

    # A 3-hour call's 20 ms frames: at most 4000 points, each its bin's loudest frame.
    frames = np.random.default_rng(0).random(540_000).astype(np.float32)
    frames[123_456] = 7.0  # one loud click stays visible
    first, loudest = binned_max(frames, bin_step(frames.size, max_points=4000))
    assert len(first) <= 4000 and first[0] == 0
    step = int(first[1])
    assert loudest[1] == frames[step : 2 * step].max()
    assert loudest.max() == 7.0 and int(first[np.argmax(loudest)]) <= 123_456 < int(first[np.argmax(loudest)]) + step


def test_a_file_where_a_recordings_results_folder_should_be_fails_that_recording_alone(instance, store):
    """A tester put a file where a recording's results folder goes: the whole batch
    failed, "outside any recording", and the other recording with it."""
    keys = [drop(store, SAMPLE_WAVS[0], "x1.wav").name, drop(store, SAMPLE_WAVS[1], "x2.wav").name]
    instance.add_dynamic_partitions("audio_files", keys)
    (store.outputs_dir / "x1.wav").write_text("not a folder")
    result = run_batch(instance, store, keys)
    assert materialization_count(instance, "report", "x2.wav") == 1
    assert materialization_count(instance, "audio", "x1.wav") == 0
    failures = {(key, stage): reason for key, stage, reason in failed_recordings(result.all_events)}
    assert list(failures) == [("x1.wav", "audio")]
    assert str(store.outputs_dir / "x1.wav") in failures["x1.wav", "audio"]
    assert (store.outputs_dir / "x1.wav").read_text() == "not a folder"  # left as it was
