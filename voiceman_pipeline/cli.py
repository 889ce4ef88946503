"""``voiceman``: operator commands that need no daemon.

    voiceman ingest            register stable new/changed inbox files as partitions
    voiceman run [--samples]   ingest, then materialize them (and any recording an
                               earlier run left unfinished, or whose results are out
                               of date) in batches, and the summary
    voiceman status            one line per recording: stages materialized or failed
    voiceman retry-failed      finish the chain of every recording that has a failed
                               stage or that an earlier run left unfinished
    voiceman retire KEY... --reason TEXT
                               set recordings aside for good (status "retired: TEXT"):
                               run and retry-failed leave them; nothing is deleted
    voiceman retire --undo KEY...   take them back
    voiceman validate          dry run: list the inbox files intake would refuse, and
                               why (no model, no storage, nothing written); exit 1 if any
    voiceman pause | resume    stop / start the inbox_sensor (as the UI's Stop/Start)
    voiceman report [RUN_ID]   a run's batch report (default: the latest analysis run):
                               recordings ok/failed, failures by category, results
                               computed/kept, retries, memory, duration; exit 1 if none

Runs execute in this process against the Dagster instance in ``$DAGSTER_HOME``
(the repository, by default, whose ``dagster.yaml`` keeps sqlite storage under
``data/dagster/``), so they appear in ``dagster dev`` like any other run. Every
run computes only what is not current already (see ``assets/checkpoint.py``).

Ctrl+C or SIGTERM stops the run in progress (it ends CANCELED, nothing partial
is written) and no further batch starts; the command exits 130. Running it
again finishes the rest: a canceled run's recordings read "pending" (part
done), and both ``run`` and ``retry-failed`` take those up again.

If the process is killed outright (kill -9), its run is left STARTED (and,
where its step is in the ``gpu`` pool, holding a slot); the next ``run`` or
``retry-failed`` on this host marks it failed, frees any slot (``runs.py``) and
finishes its recordings.

``--workers N`` (VOICEMAN_WORKERS; default: one per CPU core with CPU
engines, 1 with GPU engines) runs up to N batches side by side, each in a
worker process that executes its run as this process would (``workers.py``):
a stop cancels every worker's run, and a kill -9 of this process takes its
workers with it, their runs then cleaned up as above.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import os
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Collection, Iterator
from pathlib import Path

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "data" / "samples"


STOPPED_EXIT = 130  # as a shell reports a command ended by Ctrl+C


class Stopped(Exception):
    """A run was stopped by the user; no further batch starts."""


def console_log_config(level: str) -> dict:
    """Run config for the console logger: runs log every event at DEBUG; a
    person running a batch wants the table and one line per failure, which
    this command prints itself (Dagster's failure events carry stack traces)."""
    return {"loggers": {"console": {"config": {"log_level": level}}}}


def command() -> int:
    """The ``voiceman`` console script: ``main()``, then an exit that skips
    Python's last garbage collection."""
    warnings_only_at_the_root()
    code = main()
    skip_final_collection()
    return code


def warnings_only_at_the_root() -> None:
    """Give Python's root logger the handler it falls back on anyway (warnings and
    errors, as bare lines on stderr). Otherwise the first ``logging.warning()`` of a
    library (dagster-postgres, retrying a lost server) set up a root handler of every
    level, and each INFO line of Dagster's step logger was printed from then on."""
    import logging

    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.lastResort)


def skip_final_collection() -> None:
    """Call just before the process exits. At exit Python collects garbage
    once more over every object still alive: Dagster's definitions, types and
    storage metadata, about 270,000 objects after a run (measured: 0.6 s after
    `voiceman status`, 0.03 s without). ``gc.freeze()`` moves them all out of the
    collector's reach; the OS frees the memory anyway. Atexit handlers, buffered
    output and reference-counted cleanup still run; the instance and its
    storage were closed before this."""
    gc.freeze()


@contextlib.contextmanager
def collection_paused(then_freeze: bool = False) -> Iterator[None]:
    """Python's cyclic garbage collector off inside, as it was after; with
    ``then_freeze``, every object alive at the end is then moved out of its
    reach (``gc.freeze()``), as objects built at startup, which live to exit,
    may be. (A run's MemoryManager freezes and thaws again around its run,
    resources/memory.py; thawed, they join the oldest generation, which only
    the rare full collections go over.)

    For startup: importing Dagster, the storage and the code location builds
    about 300,000 objects, and the collector, run every 700 new objects, ran
    some 400 times while they were built, for next to nothing (`voiceman run`
    on 16 recordings of 5 s: 0.37-0.47 s of collections in all, 0.18-0.28 s
    with startup paused then frozen; gc.callbacks timings, 5 runs each). Pausing
    alone does not help: the first collections after it go over everything
    built meanwhile. Garbage already there is collected first, so none is
    frozen (1 ms in a fresh command; more when a test calls ``main()`` in its
    own process).
    """
    if then_freeze:
        gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if then_freeze:
            gc.freeze()
        if was_enabled:
            gc.enable()


