"""A killed CLI run must not poison the instance (see ``voiceman_pipeline/runs.py``).

kill -9 of ``voiceman run`` leaves its run STARTED, its recordings "in
progress" and its ``gpu`` pool slot taken; the next command cleans that up
and finishes every recording. Only runs of this host's ``voiceman`` whose
process is gone are touched.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from dagster import AssetPartitionStatus, DagsterRunStatus, build_sensor_context
from dagster._core.test_utils import create_run_for_test

from voiceman_pipeline import runs
from voiceman_pipeline.assets.stages import STAGES
from voiceman_pipeline.cli import INTERRUPTED
from voiceman_pipeline.partitions import audio_files
from voiceman_pipeline_tests.conftest import REPO, SAMPLE_WAVS, wait_for
from voiceman_pipeline_tests.test_cli_stop import (  # noqa: F401 (env is a fixture)
    TWO_WORKERS,
    alive,
    assert_all_done_once,
    cpu_engines,
    env,
    materialized,
    open_instance,
    recordings,
    run,
    start,
    wait_until_mid_batch,
    worker_pids,
)


@pytest.mark.timeout(150)
def test_kill_9_mid_batch_then_the_same_command_cleans_up_and_finishes(env, tmp_path):
    with open_instance(env) as instance:  # storage created before the command starts
        process = start(env, tmp_path, "run", "--settle", "0.1")
        killed, _ = wait_until_mid_batch(instance, process)
        process.kill()
        process.wait(timeout=30)
        done_before = materialized(instance)

        # The poisoned state this is about.
        assert instance.get_run_by_id(killed.run_id).status == DagsterRunStatus.STARTED
        gpu = instance.event_log_storage.get_concurrency_info("gpu")
        assert [slot.run_id for slot in gpu.claimed_slots] == [killed.run_id]
        status = run(env, "status")  # reads only: says who will clean it up
        assert f"run {killed.run_id[:8]} (STARTED; its process, pid {process.pid}, is gone)" in status.stderr
        # Its recordings: not "in progress" (nothing is at them), but what happened and what finishes them.
        assert status.stdout.count(INTERRUPTED) == recordings() and "in progress" not in status.stdout
        assert instance.get_run_by_id(killed.run_id).status == DagsterRunStatus.STARTED

        began = time.monotonic()
        again = run(env, "run", "--settle", "0.1", timeout=120)  # a hang fails here
        print(f"recovery after kill -9: {time.monotonic() - began:.1f} s")
        assert again.returncode == 0, again.stdout + again.stderr
        assert (
            f"cleaned up run {killed.run_id[:8]} (STARTED; its process, pid {process.pid}, is gone): "
            f"marked failed, freed 1 pool slot(s)"
        ) in again.stderr.splitlines()
        assert f"{recordings()} recording(s) left unfinished by an earlier run" in again.stdout
        assert "Step blocked" not in again.stdout + again.stderr
        assert instance.get_run_by_id(killed.run_id).status == DagsterRunStatus.FAILURE
        later = [r for r in instance.get_runs() if r.run_id != killed.run_id]
        assert later and all(r.status == DagsterRunStatus.SUCCESS for r in later)
        gpu = instance.event_log_storage.get_concurrency_info("gpu")
        assert gpu.claimed_slots == [] and gpu.pending_steps == []
        keys = list(instance.get_dynamic_partitions(audio_files.name))
        for stage in STAGES:
            statuses = instance.get_status_by_partition(stage.key, keys, audio_files)
            assert set(statuses.values()) == {AssetPartitionStatus.MATERIALIZED}, stage.name
        assert_all_done_once(instance, again.stdout)
        assert all(materialized(instance)[pair] == 1 for pair in done_before)
        assert "No failed recordings." in run(env, "retry-failed").stdout


@pytest.mark.timeout(200)
@pytest.mark.parametrize("cleaner", ["voiceman run", "dead_cli_runs_sensor"])
def test_kill_9_of_dagster_asset_materialize_is_cleaned_up_and_finished(env, tmp_path, cleaner):
    """A run of `dagster asset materialize` is tagged with its process by its
    step, so a kill -9 of it does not leave the recording "in progress" for
    good (run monitoring does not watch such runs): the next `voiceman run`
    marks the run failed and finishes the recording; or the daemon's sensor
    marks it failed, `voiceman status` says why, and `retry-failed` finishes it."""
    from voiceman_pipeline.sensors import dead_cli_runs_sensor
    from voiceman_pipeline.status import NO_REASON

    longest = max(SAMPLE_WAVS, key=lambda wav: wav.stat().st_size)
    key = f"c0_{longest.name}"
    with open_instance(env) as instance:
        assert run(env, "ingest", "--settle", "0.1").returncode == 0
        log = open(tmp_path / "materialize.log", "w")
        process = subprocess.Popen(
            [Path(sys.executable).parent / "dagster", "asset", "materialize", "-m",
             "voiceman_pipeline.definitions", "--select", "report", "--partition", key],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        wait_for(lambda: ("audio", key) in materialized(instance), 90, "its intake")
        process.kill()
        process.wait(timeout=30)
        (killed,) = instance.get_runs()
        assert killed.status == DagsterRunStatus.STARTED, "finished before the kill: no test"
        assert killed.tags[runs.PID_TAG] == str(process.pid)
        assert materialized(instance)[("report", key)] == 0

        cleaned = (
            f"cleaned up run {killed.run_id[:8]} (STARTED; its process, pid {process.pid}, is gone): "
            f"marked failed"
        )
        if cleaner == "voiceman run":
            again = run(env, "run", "--settle", "0.1", timeout=150)
            assert cleaned in again.stderr
        else:
            dead_cli_runs_sensor(build_sensor_context(instance=instance))
            assert instance.get_run_by_id(killed.run_id).status == DagsterRunStatus.FAILURE
            row = next(line for line in run(env, "status").stdout.splitlines() if line.startswith(key))
            assert "failed at report: " + NO_REASON in row  # the stage it selected
            again = run(env, "retry-failed", timeout=150)
        assert again.returncode == 0, again.stdout + again.stderr
        assert instance.get_run_by_id(killed.run_id).status == DagsterRunStatus.FAILURE
        for stage in STAGES:
            statuses = instance.get_status_by_partition(stage.key, [key], audio_files)
            assert statuses == {key: AssetPartitionStatus.MATERIALIZED}, stage.name
        assert materialized(instance)[("audio", key)] == 1  # kept, not taken in again


@pytest.mark.timeout(200)
def test_kill_9_with_two_workers_kills_them_and_the_next_command_cleans_up(env, tmp_path):
    """kill -9 of the command while two workers run: the kernel kills the
    workers too (none runs on), and the next command cleans up both runs,
    each tagged with its worker's pid, and finishes every recording."""
    env = cpu_engines(env)
    with open_instance(env) as instance:  # storage created before the command starts
        process = start(env, tmp_path, "run", "--settle", "0.1", *TWO_WORKERS)
        both, _ = wait_until_mid_batch(instance, process, timeout_s=120, runs=2)
        workers = worker_pids(both)
        assert len(workers) == 2 and process.pid not in workers
        process.kill()
        process.wait(timeout=30)
        wait_for(lambda: not any(alive(pid) for pid in workers), 30, "the workers to die")
        done_before = materialized(instance)
        assert {instance.get_run_by_id(r.run_id).status for r in both} == {DagsterRunStatus.STARTED}

        again = run(env, "run", "--settle", "0.1", *TWO_WORKERS, timeout=150)
        assert again.returncode == 0, again.stdout + again.stderr
        cleaned = [line for line in again.stderr.splitlines() if line.startswith("cleaned up run ")]
        assert sorted(cleaned) == sorted(
            f"cleaned up run {r.run_id[:8]} (STARTED; its process, pid {r.tags[runs.PID_TAG]}, "
            f"is gone): marked failed" for r in both
        )
        assert f"{recordings()} recording(s) left unfinished by an earlier run" in again.stdout
        assert {instance.get_run_by_id(r.run_id).status for r in both} == {DagsterRunStatus.FAILURE}
        assert_all_done_once(instance, again.stdout)
        assert all(materialized(instance)[pair] == 1 for pair in done_before)


