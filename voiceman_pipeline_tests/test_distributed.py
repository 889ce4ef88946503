"""Distributed execution through Celery (``VOICEMAN_CELERY_BROKER``, distributed.py).

One cluster for the module, on this machine: ``redis-server`` on a free
loopback port (no persistence), two Celery workers (one process each,
distinct names, queue ``cpu``) and ``dagster-daemon run`` on a temporary
DAGSTER_HOME and data dir. One backfill of the whole chain over three sample
recordings and one broken file, in two runs of two recordings side by side,
so two steps reach the workers at once. Skipped without ``redis-server``, except
under ``CI=true``, where that fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from dagster import AssetKey, DagsterInstance, DagsterRunStatus, RunsFilter

from voiceman_pipeline import distributed
from voiceman_pipeline_tests.conftest import REPO, SAMPLES, free_port, wait_for

STAGES = ["audio", "transcript", "forensic", "emotion", "report"]
BIN = Path(sys.executable).parent
GOOD = ["cards_001.wav", "cards_002.wav", "sense_and_sensibility_01_austen_64kb-0880.wav"]
BROKEN = "broken.wav"  # text with a .wav name
WORKERS = ["cpu1", "cpu2"]

pytestmark = pytest.mark.timeout(600)


# --- routing: no processes ----------------------------------------------------


class _Engines:
    def __init__(self, **fields):
        self.__dict__.update(fields)


CPU_STT = _Engines(engine="pocketsphinx", device="auto")
WHISPER_CUDA = _Engines(engine="faster-whisper", device="cuda")
NO_SER = _Engines(model="", device="auto")
SER_AUTO = _Engines(model="/models/ser", device="auto")


def test_steps_go_to_the_gpu_queue_only_when_an_engine_uses_the_gpu():
    never = lambda: False  # noqa: E731  (no GPU visible)
    always = lambda: True  # noqa: E731
    assert distributed.step_queue(CPU_STT, NO_SER, never) == "cpu"
    assert distributed.step_queue(CPU_STT, NO_SER, always) == "cpu"  # pocketsphinx: CPU only
    assert distributed.step_queue(WHISPER_CUDA, NO_SER, never) == "gpu"
    assert distributed.step_queue(CPU_STT, SER_AUTO, always) == "gpu"
    assert distributed.step_queue(CPU_STT, SER_AUTO, never) == "cpu"


# Run in a fresh interpreter: the definitions without the switch (nothing of
# Celery imported, the in-process executor), then reloaded with it.
SWITCH_PROBE = """
import importlib, os, sys
import voiceman_pipeline.definitions as d
job = d.defs.resolve_implicit_global_asset_job_def()
print(job.executor_def.name, sorted(m for m in sys.modules if "celery" in m), dict(d.recording_analysis.op.tags))
os.environ["VOICEMAN_CELERY_BROKER"] = "redis://127.0.0.1:1/0"  # never contacted
os.environ["VOICEMAN_BATCH_SIZE"] = "3"
d = importlib.reload(d)
job = d.defs.resolve_implicit_global_asset_job_def()
a = d.recording_analysis
print(job.executor_def.name, a.op.tags["dagster-celery/queue"], a.op.pool, a.backfill_policy.max_partitions_per_run)
"""


def test_the_switch_chooses_the_executor_and_nothing_of_celery_loads_without_it(env):
    env = {k: v for k, v in env.items() if k not in (distributed.BROKER_ENV, "VOICEMAN_ANALYSIS_POOL")}
    out = subprocess.run([sys.executable, "-c", SWITCH_PROBE], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    without, with_switch = out.stdout.splitlines()[-2:]
    assert without == "in_process [] {}"
    assert with_switch.split() == ["celery", "cpu", "None", "3"]


# --- the cluster ----------------------------------------------------------------


def _redis_server() -> str:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if found is None:
        reason = "redis-server not found (Debian: apt-get install redis-server)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + ": CI must run the Celery test", pytrace=False)
        pytest.skip(reason)
    return found



def _stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM each process group, then SIGKILL what is left (workers' children included)."""
    for proc in processes:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30
    for proc in processes:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group: also a worker's pool child
        except ProcessLookupError:
            pass
        proc.wait(10)


