"""Where Dagster keeps runs, event logs and schedules: sqlite, or PostgreSQL.

One switch, the environment variable ``VOICEMAN_PG_URL`` (a libpq URL such as
``postgresql://user:pass@127.0.0.1:5432/voiceman``): set, run, event-log and
schedule storage is Dagster's own ``DagsterPostgresStorage`` on that database;
unset (or empty), it is Dagster's sqlite storage under ``base_dir``
(``sqlite_pool.PooledSqliteStorage``: the same files, with connections kept
open between writes).

dagster.yaml names ``VoicemanStorage`` as a custom ``storage:`` (Dagster's
``{env: VAR}`` has no "else"). It is only a factory: ``from_config_value``
returns one of Dagster's two storages (sqlite's with pooled connections,
nothing else changed), so everything Dagster does per backend (sqlite's
per-run event files, PostgreSQL's migrations) still applies. The returned
storage keeps this class's ``inst_data`` (which holds only ``base_dir``), so
every process rebuilt from the instance (run subprocesses, the daemon,
`dagster asset materialize`) reads ``VOICEMAN_PG_URL`` from its own
environment, as Dagster's ``{env: ...}`` would, and the password never
appears in an InstanceRef or a command line.

Each process opens the storage holding a lock, so that processes started
together on a new one (``dagster dev``'s webserver and daemon, a ``voiceman``
command) create and stamp its tables one at a time: a file lock for sqlite
(``sqlite_pool``), an advisory lock on the server for PostgreSQL. Dagster's
PostgreSQL storage retries a table another process created meanwhile, but
not everything such a race meets ("DuplicateTable: relation "instance_info"
already exists", "DuplicateObject: type "asset_keys" already exists"): with 4
processes opening 3 new databases at once, one of them failed in 2 of 4 tries
here (``test_postgres.py``).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from contextlib import closing
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from dagster import StringSource
from dagster._core.storage.base_storage import DagsterStorage
from dagster._core.storage.root import LocalArtifactStorage
from dagster._serdes import ConfigurableClass, ConfigurableClassData

from voiceman_pipeline import dagster_fixes  # noqa: F401  (applied where any instance loads)
from voiceman_pipeline.errors import ConfigurationError

PG_URL_ENV = "VOICEMAN_PG_URL"
# Seconds to wait for the server before giving up (libpq's connect_timeout).
CONNECT_TIMEOUT_S = 10
# Opening an existing storage holds the creation lock for a moment (sqlite:
# about 0.03 s; creating one, about 0.2 s, measured on this project's 2-core
# machine); a wait beyond this is logged.
CREATION_LOCK_QUIET_S = 10.0
# The PostgreSQL advisory lock held while opening the storage: any fixed
# 64-bit key ("voiceman" in ASCII) shared by every process of the database.
PG_CREATION_LOCK_KEY = int.from_bytes(b"voiceman", "big")


def from_home(path: str) -> str:
    """A folder named in dagster.yaml, a relative one taken from ``$DAGSTER_HOME`` (the
    folder holding that file) rather than from each process's current folder: `voiceman`
    moves into DAGSTER_HOME, but `dagster` commands, `dagster dev` and the runs they start
    stay where they were started, and would otherwise keep a second storage there."""
    home = os.environ.get("DAGSTER_HOME")
    return path if os.path.isabs(path) or not home else os.path.join(home, path)


class StorageUnavailableError(ConfigurationError):
    """The PostgreSQL storage named by VOICEMAN_PG_URL cannot be used (bad URL, no server, refused)."""


def postgres_url() -> str | None:
    """The PostgreSQL URL from VOICEMAN_PG_URL, or None when unset or blank (sqlite)."""
    url = os.environ.get(PG_URL_ENV, "").strip()
    return url or None


def masked(url: str) -> str:
    """``url`` with its password, after "user:", as ``?password=`` or as a libpq
    ``password=...`` (a "host=... password=..." string, which is refused as no URL,
    but echoed), replaced by ``***`` (for messages and logs)."""
    url = re.sub(r"(?i)(^|[\s?&])(password\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s&#]*)", r"\1\2***", url)
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)
        user = (parts.username or "") + ":***"
        return urlunsplit(parts._replace(netloc=f"{user}@{netloc[1]}"))
    except ValueError:  # unparsable (e.g. a bad port): hide whatever follows "user:"
        return re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", url)


def sqlalchemy_url(url: str) -> str:
    """``url`` for SQLAlchemy, through psycopg2 whatever driver it names.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3, under which
    dagster-postgres 0.29.27 fails on its first event (``NOTIFY run_events,
    $1``: psycopg 3 binds parameters server-side, NOTIFY takes none);
    psycopg2, which dagster-postgres itself requires, interpolates them.
    """
    return re.sub(r"^[A-Za-z]+(\+[A-Za-z0-9_]+)?://", "postgresql+psycopg2://", url)


def wait_for_lock(try_lock: Callable[[], bool], lock: Callable[[], Any], where: str, what: str) -> None:
    """Take a lock, ``try_lock`` (True once taken) every 20 ms, then ``lock``
    (blocking) once CREATION_LOCK_QUIET_S have passed, saying so.

    Processes started together wait here for each other for a moment,
    unremarked. A longer wait is said, so that a start held up by a stopped
    (kill -STOP) or hung holder does not look hung itself. There is no time
    limit: a creation cut short is what the lock prevents.
    """
    deadline = time.monotonic() + CREATION_LOCK_QUIET_S
    while not try_lock():
        if time.monotonic() > deadline:
            logging.getLogger(__name__).warning(
                "waiting for another process opening Dagster's storage under %s (it holds %s)",
                where, what)
            lock()
            return
        time.sleep(0.02)


def take_postgres_creation_lock(connection, url: str) -> None:
    """Take PG_CREATION_LOCK_KEY's advisory lock on ``connection`` (psycopg2,
    autocommit), for Dagster's storages to check, create and stamp their
    tables under. The server releases it when the connection closes, also
    when the process dies holding it."""
    cursor = connection.cursor()

    def try_lock() -> bool:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", (PG_CREATION_LOCK_KEY,))
        return cursor.fetchone()[0]

    def lock() -> None:
        cursor.execute("SELECT pg_advisory_lock(%s)", (PG_CREATION_LOCK_KEY,))

    wait_for_lock(try_lock, lock, f"{PG_URL_ENV}={masked(url)}",
                  f"the advisory lock {PG_CREATION_LOCK_KEY}")


def connect_postgres(url: str):
    """A psycopg2 connection to ``url`` (at most CONNECT_TIMEOUT_S), or raise StorageUnavailableError.

    Dagster's own connection retries (five, with backoff) and libpq's default
    of no timeout would turn a typo or a stopped server into a long wait and
    a traceback; this gives one line naming the variable, password masked.
    """
    import psycopg2

    where = f"{PG_URL_ENV}={masked(url)}"
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme.split("+")[0] not in ("postgresql", "postgres"):
        raise StorageUnavailableError(
            f"{where} is not a PostgreSQL URL: expected postgresql://user:password@host:port/database "
            f"(unset {PG_URL_ENV} to keep sqlite)"
        )
    libpq_url = re.sub(r"^[A-Za-z]+(\+[A-Za-z0-9_]+)?://", "postgresql://", url)  # libpq knows no "+driver"
    try:
        connection = psycopg2.connect(libpq_url, connect_timeout=CONNECT_TIMEOUT_S)
        connection.autocommit = True
        return connection
    except (psycopg2.Error, ValueError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        reason = reason.replace(url, masked(url)).replace(libpq_url, masked(libpq_url))
        raise StorageUnavailableError(
            f"cannot use the PostgreSQL storage {where}: {reason} "
            f"(check the URL and that the server is running; unset {PG_URL_ENV} to keep sqlite)"
        ) from None


def postgres_failure(exc: BaseException) -> str | None:
    """One line for a failure of the PostgreSQL storage, or None when ``exc`` is not one.

    Covers StorageUnavailableError (at start) and, while VOICEMAN_PG_URL is
    set, a database error later (dagster-postgres gives up on a lost server
    after its retries with DagsterPostgresException, the error as its cause).
    """
    if isinstance(exc, StorageUnavailableError):
        return str(exc)
    url = postgres_url()
    if url is None:
        return None
    from dagster_postgres.utils import DagsterPostgresException
    from sqlalchemy.exc import DatabaseError

    cause = exc.__cause__ if isinstance(exc, DagsterPostgresException) and exc.__cause__ else exc
    if not isinstance(cause, (DatabaseError, DagsterPostgresException)):
        return None
    reason = (str(getattr(cause, "orig", None) or cause).strip().splitlines() or ["unknown error"])[0]
    # "permission denied for schema public": the server is up; the user lacks rights.
    fix = ("give the URL's user the rights to create and use tables in that database" if
           "permission denied" in reason.lower() else "check the server")
    return (f"the PostgreSQL storage {PG_URL_ENV}={masked(url)} failed: {reason.replace(url, masked(url))} "
            f"({fix}, then run the same command again)")


class VoicemanStorage(DagsterStorage, ConfigurableClass):
    """Factory named in dagster.yaml: PostgreSQL when VOICEMAN_PG_URL is set, else sqlite in ``base_dir``.

    Never instantiated itself; ``from_config_value`` returns Dagster's storage.
    """

    @classmethod
    def config_type(cls) -> Mapping[str, Any]:
        return {"base_dir": StringSource}

    @classmethod
    def from_config_value(  # ty: ignore[invalid-method-override]
        cls, inst_data: ConfigurableClassData | None, config_value: Mapping[str, Any]
    ) -> DagsterStorage:
        url = postgres_url()
        if url is None:
            from voiceman_pipeline.sqlite_pool import PooledSqliteStorage

            return PooledSqliteStorage.from_local(base_dir=from_home(config_value["base_dir"]), inst_data=inst_data)
        from dagster_postgres import DagsterPostgresStorage

        with closing(connect_postgres(url)) as connection:  # closing it releases the lock
            take_postgres_creation_lock(connection, url)
            return DagsterPostgresStorage(postgres_url=sqlalchemy_url(url), inst_data=inst_data)


class ArtifactStorage(LocalArtifactStorage):
    """Dagster's ``LocalArtifactStorage``, its ``base_dir`` taken from DAGSTER_HOME (``from_home``)."""

    @classmethod
    def from_config_value(cls, inst_data, config_value) -> ArtifactStorage:  # ty: ignore[invalid-method-override]
        return cls(from_home(config_value["base_dir"]), inst_data=inst_data)