@pytest.mark.storage
def test_only_dead_runs_of_this_hosts_command_are_cleaned_up(instance):
    """Alive, other host, untagged (daemon-launched) and finished runs are left
    alone; a dead pid, or a pid now used by another process, is cleaned up."""
    me = runs.launch_tags()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = {**me, runs.PID_TAG: str(gone.pid)}
    reused = {**me, runs.PROCESS_START_TAG: f"{psutil.Process().create_time() - 3600:.2f}"}
    other_host = {**dead, runs.HOST_TAG: socket.gethostname() + "-elsewhere"}
    started = DagsterRunStatus.STARTED
    cases = {
        "alive": create_run_for_test(instance, status=started, tags=me),
        "other host": create_run_for_test(instance, status=started, tags=other_host),
        "daemon": create_run_for_test(instance, status=started),
        "finished": create_run_for_test(instance, status=DagsterRunStatus.SUCCESS, tags=dead),
        "dead": create_run_for_test(instance, status=started, tags=dead),
        "pid reused": create_run_for_test(instance, status=DagsterRunStatus.CANCELING, tags=reused),
        "ended holding a slot": create_run_for_test(instance, status=DagsterRunStatus.FAILURE, tags=dead),
    }
    storage = instance.event_log_storage
    storage.set_concurrency_slots("gpu", 3)
    for name in ("alive", "dead", "ended holding a slot"):
        assert storage.claim_concurrency_slot("gpu", cases[name].run_id, "step").is_claimed
    assert not storage.claim_concurrency_slot("gpu", cases["pid reused"].run_id, "step").is_claimed

    said: list[str] = []
    cleaned = runs.clean_up(instance, say=said.append)

    assert {d.run.run_id for d in cleaned} == {
        cases[name].run_id for name in ("dead", "pid reused", "ended holding a slot")
    }
    assert len(said) == 3 and "dropped 1 queued pool claim(s)" in " ".join(said)
    status = {name: instance.get_run_by_id(r.run_id).status for name, r in cases.items()}
    assert status == {
        "alive": started,
        "other host": started,
        "daemon": started,
        "finished": DagsterRunStatus.SUCCESS,
        "dead": DagsterRunStatus.FAILURE,
        "pid reused": DagsterRunStatus.FAILURE,
        "ended holding a slot": DagsterRunStatus.FAILURE,
    }
    gpu = storage.get_concurrency_info("gpu")
    assert {s.run_id for s in [*gpu.claimed_slots, *gpu.pending_steps]} == {cases["alive"].run_id}
    assert runs.clean_up(instance, say=said.append) == []  # nothing left to do


