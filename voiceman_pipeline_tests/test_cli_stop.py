"""Stop on the real command: SIGTERM or Ctrl+C (SIGINT) to ``voiceman run`` in
the middle of a batch, then the same command again finishes the rest.

Each test runs ``voiceman`` in a subprocess against a temporary DAGSTER_HOME
(whose dagster.yaml limits the ``gpu`` pool to one step, as the project's
does) and reads the outcome from that instance's storage. The helpers here
are shared with ``test_cli_crash.py``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, DagsterRunStatus

from voiceman_pipeline.assets.stages import STAGES
from voiceman_pipeline_tests.conftest import POOL_OF_ONE_YAML, REPO, SAMPLE_WAVS, shipped_storage_yaml

VOICEMAN = str(Path(sys.executable).parent / "voiceman")
COPIES = 2  # of each sample: 10 recordings, one run (VOICEMAN_BATCH_SIZE below)
STOP_BOUND_S = 20  # a stop must end the command within this
STOP_LINE = re.compile(
    r"^Stopped: run [0-9a-f]{8} was canceled\. Run the same command again to finish the rest\.$"
)
# With workers: every worker's run named.
STOP_LINE_WORKERS = re.compile(
    r"^Stopped: runs [0-9a-f]{8}(, [0-9a-f]{8})+ were canceled\. Run the same command again "
    r"to finish the rest\.$"
)
# ``--workers 2`` on CPU engines (no pool): two runs of 5, side by side.
TWO_WORKERS = ("--workers", "2", "--batch-size", "5")


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """Environment for ``voiceman``: a fresh instance, and an inbox with
    ``COPIES`` copies of every sample recording."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(shipped_storage_yaml(home) + POOL_OF_ONE_YAML)
    inbox = tmp_path / "data" / "inbox"
    inbox.mkdir(parents=True)
    for copy in range(COPIES):
        for wav in SAMPLE_WAVS:
            (inbox / f"c{copy}_{wav.name}").write_bytes(wav.read_bytes())
    return {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "VOICEMAN_DATA_DIR": str(tmp_path / "data"),
        "VOICEMAN_BATCH_SIZE": "16",
        "PYTHONPATH": str(REPO),
        # The analysis step in the `gpu` pool as with GPU engines (CPU-only
        # engines put it in none): these tests are about a step holding a slot.
        "VOICEMAN_ANALYSIS_POOL": "gpu",
    }


def recordings() -> int:
    return COPIES * len(SAMPLE_WAVS)


def start(env: dict, tmp_path: Path, *args: str, name: str = "first", **popen) -> subprocess.Popen:
    """``voiceman`` in the background; its output goes to files (no pipe to fill)."""
    out = open(tmp_path / f"{name}.out", "w")
    err = open(tmp_path / f"{name}.err", "w")
    return subprocess.Popen([VOICEMAN, *args], cwd=REPO, env=env, stdout=out, stderr=err, text=True,
                            **popen)


def cpu_engines(env: dict) -> dict:
    """``env`` with the analysis step in no pool, as with CPU engines (workers side by side)."""
    return {name: value for name, value in env.items() if name != "VOICEMAN_ANALYSIS_POOL"}


def worker_pids(the_runs) -> set[int]:
    from voiceman_pipeline.runs import PID_TAG

    return {int(r.tags[PID_TAG]) for r in the_runs}


def alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def output_of(tmp_path: Path, name: str = "first") -> tuple[str, str]:
    return (tmp_path / f"{name}.out").read_text(), (tmp_path / f"{name}.err").read_text()


