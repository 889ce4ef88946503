"""The storage switch VOICEMAN_PG_URL: the shipped dagster.yaml on PostgreSQL.

Runs, event logs and schedules must land in PostgreSQL for every entry point
(here: `voiceman run` and `dagster asset materialize`, as subprocesses),
nothing in sqlite, and a bad URL must be one clear line. The storage-dependent
tests elsewhere (marked `storage`) run on both backends through conftest.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg2
import pytest
from dagster import AssetKey, AssetPartitionStatus, DagsterInstance, instance_for_test
from dagster._core.test_utils import create_run_for_test
from dagster._serdes import deserialize_value, serialize_value
from dagster_postgres import PostgresRunStorage

from voiceman_pipeline import storage
from voiceman_pipeline.partitions import audio_files
from voiceman_pipeline.storage import StorageUnavailableError, masked
from voiceman_pipeline_tests.conftest import (
    REPO,
    SAMPLES,
    VOICEMAN_STORAGE,
    free_port,
    open_while_held,
    pg_admin,
    run_together,
    with_database,
)

BIN = Path(sys.executable).parent
STAGES = ["audio", "transcript", "forensic", "emotion", "report"]


def shipped_home(tmp_path: Path) -> Path:
    """A DAGSTER_HOME holding the repository's own dagster.yaml."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    return home


def sqlite_files(*roots: Path) -> list[Path]:
    """Every sqlite database file under ``roots`` (what sqlite storage would leave)."""
    return [p for root in roots for p in root.rglob("*") if p.suffix in (".db", ".sqlite")]


def query(url: str, sql: str) -> list[tuple]:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchall()
    finally:
        conn.close()


