"""Shared fixtures: real sample recordings, a temporary data dir and instance."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from dagster import instance_for_test

from voiceman_pipeline.resources.outputs import RecordingStore

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "data" / "samples"
SAMPLE_WAVS = sorted(SAMPLES.glob("*.wav"))


def shipped_storage_yaml(home: Path) -> str:
    """A dagster.yaml for ``home``: the shipped storage section (sqlite, pooled,
    unless VOICEMAN_PG_URL is set) and compute log manager, their files in
    ``home`` (absolute paths), no telemetry."""
    return f"""\
storage:
  custom:
    module: voiceman_pipeline.storage
    class: VoicemanStorage
    config:
      base_dir: {home / "storage"}
compute_logs:
  module: voiceman_pipeline.compute_logs
  class: ComputeLogManager
  config:
    base_dir: {home / "compute_logs"}
telemetry:
  enabled: false
"""


# Appended to it for CLI tests: the shipped `gpu` pool limit.
POOL_OF_ONE_YAML = """\
concurrency:
  pools:
    default_limit: 1
"""


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory) -> Path:
    """A tiny random multilingual Whisper model in CTranslate2 format (built once)."""
    from voiceman_pipeline_tests.tiny_models import build_tiny_whisper_ct2

    return build_tiny_whisper_ct2(tmp_path_factory.mktemp("tiny-whisper") / "ct2")


@pytest.fixture
def store(tmp_path: Path) -> RecordingStore:
    data = tmp_path / "data"
    (data / "inbox").mkdir(parents=True)
    (data / "outputs").mkdir()
    return RecordingStore(data_dir=str(data))


@pytest.fixture
def instance(request):
    """A temporary instance with the shipped storage: sqlite; for tests marked
    `storage`, also PostgreSQL (see below)."""
    if getattr(request, "param", "sqlite") == "postgres":
        yield request.getfixturevalue("_postgres_instance")
        return
    base_dir = request.getfixturevalue("tmp_path") / "storage"
    custom = {**VOICEMAN_STORAGE, "config": {"base_dir": str(base_dir)}}
    with instance_for_test(overrides={"storage": {"custom": custom}}) as inst:
        yield inst


def drop(store: RecordingStore, sample: str | Path, name: str | None = None) -> Path:
    """Copy a sample recording into the inbox under ``name``."""
    source = SAMPLES / sample if isinstance(sample, str) else sample
    target = store.inbox_dir / (name or source.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


@pytest.fixture
def env(request, tmp_path):
    """Environment of a `voiceman` subprocess: a fresh DAGSTER_HOME whose
    dagster.yaml has the shipped storage (sqlite), and a data dir.

    For tests marked `storage`, also PostgreSQL: VOICEMAN_PG_URL set to a
    fresh database.
    """
    home = tmp_path / "dagster_home"
    home.mkdir()
    data = tmp_path / "data"
    (data / "inbox").mkdir(parents=True)
    environ = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "VOICEMAN_DATA_DIR": str(data),
        "PYTHONPATH": str(REPO),
    }
    (home / "dagster.yaml").write_text(shipped_storage_yaml(home))
    if getattr(request, "param", "sqlite") == "postgres":
        environ["VOICEMAN_PG_URL"] = request.getfixturevalue("pg_url")
    return environ


# --- PostgreSQL storage (VOICEMAN_PG_URL, voiceman_pipeline/storage.py) -----
#
# Tests marked `storage` that use `instance` or `env` run twice: on sqlite and on
# PostgreSQL. The server is VOICEMAN_TEST_PG_URL when set (a URL whose user
# may CREATE DATABASE; .ci/run starts one), else a throwaway one started here
# (initdb + pg_ctl on 127.0.0.1, once per session). Each test gets a fresh
# database. Without PostgreSQL the postgres half skips, except under CI=true,
# where it fails: CI must not silently skip it.



def pytest_generate_tests(metafunc):
    if not metafunc.definition.get_closest_marker("storage"):
        return
    names = [name for name in ("instance", "env") if name in metafunc.fixturenames]
    if names:
        backends = ["sqlite", "postgres"]
        metafunc.parametrize(",".join(names), [(b,) * len(names) for b in backends],
                             indirect=True, ids=backends)


@pytest.fixture(autouse=True)
def _no_ambient_pg_url(monkeypatch):
    """A VOICEMAN_PG_URL in the caller's shell must not move the tests' storage."""
    monkeypatch.delenv("VOICEMAN_PG_URL", raising=False)


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server a test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(probe, timeout: float, what: str):
    """``probe()``'s first truthy value, polled every 0.5 s (OSError: not up yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = probe()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


_TOGETHER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
me, root = sys.argv[1], Path(sys.argv[2])
{setup}
for round in range({rounds}):
    (root / f"ready-{{round}}-{{me}}").touch()
    while not (root / f"go-{{round}}").exists():
        time.sleep(0.001)
    try:
{body}
    except Exception as error:
        print(f"round {{round}}: {{type(error).__name__}}: {{error}}".splitlines()[0], flush=True)
