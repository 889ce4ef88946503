"""Dagster's sqlite storage with its connections kept open between writes.

Dagster 1.13's sqlite run and event-log storages build a new SQLAlchemy
engine, open a new sqlite connection and close it again for every statement
group: every event written (a run writes about 10 per recording), every read
of a partition's status. Closing the last connection to a WAL database also
checkpoints it and deletes its -wal and -shm files, which the next write
creates again. Measured on this project's 2-core machine, storing one asset
materialization took 7-10 ms that way and 1.8 ms over a connection kept open;
reading the latest materialization 7.4 ms and 1.4 ms.

The classes here change only how a connection is obtained: one engine per
(process, database file), whose pool keeps one idle connection open (extra
ones, when threads overlap, are closed on return). Nothing else changes: the
same files, tables, migrations and transactions (each ``_connect`` still
commits on exit), and the same crash safety (WAL). An idle connection holds
no lock and no read snapshot, so other processes' writes are seen by the next
transaction. Engines are kept per process id (a forked child never uses its
parent's connections) and only for the ``ENGINES_KEPT`` files used last: a
webserver reading many runs' event files does not hold one open per run.
Closing the instance (``dispose``) closes them, and so does the end of a
process that never closed its instance: each WAL is then folded into its
database and deleted, as Dagster's own per-statement connections leave it.

Creating the storage also takes a file lock, so that processes opening a new
home at the same moment (``dagster dev`` and a ``voiceman`` command started
together, two commands, a command and a program watching the same home)
create and stamp its databases one at a time. Dagster's own sqlite storages
race there (dagster-io/dagster#27390): two processes can both find a database
unstamped and both stamp it, one with the head revision and one with an older
one, and every later start fails with "Version table 'alembic_version' has
more than one head present". A home an earlier version left that way (its
file stamped with exactly the head and the revision the race adds) is
repaired when it is next opened: the stray stamp is deleted.

Three things Dagster's event-log storage redid for every run or event are
done once (measured in a `voiceman run` of 16 recordings of 5 s: 3 runs,
fresh home; the files, tables and rows stay Dagster's):
- Creating a run's own database (Dagster's tables, WAL mode, alembic's
  stamp) took about 50 ms, most of it alembic reading its migration scripts
  twice. Each process now lets Dagster create one such database, in a
  temporary folder, and gives every new run file a copy of its bytes. The
  copy is written to an unnamed file and linked under the run's name only
  when whole (``O_TMPFILE``, then ``linkat``): no other process can see it
  half written, a name already there (another process's) is never replaced,
  and a process killed meanwhile leaves nothing behind. A run file that
  exists holding one schema stamp, where Dagster's check (13-16 ms) would
  change nothing, is used after one query (under 1 ms).
- A new run's "planned" events (one per stage and recording) were stored
  with two transactions each; Dagster hands them over as one batch when
  DAGSTER_EVENT_BATCH_SIZE is set, which this storage sets, and
  ``store_event_batch`` writes such a batch with one transaction per file.
- Whether a table of the index, or a column of its ``asset_keys`` table,
  exists: asked about 330 times (before most event writes) at 0.2 ms each.
  Dagster's migrations add tables and columns and never drop them, so a
  "yes" is kept for the storage's life; a "no" is asked again (another
  process may migrate).
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import sqlite3
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager

from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from dagster._core.events import ASSET_EVENTS
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.base_storage import DagsterStorage
from dagster._core.storage.event_log.sqlite.sqlite_event_log import (
    INDEX_SHARD_NAME,
    SQLITE_BUSY_TIMEOUT_SECONDS,
    SqliteEventLogStorage,
)
from dagster._core.storage.runs.sqlite import sqlite_run_storage
from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage
from dagster._core.storage.schedules.sqlite.sqlite_schedule_storage import SqliteScheduleStorage
from dagster._core.storage.sql import get_alembic_config
from dagster._core.storage.sqlite import LAST_KNOWN_STAMPED_SQLITE_ALEMBIC_REVISION
from dagster._core.storage.sqlite_storage import (
    DagsterSqliteStorage,
    _event_logs_directory,
    _runs_directory,
    _schedule_directory,
)
from dagster._serdes import ConfigurableClassData
from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.pool import NullPool, QueuePool

from voiceman_pipeline.storage import wait_for_lock

# Database files with an engine (and one idle connection: 3 file handles in
# WAL mode) kept per process: the index and runs files, and the event files
# of the runs in progress.
ENGINES_KEPT = 8


class _Engines:
    """Engines per (process id, sqlite URL), the ENGINES_KEPT used last."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._engines: OrderedDict[tuple[int, str], Engine] = OrderedDict()

    def get(self, url: str, timeout_s: float | None = None) -> Engine:
        key = (os.getpid(), url)
        with self._lock:
            engine = self._engines.get(key)
            if engine is not None:
                self._engines.move_to_end(key)
                return engine
            connect_args: dict = {"check_same_thread": False}  # threads take turns through the pool
            if timeout_s is not None:
                connect_args["timeout"] = timeout_s
            engine = create_engine(url, poolclass=QueuePool, pool_size=1, max_overflow=-1,
                                   connect_args=connect_args)
            self._engines[key] = engine
            while len(self._engines) > ENGINES_KEPT:
                _, oldest = self._engines.popitem(last=False)
                oldest.dispose()  # closes its idle connection; one in use closes on return
            return engine

    def forget(self, prefix: str) -> None:
        """Close this process's engines of every database whose URL starts with
        ``prefix`` (a forked child leaves its parent's connections alone)."""
        with self._lock:
            pid = os.getpid()
            for key in [k for k in self._engines if k[0] == pid and k[1].startswith(prefix)]:
                self._engines.pop(key).dispose()

    def open_urls(self) -> list[str]:
        """The URLs with an engine in this process (oldest first)."""
        with self._lock:
            return [url for pid, url in self._engines if pid == os.getpid()]