@pytest.mark.storage
def test_a_retry_is_not_judged_by_the_process_tags_it_copied_and_takes_them_over(instance, store):
    """Dagster copies a run's tags to its automatic retry (run_retries) and to a
    re-execution, ours included. Until its step starts, the new run's process tags
    name the process of the run it repeats, which is dead: it was once marked
    failed for that by the daemon's sensor while its step waited for the pool slot
    the dead run held (bench/crash_recovery.py --pool). Now only the dead run is
    cleaned up (its slot freed); the retry waits; its step then tags it as its own."""
    from dagster import materialize
    from dagster._core.storage.tags import PARENT_RUN_ID_TAG, ROOT_RUN_ID_TAG

    from voiceman_pipeline.assets.summary import summary

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = {**runs.launch_tags(), runs.PID_TAG: str(gone.pid)}
    killed = create_run_for_test(instance, status=DagsterRunStatus.FAILURE, tags=dead)
    copied = {**dead, PARENT_RUN_ID_TAG: killed.run_id, ROOT_RUN_ID_TAG: killed.run_id}
    retry = create_run_for_test(instance, status=DagsterRunStatus.STARTED, tags=copied)
    storage = instance.event_log_storage
    storage.set_concurrency_slots("gpu", 1)
    assert storage.claim_concurrency_slot("gpu", killed.run_id, "step").is_claimed
    assert not storage.claim_concurrency_slot("gpu", retry.run_id, "step").is_claimed  # waits in the queue

    cleaned = runs.clean_up(instance, say=lambda line: None)

    assert [d.run.run_id for d in cleaned] == [killed.run_id]
    assert instance.get_run_by_id(retry.run_id).status == DagsterRunStatus.STARTED
    gpu = storage.get_concurrency_info("gpu")
    assert not gpu.claimed_slots and [s.run_id for s in gpu.pending_steps] == [retry.run_id]
    # The step of a run that starts with another process's tags replaces them with its own.
    result = materialize([summary], instance=instance, resources={"store": store}, tags=copied)
    assert result.success
    mine = runs.launch_tags()
    assert {k: instance.get_run_by_id(result.run_id).tags[k] for k in mine} == mine


def test_the_daemon_cleans_up_a_dead_cli_run_without_waiting_for_a_command(instance):
    """The sensor the daemon evaluates every 30 s does what the next command would."""
    from dagster import SkipReason, build_sensor_context

    from voiceman_pipeline.sensors import dead_cli_runs_sensor

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = create_run_for_test(
        instance, status=DagsterRunStatus.STARTED, tags={**runs.launch_tags(), runs.PID_TAG: str(gone.pid)}
    )
    alive = create_run_for_test(instance, status=DagsterRunStatus.STARTED, tags=runs.launch_tags())
    instance.event_log_storage.set_concurrency_slots("gpu", 1)
    assert instance.event_log_storage.claim_concurrency_slot("gpu", dead.run_id, "step").is_claimed
    result = dead_cli_runs_sensor(build_sensor_context(instance=instance))
    assert isinstance(result, SkipReason) and "cleaned up 1" in result.skip_message
    assert instance.get_run_by_id(dead.run_id).status == DagsterRunStatus.FAILURE
    assert instance.get_run_by_id(alive.run_id).status == DagsterRunStatus.STARTED
    assert not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
