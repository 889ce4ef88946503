"""The pipeline as a user runs it: ``dagster dev`` (webserver, daemon, code
server) on a temporary home, driven through GraphQL, the inbox and signals.

One server for the module. The batches the tests build on are module
fixtures, made once whether the tests run together or one alone (-k):

1. six recordings dropped in the inbox; the sensor launches their run; the
   UI's *Terminate* (GraphQL ``terminateRun``) in the middle of it: the run
   ends CANCELED within a bound, no retry starts, nothing partial is left;
2. a backfill of the failed partitions of the ``audio`` asset alone (what an
   asset page's *Materialize -> Failed* launches) finishes the whole chain for
   them without recomputing what finished before the stop; two sensor ticks
   later no run was launched for them;
3. six more recordings; the run worker is killed with SIGKILL mid-batch; the
   code server fails the run and ``run_retries`` relaunches it; every (stage,
   recording) pair is materialized exactly once;
4. one of those recordings' transcript re-run with another engine from the
   CLI: the UI marks what read it as out of date;
5. a batch with a cut-off file: *Re-execute -> From failure*, then Dagster's
   own GraphQL client's backfill of the failed partition, compute only it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml
from dagster import AssetKey, DagsterInstance, DagsterRunStatus, RunsFilter

from voiceman_pipeline.assets.stages import STAGE_BY_NAME
from voiceman_pipeline.runs import process_alive
from voiceman_pipeline_tests.conftest import REPO, SAMPLE_WAVS, free_port, location_loaded, wait_for

STAGES = ["audio", "transcript", "forensic", "emotion", "report"]
BIN = Path(sys.executable).parent
STOP_BOUND_S = 30.0  # Terminate -> CANCELED; what the README promises, with margin
# How long `dagster dev` may take to stop: Dagster's own limits, 60 s for the
# webserver and then 60 s for the daemon (dagster/_cli/dev.py), with margin.
# It usually stops in seconds; once in this project's CI the daemon was still
# running sensor ticks 30 s after SIGTERM (its code server had exited first).
DAGSTER_DEV_STOP_S = 150

pytestmark = pytest.mark.timeout(600)



@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """``dagster dev`` on 127.0.0.1 with the shipped dagster.yaml, storage in a temp dir."""
    root = tmp_path_factory.mktemp("live")
    home, data = root / "home", root / "data"
    home.mkdir()
    (data / "inbox").mkdir(parents=True)
    config = yaml.safe_load((REPO / "dagster.yaml").read_text())
    config["storage"]["custom"]["config"]["base_dir"] = str(home / "storage")  # sqlite, pooled
    config["local_artifact_storage"]["config"]["base_dir"] = str(home)
    config["compute_logs"]["config"]["base_dir"] = str(home / "compute_logs")
    config["run_monitoring"]["poll_interval_seconds"] = 1  # the test's patience only (slots freed sooner)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "VOICEMAN_DATA_DIR": str(data),
        "VOICEMAN_SENSOR_INTERVAL_S": "2",
        "VOICEMAN_BATCH_SIZE": "8",
        # One run at a time, so that each drop of 6 is one sensor run, as the tests
        # below stop, kill and retry it (test_sensors: drops shared among runs).
        "VOICEMAN_MAX_CONCURRENT_RUNS": "1",
        "PYTHONPATH": str(REPO),
    }
    env.pop("VOICEMAN_PG_URL", None)  # this home's storage is sqlite, whatever the shell says
    log = open(root / "dagster-dev.log", "w")
    server = subprocess.Popen(
        [BIN / "dagster", "dev", "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # SIGINT at its default, as in a terminal, whatever this test run inherited: a
        # suite started with `&` from a script has it ignored, and Dagster maps SIGTERM
        # to SIGINT's handler, so dagster dev ignored the SIGTERM below (see "The UI").
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    url = f"http://127.0.0.1:{port}/graphql"
    try:
        wait_for(lambda: location_loaded(url), 120, "the code location to load")
        with DagsterInstance.from_config(str(home)) as instance:
            yield Live(url, instance, data, root / "dagster-dev.log")
    finally:
        stopping = time.monotonic()
        os.killpg(server.pid, signal.SIGTERM)  # as Ctrl+C in its terminal: the whole group
        try:
            server.wait(DAGSTER_DEV_STOP_S)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    # Stopped, its processes closed the storage: every database whole in its own
    # file. (Its code servers and run workers may still be exiting when it has. A code
    # server that dagster dev restarted in its last seconds, having seen the old one exit
    # on SIGTERM before its own shutdown began, waits out its heartbeat timeout first:
    # DAGSTER_PROXY_SERVER_HEARTBEAT_TIMEOUT, 30 s. Seen once in this project's CI.)
    try:
        wait_for(lambda: not group_alive(server.pid), 90, "dagster dev's processes to exit")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)  # none left, unless the wait failed
    stopped_in = time.monotonic() - stopping
    print(f"dagster dev stopped {stopped_in:.1f} s after SIGTERM, exit {server.returncode}")
    assert server.returncode == 0, (
        f"dagster dev: exit {server.returncode} {stopped_in:.0f} s after SIGTERM "
        f"(killed after {DAGSTER_DEV_STOP_S} s); the end of its log:\n"
        + "\n".join((root / "dagster-dev.log").read_text().splitlines()[-40:]))
    assert not list(home.rglob("*.db-wal"))


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still running (not a zombie)."""
    for pid in psutil.pids():
        with contextlib.suppress(OSError):  # gone meanwhile
            if os.getpgid(pid) == pgid and process_alive(pid, None):
                return True
    return False