def test_voiceman_run_and_the_dagster_cli_keep_everything_in_postgres(tmp_path, pg_url, monkeypatch):
    home = shipped_home(tmp_path)
    data = tmp_path / "data"
    inbox = data / "inbox"
    inbox.mkdir(parents=True)
    for name in ("cards_001.wav", "cards_002.wav"):
        shutil.copy(SAMPLES / name, inbox / name)
    (inbox / "broken.wav").write_bytes(b"RIFF\x00\x00garbage" * 100)
    env = {**os.environ, "DAGSTER_HOME": str(home), "VOICEMAN_DATA_DIR": str(data),
           "VOICEMAN_PG_URL": pg_url, "PYTHONPATH": str(REPO)}

    first = subprocess.run([BIN / "voiceman", "run", "--settle", "0.2"], cwd=home, env=env,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 1, first.stdout + first.stderr  # broken.wav failed, the rest done
    rows = {line.split()[0]: line for line in first.stdout.splitlines()[-3:]}
    assert " done " in rows["cards_001.wav"] and " done " in rows["cards_002.wav"]
    assert "failed at audio" in rows["broken.wav"]

    cli = [BIN / "dagster", "asset", "materialize", "-m", "voiceman_pipeline.definitions"]
    second = subprocess.run(cli + ["--select", "summary"],
                            cwd=home, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr

    # PostgreSQL holds the runs, the materializations per (stage, recording) and the failure.
    statuses = [status for (status,) in query(pg_url, "SELECT status FROM runs")]
    assert "FAILURE" in statuses and "SUCCESS" in statuses
    counts = dict(((key, part), n) for key, part, n in query(pg_url, """
        SELECT asset_key, partition, count(*) FROM event_logs
        WHERE dagster_event_type = 'ASSET_MATERIALIZATION' GROUP BY asset_key, partition"""))
    expected = {(f'["{stage}"]', name): 1 for stage in STAGES for name in ("cards_001.wav", "cards_002.wav")}
    assert {k: n for k, n in counts.items() if k[1] is not None} == expected
    assert counts[('["summary"]', None)] == 2  # `voiceman run`'s and the CLI's
    # broken.wav's failure: one observation per stage saying why, and Dagster reads it as failed.
    observed = query(pg_url, """
        SELECT asset_key FROM event_logs
        WHERE dagster_event_type = 'ASSET_OBSERVATION' AND partition = 'broken.wav'""")
    assert sorted(key for (key,) in observed) == sorted(f'["{stage}"]' for stage in STAGES)
    monkeypatch.setenv("VOICEMAN_PG_URL", pg_url)
    monkeypatch.chdir(home)
    with DagsterInstance.from_config(str(home)) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        keys = ["broken.wav", "cards_001.wav", "cards_002.wav"]
        status = instance.get_status_by_partition(AssetKey("report"), keys, audio_files)
        assert status == {"broken.wav": AssetPartitionStatus.FAILED,
                          "cards_001.wav": AssetPartitionStatus.MATERIALIZED,
                          "cards_002.wav": AssetPartitionStatus.MATERIALIZED}
    partitions = query(pg_url, "SELECT partition FROM dynamic_partitions ORDER BY partition")
    assert partitions == [("broken.wav",), ("cards_001.wav",), ("cards_002.wav",)]

    # The failed recording is found in PostgreSQL and retried alone once a good copy arrived.
    shutil.copy(SAMPLES / "cards_002.wav", inbox / "broken.wav")
    retry = subprocess.run([BIN / "voiceman", "retry-failed"], cwd=home, env=env,
                           capture_output=True, text=True, timeout=600)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert "run: 1 recording(s) broken.wav .. broken.wav" in retry.stdout
    counts = dict(((key, part), n) for key, part, n in query(pg_url, """
        SELECT asset_key, partition, count(*) FROM event_logs
        WHERE dagster_event_type = 'ASSET_MATERIALIZATION' AND partition IS NOT NULL
        GROUP BY asset_key, partition"""))
    assert counts == {(f'["{stage}"]', name): 1 for stage in STAGES for name in keys}
    # ... and nothing went to sqlite.
    assert sqlite_files(home, data) == []
    assert not (home / "data" / "dagster" / "storage").exists()


def test_runs_rebuilt_from_the_instance_ref_use_the_same_database(tmp_path, pg_url, monkeypatch):
    """Run subprocesses and the daemon rebuild the instance from its ref: same database,
    and the ref (on their command lines) carries no password."""
    home = shipped_home(tmp_path)
    monkeypatch.chdir(home)
    monkeypatch.setenv("VOICEMAN_PG_URL", pg_url.replace("postgresql://postgres@", "postgresql://postgres:pw-not-needed@"))
    with DagsterInstance.from_config(str(home)) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        run = create_run_for_test(instance, job_name="ref_check")
        ref = serialize_value(instance.get_ref())
        assert "pw-not-needed" not in ref and "postgresql" not in ref
        with DagsterInstance.from_ref(deserialize_value(ref)) as rebuilt:
            assert isinstance(rebuilt.run_storage, PostgresRunStorage)
            assert rebuilt.get_run_by_id(run.run_id).job_name == "ref_check"
    assert sqlite_files(home) == []


@pytest.fixture
def new_databases(pg_server):
    """Three fresh, empty databases on the session's server (dropped after the test)."""
    urls = []
    for _ in range(3):
        name = f"voiceman_test_{uuid.uuid4().hex[:12]}"
        pg_admin(pg_server, f'CREATE DATABASE "{name}"')
        urls.append(with_database(pg_server, name))
    yield urls
    for url in urls:
        pg_admin(pg_server, f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def test_processes_opening_a_new_database_at_once_create_its_tables_one_at_a_time(tmp_path,
                                                                                  new_databases):
    # `dagster dev`'s webserver and daemon, or a `voiceman` command started
    # beside them, on a new database. Without the advisory lock, every run of
    # this test had processes meeting each other's half-made tables (Dagster
    # retries a table that exists, warning "Retrying failed database
    # creation"), and in 2 of 4 runs a process failed for good, on what
    # Dagster does not retry: "DuplicateTable: relation "instance_info"
    # already exists", "DuplicateObject: type "asset_keys" already exists".
    processes = 4
    for round, url in enumerate(new_databases):
        (tmp_path / f"url-{round}").write_text(url)
    finished = run_together(
        tmp_path, processes, len(new_databases),
        setup="import os\nimport dagster as dg\nfrom voiceman_pipeline_tests.conftest import VOICEMAN_STORAGE",
        body="""
            os.environ["VOICEMAN_PG_URL"] = (root / f"url-{round}").read_text()
            custom = {**VOICEMAN_STORAGE, "config": {"base_dir": str(root / "sqlite-unused")}}
            with dg.instance_for_test(overrides={"storage": {"custom": custom}}) as instance:
                instance.get_runs()
        """,
    )
    assert [p.returncode for p in finished] == [0] * processes
    assert "".join(p.stdout for p in finished) == ""  # no open failed
    assert "Retrying failed database creation" not in "".join(p.stderr for p in finished)
    for url in new_databases:
        assert len(query(url, "SELECT version_num FROM alembic_version")) == 1  # stamped once
        assert {"runs", "event_logs", "jobs"} <= {row[0] for row in query(
            url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


def test_a_start_waits_for_the_process_holding_the_advisory_lock_and_says_so(tmp_path, pg_url,
                                                                           monkeypatch, caplog):
    # A process stopped (kill -STOP) or hung while opening the storage holds
    # the lock: a start waits, says why once the wait is longer than opening
    # takes (the limit lowered to 0.5 s here), and goes on once it is released.
    monkeypatch.setenv("VOICEMAN_PG_URL", pg_url)
    monkeypatch.setattr(storage, "CREATION_LOCK_QUIET_S", 0.5)
    holder = psycopg2.connect(pg_url)
    holder.autocommit = True
    holder.cursor().execute("SELECT pg_advisory_lock(%s)", (storage.PG_CREATION_LOCK_KEY,))

    def open_storage():
        custom = {**VOICEMAN_STORAGE, "config": {"base_dir": str(tmp_path / "sqlite-unused")}}
        with instance_for_test(overrides={"storage": {"custom": custom}}) as instance:
            return instance.get_runs()

    def no_tables() -> bool:
        return query(pg_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'") == []

    with caplog.at_level("WARNING", logger="voiceman_pipeline.storage"):
        # Closing the holder's connection: the server releases the session's lock.
        waited, runs = open_while_held(open_storage, 2.0, no_tables, holder.close)
    assert waited and runs == [[]]
    waiting = [r.getMessage() for r in caplog.records if "waiting for another process" in r.getMessage()]
    assert len(waiting) == 1 and "VOICEMAN_PG_URL=" in waiting[0], caplog.text


def test_no_server_is_one_line_naming_the_variable_with_the_password_masked(tmp_path, env):
    home = shipped_home(tmp_path)
    url = f"postgresql://voiceman:s3cret@127.0.0.1:{free_port()}/voiceman"  # nothing listens
    out = subprocess.run([BIN / "voiceman", "status"], cwd=home,
                         env={**env, "DAGSTER_HOME": str(home), "VOICEMAN_PG_URL": url},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 3
    assert "Traceback" not in out.stderr and "s3cret" not in out.stdout + out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("voiceman: cannot use the PostgreSQL storage VOICEMAN_PG_URL=")
    assert "postgresql://voiceman:***@127.0.0.1" in line


def test_a_url_that_is_not_postgres_is_refused_before_anything_is_created(tmp_path, monkeypatch):
    home = shipped_home(tmp_path)
    monkeypatch.chdir(home)
    monkeypatch.setenv("VOICEMAN_PG_URL", "mysql://voiceman:s3cret@db/voiceman")
    with pytest.raises(StorageUnavailableError, match="VOICEMAN_PG_URL=mysql://voiceman:\\*\\*\\*@db"):
        DagsterInstance.from_config(str(home))
    assert sqlite_files(home) == []


@pytest.mark.parametrize("url,shown", [
    ("postgresql://u:p%40ss@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("postgresql://u@h/db", "postgresql://u@h/db"),
    ("postgresql://u:secret@h:notaport/db", "postgresql://u:***@h:notaport/db"),
    ("postgresql://u@h/db?sslmode=require&PASSWORD=wrong&x=1", "postgresql://u@h/db?sslmode=require&PASSWORD=***&x=1"),
    ("postgresql://u:a@h/db?password=b", "postgresql://u:***@h/db?password=***"),
    # libpq's key=value form: refused (not a URL), and the refusal echoes it.
    ("host=h port=5432 password=topsecret user=u", "host=h port=5432 password=*** user=u"),
    ("host=h password = 'top secret\\' x' dbname=d", "host=h password = *** dbname=d"),
])
def test_the_password_is_masked(url, shown):
    assert masked(url) == shown


def test_a_user_without_rights_is_told_so_not_to_check_the_server(monkeypatch):
    """A tester's database owned by another user: "permission denied for schema
    public" came with "check the server", which was up."""
    from sqlalchemy.exc import ProgrammingError

    from voiceman_pipeline.storage import postgres_failure

    monkeypatch.setenv("VOICEMAN_PG_URL", "postgresql://voiceman:s3cret@db/vm5")
    denied = ProgrammingError("CREATE TABLE runs ...", {}, Exception("permission denied for schema public"))
    line = postgres_failure(denied)
    assert line.startswith("the PostgreSQL storage VOICEMAN_PG_URL=postgresql://voiceman:***@db/vm5 failed:"
                           " permission denied for schema public (give the URL's user the rights")
    lost = ProgrammingError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
    assert postgres_failure(lost).endswith("(check the server, then run the same command again)")
