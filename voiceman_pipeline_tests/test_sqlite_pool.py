"""The shipped sqlite storage keeps its connections open (voiceman_pipeline/sqlite_pool.py):
events still land in Dagster's own files, other processes see them at once, a
forked child uses its own connections, open files stay bounded, closing
the instance leaves each database whole in its own file, processes that
open a new storage at the same moment create each database once (a longer
wait for another holding the lock is said), and a storage an earlier race
left with two stamps is repaired when opened."""

import fcntl
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import dagster as dg
import pytest
from alembic.util.exc import CommandError
from dagster._core.events import DagsterEvent, DagsterEventType, StepMaterializationData
from dagster._core.events.log import EventLogEntry

from voiceman_pipeline.sqlite_pool import (
    ENGINES,
    ENGINES_KEPT,
    PooledSqliteEventLogStorage,
    PooledSqliteRunStorage,
)
from voiceman_pipeline_tests.conftest import REPO, VOICEMAN_STORAGE, open_while_held, run_together

KEY = dg.AssetKey("transcript")


def shipped_instance(base: Path):
    custom = {**VOICEMAN_STORAGE, "config": {"base_dir": str(base)}}
    return dg.instance_for_test(overrides={"storage": {"custom": custom}})


def store(instance, run_id: str, partition: str) -> None:
    """One asset materialization written as a run writes it (run file + index)."""
    materialization = dg.AssetMaterialization(asset_key=KEY, partition=partition, metadata={"n": 1})
    instance.event_log_storage.store_event(EventLogEntry(
        error_info=None, level="debug", user_message="", run_id=run_id, timestamp=time.time(),
        step_key="analysis", job_name="analysis_job",
        dagster_event=DagsterEvent(DagsterEventType.ASSET_MATERIALIZATION.value, "analysis_job",
                                   event_specific_data=StepMaterializationData(materialization)),
    ))


def materialized(instance) -> set[str]:
    records = instance.fetch_materializations(KEY, limit=1000).records
    return {r.event_log_entry.asset_materialization.partition for r in records}


def open_files_under(base: Path) -> list[str]:
    """This process's open file descriptors on files under ``base`` (their targets)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(base)):
            found.append(target)
    return found


def test_events_land_in_dagsters_files_over_connections_kept_open(tmp_path):
    base = tmp_path / "storage"
    with shipped_instance(base) as instance:
        assert isinstance(instance.event_log_storage, PooledSqliteEventLogStorage)
        assert isinstance(instance.run_storage, PooledSqliteRunStorage)
        store(instance, "run-a", "call_1.wav")
        # Dagster's layout: the run's own file and the index, both written.
        runs = base / "history" / "runs"
        assert (runs / "run-a.db").is_file() and (runs / "index.db").is_file()
        assert materialized(instance) == {"call_1.wav"}
        # The index's connection is still open after the write (Dagster's own closes it).
        assert any(path.endswith("index.db") for path in open_files_under(base))


def test_writes_are_seen_at_once_by_another_process_and_back(tmp_path):
    base = tmp_path / "storage"
    with shipped_instance(base) as instance:
        store(instance, "run-a", "mine.wav")
        script = f"""
import sys, time
sys.path.insert(0, {str(REPO)!r})
from voiceman_pipeline_tests.test_sqlite_pool import materialized, shipped_instance, store
from pathlib import Path
with shipped_instance(Path({str(base)!r})) as other:
    assert materialized(other) == {{"mine.wav"}}, materialized(other)
    store(other, "run-b", "theirs.wav")