class Live:
    def __init__(self, url: str, instance: DagsterInstance, data: Path, log: Path):
        self.url, self.instance, self.data, self.log = url, instance, data, log

    def gql(self, query: str, **variables) -> dict:
        body = json.dumps({"query": query, "variables": variables}).encode()
        request = urllib.request.Request(self.url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        assert "errors" not in answer, answer
        return answer["data"]

    def drop(self, names: list[str]) -> None:
        for i, name in enumerate(names):
            shutil.copyfile(SAMPLE_WAVS[i % len(SAMPLE_WAVS)], self.data / "inbox" / name)

    def reexecute_from_failure(self, run_id: str) -> dict:
        """The UI's *Re-execute -> From failure*, as its GraphQL mutation; the answer."""
        return self.gql(
            """mutation($parent: String!) {
                 launchPipelineReexecution(reexecutionParams: {parentRunId: $parent, strategy: FROM_FAILURE}) {
                   __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }""",
            parent=run_id,
        )["launchPipelineReexecution"]

    def runs_for(self, keys: list[str]):
        """Analysis runs that cover any of ``keys`` (range runs or single partitions)."""
        found = []
        for run in self.instance.get_runs():
            tags = run.tags
            covered = {tags.get("dagster/partition")} | {
                tags.get("dagster/asset_partition_range_start"),
                tags.get("dagster/asset_partition_range_end"),
            }
            if covered & set(keys):
                found.append(run)
        return found

    def counts(self, keys: list[str], computed_only: bool = False) -> Counter:
        """Materialization events per (stage, recording), from the event log;
        ``computed_only``: leaving out a backfill's confirmations of results
        that were already current (metadata ``computed`` False)."""
        counted: Counter = Counter()
        for stage in STAGES:
            for record in self.instance.fetch_materializations(AssetKey(stage), limit=10_000).records:
                computed = record.asset_materialization.metadata.get("computed")
                if computed_only and computed is not None and computed.value is False:
                    continue
                if record.partition_key in keys:
                    counted[(stage, record.partition_key)] += 1
        return counted

    def output_times(self, pairs) -> dict[Path, int]:
        """Modification times of the files the (stage, recording) ``pairs`` wrote."""
        return {
            path: path.stat().st_mtime_ns
            for stage, key in pairs
            for path in (self.data / "outputs" / key / name for name in STAGE_BY_NAME[stage].writes)
        }

    def wait_run(self, run_id: str, statuses, timeout: float):
        def ended():
            run = self.instance.get_run_by_id(run_id)
            return run if run.status in statuses else None

        return wait_for(ended, timeout, f"run {run_id} to reach {statuses}")

    def tail(self) -> str:
        return self.log.read_text()[-3000:]



def some_transcripts_done(live: Live, run_id: str, keys: list[str]) -> bool:
    done = sum(1 for (stage, _), n in live.counts(keys).items() if stage == "transcript" and n)
    run = live.instance.get_run_by_id(run_id)
    assert run.status not in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE), "batch ended too soon"
    return 1 <= done