class Cluster:
    def __init__(self, root: Path, instance: DagsterInstance, data: Path, env: dict):
        self.root, self.instance, self.data, self.env = root, instance, data, env

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-2500:]}"
            for path in sorted(self.root.glob("*.log"))
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    server = _redis_server()
    root = tmp_path_factory.mktemp("celery")
    home, data = root / "home", root / "data"
    home.mkdir()
    (data / "inbox").mkdir(parents=True)
    for name in GOOD:
        shutil.copyfile(SAMPLES / name, data / "inbox" / name)
    (data / "inbox" / BROKEN).write_text("not a recording, only text with a .wav name\n" * 20)

    # The shipped dagster.yaml (run queue, pools, run monitoring) with its
    # storage in the temporary home: sqlite, as all processes share this machine.
    config = yaml.safe_load((REPO / "dagster.yaml").read_text())
    config["storage"] = {"sqlite": {"base_dir": str(home / "storage")}}
    config["local_artifact_storage"]["config"]["base_dir"] = str(home)
    config["compute_logs"]["config"]["base_dir"] = str(home / "compute_logs")
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))

    port = free_port()
    broker = f"redis://127.0.0.1:{port}/0"
    env = {
        **{k: v for k, v in os.environ.items() if k != "VOICEMAN_PG_URL"},
        "DAGSTER_HOME": str(home),
        "VOICEMAN_DATA_DIR": str(data),
        "PYTHONPATH": str(REPO),
        distributed.BROKER_ENV: broker,
        # Two runs of two recordings, side by side: two steps at once, one per worker.
        "VOICEMAN_BATCH_SIZE": "2",
        "VOICEMAN_MAX_CONCURRENT_RUNS": "2",
        # The inbox sensor takes in only files settled for an hour: it leaves
        # these recordings to the backfill.
        "VOICEMAN_SENSOR_INTERVAL_S": "3600",
    }
    processes: list[subprocess.Popen] = []

    def start(name: str, argv: list) -> None:
        log = open(root / f"{name}.log", "w")
        processes.append(subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        ))
        log.close()

    try:
        start("redis", [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no"])
        import redis

        client = redis.Redis.from_url(broker)
        wait_for(lambda: _ping(client), 30, "redis-server")
        for worker in WORKERS:
            start(worker, [BIN / "celery", "-A", "voiceman_pipeline.distributed", "worker",
                           "-Q", "cpu", "-c", "1", "-n", f"{worker}@%h", "--loglevel", "INFO"])
        start("daemon", [BIN / "dagster-daemon", "run", "-w", str(REPO / "workspace.yaml")])
        app = _app(env)
        wait_for(lambda: len(app.control.inspect(timeout=1).ping() or {}) == 2, 180,
                 "both Celery workers to answer")
        with DagsterInstance.from_config(str(home)) as instance:
            cluster = Cluster(root, instance, data, env)
            cluster.app = app
            yield cluster
    finally:
        _stop(processes)


def _ping(client) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def _app(env: dict):
    """The workers' Celery app, built as a worker builds it (from the same broker)."""
    old = os.environ.get(distributed.BROKER_ENV)
    os.environ[distributed.BROKER_ENV] = env[distributed.BROKER_ENV]
    try:
        return distributed.celery_app()
    finally:
        if old is None:
            del os.environ[distributed.BROKER_ENV]
        else:
            os.environ[distributed.BROKER_ENV] = old


def _backfill(instance: DagsterInstance, keys: list[str]) -> str:
    """One backfill of the whole chain over ``keys`` (as the UI's Materialize launches it)."""
    from dagster._core.execution.backfill import PartitionBackfill

    from voiceman_pipeline.definitions import defs

    backfill = PartitionBackfill.from_asset_partitions(
        backfill_id="celery01", partition_names=keys, asset_graph=defs.resolve_asset_graph(),
        backfill_timestamp=time.time(), tags={}, dynamic_partitions_store=instance,
        all_partitions=False, asset_selection=[AssetKey(s) for s in STAGES], title=None,
        description=None, run_config=None,
    )
    instance.add_backfill(backfill)
    return backfill.backfill_id


def _celery_worker_of(instance: DagsterInstance, run_id: str) -> set[str]:
    """Names of the workers that executed the run's steps (dagster-celery's engine event)."""
    names = set()
    for record in instance.get_records_for_run(run_id).records:
        event = record.event_log_entry.dagster_event
        data = event and event.event_type_value == "ENGINE_EVENT" and event.event_specific_data
        if data and "Celery worker" in (data.metadata or {}):
            names.add(data.metadata["Celery worker"].value)
    return names


def test_one_backfill_runs_on_both_workers_and_isolates_the_broken_recording(cluster):
    instance = cluster.instance
    keys = [*GOOD, BROKEN]
    instance.add_dynamic_partitions("audio_files", keys)
    backfill_id = _backfill(instance, keys)

    def finished():
        # The backfill daemon marks the backfill done on its next pass (up to
        # 30 s later): its runs covering every key and all ended is enough.
        runs = instance.get_runs(RunsFilter(tags={"dagster/backfill": backfill_id}))
        covered = set()
        for run in runs:
            first = keys.index(run.tags["dagster/asset_partition_range_start"])
            last = keys.index(run.tags["dagster/asset_partition_range_end"])
            covered.update(keys[first : last + 1])
        return covered == set(keys) and all(run.is_finished for run in runs) and runs

    runs = wait_for(finished, 420, f"the backfill's runs to finish\n{cluster.logs()}")
    statuses = Counter(run.status for run in runs)
    # The broken recording's run failed; the good one beside it in that run did not.
    assert statuses == {DagsterRunStatus.SUCCESS: 1, DagsterRunStatus.FAILURE: 1}, cluster.logs()

    # Both workers executed steps: each run's step names its worker, and each
    # worker's own count of tasks executed.
    ran_on = [_celery_worker_of(instance, run.run_id) for run in runs]
    assert all(len(names) == 1 for names in ran_on), ran_on
    assert {name.split("@")[0] for names in ran_on for name in names} == set(WORKERS)
    totals = {
        name.split("@")[0]: stats["total"].get("execute_plan", 0)
        for name, stats in (cluster.app.control.inspect(timeout=5).stats() or {}).items()
    }
    assert set(totals) == set(WORKERS) and all(n >= 1 for n in totals.values()), totals

    # Every stage of every good recording materialized exactly once, the
    # broken one never, and only its partition failed.
    counts: Counter = Counter()
    for stage in STAGES:
        for record in instance.fetch_materializations(AssetKey(stage), limit=1000).records:
            counts[(stage, record.partition_key)] += 1
            metadata = record.asset_materialization.metadata
            assert "memory_peak_delta_mb" in metadata and "memory_predicted_mb" in metadata, (
                stage, record.partition_key, sorted(metadata))
    assert counts == {(stage, key): 1 for stage in STAGES for key in GOOD}
    from voiceman_pipeline.partitions import audio_files

    for stage in STAGES:
        status = instance.get_status_by_partition(AssetKey(stage), keys, audio_files)
        assert {k: v.value for k, v in status.items()} == {
            **{key: "MATERIALIZED" for key in GOOD}, BROKEN: "FAILED"}, stage

    # Why: the audio stage's observation for the broken recording says so.
    observed = [
        r.asset_observation.metadata
        for r in instance.fetch_observations(AssetKey("audio"), limit=100).records
        if r.partition_key == BROKEN and "error" in r.asset_observation.metadata
    ]
    assert observed, "no failure recorded for the broken recording"
    assert {m["error_category"].value for m in observed} == {"permanent"}
    assert all(BROKEN in m["error"].value for m in observed), [m["error"].value for m in observed]
    (failed_run,) = [run for run in runs if run.status == DagsterRunStatus.FAILURE]
    assert failed_run.tags.get("voiceman/recordings_failed") == "1"
    assert failed_run.tags.get("voiceman/recordings_ok") == "1"