"""
        subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
        # This process's connection, idle meanwhile, reads the other's write.
        assert materialized(instance) == {"mine.wav", "theirs.wav"}
        assert instance.get_latest_materialization_event(KEY).asset_materialization.partition == "theirs.wav"


def test_a_forked_child_writes_over_its_own_connections(tmp_path):
    base = tmp_path / "storage"
    with shipped_instance(base) as instance:
        store(instance, "run-a", "before_fork.wav")
        parents = ENGINES.open_urls()
        pid = os.fork()
        if pid == 0:  # the child: a new engine for the same files, then exit at once
            code = 1
            try:
                store(instance, "run-a", "from_child.wav")
                code = 0 if materialized(instance) == {"before_fork.wav", "from_child.wav"} else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert ENGINES.open_urls() == parents  # the child's engines are not the parent's
        store(instance, "run-a", "after_fork.wav")
        assert materialized(instance) == {"before_fork.wav", "from_child.wav", "after_fork.wav"}


def test_open_files_stay_bounded_over_many_runs(tmp_path):
    base = tmp_path / "storage"
    with shipped_instance(base) as instance:
        for n in range(3 * ENGINES_KEPT):
            store(instance, f"run-{n:02d}", f"call_{n:02d}.wav")
        assert materialized(instance) == {f"call_{n:02d}.wav" for n in range(3 * ENGINES_KEPT)}
        databases = {Path(p).name.split(".db")[0] for p in open_files_under(base) if ".db" in p}
        assert len(databases) <= ENGINES_KEPT, databases
        assert "index" in databases  # the one used most stays open


def test_wipe_closes_the_deleted_files_and_writing_goes_on(tmp_path):
    base = tmp_path / "storage"
    with shipped_instance(base) as instance:
        store(instance, "run-a", "old.wav")
        instance.wipe()
        assert not (base / "history" / "runs" / "run-a.db").exists()
        assert not [p for p in open_files_under(base) if p.endswith("(deleted)")]
        store(instance, "run-a", "new.wav")
        assert materialized(instance) == {"new.wav"}


def test_closing_the_instance_leaves_each_database_whole_in_its_own_file(tmp_path):
    base = tmp_path / "storage"
    with shipped_instance(base) as instance:
        store(instance, "run-a", "call_1.wav")
        instance.add_run(dg.DagsterRun(job_name="analysis_job", run_id="run-a"))
        # Open: the latest writes are in write-ahead logs beside the databases.
        assert sorted(p.name for p in base.rglob("*-wal")) == ["index.db-wal", "run-a.db-wal", "runs.db-wal"]
    assert not list(base.rglob("*-wal")) and not list(base.rglob("*-shm"))
    assert not open_files_under(base)
    # A copy of the database files alone (as an archive of the folder might
    # take them) holds everything written.
    copy = tmp_path / "copy"
    for db in base.rglob("*.db"):
        (copy / db.relative_to(base)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(db, copy / db.relative_to(base))
    with shipped_instance(copy) as reopened:
        assert materialized(reopened) == {"call_1.wav"}
        assert reopened.get_run_by_id("run-a") is not None


def test_a_process_that_never_closes_its_instance_still_leaves_each_database_whole(tmp_path):
    # As a run worker or code server stopped with `dagster dev` may end.
    base = tmp_path / "storage"
    script = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from pathlib import Path
from voiceman_pipeline_tests.test_sqlite_pool import shipped_instance, store
instance = shipped_instance(Path({str(base)!r})).__enter__()
store(instance, "run-a", "call_1.wav")
assert sorted(p.name for p in Path({str(base)!r}).rglob("*-wal")) == ["index.db-wal", "run-a.db-wal"]
"""  # ends here, the instance still open
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert not list(base.rglob("*-wal"))
    with shipped_instance(base) as reopened:
        assert materialized(reopened) == {"call_1.wav"}


def stamps(db: Path) -> set[str]:
    """The revisions a database's alembic_version table holds (one row each)."""
    with closing(sqlite3.connect(db)) as connection:
        return {row[0] for row in connection.execute("SELECT version_num FROM alembic_version")}