def worker_pid(live: Live, run_id: str) -> int:
    """The run worker's pid, as the run launcher recorded it in the run's events."""
    for record in live.instance.get_records_for_run(run_id).records:
        match = re.search(r"pid: (\d+)", record.event_log_entry.message or "")
        if match:
            return int(match.group(1))
    raise AssertionError(f"no pid recorded for run {run_id}")


FIRST = [f"first{i}.wav" for i in range(6)]
SECOND = [f"second{i}.wav" for i in range(6)]


@pytest.fixture(scope="module")
def stopped_first(live):
    """FIRST dropped in the inbox; the sensor's run of it terminated from the UI
    once a transcript is done: (the run, seconds from Terminate to CANCELED)."""
    live.drop(FIRST)
    run = wait_for(lambda: live.runs_for(FIRST), 60, "the sensor to launch the batch")[0]
    assert run.tags.get("dagster/asset_partition_range_start") == FIRST[0]
    wait_for(lambda: some_transcripts_done(live, run.run_id, FIRST), 180, "a first transcript")
    asked = time.monotonic()
    answer = live.gql(
        "mutation($id: String!) { terminateRun(runId: $id) { __typename } }", id=run.run_id
    )
    assert answer["terminateRun"]["__typename"] == "TerminateRunSuccess"
    live.wait_run(run.run_id, {DagsterRunStatus.CANCELED}, STOP_BOUND_S)
    return run, time.monotonic() - asked


def test_terminate_from_the_ui_stops_the_run_and_nothing_retries_it(live, stopped_first):
    run, stopped_after = stopped_first
    print(f"Terminate -> CANCELED in {stopped_after:.1f} s")

    time.sleep(5)  # time for a (wrong) retry or relaunch to appear
    runs = live.runs_for(FIRST)
    assert [r.run_id for r in runs] == [run.run_id], "a retry or another run started"
    events = [r.event_log_entry.dagster_event for r in live.instance.get_records_for_run(run.run_id).records]
    assert not [e for e in events if e and e.event_type_value == "STEP_UP_FOR_RETRY"]
    partial = [p for p in (live.data / "outputs").rglob("*") if p.name.endswith(".tmp")]
    assert partial == []
    counts = live.counts(FIRST)
    assert counts and set(counts.values()) == {1}
    assert len(counts) < len(FIRST) * len(STAGES)  # it really stopped part-way