def main(argv: list[str] | None = None) -> int:
    # SIGTERM (a service manager, `kill`) stops like Ctrl+C. While a run
    # executes, Dagster installs its own handlers and does the same.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return _main(argv)
    except BrokenPipeError:  # the reader went away (`voiceman status | head`): stop quietly, as `cat` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor an error at exit's last flush
        return BROKEN_PIPE_EXIT
    except BaseException as stop:
        storage = _storage_failure(stop)
        if storage:
            print(f"voiceman: {storage}", file=sys.stderr)
            return STORAGE_EXIT
        from voiceman_pipeline.errors import ConfigurationError

        if isinstance(stop, ConfigurationError):  # its message names the setting to fix
            print(f"voiceman: {stop}", file=sys.stderr)
            return CONFIGURATION_EXIT
        if not _is_stop(stop):
            raise
        print(f"Stopped{': ' + str(stop) if str(stop) else ''}. Run the same command again "
              f"to finish the rest.", file=sys.stderr)
        return STOPPED_EXIT


STORAGE_EXIT = 3
CONFIGURATION_EXIT = 2  # as argparse's for a bad option
BROKEN_PIPE_EXIT = 141  # as a shell reports a command ended by SIGPIPE (128 + 13)


def _storage_failure(exc: BaseException) -> str | None:
    """One line for an error of Dagster's storage (one that cannot be opened, a
    full disk, a broken or locked database), instead of a traceback; None for
    anything else."""
    import sqlite3

    from sqlalchemy.exc import DatabaseError  # disk full, disk I/O error, damaged file, locked

    from voiceman_pipeline.storage import postgres_failure

    if line := postgres_failure(exc):  # VOICEMAN_PG_URL: a server, not files on this disk
        return line
    if isinstance(exc, StorageOpenError):
        return str(exc)
    home = os.environ.get("DAGSTER_HOME", ".")
    if not isinstance(exc, (DatabaseError, sqlite3.DatabaseError)):
        return None
    try:
        free = f"{shutil.disk_usage(home).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
    return (
        f"Dagster's storage under {home} failed ({reason}); {free} there. "
        f"Free some disk space (or fix the storage) and run the command again."
    )