def test_processes_opening_a_new_storage_at_once_create_and_stamp_each_database_once(tmp_path):
    # As processes started together on a new home do (`dagster dev` and a
    # `voiceman` command; a command and a program watching the same home).
    # Each of `processes` processes opens each of `homes` new storages as soon
    # as all of them are ready to (they wait on a file, imports done). Without
    # the creation lock this failed in every try on a 2-core machine: some
    # processes ended in "table runs already exists" or "UNIQUE constraint
    # failed: alembic_version", and runs.db was left stamped with two
    # revisions, which every later start refuses (dagster-io/dagster#27390).
    processes, homes = 4, 3
    finished = run_together(
        tmp_path, processes, homes,
        setup="from voiceman_pipeline_tests.test_sqlite_pool import shipped_instance",
        body="""
            with shipped_instance(root / f"storage-{round}") as instance:
                instance.get_runs()
        """,
    )
    assert [p.returncode for p in finished] == [0] * processes
    assert "".join(p.stdout for p in finished) == ""  # no open failed
    for home in range(homes):
        databases = sorted((tmp_path / f"storage-{home}").rglob("*.db"))
        assert [db.name for db in databases] == ["index.db", "runs.db", "schedules.db"]
        for db in databases:
            assert len(stamps(db)) == 1, (db, stamps(db))
        with shipped_instance(tmp_path / f"storage-{home}") as instance:
            assert instance.get_runs() == []  # and it opens again, as every later start must


def open_while_the_creation_lock_is_held(base: Path, held_s: float) -> tuple[bool, list]:
    """Open a new storage at ``base`` in a thread while the creation lock is
    held (through another open file of this process, as another process would
    hold it) for ``held_s``: (whether the open was still waiting, its database
    not made, when the lock was released; the runs it then read)."""
    base.mkdir()
    holder = open(base / ".creating.lock", "a")
    fcntl.flock(holder, fcntl.LOCK_EX)

    def open_storage():
        with shipped_instance(base) as instance:
            return instance.get_runs()

    return open_while_held(open_storage, held_s, lambda: not (base / "history" / "runs.db").exists(),
                           holder.close)  # closing the file releases the lock


def test_a_start_waits_for_the_process_holding_the_creation_lock_and_says_so(tmp_path, caplog,
                                                                           monkeypatch):
    # A process stopped (kill -STOP) or hung while opening the storage holds
    # the lock: a start waits for it, says why once the wait is longer than
    # opening a storage takes, and goes on once the lock is released.
    from voiceman_pipeline import storage

    monkeypatch.setattr(storage, "CREATION_LOCK_QUIET_S", 0.5)
    with caplog.at_level("WARNING", logger="voiceman_pipeline.storage"):
        waited, runs = open_while_the_creation_lock_is_held(tmp_path / "storage", held_s=2.0)
    assert waited and runs == [[]]
    waiting = [r.getMessage() for r in caplog.records if "waiting for another process" in r.getMessage()]
    assert len(waiting) == 1 and str(tmp_path / "storage") in waiting[0], caplog.text


def test_processes_waiting_for_each_other_a_moment_say_nothing(tmp_path, caplog):
    # As `dagster dev`'s processes, or a command's workers, starting together.
    with caplog.at_level("WARNING", logger="voiceman_pipeline.storage"):
        waited, runs = open_while_the_creation_lock_is_held(tmp_path / "storage", held_s=0.5)
    assert waited and runs == [[]]
    assert "waiting for another process" not in caplog.text


STAMPED_FILES = ("history/runs.db", "schedules/schedules.db")


def with_a_second_stamp(base: Path, revision: str, files=STAMPED_FILES) -> str:
    """A storage holding one run, the stamp tables of ``files`` then given
    ``revision`` too (as the creation race leaves them); returns the head revision."""
    with shipped_instance(base) as instance:
        store(instance, "run-a", "call_1.wav")
    (head,) = stamps(base / STAMPED_FILES[0])
    for name in files:
        with closing(sqlite3.connect(base / name)) as connection, connection:
            connection.execute("INSERT INTO alembic_version VALUES (?)", (revision,))
    return head