def test_a_backfill_of_failed_audio_partitions_finishes_the_whole_chain(live, stopped_first):
    before = live.counts(FIRST)
    # The files of the results recorded before the stop. (A stage whose files were
    # written but whose materialization the Terminate cut off has no result in
    # Dagster's storage, the checkpoint: the backfill computes it again.)
    written_before = live.output_times(before)
    # A terminated run's unfinished partitions read "missing" in Dagster (a
    # user's stop is not a failure); the UI offers them as such.
    statuses = live.instance.get_status_by_partition(AssetKey("report"), FIRST, _partitions())
    failed = [key for key in FIRST if statuses.get(key) is None or statuses[key].value == "FAILED"]
    assert failed, "the stopped run left nothing unfinished"
    answer = live.gql(
        """mutation($names: [String!]) {
             launchPartitionBackfill(backfillParams: {
               partitionNames: $names, assetSelection: [{path: ["audio"]}]}) {
               __typename ... on LaunchBackfillSuccess { backfillId }
               ... on PythonError { message } } }""",
        names=failed,
    )["launchPartitionBackfill"]
    assert answer["__typename"] == "LaunchBackfillSuccess", answer
    backfill_id = answer["backfillId"]

    def backfill_done():
        backfill = live.instance.get_backfill(backfill_id)
        return backfill.status.value not in ("REQUESTED",) and backfill

    backfill = wait_for(backfill_done, 300, "the backfill to finish")
    assert backfill.status.value == "COMPLETED_SUCCESS", backfill.status
    backfill_runs = live.instance.get_runs(RunsFilter(tags={"dagster/backfill": backfill_id}))
    assert backfill_runs and {r.tags["voiceman/source"] for r in backfill_runs} == {"backfill"}
    counts = live.counts(FIRST, computed_only=True)
    assert len(counts) == len(FIRST) * len(STAGES)  # the whole chain, every recording
    assert set(counts.values()) == {1}  # nothing computed twice
    assert all(counts[pair] == 1 for pair in before)
    rewritten = [path for path, when in live.output_times(before).items() if written_before[path] != when]
    assert rewritten == [], "results recorded before the stop were written again"

    # The summary sensor has the summary table rebuilt with them.
    def summary_lists_them():
        path = live.data / "outputs" / "summary.csv"
        table = pd.read_csv(path) if path.exists() else None
        return table is not None and set(FIRST) <= set(table[table["status"] == "done"]["partition_key"])

    wait_for(summary_lists_them, 120, "summary_sensor to rebuild the summary with the backfilled recordings")

    # The sensor knows these contents were taken in (by the backfill): two
    # ticks later it has launched nothing for them.
    runs_before = {r.run_id for r in live.runs_for(FIRST)}
    ticks_before = _sensor_ticks(live)
    wait_for(lambda: len(_sensor_ticks(live) - ticks_before) >= 2, 60, "two sensor ticks")
    assert {r.run_id for r in live.runs_for(FIRST)} == runs_before


@pytest.fixture(scope="module")
def relaunched_second(live):
    """SECOND dropped in the inbox; the worker of the sensor's run killed (kill
    -9) once a transcript is done, and the run relaunched by run_retries:
    (materializations before the kill, the relaunched run once ended)."""
    live.drop(SECOND)
    run = wait_for(lambda: live.runs_for(SECOND), 60, "the sensor to launch the batch")[0]
    wait_for(lambda: some_transcripts_done(live, run.run_id, SECOND), 180, "a first transcript")
    before_kill = live.counts(SECOND)
    os.kill(worker_pid(live, run.run_id), signal.SIGKILL)

    live.wait_run(run.run_id, {DagsterRunStatus.FAILURE}, 60)  # the code server that started it noticed

    def relaunched():
        children = live.instance.get_runs(RunsFilter(tags={"dagster/parent_run_id": run.run_id}))
        return children[0] if children else None

    child = wait_for(relaunched, 60, "run_retries to relaunch the run")
    child = live.wait_run(
        child.run_id, {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE}, 300
    )
    return before_kill, child


def test_a_killed_run_worker_is_relaunched_and_computes_each_pair_once(live, relaunched_second):
    before_kill, child = relaunched_second
    assert child.status == DagsterRunStatus.SUCCESS, live.tail()
    counts = live.counts(SECOND)
    assert len(counts) == len(SECOND) * len(STAGES)
    assert set(counts.values()) == {1}, {k: v for k, v in counts.items() if v != 1}
    assert all(counts[pair] == 1 for pair in before_kill)  # finished before the kill: kept


def _partitions():
    from voiceman_pipeline.partitions import audio_files

    return audio_files