ENGINES = _Engines()
# A process that ends without closing its instance (a run worker, a code
# server, stopped with `dagster dev`) closes its connections here, so that
# whichever process closes a database last still folds its WAL in.
atexit.register(ENGINES.forget, "")


class PooledSqliteEventLogStorage(SqliteEventLogStorage):
    """SqliteEventLogStorage whose connections come from ``ENGINES``, whose new
    run files are copies of one Dagster made, and which keeps what it learnt
    exists in the schema (see the module's docstring)."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None):
        self._tables_present: set[str] = set()  # set first: Dagster's __init__ may ask
        self._asset_key_columns_present: set[str] = set()
        super().__init__(base_dir, inst_data)

    @contextmanager
    def _connect(self, shard: str) -> Iterator:
        with self._db_lock:  # as Dagster's: one statement group at a time per storage
            engine = ENGINES.get(self.conn_string_for_shard(shard), SQLITE_BUSY_TIMEOUT_SECONDS)
            if shard not in self._initialized_dbs:
                self._initdb(engine)
                self._initialized_dbs.add(shard)
            with engine.connect() as conn, conn.begin():
                yield conn

    def _initdb(self, engine: Engine, for_index_shard: bool = False) -> None:
        path = engine.url.database
        # By name: the index also comes through _connect, without for_index_shard.
        is_run_file = os.path.basename(path) != f"{INDEX_SHARD_NAME}.db"
        copied = is_run_file and _copy_new_run_database(path, create=super()._initdb)
        if not copied and not _stamped_once(engine):  # else Dagster's check would change nothing
            super()._initdb(engine, for_index_shard)

    def store_event_batch(self, events: Sequence[EventLogEntry]) -> None:
        """Store asset events of one run that Dagster hands over together (with
        DAGSTER_EVENT_BATCH_SIZE set, see PooledSqliteStorage: a new run's
        "planned" events, one per stage and recording) as ``store_event``
        stores each, but in one transaction per database rather than two per
        event. Any other batch is stored one event at a time, as Dagster's
        default does. The run's file is written first and whole: if it fails,
        nothing is written and Dagster stores the events one by one."""
        if len({event.run_id for event in events}) != 1 or not all(
            event.is_dagster_event and event.dagster_event_type in ASSET_EVENTS for event in events
        ):
            super().store_event_batch(events)
            return
        with self.run_connection(events[0].run_id) as conn:
            conn.execute(self.prepare_insert_event_batch(events))
        with self.index_transaction() as conn:  # mirrored in the index, as store_event does
            ids = [conn.execute(self.prepare_insert_event(event)).inserted_primary_key[0] for event in events]
            self._store_asset_event_tags(conn, events, ids)
            for event, event_id in zip(events, ids):
                self._store_asset_event(conn, event, event_id)

    def has_table(self, table_name: str) -> bool:
        if table_name in self._tables_present:
            return True
        engine = ENGINES.get(self.conn_string_for_shard(INDEX_SHARD_NAME), SQLITE_BUSY_TIMEOUT_SECONDS)
        with engine.connect() as conn:
            present = bool(engine.dialect.has_table(conn, table_name))
        if present:
            self._tables_present.add(table_name)
        return present

    def _has_asset_key_col_on_connection(self, conn, column_name: str) -> bool:
        if column_name in self._asset_key_columns_present:
            return True
        present = super()._has_asset_key_col_on_connection(conn, column_name)
        if present:
            self._asset_key_columns_present.add(column_name)
        return present

    def _forget_engines(self) -> None:
        """Close this process's connections to the index and every run file."""
        ENGINES.forget(self.conn_string_for_shard(INDEX_SHARD_NAME).removesuffix(f"{INDEX_SHARD_NAME}.db"))

    def wipe(self) -> None:
        self._forget_engines()  # its run files are deleted: no connection may stay open on them
        super().wipe()

    def dispose(self) -> None:
        # The instance is closing (the end of a command, of the webserver, of
        # the daemon). SQLite moves a WAL file's pages into the database and
        # deletes it when the last connection to it closes: left open to the
        # exit, every file would keep its -wal beside it, and a copy of the
        # storage folder without them would lack the latest events.
        super().dispose()
        self._forget_engines()