@pytest.mark.parametrize("files", [STAMPED_FILES, STAMPED_FILES[:1]], ids=["both", "runs-only"])
def test_a_storage_the_race_left_with_two_stamps_is_repaired_when_opened(tmp_path, files):
    from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage
    from dagster._core.storage.sqlite import LAST_KNOWN_STAMPED_SQLITE_ALEMBIC_REVISION as STRAY

    base = tmp_path / "storage"
    head = with_a_second_stamp(base, STRAY, files)
    with pytest.raises(CommandError, match="more than one head"):  # what Dagster's own storage does
        SqliteRunStorage.from_local(str(base / "history"))
    with shipped_instance(base) as instance:
        assert materialized(instance) == {"call_1.wav"}
    assert [stamps(base / name) for name in STAMPED_FILES] == [{head}, {head}]


def test_two_stamps_the_race_cannot_leave_are_not_touched(tmp_path):
    base = tmp_path / "storage"
    head = with_a_second_stamp(base, "0123456789ab")
    with pytest.raises(CommandError, match="more than one head"):
        with shipped_instance(base):
            pass
    assert [stamps(base / name) for name in STAMPED_FILES] == [{head, "0123456789ab"}] * 2


def plain_instance(base: Path):
    """An instance on Dagster's own sqlite storage (as an older version of this project kept it)."""
    return dg.instance_for_test(overrides={"storage": {"sqlite": {"base_dir": str(base)}}})


def database_layout(db: Path) -> tuple:
    """What a database is made of: its tables and indexes as sqlite keeps
    their definitions, its journal mode and its schema stamps."""
    with closing(sqlite3.connect(db)) as connection:
        definitions = sorted(connection.execute("SELECT type, name, sql FROM sqlite_master"))
        return definitions, connection.execute("PRAGMA journal_mode").fetchone()[0], stamps(db)


def test_new_run_files_are_copies_of_the_one_dagster_creates_first_in_each_process(tmp_path, monkeypatch):
    from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage

    from voiceman_pipeline import sqlite_pool

    monkeypatch.setattr(sqlite_pool, "_run_database", [])  # as in a new process
    created_by_dagster = []
    dagsters_initdb = SqliteEventLogStorage._initdb

    def counted(storage, engine, for_index_shard=False):
        created_by_dagster.append(Path(engine.url.database))
        return dagsters_initdb(storage, engine, for_index_shard)

    monkeypatch.setattr(SqliteEventLogStorage, "_initdb", counted)
    base = tmp_path / "storage"
    with shipped_instance(base) as instance:
        for run in ("run-a", "run-b", "run-c"):
            store(instance, run, f"{run}.wav")
        assert materialized(instance) == {"run-a.wav", "run-b.wav", "run-c.wav"}
    runs = base / "history" / "runs"
    # Dagster created the index, and one run database outside the storage: not the three.
    assert [p for p in created_by_dagster if p.parent == runs] == [runs / "index.db"]
    assert len([p for p in created_by_dagster if p.parent != runs]) == 1
    assert sorted(p.name for p in runs.iterdir()) == ["index.db", "run-a.db", "run-b.db", "run-c.db"]
    # Each is what Dagster's own storage makes for a run: the same tables and
    # indexes, WAL, stamped once with the same revision.
    monkeypatch.setattr(SqliteEventLogStorage, "_initdb", dagsters_initdb)
    with plain_instance(tmp_path / "dagsters") as dagsters:
        store(dagsters, "run-d", "run-d.wav")
    reference = database_layout(tmp_path / "dagsters" / "history" / "runs" / "run-d.db")
    assert reference[1] == "wal" and len(reference[2]) == 1
    for run in ("run-a", "run-b", "run-c"):
        assert database_layout(runs / f"{run}.db") == reference


def test_a_run_file_another_process_made_is_never_replaced(tmp_path):
    from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage

    from voiceman_pipeline.sqlite_pool import _copy_new_run_database

    taken = tmp_path / "run-a.db"
    taken.write_bytes(b"another process's file")
    assert not _copy_new_run_database(str(taken), create=SqliteEventLogStorage(str(tmp_path / "x"))._initdb)
    assert taken.read_bytes() == b"another process's file"
    # Through the storage: a run file Dagster's own storage began keeps its events.
    base = tmp_path / "storage"
    with plain_instance(base) as dagsters:
        store(dagsters, "run-b", "first.wav")
    with shipped_instance(base) as instance:
        store(instance, "run-b", "second.wav")
        assert materialized(instance) == {"first.wav", "second.wav"}
        assert len(instance.all_logs("run-b")) == 2