def run(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``voiceman`` to the end; a hang fails the test after ``timeout`` seconds."""
    return subprocess.run(
        [VOICEMAN, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def open_instance(env: dict) -> DagsterInstance:
    """The command's instance. Open it before starting the command on a fresh
    home: two processes creating sqlite storage at once can stamp its schema
    version twice, and every later open then fails ("more than one head")."""
    return DagsterInstance.from_config(env["DAGSTER_HOME"])


def materialized(instance: DagsterInstance) -> Counter[tuple[str, str]]:
    """How many materialization events each (stage, recording) has."""
    counts: Counter[tuple[str, str]] = Counter()
    for stage in STAGES:
        records = instance.fetch_materializations(AssetKey(stage.name), limit=10_000).records
        counts.update((stage.name, record.partition_key) for record in records)
    return counts


def stages_by_run(instance: DagsterInstance) -> dict[str, Counter[str]]:
    """Run id -> how many transcript and report materializations it made."""
    made: dict[str, Counter[str]] = defaultdict(Counter)
    for stage in ("transcript", "report"):
        for record in instance.fetch_materializations(AssetKey(stage), limit=10_000).records:
            made[record.run_id][stage] += 1
    return made


def wait_until_mid_batch(
    instance: DagsterInstance, process: subprocess.Popen, timeout_s: float = 60, runs: int = 1
):
    """Poll storage until ``runs`` runs are STARTED and each is in the middle
    of its batch: a transcript made, no report yet (the last stage; a run that
    far ahead of the other could finish before a signal sent now lands);
    (the latest run, transcripts), or (the runs, ...) when ``runs`` > 1."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"voiceman exited ({process.returncode}) before mid-batch"
        started = [r for r in instance.get_runs() if r.status == DagsterRunStatus.STARTED]
        made = stages_by_run(instance)
        if len(started) >= runs and len(instance.get_runs()) == runs and all(
            made[r.run_id]["transcript"] and not made[r.run_id]["report"] for r in started
        ):
            transcripts = [k for (stage, k) in materialized(instance) if stage == "transcript"]
            return (started[0] if runs == 1 else started), transcripts
        time.sleep(0.2)
    pytest.fail("the batch never reached its transcripts")


def partial_files(outputs: Path) -> list[Path]:
    """Temporary files of atomic writes ('.<name>.<random>.tmp') left behind."""
    return [p for p in outputs.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


def assert_all_done_once(instance: DagsterInstance, out: str) -> None:
    """Every (stage, recording) materialized exactly once across all runs: what
    finished before an interruption was not computed again."""
    counts = materialized(instance)
    keys = {key for (_, key) in counts}
    assert len(keys) == recordings()
    assert {pair: n for pair, n in counts.items() if n != 1} == {}
    assert set(counts) == {(stage.name, key) for stage in STAGES for key in keys}
    table = out[out.index("partition key") :].splitlines()[2:]
    assert len(table) == recordings() and all(row.split()[2] == "done" for row in table), out


def assert_runs_said_stopped(out: str) -> None:
    """Each line the command printed for a run it finished says the run was stopped."""
    lines = [line for line in out.splitlines() if "result(s) computed" in line]
    assert lines and all("stopped (canceled) after" in line for line in lines), out


@pytest.mark.timeout(150)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_batch_stops_the_run_and_the_same_command_finishes_the_rest(env, tmp_path, signum):
    with open_instance(env) as instance:  # storage created before the command starts
        process = start(env, tmp_path, "run", "--settle", "0.1")
        the_run, done_before = wait_until_mid_batch(instance, process)
        process.send_signal(signum)
        sent = time.monotonic()
        process.wait(timeout=60)
        latency = time.monotonic() - sent
        print(f"{signum.name}: stop latency {latency:.2f} s, {len(done_before)} transcript(s) before")
        out, err = output_of(tmp_path)

        assert process.returncode == 130, (out, err)
        assert latency < STOP_BOUND_S
        stop_lines = [line for line in err.splitlines() if line.startswith("Stopped")]
        assert len(stop_lines) == 1 and STOP_LINE.match(stop_lines[0]), err
        assert "Traceback" not in err + out
        assert_runs_said_stopped(out)
        # One run, canceled, never retried; the summary run did not start.
        assert [r.run_id for r in instance.get_runs()] == [the_run.run_id]
        assert instance.get_run_by_id(the_run.run_id).status == DagsterRunStatus.CANCELED
        events = {e.dagster_event_type.value for e in instance.all_logs(the_run.run_id) if e.is_dagster_event}
        assert not events & {"STEP_UP_FOR_RETRY", "STEP_RESTARTED"}
        stopped_at = materialized(instance)
        assert sum(1 for stage, _ in stopped_at if stage == "report") < recordings()  # mid-batch
        assert partial_files(Path(env["VOICEMAN_DATA_DIR"]) / "outputs") == []
        assert not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots

        began = time.monotonic()
        again = run(env, "run", "--settle", "0.1")
        print(f"{signum.name}: the same command finished the rest in {time.monotonic() - began:.1f} s")
        assert again.returncode == 0, again.stdout + again.stderr
        assert f"{recordings()} recording(s) left unfinished by an earlier run" in again.stdout
        assert_all_done_once(instance, again.stdout)
        assert all(materialized(instance)[pair] == 1 for pair in stopped_at)


@pytest.mark.timeout(200)
def test_ctrl_c_with_two_workers_cancels_both_runs_and_the_same_command_finishes(env, tmp_path):
    """Ctrl+C as a terminal sends it (SIGINT to the command's process group)
    while two workers each run a batch: both runs end CANCELED, the workers
    are gone, nothing partial is written; the same command finishes the rest."""
    env = cpu_engines(env)
    with open_instance(env) as instance:  # storage created before the command starts
        process = start(env, tmp_path, "run", "--settle", "0.1", *TWO_WORKERS, start_new_session=True)
        both, _ = wait_until_mid_batch(instance, process, timeout_s=120, runs=2)
        workers = worker_pids(both)
        assert len(workers) == 2 and process.pid not in workers  # each run: its worker's pid
        os.killpg(process.pid, signal.SIGINT)
        sent = time.monotonic()
        process.wait(timeout=60)
        print(f"Ctrl+C with 2 workers: stop latency {time.monotonic() - sent:.2f} s")
        out, err = output_of(tmp_path)

        assert process.returncode == 130, (out, err)
        assert time.monotonic() - sent < STOP_BOUND_S
        stop_lines = [line for line in err.splitlines() if line.startswith("Stopped")]
        assert len(stop_lines) == 1 and STOP_LINE_WORKERS.match(stop_lines[0]), err
        # Said once, for both runs, when the stop was taken (the command's last line comes after).
        said = [i for i, line in enumerate(err.splitlines()) if line.startswith("Stopping: canceling 2 run(s)")]
        assert len(said) == 1 and said[0] < err.splitlines().index(stop_lines[0]), err
        assert "Traceback" not in err + out
        assert_runs_said_stopped(out)
        assert not any(alive(pid) for pid in workers)
        # The two runs, canceled; no third batch, no summary run.
        assert sorted(r.run_id for r in instance.get_runs()) == sorted(r.run_id for r in both)
        assert {instance.get_run_by_id(r.run_id).status for r in both} == {DagsterRunStatus.CANCELED}
        stopped_at = materialized(instance)
        assert sum(1 for stage, _ in stopped_at if stage == "report") < recordings()
        assert partial_files(Path(env["VOICEMAN_DATA_DIR"]) / "outputs") == []

        again = run(env, "run", "--settle", "0.1", *TWO_WORKERS)
        assert again.returncode == 0, again.stdout + again.stderr
        assert f"{recordings()} recording(s) left unfinished by an earlier run" in again.stdout
        assert_all_done_once(instance, again.stdout)


@pytest.mark.timeout(60)
def test_a_command_waiting_for_the_pool_stops_at_once(env, tmp_path):
    """Another run holds the gpu pool's only slot: the command waits, and a
    SIGTERM stops it at once (Dagster's own wait for a slot would hold the
    signal back until the slot frees)."""
    with open_instance(env) as instance:
        instance.event_log_storage.set_concurrency_slots("gpu", 1)
        held = instance.event_log_storage.claim_concurrency_slot("gpu", "someone-else", "step")
        assert held.is_claimed
        process = start(env, tmp_path, "run", "--settle", "0.1")
        deadline = time.monotonic() + 60
        while "waiting for a free slot in pool 'gpu'" not in output_of(tmp_path)[0]:
            assert process.poll() is None and time.monotonic() < deadline, output_of(tmp_path)
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        process.wait(timeout=30)
        print(f"stop latency while waiting for the pool: {time.monotonic() - sent:.2f} s")
        out, err = output_of(tmp_path)
        assert process.returncode == 130, (out, err)
        assert time.monotonic() - sent < 5
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("Stopped.")
        assert instance.get_runs() == []  # no run was started
        # The slot holder is no CLI run of this host: left alone.
        claimed = instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
        assert [slot.run_id for slot in claimed] == ["someone-else"]