class PooledSqliteRunStorage(SqliteRunStorage):
    """SqliteRunStorage whose connections come from ``ENGINES``."""

    @contextmanager
    def connect(self) -> Iterator:
        with ENGINES.get(self._conn_string).connect() as conn, conn.begin():
            yield conn

    def dispose(self) -> None:
        super().dispose()
        ENGINES.forget(self._conn_string)  # as the event log's: the -wal is folded in and deleted


def _stamped_once(engine: Engine) -> bool:
    """Whether the database holds exactly one alembic schema stamp (Dagster's
    ``_initdb`` then leaves it as it is; with none it creates and stamps, with
    two alembic refuses it). False also where the question cannot be answered
    now (no stamp table yet, a lock): Dagster's own check then decides."""
    try:
        with engine.connect() as conn:
            return len(conn.exec_driver_sql("SELECT version_num FROM alembic_version").fetchall()) == 1
    except OperationalError:
        return False


# A new run database's bytes, made by the first new run file of the process
# (a forked child may use its parent's: they do not depend on the process).
_run_database: list[bytes] = []


def _new_run_database_bytes(create: Callable[[Engine], None]) -> bytes:
    """A run's event database as ``create`` (Dagster's ``_initdb``) makes it:
    tables, WAL mode, schema stamp. Made once per process in a temporary
    folder and read whole."""
    if not _run_database:
        with tempfile.TemporaryDirectory(prefix="voiceman-run-db-") as folder:
            path = os.path.join(folder, "run.db")
            engine = create_engine(f"sqlite:///{path}", poolclass=NullPool)
            create(engine)
            engine.dispose()  # its last connection closed: the WAL is folded into the file
            with open(path, "rb") as made:
                _run_database[:] = [made.read()]
    return _run_database[0]


def _copy_new_run_database(path: str, create: Callable[[Engine], None]) -> bool:
    """Create the run database ``path`` as a copy of ``_new_run_database_bytes(create)``
    unless a file of that name exists. The bytes go to an unnamed file in the
    same folder, flushed to disk, which is then given the name: another process
    sees no file or a whole one, and a name taken meanwhile is left alone.
    False where nothing was created (the name exists; no ``O_TMPFILE`` here;
    no copy could be made): Dagster's own creation then goes on."""
    if os.path.exists(path):
        return False
    try:
        made = _new_run_database_bytes(create)
    except (OSError, SQLAlchemyError):  # e.g. no room in the temporary folder
        return False
    folder, name = os.path.split(path)
    try:
        unnamed = os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o644)
    except (AttributeError, OSError):  # not Linux, or a file system without it
        return False
    try:
        with open(unnamed, "wb", closefd=False) as out:
            out.write(made)
        os.fsync(unnamed)
        folder_fd = os.open(folder, os.O_RDONLY)
        try:
            # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N: open(2)'s way to name an O_TMPFILE
            # file (a dir_fd makes Python call linkat rather than link, which would not follow).
            os.link(f"/proc/self/fd/{unnamed}", name, dst_dir_fd=folder_fd, follow_symlinks=True)
        finally:
            os.close(folder_fd)
        return True
    except OSError:  # FileExistsError: another process made it first; any other (a full
        return False  # disk): Dagster's own creation then meets it and reports it its way
    finally:
        os.close(unnamed)