"""


def run_together(root: Path, processes: int, rounds: int, setup: str, body: str, env=None) -> list:
    """Run ``body`` in ``processes`` Python processes at the same moment, ``rounds`` times.

    Each process runs ``setup`` (imports) first; in each round, every process
    waits until all are ready (a file each in ``root``), then all run ``body``
    (which sees ``round``, ``root`` and ``me``, the process's number). An
    exception in ``body`` is printed as one line to stdout. Returns each
    process's CompletedProcess (stdout, stderr, returncode).
    """
    import sys
    import textwrap

    script = _TOGETHER.format(repo=str(REPO), setup=textwrap.dedent(setup), rounds=rounds,
                              body=textwrap.indent(textwrap.dedent(body), " " * 8))
    started = [subprocess.Popen([sys.executable, "-c", script, str(n), str(root)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for n in range(processes)]
    for round in range(rounds):
        deadline = time.monotonic() + 120
        while len(list(root.glob(f"ready-{round}-*"))) < processes:
            assert time.monotonic() < deadline, "the processes never got ready"
            assert all(p.poll() is None for p in started), [p.communicate() for p in started]
            time.sleep(0.01)
        (root / f"go-{round}").touch()
    outputs = [p.communicate(timeout=120) for p in started]
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err)
            for p, (out, err) in zip(started, outputs)]


def open_while_held(open_storage, held_s: float, nothing_made, release) -> tuple[bool, list]:
    """Run ``open_storage()`` (it returns what it read) in a thread while this
    process holds a storage's creation lock, as another process would. After
    ``held_s``: whether it was still waiting with ``nothing_made()``; then
    ``release()`` the lock. Returns that, and what the open then read."""
    import threading

    read = []
    start = threading.Thread(target=lambda: read.append(open_storage()))
    start.start()
    time.sleep(held_s)
    waited = start.is_alive() and nothing_made()
    release()
    start.join(timeout=60)
    return waited, read


def location_loaded(graphql_url: str) -> bool:
    """Whether the webserver at ``graphql_url`` has loaded the code location."""
    query = "{ repositoriesOrError { ... on RepositoryConnection { nodes { name } } } }"
    body = json.dumps({"query": query}).encode()
    request = urllib.request.Request(graphql_url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        nodes = json.loads(response.read())["data"]["repositoriesOrError"].get("nodes", [])
    return bool(nodes)


@contextlib.contextmanager
def _throwaway_pg_server():
    """A PostgreSQL server on 127.0.0.1 in a temporary directory; yields its admin URL.

    initdb refuses to run as root: as root, the server runs as the `postgres`
    user in a directory it owns.
    """
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        reason = "PostgreSQL not found (no initdb/pg_ctl; Debian: apt-get install postgresql), " \
                 "and VOICEMAN_TEST_PG_URL is not set"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + ": CI must run the PostgreSQL storage tests", pytrace=False)
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="voiceman-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data, log = root / "data", root / "server.log"
    try:
        subprocess.run([*as_user, initdb, "-D", str(data), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, timeout=300)
        # Durability settings off: a throwaway test server, torn down after the session.
        options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off")
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(log), "-w", "-t", "120",
                        "-o", options, "start"], check=True, capture_output=True, timeout=300)
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not start a PostgreSQL server: {exc.stderr.decode(errors='replace')[-500:]}",
                    pytrace=False)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server():
    """Admin URL of a PostgreSQL server for the session (VOICEMAN_TEST_PG_URL or a throwaway one)."""
    url = os.environ.get("VOICEMAN_TEST_PG_URL", "").strip()
    if url:
        yield url
        return
    with _throwaway_pg_server() as url:
        yield url


def with_database(url: str, database: str) -> str:
    """``url`` pointing at another database on the same server."""
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(url)._replace(path="/" + database))


@pytest.fixture
def pg_url(pg_server):
    """URL of a fresh, empty database on the session's server (dropped after the test)."""
    name = f"voiceman_test_{uuid.uuid4().hex[:12]}"
    pg_admin(pg_server, f'CREATE DATABASE "{name}"')
    yield with_database(pg_server, name)
    pg_admin(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pg_admin(url: str, statement: str) -> None:
    """One statement outside a transaction (CREATE/DROP DATABASE), through psycopg2 as Dagster's storage."""
    import psycopg2

    conn = psycopg2.connect(url)
    try:
        conn.autocommit = True
        conn.cursor().execute(statement)
    finally:
        conn.close()


VOICEMAN_STORAGE = {"module": "voiceman_pipeline.storage", "class": "VoicemanStorage"}


@pytest.fixture
def _postgres_instance(request, monkeypatch, tmp_path):
    """A test instance whose storage is the shipped switch with VOICEMAN_PG_URL set."""
    monkeypatch.setenv("VOICEMAN_PG_URL", request.getfixturevalue("pg_url"))
    custom = {**VOICEMAN_STORAGE, "config": {"base_dir": str(tmp_path / "sqlite-unused")}}
    with instance_for_test(overrides={"storage": {"custom": custom}}) as inst:
        yield inst