def _is_stop(exc: BaseException) -> bool:
    """Ctrl+C/SIGTERM, as Python or as Dagster raises it (a run without our
    interrupt handling, e.g. the summary's, re-raises Dagster's), or a
    canceled batch."""
    if isinstance(exc, (KeyboardInterrupt, Stopped)):
        return True
    from dagster._core.errors import DagsterExecutionInterruptedError

    return isinstance(exc, DagsterExecutionInterruptedError)


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "status":
        # A short read: the objects it builds (Dagster's modules, rows and
        # records for every recording) live to its end, so the cyclic
        # collector, run every 700 allocations, frees next to nothing (peak
        # memory 3 MB higher without it) and cost 0.25-0.5 s of CPU per run
        # over 10,000 recordings (bench/scale.py's home, runs with and
        # without it in turn). Off for this command alone.
        with collection_paused():
            return _command(args)
    return _command(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voiceman", description=__doc__.split("\n")[0].replace("``", ""))
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show Dagster's run log (default: warnings)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ingest = sub.add_parser("ingest", help="register inbox files as partitions (no run)")
    settle_help = (
        "seconds a file must stay unchanged before it is taken in (default: "
        "VOICEMAN_SENSOR_INTERVAL_S, as the sensor); files untouched that long are taken at once"
    )
    ingest.add_argument("--settle", type=float, default=None, help=settle_help)
    run = sub.add_parser(
        "run", help="ingest, then materialize new, unfinished and out-of-date recordings and the summary")
    run.add_argument("--samples", action="store_true", help="first copy data/samples/ audio into the inbox")
    run.add_argument("--settle", type=float, default=None, help=settle_help)
    run.add_argument("--batch-size", type=int, default=None, help=BATCH_SIZE_HELP)
    run.add_argument("--workers", type=_positive, default=None, help=WORKERS_HELP)
    status = sub.add_parser("status", help="status of every recording")
    status.add_argument("--by-risk", action="store_true", help=(
        "as the UI's summary table: recordings not done first, then the done ones by their "
        "strongest category's score, then by overall risk, highest first; ties by key "
        "(default: as registered)"))
    sub.add_parser(
        "verify", help="re-hash every recording and result against what was recorded; "
        "exit 1 naming each mismatch"
    )
    retry = sub.add_parser("retry-failed", help="re-run recordings with a failed stage")
    retry.add_argument("--batch-size", type=int, default=None, help=BATCH_SIZE_HELP)
    retry.add_argument("--workers", type=_positive, default=None, help=WORKERS_HELP)
    report = sub.add_parser("report", help="print a run's batch report (default: the latest)")
    report.add_argument("run_id", nargs="?", default=None, metavar="RUN_ID",
                        help="run id, or its first 8 characters as printed")
    retire = sub.add_parser("retire", help="set recordings aside for good (deleted, or bad and "
                            "accepted): run and retry-failed leave them; nothing is deleted")
    retire.add_argument("keys", nargs="+", metavar="KEY", help="partition key (see `voiceman status`)")
    retire.add_argument("--reason", help="why (required unless --undo)")
    retire.add_argument("--undo", action="store_true", help="take retired recordings back")
    sub.add_parser("validate", help="list inbox files that would fail intake, and why "
                   "(changes nothing); exit 1 if any")
    sub.add_parser("pause", help="stop the inbox sensor: dropped files wait")
    sub.add_parser("resume", help="start the inbox sensor again")
    return parser


def _command(args: argparse.Namespace) -> int:
    """Carry out the parsed command; its exit status."""
    _default_dagster_home()
    run_config = console_log_config("DEBUG" if args.verbose else "CRITICAL")
    with collection_paused(then_freeze=True):  # startup: what is built here stays to the end
        from dagster import DagsterInstance

        # storage: the instance's (dagster.yaml), imported here so that its modules
        # (SQLAlchemy, alembic) load with the rest, not when the instance opens.
        from voiceman_pipeline import runs, storage  # noqa: F401

        if args.command == "status":
            # Reads only: the code location (its summary asset's pandas, the run
            # machinery) is not imported; the store is the one it would configure.
            from voiceman_pipeline.resources import configured_resources
            from voiceman_pipeline.settings import Settings

            store = configured_resources(Settings.from_env())["store"]
        else:
            from voiceman_pipeline.definitions import defs, settings

            store = defs.resources["store"]
    if args.command == "validate":  # a dry run: no lock, no instance, nothing written
        from voiceman_pipeline.validate import validate_command

        return validate_command(store)
    # One voiceman command at a time takes in files (two at once raced on
    # registering the same keys); commands that only read do not wait for it,
    # e.g. `status` while a `run` hashes a large inbox. Runs themselves do not
    # hold the lock.
    with opened_instance(lock_intake=args.command not in READ_ONLY_COMMANDS) as instance:
        if args.command == "verify":
            from voiceman_pipeline.evidence import verify_command

            return verify_command(instance, store)
        if args.command == "report":
            from voiceman_pipeline.batch_report import report_command

            return report_command(instance, store, args.run_id)
        if args.command == "retire":
            from voiceman_pipeline.retire import retire_command

            code = retire_command(instance, store, args.keys, args.reason, args.undo)
            release_intake_lock()
            if code == 0:  # its status changed: so does the summary's row
                materialize_summary(instance, run_config)
            return code
        if args.command in ("pause", "resume"):
            from voiceman_pipeline.intake_control import pause_command, resume_command

            return (pause_command if args.command == "pause" else resume_command)(instance)
        if args.command == "status":
            from dagster._core.instance.types import CachingDynamicPartitionsLoader

            from voiceman_pipeline.intake_control import print_intake_state

            dead = runs.dead_runs(instance)
            for run in dead:  # read-only here; say who cleans it up
                print(f"{run.describe()}: the next `voiceman run` or `voiceman retry-failed` "
                      f"cleans it up", file=sys.stderr)
            # The registered keys, read once for the table and the statuses.
            partitions = CachingDynamicPartitionsLoader(instance)
            keys = partition_keys(partitions)
            interrupted = set(recordings_of([run for run in dead if run.unfinished], keys))
            print_status(instance, store, keys, partitions, interrupted, by_risk=args.by_risk)
            print_intake_state(instance)
            return 0
        crashed = []  # recordings of runs whose process died (see runs.py): finished below
        if args.command in ("run", "retry-failed"):
            dead = runs.clean_up(instance, say=lambda line: print(line, file=sys.stderr))
            crashed = recordings_of(dead, partition_keys(instance))
        if args.command == "retry-failed":
            release_intake_lock()
            return retry_failed(instance, store, args.batch_size or settings.batch_size, run_config,
                                workers=worker_count(args.workers))
        if args.command == "run" and args.samples:
            copy_samples(store.inbox_dir)
        settle = args.settle
        if settle is None:  # the samples this command copied itself are complete
            settle = 0.0 if getattr(args, "samples", False) else settings.sensor_interval_s
        ready = ingest_inbox(instance, store, settle_s=settle, only=args.command == "ingest")
        release_intake_lock()
        if args.command == "ingest":
            return 0
        keys = not_in_progress(instance, [r.file.key for r in ready])
        from voiceman_pipeline.status import partition_statuses, stale_recordings

        registered = partition_keys(instance)
        by_stage = partition_statuses(instance, registered)  # read once for the three questions below
        left = unfinished_recordings(instance, registered, failed_too=crashed, by_stage=by_stage)
        left = [key for key in left if key not in keys]
        if left:
            print(f"{len(left)} recording(s) left unfinished by an earlier run")
        keys += left
        taken = set(keys)
        stale = stale_recordings(instance, [key for key in registered if key not in taken], by_stage)
        if stale:  # the runs compute only what is out of date (assets/checkpoint.py)
            firsts = ", ".join(f"{n} from {stage}" for stage, n in Counter(stale.values()).items())
            print(f"{len(stale)} recording(s) with results out of date ({firsts}): computing those again")
            keys += list(stale)
        if not keys:
            busy = in_progress(instance, registered, by_stage)  # taken in by a run still at them
            print("Nothing new to process." + (f" {len(busy)} recording(s) are being processed by another"
                                               " run; left to it." if busy else ""))
            if summary_behind(instance):  # results made elsewhere, or a stopped command's
                materialize_summary(instance, run_config)
        else:
            ok = materialize_batches(instance, keys, args.batch_size or settings.batch_size, run_config,
                                     workers=worker_count(args.workers))
            materialize_summary(instance, run_config)
            print_status(instance, store, keys)
            return 0 if ok else 1
        print_status(instance, store, partition_keys(instance))
    return 0


BATCH_SIZE_HELP = (
    "most recordings per run (default: VOICEMAN_BATCH_SIZE); fewer where that shares the "
    "recordings evenly among the workers"
)
WORKERS_HELP = (
    "batches run side by side, each in its own worker process (default: VOICEMAN_WORKERS, "
    "else one per usable CPU core with CPU engines and 1 with GPU engines)"
)


def _positive(text: str) -> int:
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{text} is not 1 or more")
    return number


def worker_count(requested: int | None) -> int:
    """Batches side by side: ``--workers``, else VOICEMAN_WORKERS, else by the engines."""
    from voiceman_pipeline.definitions import recording_analysis, settings
    from voiceman_pipeline.workers import default_workers

    return requested or settings.workers or default_workers(recording_analysis.op.pool)


def _default_dagster_home() -> None:
    """Use $DAGSTER_HOME, or the repository root when started there, and work
    from it: dagster.yaml's relative storage paths are taken from the current
    folder, so this makes them land under $DAGSTER_HOME/data/dagster."""
    from voiceman_pipeline.errors import ConfigurationError

    home = os.environ.get("DAGSTER_HOME")
    if not home:
        if not (Path.cwd() / "dagster.yaml").is_file():
            raise ConfigurationError(
                "DAGSTER_HOME is not set and there is no dagster.yaml here: run from the "
                "repository root, or set DAGSTER_HOME to it."
            )
        home = os.environ["DAGSTER_HOME"] = str(Path.cwd())
    elif not (Path(home) / "dagster.yaml").is_file():
        # Dagster itself would go on with its defaults: another storage, no
        # run monitoring or retries, no limit on the "gpu" pool.
        missing = "holds no dagster.yaml" if Path(home).is_dir() else "is not a folder"
        raise ConfigurationError(
            f"DAGSTER_HOME={home} {missing}: set it to the folder holding VoiceMan's "
            f"dagster.yaml (the repository root), or copy that file there."
        )
    data_dir = os.environ.get("VOICEMAN_DATA_DIR")
    if data_dir:  # a relative one means relative to where the user typed it
        os.environ["VOICEMAN_DATA_DIR"] = str(Path(data_dir).resolve())
    os.chdir(home)


def copy_samples(inbox: Path) -> None:
    """Copy the bundled sample recordings into the inbox (existing ones kept)."""
    from voiceman_pipeline.inbox import AUDIO_EXTENSIONS

    inbox.mkdir(parents=True, exist_ok=True)
    for sample in sorted(SAMPLES_DIR.iterdir()):
        target = inbox / sample.name
        if sample.suffix.lower() in AUDIO_EXTENSIONS and not target.exists():
            shutil.copy2(sample, target)


def ingest_inbox(instance, store, *, settle_s: float, only: bool = False):
    """The sensor's rule, without waiting for its ticks: files untouched for
    ``settle_s`` are ready at once; the others get a second look ``settle_s``
    later and are ready if unchanged. Then every ready file is registered: a
    person asked for all of them, so no per-tick cap. Files whose content
    Dagster already recorded (taken in or tried) are not ready. ``only``: the
    command only ingests (it says the files are registered, not run)."""
    from voiceman_pipeline.inbox import inbox_missing, quoted
    from voiceman_pipeline.sensors import plan_for_inbox

    if missing := inbox_missing(store.inbox_dir):
        print(missing, file=sys.stderr)
    cursor, ready = None, {}
    for look in range(2):
        plan, _, rejected = plan_for_inbox(
            instance, store, cursor, max_new=sys.maxsize, settled_after_s=settle_s
        )
        ready.update({r.file.key: r for r in plan.ready})  # requested: not again on look 2
        if not plan.waiting:
            break
        cursor = plan.cursor()
        if look == 0:
            print(f"waiting {settle_s:g} s for {len(plan.waiting)} file(s) that changed "
                  f"recently", flush=True)
            time.sleep(settle_s)
    for rejection in rejected:
        print(f"skipped {quoted(rejection.relative_path)}: {rejection.reason}", file=sys.stderr)
    for name in plan.waiting:
        print(f"waiting: {name!r} is still changing; run again once it is complete", file=sys.stderr)
    new_keys = [key for key, r in ready.items() if r.is_new_key]
    if new_keys:
        register(instance, new_keys)
    if only:  # `voiceman ingest`: registered, not run
        print(f"inbox {store.inbox_dir}: {len(ready)} ready to process ({len(new_keys)} new, registered);"
              " `voiceman run` or the daemon's inbox_sensor runs them")
    else:
        print(f"inbox {store.inbox_dir}: {len(ready)} to process ({len(new_keys)} new)")
    return list(ready.values())


class StorageOpenError(Exception):
    """Dagster's storage under $DAGSTER_HOME cannot be opened: a folder it cannot
    make or write, or schema stamps it cannot use."""


# Commands that change nothing Dagster or intake keep (their own output aside).
READ_ONLY_COMMANDS = ("status", "verify", "report")


@contextlib.contextmanager
def opened_instance(lock_intake: bool = True):
    """The intake lock (unless not ``lock_intake``), then Dagster's instance from $DAGSTER_HOME.

    A home that cannot be used is one line naming what to fix, not
    Dagster's traceback: a dagster.yaml Dagster rejects is a
    ConfigurationError, a storage folder it cannot create or write (read-only,
    a file in its place, a full disk) or schema stamps alembic rejects a
    StorageOpenError.
    """
    import yaml
    from alembic.util.exc import CommandError  # a database's schema stamps, as alembic checks them
    from dagster import DagsterInstance
    from dagster._check import CheckError  # e.g. a class dagster.yaml names that cannot be imported
    from dagster._core.errors import DagsterInvalidConfigError

    from voiceman_pipeline.errors import ConfigurationError

    home = os.environ["DAGSTER_HOME"]
    with contextlib.ExitStack() as stack:
        try:
            if lock_intake:
                stack.enter_context(intake_lock())
            instance = stack.enter_context(DagsterInstance.get())
        except (yaml.YAMLError, DagsterInvalidConfigError, CheckError) as exc:
            problems = [error.message for error in getattr(exc, "errors", [])] or [str(exc)]
            # Dagster appends every key it would accept to an unknown key's message.
            reason = "; ".join(" ".join(p.split(" Expected: ")[0].split()) for p in problems)
            raise ConfigurationError(f"{home}/dagster.yaml cannot be used: {reason}") from None
        except CommandError as exc:
            raise StorageOpenError(
                f"Dagster's storage under {home} could not be opened: its schema version "
                f"(alembic_version) is not one Dagster can use ({str(exc).splitlines()[0]}). "
                f"Nothing was changed; see \"Storage\" in the README."
            ) from None
        except OSError as exc:
            if isinstance(exc, FileExistsError):  # os.makedirs on a file
                reason = f"{exc.filename} is a file, not a folder"
            elif isinstance(exc, NotADirectoryError):
                reason = f"{exc.filename}: part of this path is a file, not a folder"
            else:
                reason = f"{exc.strerror or exc}: {exc.filename}"
            raise StorageOpenError(
                f"Dagster's storage under {home} could not be opened: {reason} (DAGSTER_HOME "
                f"and the folders its dagster.yaml names must be folders this user can write, "
                f"on a disk with space left)"
            ) from None
        yield instance


_LOCK = {"file": None}


@contextlib.contextmanager
def intake_lock():
    """An exclusive lock file under $DAGSTER_HOME, held from opening the
    instance until the inbox is taken in (``release_intake_lock``)."""
    path = Path(os.environ["DAGSTER_HOME"]) / ".voiceman-intake.lock"
    handle = open(path, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("waiting for another voiceman command to finish taking in files", file=sys.stderr)
        fcntl.flock(handle, fcntl.LOCK_EX)
    _LOCK["file"] = handle
    try:
        yield
    finally:
        release_intake_lock()


def release_intake_lock() -> None:
    handle = _LOCK["file"]
    if handle is not None:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
        _LOCK["file"] = None


def register(instance, keys: list[str]) -> None:
    """Add partitions; keys another process added meanwhile are fine."""
    from sqlalchemy.exc import IntegrityError

    from voiceman_pipeline.partitions import audio_files

    for _ in range(3):
        known = set(instance.get_dynamic_partitions(audio_files.name))
        missing = [key for key in keys if key not in known]
        if not missing:
            return
        try:
            instance.add_dynamic_partitions(audio_files.name, missing)
            return
        except IntegrityError:
            continue  # added by someone else between the read and the write: look again
    raise RuntimeError("could not register the new recordings: the partition list keeps changing")


def not_in_progress(instance, keys: list[str]) -> list[str]:
    """``keys`` less those a run in progress is already processing (one run per
    recording at a time); says how many were left to that run."""
    from dagster import AssetPartitionStatus

    from voiceman_pipeline.assets.stages import AUDIO
    from voiceman_pipeline.partitions import audio_files

    statuses = instance.get_status_by_partition(AUDIO.key, keys, audio_files) or {} if keys else {}
    busy = [key for key in keys if statuses.get(key) == AssetPartitionStatus.IN_PROGRESS]
    if busy:
        print(f"{len(busy)} recording(s) are being processed by another run; left to it")
    return [key for key in keys if key not in busy]


def materialize_batches(
    instance, keys: list[str], batch_size: int, run_config: dict, source: str = "cli",
    workers: int = 1,
) -> bool:
    """Run the analysis job once per batch; True if every recording succeeded.
    ``source``: the runs' ``voiceman/source`` tag. ``workers``: batches run side
    by side, each in a worker process (``workers.py``); with 1 (or a single
    batch) they run one after another in this process. Batches hold at most
    ``batch_size`` recordings, fewer where that shares them evenly among the
    workers when their steps can go at once (``balanced_batch_size``).

    Prints one line per failed recording (stage and reason), and a progress
    bar on a terminal. Raises Stopped when a run was stopped, so no further
    batch starts; stops launching batches when the error-rate brake trips."""
    from dagster import DagsterRunStatus

    from voiceman_pipeline import runs
    from voiceman_pipeline.brake import Brake, run_counts
    from voiceman_pipeline.definitions import defs, recording_analysis, settings
    from voiceman_pipeline.jobs import source_tags
    from voiceman_pipeline.partitions import balanced_batch_size, range_tags, spanning_batches
    from voiceman_pipeline.progress import PROGRESS_LOGGER, batch_progress

    brake = Brake.from_settings(settings)
    run_config = {**run_config, "loggers": {**run_config.get("loggers", {}), **PROGRESS_LOGGER}}
    ok, finished = True, []
    wanted = set(keys)
    # Shared among the workers, unless the analysis step is in a pool (GPU engines:
    # one step at a time, so smaller runs would only load the models more often).
    batch_size = balanced_batch_size(len(keys), batch_size, 1 if recording_analysis.op.pool else workers)
    # Up to 4 batches' worth of done recordings between scattered ones share a run.
    registered = partition_keys(instance)
    batches = spanning_batches(registered, keys, batch_size, max_span=4 * batch_size)
    between = [key for batch in batches for key in batch if key not in wanted]
    if between:  # only done ones: a failed one between would be tried (and counted) again
        batches = spanning_batches(registered, keys, batch_size, max_span=4 * batch_size,
                                   unspannable=_not_done(instance, between))
    with batch_progress(keys) as bar:
        if min(workers, len(batches)) > 1:
            return _side_by_side(instance, batches, wanted, min(workers, len(batches)),
                                 run_config, source, brake, bar)
        job = defs.resolve_job_def("analysis_job")
        for number, batch in enumerate(batches):
            if brake.tripped(*run_counts(finished)):
                _braked(brake, finished, batches[number:], wanted)
                return False
            _announce(batch, wanted)
            if recording_analysis.op.pool:
                runs.wait_for_pool(instance, recording_analysis.op.pool, say=lambda line: print(line, flush=True))
            result = job.execute_in_process(
                instance=instance,
                tags={**range_tags(batch), **runs.launch_tags(), **source_tags(source)},
                run_config=run_config,
                raise_on_error=False,
            )
            run = instance.get_run_by_id(result.run_id)
            finished.append(run)
            _report(run, failed_recordings(result.all_events), batch, instance)  # named as in workers
            if result.dagster_run.status == DagsterRunStatus.CANCELED:
                raise Stopped(f"run {result.run_id[:8]} was canceled")
            ok = ok and result.success
    return ok


def _announce(batch: list[str], wanted: set[str]) -> None:
    todo = sum(1 for key in batch if key in wanted)
    spanned = f" (spanning {len(batch) - todo} done)" if len(batch) > todo else ""
    print(f"run: {todo} recording(s) {batch[0]} .. {batch[-1]}{spanned}", flush=True)


def _report(run, failed: list, batch: list[str] | None = None, instance=None) -> None:
    """A finished run's lines: results computed and kept, one per failed recording,
    or why the run failed where no recording did (its storage lost mid-run, say);
    ``batch``: name its recordings (runs side by side finish in any order, and a
    stop's lines come between)."""
    from dagster import DagsterEventType, DagsterRunStatus

    from voiceman_pipeline.assets.pipeline import RESULTS_COMPUTED_TAG, RESULTS_KEPT_TAG

    if RESULTS_COMPUTED_TAG in run.tags:
        which = f" {batch[0]} .. {batch[-1]}:" if batch else ""
        stopped = run.status in (DagsterRunStatus.CANCELED, DagsterRunStatus.CANCELING)
        # The run's id: `voiceman report <id>` shows its batch report (one per run).
        print(f" {which} {'stopped (canceled) after ' if stopped else ''}{run.tags[RESULTS_COMPUTED_TAG]}"
              f" result(s) computed, {run.tags[RESULTS_KEPT_TAG]} already current and kept"
              f" (run {run.run_id[:8]})", flush=True)
    for key, stage, reason in failed:
        print(f"  failed: {key} at {stage}: {reason}", file=sys.stderr, flush=True)
    if failed or instance is None or run.status != DagsterRunStatus.FAILURE:
        return
    from voiceman_pipeline.storage import masked, postgres_url

    events = [r.event_log_entry.dagster_event for r in instance.get_records_for_run(
        run.run_id, of_type={DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE}).records]
    errors = [e.event_specific_data.error for e in events if getattr(e.event_specific_data, "error", None)]
    error = errors[0] if errors else None
    while error is not None and error.cause is not None:  # past Dagster's wrappers, to what raised
        error = error.cause
    if error is not None and error.message.strip():
        why = error.message.strip().splitlines()[0]
    else:  # no error recorded: the failure event's own words
        why = (events[-1].message if events else None) or "no reason recorded"
    if url := postgres_url():
        why = why.replace(url, masked(url))
    print(f"  run {run.run_id[:8]} failed outside any recording: {why}; its recordings are left"
          " for voiceman retry-failed", file=sys.stderr, flush=True)


def _braked(brake, finished: list, not_started: list[list[str]], wanted: set[str]) -> None:
    from voiceman_pipeline.brake import HOW_TO_CONTINUE, run_counts

    left = sum(1 for batch in not_started for key in batch if key in wanted)
    print(f"Stopped by the {brake.reason(*run_counts(finished))}: {left} recording(s) "
          f"not started. {HOW_TO_CONTINUE}.", file=sys.stderr, flush=True)


def _side_by_side(instance, batches, wanted, workers: int, run_config, source, brake, bar) -> bool:
    """``materialize_batches`` with ``workers`` worker processes: each idle
    worker gets the next batch, while the brake allows; finished runs are
    reported as they come in. Ctrl+C / SIGTERM: every busy worker's run is
    canceled (the worker forwards nothing partial), then Stopped is raised."""
    import queue

    from dagster import DagsterRunStatus

    from voiceman_pipeline import runs
    from voiceman_pipeline.brake import run_counts
    from voiceman_pipeline.workers import WorkerPool

    stop = {"requested": False}

    def on_stop(_signum, _frame):  # handled in the loop below: no message is lost
        stop["requested"] = True

    handlers = {signum: signal.signal(signum, on_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    pool = WorkerPool(workers)
    ok, finished, canceled, pending = True, [], [], list(batches)
    try:
        while pending or pool.busy():
            if stop["requested"]:
                pending = []  # no further batch; busy workers are stopped below
                if sent := pool.interrupt_busy(instance):  # said at once: the stop itself can take seconds
                    print(f"Stopping: canceling {sent} run(s) in progress. Each ends once its engine is"
                          " done with the piece of audio in hand (a transcript: the utterance being"
                          " decoded); nothing partial is kept.", file=sys.stderr, flush=True)
            for worker in pool.idle():
                if not pending:
                    break
                if brake.tripped(*run_counts(finished)):
                    _braked(brake, finished, pending, wanted)
                    ok, pending = False, []  # runs under way finish
                    break
                batch = pending.pop(0)
                _announce(batch, wanted)
                worker.batch = batch
                worker.send({"batch": batch, "run_config": run_config, "source": source})
            try:
                worker, message = pool.messages.get(timeout=0.5)
            except queue.Empty:
                continue
            if message is None:  # the worker exited
                if worker.batch is not None and not stop["requested"]:
                    print(f"  worker pid {worker.pid} ended (exit code {worker.process.returncode}) "
                          f"during its run over {worker.batch[0]} .. {worker.batch[-1]}; no further "
                          f"batch starts. Run the same command again to finish the rest.",
                          file=sys.stderr, flush=True)
                    runs.clean_up(instance, say=lambda line: print(line, file=sys.stderr))
                    ok, pending = False, []
                elif worker.batch is None and not stop["requested"] and not pool.idle() and not pool.busy():
                    raise RuntimeError(f"the worker processes ended (exit code {worker.process.returncode}); "
                                       f"see the messages above")
                worker.batch = None
            elif "progress" in message:
                bar.note(*message["progress"])
            elif "say" in message:
                print(message["say"], flush=True)
            elif "done" in message:
                batch, worker.batch = worker.batch, None
                done = message["done"]
                if done["run_id"] is None:
                    continue  # stopped before its run started
                run = instance.get_run_by_id(done["run_id"])
                finished.append(run)
                _report(run, done["failed"], batch, instance)
                if done["status"] == DagsterRunStatus.CANCELED.value:
                    canceled.append(done["run_id"][:8])
                    stop["requested"] = True  # stopped from elsewhere: stop as here
                ok = ok and done["success"]
    finally:
        pool.close()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    if stop["requested"]:
        if len(canceled) > 1:
            raise Stopped(f"runs {', '.join(canceled)} were canceled")
        raise Stopped(f"run {canceled[0]} was canceled" if canceled else "")
    return ok


def failed_recordings(events) -> list[tuple[str, str, str]]:
    """(recording, stage, reason) of each recording a run's events say failed."""
    from voiceman_pipeline.assets.pipeline import ERROR_KEY, FAILED_STAGE_KEY

    found = {}
    for event in events:
        if event.event_type_value != "ASSET_OBSERVATION":
            continue
        observation = event.event_specific_data.asset_observation
        metadata = observation.metadata
        stage = metadata.get(FAILED_STAGE_KEY)
        if stage is None or stage.value != observation.asset_key.to_user_string():
            continue  # a later stage's "not run" note
        found[observation.partition] = (stage.value, str(metadata[ERROR_KEY].value))
    return [(key, stage, reason) for key, (stage, reason) in found.items()]


def retry_failed(instance, store, batch_size: int, run_config: dict, workers: int = 1) -> int:
    """Finish every recording Dagster's storage lists as failed, and every one
    an earlier run left unfinished (a stopped ``retry-failed`` leaves some that
    no longer read failed): the whole chain is selected, and what is already
    current is not computed again."""
    from voiceman_pipeline.status import recording_statuses

    keys = partition_keys(instance)
    # A retired recording reads "retired", not failed; unfinished_recordings leaves it out too.
    failed = [row.key for row in recording_statuses(instance, store, keys) if row.failed]
    failed += [key for key in unfinished_recordings(instance, keys) if key not in failed]
    hopeless = unchanged_bad_files(instance, store, failed)
    if hopeless:
        print(f"{len(hopeless)} recording(s) whose file could not be taken in and has not "
              f"changed since are not retried (replace the file to retry): {', '.join(hopeless)}")
        failed = [key for key in failed if key not in hopeless]
    if not failed:
        print("No other failed recordings." if hopeless else "No failed recordings.")
        return 0
    ok = materialize_batches(instance, failed, batch_size, run_config, source="retry", workers=workers)
    materialize_summary(instance, run_config)
    print_status(instance, store, failed)
    return 0 if ok else 1


def unchanged_bad_files(instance, store, keys: list[str]) -> list[str]:
    """Recordings whose intake failed permanently (corrupt, truncated, not audio)
    and whose file still has the content that failed: retrying cannot help."""
    from voiceman_pipeline.audio_io import sha256_file
    from voiceman_pipeline.errors import PermanentError
    from voiceman_pipeline.inbox import find_recording
    from voiceman_pipeline.sensors import recorded_intakes

    hopeless = []
    for key, known in recorded_intakes(instance, keys).items():
        if not known.failed_permanently:
            continue
        try:
            if sha256_file(find_recording(store.inbox_dir, key)) == known.sha256:
                hopeless.append(key)
        except (OSError, PermanentError):
            continue  # gone or unsafe: retrying says so
    return hopeless


def recordings_of(dead_runs, all_keys: list[str]) -> list[str]:
    """The recordings of runs whose process died (each covers a range of keys)."""
    found = []
    for dead in dead_runs:
        first_last = dead.partition_range()
        if first_last and all(key in all_keys for key in first_last):
            found += all_keys[all_keys.index(first_last[0]) : all_keys.index(first_last[1]) + 1]
    return found


def unfinished_recordings(instance, keys: list[str], failed_too: Collection[str] = (),
                          by_stage: dict | None = None) -> list[str]:
    """Recordings part done and left so: some stage has no result, none failed
    and no run is at them ("pending" in ``voiceman status``). A stopped
    (canceled) run leaves its recordings so, as does ``voiceman ingest``.
    ``failed_too``: these also when a stage failed (a crashed run's, which
    reads failed once cleaned up), but not when done. Never a retired one.
    ``by_stage``: ``status.partition_statuses`` of ``keys``, where already read."""
    from dagster import AssetPartitionStatus

    from voiceman_pipeline.retire import retirements
    from voiceman_pipeline.status import partition_statuses

    by_stage = (by_stage or partition_statuses(instance, keys)).values()
    done, failed = AssetPartitionStatus.MATERIALIZED, AssetPartitionStatus.FAILED
    failed_too, found = set(failed_too), []
    retired = retirements(instance, keys)  # set aside for good: not unfinished
    for key in keys:
        if key in retired:
            continue
        statuses = {stage.get(key) for stage in by_stage}
        allowed = {None, done, failed} if key in failed_too else {None, done}
        if statuses != {done} and statuses <= allowed:
            found.append(key)
    return found


def materialize_summary(instance, run_config: dict) -> None:
    """Refresh the summary table; a failure (a full disk) is one line, not the end."""
    from voiceman_pipeline import runs
    from voiceman_pipeline.definitions import defs
    from voiceman_pipeline.jobs import source_tags

    result = defs.resolve_job_def("summary_job").execute_in_process(
        instance=instance,
        run_config=run_config,
        tags={**runs.launch_tags(), **source_tags("cli")},
        raise_on_error=False,
    )
    for event in result.get_step_failure_events():
        error = event.step_failure_data.error
        cause = error.cause or error
        print(f"  summary not refreshed: {cause.message.strip().splitlines()[-1]}", file=sys.stderr)


def summary_behind(instance) -> bool:
    """True when a recording's report was materialized, or a stage's failure
    observed, after the newest result the summary table shows (however it was
    last built: by the UI, `dagster asset materialize`, the daemon, or a command
    stopped before its summary), or when it lists a recording no longer
    registered (one deleted in the UI)."""
    from voiceman_pipeline.assets.summary import built_through, lists_unregistered, newest_result_event

    return (newest_result_event(instance) > (built_through(instance) or 0)
            or lists_unregistered(instance, partition_keys(instance)))


def _not_done(instance, keys: list[str]) -> set[str]:
    """Those of ``keys`` some stage has not materialized (failed, in progress
    or never run), by Dagster's partition statuses as ``voiceman status`` reads them."""
    from dagster import AssetPartitionStatus

    from voiceman_pipeline.status import partition_statuses

    return {
        key
        for statuses in partition_statuses(instance, keys).values()
        for key in keys
        if statuses.get(key) != AssetPartitionStatus.MATERIALIZED
    }


def in_progress(instance, keys: list[str], by_stage: dict | None = None) -> list[str]:
    """Those of ``keys`` some stage of which a run in progress has planned and not
    yet done, by Dagster's partition statuses as ``voiceman status`` reads them
    (``by_stage``, where already read)."""
    from dagster import AssetPartitionStatus

    from voiceman_pipeline.status import partition_statuses

    by_stage = (by_stage or partition_statuses(instance, keys)).values()
    return [key for key in keys if any(s.get(key) == AssetPartitionStatus.IN_PROGRESS for s in by_stage)]


def partition_keys(instance) -> list[str]:
    """Every registered recording, in the order partitions were added
    (``instance``: a DagsterInstance or a DynamicPartitionsStore)."""
    from voiceman_pipeline.partitions import audio_files

    return list(instance.get_dynamic_partitions(audio_files.name))


def _custody(row) -> str:
    """A status row's custody column: earlier contents kept aside, result files
    found altered and kept aside, a recording gone, a result file damaged."""
    notes = [f"REPLACED {row.replaced}x: earlier results in superseded/"] if row.replaced else []
    notes += [f"ALTERED {row.altered} result(s) found edited or damaged: kept in altered/"] if row.altered else []
    notes += ["RECORDING GONE FROM INBOX: see voiceman verify"] if row.gone else []
    notes += [f"UNREADABLE {', '.join(row.unreadable)}: see voiceman verify"] if row.unreadable else []
    return "; ".join(notes) or "-"


# What "in progress" reads as for a recording whose run's process died (``runs.dead_runs``).
INTERRUPTED = "interrupted: its run's process died; the next voiceman run finishes it"


def print_status(instance, store, keys: list[str], partitions=None, interrupted: Collection[str] = (),
                 by_risk: bool = False) -> None:
    """Table: key, duration, status (last stage reached / failure), outputs
    folder. ``partitions``: the loader that read ``keys``, if any (they are read once);
    ``interrupted``: recordings of runs whose process died (``INTERRUPTED``, not "in progress");
    ``by_risk``: those not done first, then the done ones by ``RecordingStatus.scores``
    (each part in key order where equal, as the UI's summary table)."""
    from dataclasses import replace

    from voiceman_pipeline.status import recording_statuses

    rows = [replace(row, status=INTERRUPTED) if row.key in interrupted and row.status == "in progress"
            else row for row in recording_statuses(instance, store, keys, partitions=partitions)]
    if by_risk:  # ties in key order, as the summary's
        scored = sorted((r for r in rows if r.scores), key=lambda r: (-r.scores[0], -r.scores[1], r.key))
        rows = sorted((r for r in rows if not r.scores), key=lambda r: r.key) + scored
    headers = ("partition key", "duration_s", "status", "risk", "outputs", "custody")
    table = [headers] + [
        (
            r.key,
            f"{r.duration_s:.2f}" if r.duration_s is not None else "-",
            r.status,
            r.risk,
            r.outputs,
            _custody(r),
        )
        for r in rows
    ]
    widths = [max(map(len, column)) for column in zip(*table)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)  # each cell left-aligned in its column's width
    lines = [line.format(*row) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    print("\n".join(lines))  # one write: ten thousand print calls cost more than the table


if __name__ == "__main__":
    sys.exit(command())