CREATION_LOCK_FILE = ".creating.lock"
# Events per batch: a run's planned events (5 per recording) in one or a few
# statements, each well under sqlite's limit of 32,766 values (7 per event).
EVENT_BATCH_SIZE = 1000


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextmanager
def _creation_lock(base_dir: str) -> Iterator[None]:
    """Hold an exclusive lock on ``base_dir/CREATION_LOCK_FILE`` while the
    storages check, create and stamp their databases (see the module's
    docstring). The kernel releases it if the process dies holding it."""
    os.makedirs(base_dir, exist_ok=True)
    path = os.path.join(base_dir, CREATION_LOCK_FILE)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        wait_for_lock(lambda: _try_lock(fd), lambda: fcntl.flock(fd, fcntl.LOCK_EX),
                      base_dir, f"the lock on {path}")
        yield
    finally:
        os.close(fd)  # closing releases the lock


class PooledSqliteStorage(DagsterSqliteStorage):
    """DagsterSqliteStorage (the same files under ``base_dir``) with the pooled
    run and event-log storages; schedules (rarely written) are Dagster's own."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None):
        # DagsterSqliteStorage.__init__, with the two classes replaced (building
        # Dagster's first would initialise the same databases twice).
        self.base_dir = base_dir
        # Dagster hands a new run's "planned" events to the storage as one batch
        # only when this is set (it reads it at each event); the event-log
        # storage here stores such a batch in one transaction per file.
        os.environ.setdefault("DAGSTER_EVENT_BATCH_SIZE", str(EVENT_BATCH_SIZE))
        with _creation_lock(base_dir):
            try:
                self._open_storages()
            except CommandError as error:
                if "more than one head" not in str(error) or not _remove_stray_stamps(base_dir):
                    raise
                self._open_storages()
        self._inst_data = inst_data
        DagsterStorage.__init__(self)

    def _open_storages(self) -> None:
        """Dagster's check, create and stamp of each database, then the storages."""
        self._run_storage = PooledSqliteRunStorage.from_local(_runs_directory(self.base_dir))
        self._event_log_storage = PooledSqliteEventLogStorage(_event_logs_directory(self.base_dir))
        self._schedule_storage = SqliteScheduleStorage.from_local(_schedule_directory(self.base_dir))


def _remove_stray_stamps(base_dir: str) -> list[str]:
    """Repair what the creation race (see the module's docstring) left: in
    ``runs.db`` and ``schedules.db``, a stamp table holding exactly the head
    revision and ``LAST_KNOWN_STAMPED_SQLITE_ALEMBIC_REVISION``. The tables
    were made by the process that stamped head, from head's schema; the other
    stamp is the loser's mistake, and is deleted. Any other set of stamps is
    left as it is (the caller re-raises). Returns the files repaired."""
    scripts = ScriptDirectory.from_config(get_alembic_config(sqlite_run_storage.__file__))
    head = scripts.as_revision_number("head")  # one script folder for all of Dagster's storages
    stray = LAST_KNOWN_STAMPED_SQLITE_ALEMBIC_REVISION
    repaired = []
    for path in (os.path.join(_runs_directory(base_dir), "runs.db"),
                 os.path.join(_schedule_directory(base_dir), "schedules.db")):
        if not os.path.isfile(path):
            continue
        with closing(sqlite3.connect(path)) as connection, connection:
            stamps = [row[0] for row in connection.execute("SELECT version_num FROM alembic_version")]
            if sorted(stamps) != sorted([head, stray]) or head == stray:  # not those two rows
                continue
            connection.execute("DELETE FROM alembic_version WHERE version_num = ?", (stray,))
        repaired.append(path)
        logging.getLogger(__name__).warning(
            "%s was stamped with two schema revisions by processes that created it at the same "
            "moment (dagster-io/dagster#27390); removed the stray one (%s), kept %s", path, stray, head)
    return repaired
