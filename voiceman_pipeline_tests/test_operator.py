"""What an operator watches and controls: the progress bar on a terminal, the
error-rate brake (``voiceman run`` and backfills), and where runs came from."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import time
import wave
from pathlib import Path

from dagster import AssetKey, AssetPartitionStatus, DagsterInstance, build_sensor_context
from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill
from dagster._core.storage.tags import BACKFILL_ID_TAG

from voiceman_pipeline.assets.pipeline import RECORDINGS_FAILED_TAG, RECORDINGS_OK_TAG
from voiceman_pipeline.brake import Brake, build_failure_brake_sensor
from voiceman_pipeline.jobs import SOURCE_TAG
from voiceman_pipeline.partitions import audio_files, range_tags
from voiceman_pipeline_tests.conftest import REPO, SAMPLE_WAVS
from voiceman_pipeline_tests.test_cli import BIN, run

STAGES = ["audio", "transcript", "forensic", "emotion", "report"]


def _statuses(instance, keys):
    return instance.get_status_by_partition(AssetKey("report"), keys, audio_files) or {}


def test_run_of_mostly_broken_files_stops_at_the_brake_and_says_so(env):
    inbox = Path(env["VOICEMAN_DATA_DIR"]) / "inbox"
    good = ["a_good0.wav", "a_good1.wav"]
    bad = [f"b_bad{i}.wav" for i in range(6)]
    for i, name in enumerate(good):
        (inbox / name).write_bytes(SAMPLE_WAVS[i].read_bytes())
    for name in bad:
        (inbox / name).write_bytes(b"RIFF not really a wave file" * 10)
    # One worker: batches one after another (with several, see test_cli.py's brake test).
    settings = {"VOICEMAN_BATCH_SIZE": "2", "VOICEMAN_BRAKE_MIN_RECORDINGS": "4", "VOICEMAN_WORKERS": "1"}
    out = run([BIN / "voiceman", "run", "--settle", "0"], {**env, **settings}, check=False)
    assert out.returncode == 1
    # 2 good, then 2 bad (2 of 4: not over 50%), then 2 bad (4 of 6): brake.
    assert "Stopped by the error-rate brake: 4 of 6 recordings failed (67% > 50%): " \
           "2 recording(s) not started" in out.stderr
    assert "voiceman validate" in out.stderr
    assert out.stdout.count("run: 2 recording(s)") == 3
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        statuses = _statuses(instance, good + bad)
        assert [statuses.get(key) for key in good] == [AssetPartitionStatus.MATERIALIZED] * 2
        assert [statuses.get(key) for key in bad[:4]] == [AssetPartitionStatus.FAILED] * 4
        assert [statuses.get(key) for key in bad[4:]] == [None, None]  # never started
        sources = {run.tags.get(SOURCE_TAG) for run in instance.get_runs()
                   if run.job_name == "analysis_job"}
        assert sources == {"cli"}


def test_progress_on_a_terminal_shows_counts_rate_and_eta(env):
    inbox = Path(env["VOICEMAN_DATA_DIR"]) / "inbox"
    for i in range(3):
        (inbox / f"p{i}.wav").write_bytes(SAMPLE_WAVS[i].read_bytes())
    main, child = pty.openpty()
    process = subprocess.Popen(
        [BIN / "voiceman", "run", "--settle", "0", "--batch-size", "2"],
        cwd=REPO, env={**env, "COLUMNS": "80", "TERM": "xterm"},  # every field whole at 80
        stdin=child, stdout=child, stderr=child, close_fds=True,
    )
    os.close(child)
    seen = b""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 1)
        if ready:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        elif process.poll() is not None:
            break
    process.wait(30)
    os.close(main)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode(errors="replace"))
    assert process.returncode == 0, text[-3000:]
    assert re.search(r"━ +3/3\b", text), text[-3000:]  # counts, to the end
    assert re.search(r"\b[12]/3\b", text)  # ... and on the way
    assert re.search(r"\d+\.\d+/min", text)  # rate
    assert re.search(r"\b\d+:\d\d:\d\d ETA (\d+:\d\d:\d\d|-:--:--)", text)  # elapsed, ETA
    # The audio of the recordings done, at a multiple of real time: all 3 at the end.
    lengths = [(w.getnframes(), w.getframerate()) for w in map(wave.open, map(str, SAMPLE_WAVS[:3]))]
    seconds = int(sum(frames / rate for frames, rate in lengths))
    assert re.search(rf"\b3/3 .*\b0:00:{seconds:02d} audio at \d+\.\dx", text)
    assert re.search(r"\b\d+ MB\b", text)  # this process's memory


def test_progress_is_quiet_when_not_a_terminal(env):
    inbox = Path(env["VOICEMAN_DATA_DIR"]) / "inbox"
    (inbox / "q.wav").write_bytes(SAMPLE_WAVS[0].read_bytes())
    out = run([BIN / "voiceman", "run", "--settle", "0"], env)
    assert "ETA" not in out.stdout + out.stderr and "/min" not in out.stdout + out.stderr


def test_the_brake_sensor_cancels_a_backfill_of_mostly_failing_recordings(instance, store):
    """Two real runs of a backfill (tagged as the backfill daemon tags them):
    one of good recordings, one of broken ones; over 50% after 4: canceled."""
    from dagster import materialize

    from voiceman_pipeline.definitions import defs
    from voiceman_pipeline_tests.test_pipeline import drop, recording_analysis, resources

    good = [drop(store, SAMPLE_WAVS[i], f"g{i}.wav").name for i in range(1)]
    bad = []
    for i in range(3):
        (store.inbox_dir / f"x{i}.wav").write_bytes(b"garbage" * 64)
        bad.append(f"x{i}.wav")
    keys = good + bad
    instance.add_dynamic_partitions("audio_files", keys)
    backfill = PartitionBackfill.from_asset_partitions(
        backfill_id="brakeme", partition_names=keys, asset_graph=defs.resolve_asset_graph(),
        backfill_timestamp=time.time(), tags={}, dynamic_partitions_store=instance,
        all_partitions=False, asset_selection=[AssetKey(s) for s in STAGES], title=None,
        description=None, run_config=None,
    )
    instance.add_backfill(backfill)
    sensor = build_failure_brake_sensor(Brake(failure_rate=0.5, min_recordings=4))

    for batch in (good, bad):
        result = materialize(
            [recording_analysis], instance=instance, resources=resources(store),
            tags={**range_tags(batch), BACKFILL_ID_TAG: "brakeme"}, raise_on_error=False,
        )
        run = instance.get_run_by_id(result.run_id)
        assert run.tags[SOURCE_TAG] == "backfill"  # the step says where it came from
        context = build_sensor_context(instance=instance)
        sensor(context)
        if batch is good:  # 0 of 1 failed, and fewer than 4 tried: left running
            assert instance.get_backfill("brakeme").status == BulkActionStatus.REQUESTED
    tags = [instance.get_run_by_id(r.run_id).tags for r in instance.get_runs()]
    assert sum(int(t[RECORDINGS_FAILED_TAG]) for t in tags) == 3
    assert sum(int(t[RECORDINGS_OK_TAG]) for t in tags) == 1
    assert instance.get_backfill("brakeme").status == BulkActionStatus.CANCELING
    # Dagster's backfill daemon marks it canceled once its runs are done; the
    # sensor ticks meanwhile. Resumed by a person later (Dagster's
    # resumePartitionBackfill sets it requested again): not braked again.
    instance.update_backfill(instance.get_backfill("brakeme").with_status(BulkActionStatus.CANCELED))
    context = build_sensor_context(instance=instance, cursor=context.cursor)
    sensor(context)
    instance.update_backfill(instance.get_backfill("brakeme").with_status(BulkActionStatus.REQUESTED))
    sensor(build_sensor_context(instance=instance, cursor=context.cursor))
    assert instance.get_backfill("brakeme").status == BulkActionStatus.REQUESTED