def test_processes_writing_a_new_run_at_once_create_its_file_once(tmp_path):
    # As a run worker and a webserver reading the run's events can: every
    # process starts writing (or reading) the same new run in the same moment;
    # one of them is Dagster's own storage, which creates files its own way.
    base = tmp_path / "storage"
    with shipped_instance(base):
        pass
    processes, rounds = 4, 3
    finished = run_together(
        tmp_path, processes, rounds,
        setup=f"""
            import atexit
            from voiceman_pipeline_tests.test_sqlite_pool import plain_instance, shipped_instance, store
            opened = (plain_instance if me == "0" else shipped_instance)(Path({str(base)!r}))
            instance = opened.__enter__()
            atexit.register(opened.__exit__, None, None, None)
        """,
        body="""
            store(instance, f"run-{round}", f"{round}-{me}.wav")
        """,
    )
    assert [p.returncode for p in finished] == [0] * processes, [p.stderr[-2000:] for p in finished]
    assert "".join(p.stdout for p in finished) == ""  # no write failed
    runs = base / "history" / "runs"
    with shipped_instance(base) as instance:
        for round in range(rounds):
            assert len(stamps(runs / f"run-{round}.db")) == 1
            assert len(instance.all_logs(f"run-{round}")) == processes  # nobody's event lost
        assert materialized(instance) == {f"{r}-{p}.wav" for r in range(rounds) for p in range(processes)}


def test_the_schema_is_asked_again_only_until_the_answer_is_yes(tmp_path):
    from sqlalchemy import event

    base = tmp_path / "storage"
    with shipped_instance(base) as instance:
        storage = instance.event_log_storage
        engine = ENGINES.get(storage.conn_string_for_shard("index"))
        statements = []
        event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
        assert storage.has_table("asset_event_tags")
        asked = len(statements)
        assert storage.has_table("asset_event_tags") and len(statements) == asked  # kept: not asked
        assert not storage.has_table("added_later")
        assert not storage.has_table("added_later") and len(statements) > asked + 1  # asked each time
        with closing(sqlite3.connect(base / "history" / "runs" / "index.db")) as other, other:
            other.execute("CREATE TABLE added_later (id INTEGER)")  # another process migrates
        assert storage.has_table("added_later")
        store(instance, "run-a", "call_1.wav")  # writes that ask about asset_keys' columns
        asked = len(statements)
        store(instance, "run-a", "call_2.wav")
        assert not [s for s in statements[asked:] if "table_info" in s.lower()]
        assert materialized(instance) == {"call_1.wav", "call_2.wav"}


def planned(run_id: str, asset: str, partition: str) -> EventLogEntry:
    """A "planned" event, as Dagster logs one per stage and recording when it creates a run."""
    from dagster._core.events import AssetMaterializationPlannedData

    return EventLogEntry(
        error_info=None, level="debug", user_message="", run_id=run_id, timestamp=time.time(),
        step_key="analysis", job_name="analysis_job",
        dagster_event=DagsterEvent(DagsterEventType.ASSET_MATERIALIZATION_PLANNED.value, "analysis_job",
                                   event_specific_data=AssetMaterializationPlannedData(
                                       dg.AssetKey(asset), partition=partition)),
    )


def stored(instance, run_id: str) -> tuple:
    """What a run's asset events left, as Dagster reads it back: the run's own
    log, the index's planned events per asset, and the asset_keys table."""
    from dagster._core.event_api import EventRecordsFilter

    log = sorted((e.dagster_event_type.value, e.dagster_event.asset_key.to_string(), e.dagster_event.partition)
                 for e in instance.all_logs(run_id) if e.dagster_event and e.dagster_event.asset_key)
    index = {asset: sorted(r.partition_key for r in instance.get_event_records(
        EventRecordsFilter(DagsterEventType.ASSET_MATERIALIZATION_PLANNED, dg.AssetKey(asset))))
        for asset in ("transcript", "report")}
    return log, index, sorted(key.to_string() for key in instance.get_asset_keys())


