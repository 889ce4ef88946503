"""The batch report of real runs (real engines, real sample audio), read back
from its JSON, the run tags, Dagster's partition statuses and ``voiceman report``."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest
from dagster import AssetKey, AssetPartitionStatus, DagsterRunStatus, instance_for_test
from dagster._core.errors import DagsterExecutionInterruptedError

from voiceman_pipeline import batch_report
from voiceman_pipeline.batch_report import BatchReport, find_report, report_command, report_path
from voiceman_pipeline.partitions import audio_files
from voiceman_pipeline_tests.conftest import REPO, SAMPLE_WAVS, VOICEMAN_STORAGE, drop
from voiceman_pipeline_tests.test_cli import BIN
from voiceman_pipeline_tests.test_pipeline import (
    CountingTranscriber,
    InjectedSpeechToText,
    run_batch,
)


def read_report(store, run_id) -> BatchReport:
    return BatchReport.from_json(report_path(store, run_id).read_text())


def test_report_of_a_batch_with_a_corrupt_file_and_of_the_same_keys_again(tmp_path, store, capsys):
    home = tmp_path / "home"  # a DAGSTER_HOME the `voiceman` command can open too
    home.mkdir()
    # The shipped storage; instance_for_test writes it into home's dagster.yaml.
    shipped = {"custom": {**VOICEMAN_STORAGE, "config": {"base_dir": str(home / "storage")}}}
    with instance_for_test(temp_dir=str(home), overrides={"storage": shipped}) as instance:
        keys = [drop(store, SAMPLE_WAVS[0], "a.wav").name, drop(store, SAMPLE_WAVS[1], "b.wav").name]
        (store.inbox_dir / "c.wav").write_bytes(b"RIFF\x00\x00garbage" * 100)
        keys.append("c.wav")
        instance.add_dynamic_partitions("audio_files", keys)
        first = run_batch(instance, store, keys)
        assert not first.success

        report = read_report(store, first.run_id)
        statuses = instance.get_status_by_partition(AssetKey("report"), keys, audio_files)
        done = sum(s == AssetPartitionStatus.MATERIALIZED for s in statuses.values())
        failed = sum(s == AssetPartitionStatus.FAILED for s in statuses.values())
        assert (report.recordings_ok, report.recordings_failed) == (done, failed) == (2, 1)
        assert report.recordings_total == 3 and report.recordings_not_done == 0
        assert report.failures_by_category == {"permanent": 1, "transient": 0, "resource": 0, "service": 0}
        assert report.success_pct == 66.7 and report.status == "failed"
        assert report.failed_recordings["c.wav"].startswith("audio [permanent]")
        assert (report.results_computed, report.results_kept) == (10, 0)  # 5 stages x 2
        assert report.step_retries == 0 and report.oom_recoveries == 0
        assert report.memory_freed_mb >= 0 and report.cleanups >= 1  # measured, after stages
        assert 0 < report.duration_s < 600
        assert report.audio_seconds == pytest.approx(1.095 + 1.960, abs=0.05)
        assert stat.S_IMODE(report_path(store, first.run_id).stat().st_mode) == 0o600
        tags = instance.get_run_by_id(first.run_id).tags
        assert tags["voiceman/recordings_ok"] == "2" and tags["voiceman/recordings_failed"] == "1"
        assert tags[batch_report.SUCCESS_PCT_TAG] == "66.7"
        assert tags[batch_report.FAILURES_TAG] == "permanent=1"
        assert tags["voiceman/results_computed"] == "10" and tags[batch_report.STEP_RETRIES_TAG] == "0"
        assert tags[batch_report.REPORT_TAG] == str(report_path(store, first.run_id))
        failure = first.get_step_failure_events()[0].step_failure_data.user_failure_data
        assert failure.metadata[batch_report.METADATA_KEY].value["success_pct"] == 66.7

        second = run_batch(instance, store, keys)  # same keys: all kept, c.wav fails again
        again = read_report(store, second.run_id)
        assert (again.results_computed, again.results_kept) == (0, 10)
        assert (again.recordings_ok, again.recordings_failed) == (2, 1)

        # `voiceman report`: the latest run by default (the real command) ...
        env = {**os.environ, "DAGSTER_HOME": str(home), "VOICEMAN_DATA_DIR": store.data_dir,
               "PYTHONPATH": str(REPO)}
        out = subprocess.run([BIN / "voiceman", "report"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert f"run {second.run_id[:8]} (failed)" in out.stdout
        assert "0 computed, 10 kept" in out.stdout
        assert "3 total, 2 ok, 1 failed (66.7% ok)" in out.stdout
        # ... an 8-character prefix, and an unknown run.
        capsys.readouterr()
        assert report_command(instance, store, first.run_id[:8]) == 0
        shown = capsys.readouterr().out
        assert f"run {first.run_id[:8]} (failed)" in shown and "permanent 1" in shown
        assert "10 computed, 0 kept" in shown and "(66.7% ok)" in shown
        assert report_command(instance, store, "deadbeef") == 1
        assert "no run with id 'deadbeef'" in capsys.readouterr().err


class InterruptedTranscriber(CountingTranscriber):
    """The real engine, stopped (as by Ctrl+C) at its second recording."""

    calls = 0

    def transcribe(self, audio, source_sha256):
        type(self).calls += 1
        if type(self).calls > 1:
            raise KeyboardInterrupt
        return super().transcribe(audio, source_sha256)


class InterruptedSpeechToText(InjectedSpeechToText):
    def transcriber(self):
        if self._injected is None:
            self._injected = InterruptedTranscriber()
        return self._injected


def test_a_stopped_run_writes_its_report_too(instance, store):
    keys = [drop(store, SAMPLE_WAVS[0], "s1.wav").name, drop(store, SAMPLE_WAVS[1], "s2.wav").name]
    instance.add_dynamic_partitions("audio_files", keys)
    InterruptedTranscriber.calls = 0
    stt = InterruptedSpeechToText()
    try:
        result = run_batch(instance, store, keys, stt=stt)
        run_id = result.run_id
    except (KeyboardInterrupt, DagsterExecutionInterruptedError):
        run_id = instance.get_runs(limit=1)[0].run_id
    assert instance.get_run_by_id(run_id).status in (
        DagsterRunStatus.CANCELED, DagsterRunStatus.CANCELING
    )
    report = read_report(store, run_id)
    assert report.status == "canceled"
    assert report.recordings_total == 2 and report.recordings_ok == 0
    assert report.recordings_not_done == 2 and report.recordings_failed == 0
    assert report.results_computed == 3  # two intakes, one transcript
    assert report.cleanups >= 1  # the stop's own cleanup, measured
    assert find_report(instance, store, None).run_id == run_id


def test_an_out_of_memory_retry_is_counted_across_attempts(instance, store, tmp_path):
    keys = [drop(store, SAMPLE_WAVS[0], "m1.wav").name, drop(store, SAMPLE_WAVS[1], "m2.wav").name]
    instance.add_dynamic_partitions("audio_files", keys)
    marker = tmp_path / "oom-raised"  # the first transcription runs out of memory, once
    result = run_batch(instance, store, keys, stt=InjectedSpeechToText(kind="oom", marker=str(marker)))
    assert marker.exists() and result.success
    report = read_report(store, result.run_id)
    assert report.status == "succeeded" and report.step_retries == 1
    assert report.oom_recoveries == 1  # the emergency cleanup after the MemoryError
    assert report.results_computed == 10 and report.recordings_ok == 2
    assert report.failures_by_category == {"permanent": 0, "transient": 0, "resource": 0, "service": 0}
    assert instance.get_run_by_id(result.run_id).tags[batch_report.OOM_RECOVERIES_TAG] == "1"