def _sensor_ticks(live: Live) -> set[str]:
    """Ids of the inbox sensor's latest ticks."""
    data = live.gql(
        """{ sensorsOrError(repositorySelector: {repositoryLocationName: "voiceman_pipeline",
               repositoryName: "__repository__"}) {
             ... on Sensors { results { name sensorState { ticks(limit: 10) { id } } } } } }"""
    )
    for sensor in data["sensorsOrError"]["results"]:
        if sensor["name"] == "inbox_sensor":
            return {tick["id"] for tick in sensor["sensorState"]["ticks"]}
    raise AssertionError("inbox_sensor not found")


def test_the_ui_shows_what_a_rerun_stage_made_out_of_date(live, relaunched_second, tiny_whisper):
    """Re-run one recording's transcript with another engine from the CLI; the
    webserver's GraphQL (what the asset page shows) marks what read the old
    transcript as stale, and ``voiceman status`` names the first stage to re-run."""
    key = SECOND[0]
    config = {"resources": {"stt": {"config": {
        "engine": "faster-whisper", "model": str(tiny_whisper), "device": "cpu", "language": "en"}}}}
    env = {**os.environ, "DAGSTER_HOME": str(live.instance.root_directory),
           "VOICEMAN_DATA_DIR": str(live.data), "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [BIN / "dagster", "asset", "materialize", "-m", "voiceman_pipeline.definitions",
         "--select", "transcript", "--partition", key, "--config-json", json.dumps(config)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    stale = {}
    for stage in STAGES:
        data = live.gql(
            """query($path: [String!]!, $key: String!) {
                 assetNodes(assetKeys: [{path: $path}]) { staleStatusByPartition(partitions: [$key]) } }""",
            path=[stage], key=key,
        )
        stale[stage] = data["assetNodes"][0]["staleStatusByPartition"][0]
    assert stale == {"audio": "FRESH", "transcript": "FRESH", "forensic": "STALE",
                     "emotion": "STALE", "report": "STALE"}
    status = subprocess.run(
        [BIN / "voiceman", "status"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    ).stdout
    (row,) = [line for line in status.splitlines() if line.startswith(key + " ")]
    assert "stale: re-run forensic" in row


THIRD = ["third0.wav", "third1.wav", "third2.wav"]


@pytest.fixture(scope="module")
def failed_third(live):
    """THIRD and a cut-off third3.wav dropped in the inbox; the sensor's run of
    them, ended."""
    live.drop(THIRD)
    cut = SAMPLE_WAVS[0].read_bytes()
    (live.data / "inbox" / "third3.wav").write_bytes(cut[: len(cut) // 2])
    run = wait_for(lambda: live.runs_for(THIRD + ["third3.wav"]), 60, "the sensor to launch the batch")[0]
    return live.wait_run(run.run_id, {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE}, 300)


def test_reexecute_from_failure_computes_only_what_failed(live, failed_third):
    """A batch with a cut-off file fails; *Re-execute -> From failure* runs the
    step again: the good recordings are current and not computed again."""
    keys = THIRD + ["third3.wav"]
    run = failed_third
    assert run.status == DagsterRunStatus.FAILURE  # third3.wav is cut off
    before = live.counts(keys)
    assert len(before) == len(THIRD) * len(STAGES) and set(before.values()) == {1}

    answer = live.reexecute_from_failure(run.run_id)
    assert answer["__typename"] == "LaunchRunSuccess", answer
    again = live.wait_run(
        answer["run"]["runId"], {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE}, 300
    )
    assert again.status == DagsterRunStatus.FAILURE  # still cut off: fails again, alone
    # Runs say what they are: the sensor's goes through analysis_job.
    assert run.job_name == again.job_name == "analysis_job"
    assert run.tags["voiceman/source"] == "sensor"
    assert live.instance.get_run_by_id(again.run_id).tags["voiceman/source"] == "re-execution"
    assert live.counts(keys, computed_only=True) == before  # nothing done is computed again
    # The sensor sees the confirmed intakes as what they are: it runs nothing again.
    ticks_before, runs_before = _sensor_ticks(live), len(live.runs_for(keys))
    wait_for(lambda: len(_sensor_ticks(live) - ticks_before) >= 2, 60, "two sensor ticks")
    assert len(live.runs_for(keys)) == runs_before
    statuses = live.instance.get_status_by_partition(AssetKey("report"), keys, _partitions())
    assert {key: statuses[key].value for key in keys} == {
        **dict.fromkeys(THIRD, "MATERIALIZED"), "third3.wav": "FAILED"}
    failures = [
        record
        for record in live.instance.get_records_for_run(again.run_id).records
        if record.event_log_entry.asset_observation is not None
        and record.event_log_entry.asset_observation.asset_key == AssetKey("audio")
    ]
    assert [r.event_log_entry.asset_observation.partition for r in failures] == ["third3.wav"]


def test_dagster_graphql_client_reads_statuses_and_backfills_the_failed(live, failed_third):
    """A client nobody here wrote, Dagster's own GraphQL Python client, reads
    the per-partition statuses and launches a backfill of the failed partitions
    (third3.wav, still cut off): it fails again, alone, and nothing done is
    computed again."""
    from urllib.parse import urlparse

    from dagster_graphql import DagsterGraphQLClient

    client = DagsterGraphQLClient("127.0.0.1", port_number=urlparse(live.url).port)
    statuses_query = """query {
        assetNodeOrError(assetKey: {path: ["report"]}) { ... on AssetNode {
          assetPartitionStatuses { ... on DefaultPartitionStatuses {
            materializedPartitions failedPartitions } } } } }"""

    def statuses():
        node = client._execute(statuses_query)["assetNodeOrError"]["assetPartitionStatuses"]
        return set(node["materializedPartitions"]), set(node["failedPartitions"])

    materialized, failed = statuses()
    assert set(THIRD) <= materialized and failed == {"third3.wav"}
    before = live.counts(THIRD + ["third3.wav"], computed_only=True)
    answer = client._execute(
        """mutation($names: [String!]) {
             launchPartitionBackfill(backfillParams: {
               partitionNames: $names, assetSelection: [{path: ["report"]}]}) {
               __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }""",
        {"names": sorted(failed)},
    )["launchPartitionBackfill"]
    assert answer["__typename"] == "LaunchBackfillSuccess", answer
    backfill = wait_for(
        lambda: (b := live.instance.get_backfill(answer["backfillId"])).status.value != "REQUESTED" and b,
        300, "the client's backfill to finish",
    )
    assert backfill.status.value == "COMPLETED_FAILED", backfill.status  # still cut off
    (run,) = live.instance.get_runs(RunsFilter(tags={"dagster/backfill": answer["backfillId"]}))
    assert run.tags["voiceman/source"] == "backfill"
    assert statuses() == (materialized, failed)
    assert live.counts(THIRD + ["third3.wav"], computed_only=True) == before


def test_a_job_backfill_re_executed_from_failure_runs_its_failed_range_again(live, failed_third):
    """The job's *Partitions* tab launches a job backfill, whose runs cover ranges of
    recordings (the stages' multi-run backfill policy). Its *Re-execute -> From
    failure* failed in Dagster's backfill daemon ("Param "partition_name" is not a
    str", ``dagster_fixes.py``) and ran nothing. Now it re-executes the failed range's
    failed step: third3.wav, still cut off, fails again; third2.wav, done, is kept."""
    keys = ["third2.wav", "third3.wav"]
    location = yaml.safe_load((REPO / "workspace.yaml").read_text())["load_from"][0]["python_module"]
    launched = live.gql(
        """mutation($names: [String!], $location: String!) {
             launchPartitionBackfill(backfillParams: {partitionNames: $names, selector: {
               partitionSetName: "analysis_job_partition_set",
               repositorySelector: {repositoryLocationName: $location, repositoryName: "__repository__"}}}) {
               __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }""",
        names=keys, location=location["location_name"],
    )["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    (run,) = backfill_runs_ended(live, launched["backfillId"])
    assert (run.tags["dagster/asset_partition_range_start"], run.tags["dagster/asset_partition_range_end"]) == (
        "third2.wav", "third3.wav") and run.status == DagsterRunStatus.FAILURE
    before = live.counts(THIRD + ["third3.wav"], computed_only=True)

    again = live.gql(
        """mutation($id: String!) {
             reexecutePartitionBackfill(reexecutionParams: {parentRunId: $id, strategy: FROM_FAILURE}) {
               __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message } } }""",
        id=launched["backfillId"],
    )["reexecutePartitionBackfill"]
    assert again["__typename"] == "LaunchBackfillSuccess", again
    (rerun,) = backfill_runs_ended(live, again["backfillId"])
    assert rerun.parent_run_id == run.run_id and rerun.status == DagsterRunStatus.FAILURE  # still cut off
    assert live.counts(THIRD + ["third3.wav"], computed_only=True) == before  # third2.wav kept
    failures = [r.event_log_entry.asset_observation.partition for r in live.instance.get_records_for_run(
        rerun.run_id).records if r.event_log_entry.asset_observation is not None]
    assert failures and set(failures) == {"third3.wav"}


def backfill_runs_ended(live: Live, backfill_id: str) -> list:
    """The runs of a backfill once the daemon has launched them all and they ended;
    a backfill the daemon itself failed fails the test with its error."""
    def launched():
        backfill = live.instance.get_backfill(backfill_id)
        return backfill.status.value != "REQUESTED" and backfill

    backfill = wait_for(launched, 300, f"backfill {backfill_id} to launch its runs")
    ended = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}

    def runs():  # all launched by now
        found = live.instance.get_runs(RunsFilter(tags={"dagster/backfill": backfill_id}))
        return all(run.status in ended for run in found) and (found,)

    (found,) = wait_for(runs, 300, f"the runs of backfill {backfill_id} to end")
    assert found, f"backfill {backfill_id} ({backfill.status.value}) launched no run: {backfill.error}"
    return found


def test_a_run_made_outside_the_daemon_can_be_re_executed_from_the_ui(live):
    """`dagster asset materialize` and `voiceman` execute their runs in their own
    process, and Dagster records no code location for such runs: the UI's
    *Re-execute* of one failed with "CheckError: Expected non-None value". Its
    first step now records this project's (``runs.own_run``), and the re-execution
    runs like any other (here it fails again: the recording is still not there)."""
    key = "never-dropped.wav"
    live.instance.add_dynamic_partitions("audio_files", [key])
    env = {**os.environ, "DAGSTER_HOME": str(live.instance.root_directory), "VOICEMAN_DATA_DIR": str(live.data)}
    env.pop("VOICEMAN_PG_URL", None)
    cli = subprocess.run(
        [BIN / "dagster", "asset", "materialize", "-m", "voiceman_pipeline.definitions",
         "--select", "audio", "--partition", key],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert cli.returncode != 0, cli.stdout[-2000:]
    (parent,) = live.instance.get_runs(RunsFilter(tags={"dagster/partition": key}))
    assert parent.status == DagsterRunStatus.FAILURE
    location = yaml.safe_load((REPO / "workspace.yaml").read_text())["load_from"][0]["python_module"]
    assert parent.remote_job_origin.location_name == location["location_name"]

    answer = live.reexecute_from_failure(parent.run_id)
    assert answer["__typename"] == "LaunchRunSuccess", answer
    again = live.wait_run(answer["run"]["runId"], {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE}, 300)
    assert again.parent_run_id == parent.run_id and again.job_name == parent.job_name
    assert again.status == DagsterRunStatus.FAILURE  # still not in the inbox: fails again, alone
    reasons = [r.event_log_entry.asset_observation for r in live.instance.get_records_for_run(again.run_id).records
               if r.event_log_entry.asset_observation is not None]
    assert reasons and {o.partition for o in reasons} == {key}