def test_a_batch_of_planned_events_is_stored_as_dagster_stores_them_one_by_one(tmp_path, monkeypatch):
    monkeypatch.delenv("DAGSTER_EVENT_BATCH_SIZE", raising=False)
    events = [planned("run-a", asset, f"call_{n}.wav") for asset in ("transcript", "report") for n in range(3)]
    with plain_instance(tmp_path / "dagsters") as dagsters:
        for event in events:
            dagsters.event_log_storage.store_event(event)
        expected = stored(dagsters, "run-a")
    with shipped_instance(tmp_path / "ours") as instance:
        assert os.environ["DAGSTER_EVENT_BATCH_SIZE"] == "1000"  # set by the storage
        instance.event_log_storage.store_event_batch(events)
        assert stored(instance, "run-a") == expected
        assert len(expected[0]) == 6 and expected[1]["report"] == ["call_0.wav", "call_1.wav", "call_2.wav"]
        # A batch holding anything else is stored one event at a time: nothing lost.
        mixed = [planned("run-b", "transcript", "call_9.wav"), planned("run-c", "report", "call_9.wav")]
        instance.event_log_storage.store_event_batch(mixed)
        assert [len(instance.all_logs(run)) for run in ("run-b", "run-c")] == [1, 1]


def test_a_real_run_stores_its_planned_events_in_one_batch_and_reads_them_back(tmp_path, monkeypatch):
    from voiceman_pipeline.sqlite_pool import PooledSqliteEventLogStorage

    batches = []
    ours = PooledSqliteEventLogStorage.store_event_batch

    def counted(storage, events):
        batches.append(len(events))
        return ours(storage, events)

    monkeypatch.setattr(PooledSqliteEventLogStorage, "store_event_batch", counted)
    partitions = dg.StaticPartitionsDefinition(["a.wav", "b.wav", "c.wav"])

    @dg.asset(partitions_def=partitions)
    def transcript(context) -> None:
        pass

    @dg.asset(partitions_def=partitions, deps=[transcript])
    def report(context) -> None:
        pass

    with shipped_instance(tmp_path / "storage") as instance:
        tags = {"dagster/asset_partition_range_start": "a.wav", "dagster/asset_partition_range_end": "c.wav"}
        assert dg.materialize([transcript, report], instance=instance, tags=tags).success
        (run,) = instance.get_runs()
        log, index, _ = stored(instance, run.run_id)
        # The planned events (2 assets x 3 partitions) together; then each step's
        # materializations of its partition range, which Dagster batches too.
        assert batches == [6, 3, 3]
        assert index == {asset: ["a.wav", "b.wav", "c.wav"] for asset in ("transcript", "report")}
        kinds = [kind for kind, _, _ in log]
        assert kinds.count("ASSET_MATERIALIZATION_PLANNED") == 6 and kinds.count("ASSET_MATERIALIZATION") == 6


def test_a_copy_that_cannot_be_written_leaves_nothing_and_dagster_creates_the_file(tmp_path, monkeypatch):
    import errno

    from voiceman_pipeline import sqlite_pool

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    base = tmp_path / "storage"
    with shipped_instance(base) as instance:
        runs = base / "history" / "runs"
        with monkeypatch.context() as patched:
            patched.setattr(sqlite_pool.os, "fsync", disk_full)  # the copy's flush fails
            assert not sqlite_pool._copy_new_run_database(
                str(runs / "run-x.db"), create=instance.event_log_storage._initdb)
            assert sorted(p.name for p in runs.iterdir() if p.suffix == ".db") == ["index.db"]
            store(instance, "run-a", "call_1.wav")  # Dagster's own creation takes over
        assert materialized(instance) == {"call_1.wav"}
        assert len(stamps(runs / "run-a.db")) == 1
