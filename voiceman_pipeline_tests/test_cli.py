"""Operator commands in subprocesses, against a temporary DAGSTER_HOME."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

from voiceman_pipeline_tests.conftest import REPO, SAMPLE_WAVS

BIN = Path(sys.executable).parent


def run(args, env, check=True):
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if check and out.returncode != 0:
        raise AssertionError(f"{args} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return out


def printed_last(script: str, env) -> str:
    """The last line a Python ``script`` prints, run in its own interpreter."""
    return run([sys.executable, "-c", script], env).stdout.splitlines()[-1]


@pytest.mark.storage
def test_verify_advice_pasted_into_a_clean_shell_puts_the_result_right(env):
    """Its data folder not under the home (VOICEMAN_DATA_DIR): the line verify
    prints carries it, and the storage URL as a reference to the shell's variable."""
    (Path(env["VOICEMAN_DATA_DIR"]) / "inbox" / "call.wav").write_bytes(SAMPLE_WAVS[0].read_bytes())
    run([BIN / "voiceman", "run", "--settle", "0"], env)
    forensic = Path(env["VOICEMAN_DATA_DIR"]) / "outputs" / "call.wav" / "forensic.json"
    forensic.write_text(forensic.read_text().replace('"risk_level": "', '"risk_level": "edited-', 1))
    verify = run([BIN / "voiceman", "verify"], env, check=False)
    assert verify.returncode == 1
    (line,) = [line for line in verify.stdout.splitlines() if line.startswith("to compute call.wav's")]
    command = line.split(": ", 1)[1]
    assert "VOICEMAN_DATA_DIR=" in command
    assert ("VOICEMAN_PG_URL=\"${VOICEMAN_PG_URL:?" in command) == ("VOICEMAN_PG_URL" in env)
    assert "@" not in command  # no password printed
    # A shell with nothing of this one's but PATH (and, where it is set, the storage URL).
    clean = {"PATH": "/usr/bin:/bin", **{k: env[k] for k in ("VOICEMAN_PG_URL",) if k in env}}
    done = subprocess.run(["bash", "-c", command], env=clean, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "edited-" not in forensic.read_text()
    assert run([BIN / "voiceman", "verify"], env).stdout.startswith("all 1 recordings")

    # The summary table is checked too: an edited one is named, and built again.
    table = Path(env["VOICEMAN_DATA_DIR"]) / "outputs" / "summary.csv"
    table.write_text(table.read_text().replace(",done,", ",edited,", 1))
    verify = run([BIN / "voiceman", "verify"], env, check=False)
    assert verify.returncode == 1 and verify.stdout.startswith("summary table: summary.csv: recorded "), verify.stdout
    (line,) = [line for line in verify.stdout.splitlines() if line.startswith("to build the summary table")]
    done = subprocess.run(["bash", "-c", line.split(": ", 1)[1]], env=clean, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ",done," in table.read_text() and ",edited," not in table.read_text()
    assert run([BIN / "voiceman", "verify"], env).stdout.startswith("all 1 recordings")


def test_ingest_then_dagster_cli_materializes_one_partition(env, monkeypatch):
    """With a home of its own holding the shipped dagster.yaml (its storage paths
    relative), `dagster` run from the repository root, as the README says, and
    `voiceman` use the one storage in that home."""
    home, data = Path(env["DAGSTER_HOME"]), Path(env["VOICEMAN_DATA_DIR"])
    shutil.copyfile(REPO / "dagster.yaml", home / "dagster.yaml")
    (data / "inbox" / "call one.wav").write_bytes(SAMPLE_WAVS[0].read_bytes())
    out = run([BIN / "voiceman", "ingest", "--settle", "0.2"], env)
    assert "1 ready to process (1 new, registered); `voiceman run` or the daemon's inbox_sensor" in out.stdout
    status = run([BIN / "voiceman", "status"], env).stdout
    key = status.splitlines()[2].split()[0]  # first row under the header
    assert key.startswith("call_one-") and key.endswith(".wav")

    cli = [BIN / "dagster", "asset", "materialize", "-m", "voiceman_pipeline.definitions"]
    run(cli + ["--select", "audio", "--partition", key], env)
    intake = json.loads((data / "outputs" / key / "audio.json").read_text())
    assert intake["source_path"].endswith("call one.wav")
    # Any selection finishes the chain of a recording that has no results yet.
    assert (data / "outputs" / key / "report.json").is_file()
    # `voiceman run` then has nothing to process, but brings the summary up to
    # the results made outside it.
    again = run([BIN / "voiceman", "run", "--settle", "0.2"], env)
    assert "Nothing new to process." in again.stdout
    rows = (data / "outputs" / "summary.csv").read_text().splitlines()
    assert [row.split(",")[:2] for row in rows[1:]] == [[key, "done"]]
    assert (home / "data" / "dagster" / "storage" / "history" / "runs.db").is_file()

    # A run still at the recording (taken in, its report not yet made): `voiceman run`
    # leaves it to that run and says so.
    from dagster import AssetKey, DagsterInstance, DagsterRunStatus

    from voiceman_pipeline.definitions import defs

    monkeypatch.setenv("DAGSTER_HOME", str(home))  # dagster.yaml's relative paths are taken from it
    with DagsterInstance.get() as instance:
        instance.create_run_for_job(defs.resolve_job_def("analysis_job"), status=DagsterRunStatus.STARTED,
                                    asset_selection={AssetKey("report")}, tags={"dagster/partition": key})
    busy = run([BIN / "voiceman", "run", "--settle", "0.2"], env)
    assert ("Nothing new to process. 1 recording(s) are being processed by another run; left to it."
            in busy.stdout), busy.stdout

    unknown = run(cli + ["--select", "audio", "--partition", "no-such-file.wav"], env, check=False)
    assert unknown.returncode != 0
    assert "no-such-file.wav" in unknown.stderr + unknown.stdout


def test_a_run_does_not_try_again_a_failed_recording_it_was_not_asked_for(env):
    """Recordings to process on both sides of an unchanged failed one: the
    runs' partition ranges leave it out (a range covering it tried it again,
    counted its failure and exited 1), while done ones between may be covered."""
    inbox = Path(env["VOICEMAN_DATA_DIR"]) / "inbox"
    for name, sample in (("a.wav", 0), ("b.wav", 1), ("c.wav", 2)):
        (inbox / name).write_bytes(SAMPLE_WAVS[sample].read_bytes())
    (inbox / "empty.wav").write_bytes(b"")
    env = {**env, "VOICEMAN_WORKERS": "1"}  # runs one after another: as many on any machine
    first = run([BIN / "voiceman", "run", "--settle", "0"], env, check=False)
    assert first.returncode == 1 and "empty.wav" in first.stdout + first.stderr
    (inbox / "a.wav").write_bytes(SAMPLE_WAVS[1].read_bytes())  # changed: before empty.wav
    (inbox / "d.wav").write_bytes(SAMPLE_WAVS[2].read_bytes())  # new: after it
    second = run([BIN / "voiceman", "run", "--settle", "0"], env)
    assert "empty.wav" not in second.stdout + second.stderr
    covered = printed_last(
        "from dagster import DagsterInstance\n"
        "from voiceman_pipeline.cli import partition_keys\n"
        "i = DagsterInstance.get(); keys = partition_keys(i)\n"
        "runs = [r for r in i.get_runs() if r.job_name == 'analysis_job']\n"
        "spans = [keys[keys.index(r.tags['dagster/asset_partition_range_start']):"
        "keys.index(r.tags['dagster/asset_partition_range_end']) + 1] for r in runs]\n"
        "print(len(runs), sum('empty.wav' in s for s in spans))", env)
    assert covered == "3 1"  # the first run's, and none of the two after it


def test_run_processes_the_samples_and_prints_the_table(env):
    out = run([BIN / "voiceman", "run", "--samples", "--settle", "0.2"], env)
    lines = out.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("partition key"))
    rows = lines[header + 2 :]
    assert sorted(row.split()[0] for row in rows) == sorted(p.name for p in SAMPLE_WAVS)
    assert all(row.split()[2] == "done" for row in rows)
    data = Path(env["VOICEMAN_DATA_DIR"])
    assert (data / "outputs" / "summary.csv").is_file()
    # Its storage closed with it: every database whole in its own file.
    assert not list(Path(env["DAGSTER_HOME"]).rglob("*.db-wal"))
    # A second run finds nothing new and only prints the status.
    again = run([BIN / "voiceman", "run", "--settle", "0.2"], env)
    assert "Nothing new to process." in again.stdout
    # The evidence and every result match what was recorded; then one is edited.
    assert "match what was recorded" in run([BIN / "voiceman", "verify"], env).stdout
    report = data / "outputs" / SAMPLE_WAVS[0].name / "report.json"
    report.write_text(report.read_text().replace("minimal", "critical"))
    edited = run([BIN / "voiceman", "verify"], env, check=False)
    assert edited.returncode == 1 and f"{SAMPLE_WAVS[0].name}" in edited.stdout + edited.stderr


def test_retry_failed_reruns_only_the_failed_recordings(env):
    inbox = Path(env["VOICEMAN_DATA_DIR"]) / "inbox"
    (inbox / "good.wav").write_bytes(SAMPLE_WAVS[0].read_bytes())
    (inbox / "late.wav").write_bytes(SAMPLE_WAVS[1].read_bytes()[:20_000])  # cut off
    first = run([BIN / "voiceman", "run", "--settle", "0.2"], env, check=False)
    assert first.returncode == 1
    assert "truncated" in first.stderr
    assert "Traceback" not in first.stderr + first.stdout  # one line per failed recording
    rows = {line.split()[0]: line for line in first.stdout.splitlines()[-2:]}
    assert "failed at audio" in rows["late.wav"] and " done " in rows["good.wav"]

    # Retrying the same cut-off bytes cannot help: not retried, and said so.
    same = run([BIN / "voiceman", "retry-failed"], env)
    assert "not retried (replace the file to retry): late.wav" in same.stdout
    assert "run:" not in same.stdout

    (inbox / "late.wav").write_bytes(SAMPLE_WAVS[1].read_bytes())  # the full copy arrived
    again = run([BIN / "voiceman", "retry-failed"], env)
    assert "run: 1 recording(s) late.wav .. late.wav" in again.stdout
    assert " done " in again.stdout.splitlines()[-1]
    assert "No failed recordings." in run([BIN / "voiceman", "retry-failed"], env).stdout


def test_two_workers_run_batches_side_by_side_each_result_once(env):
    """``--workers 2``: batches in two worker processes, each run tagged with its
    own worker's pid; a corrupt file fails alone; every result computed once.
    Four recordings, the default batch size (8): shared 2 and 2, not one run of 4."""
    from dagster import DagsterInstance

    from voiceman_pipeline import runs
    from voiceman_pipeline.assets.stages import STAGES
    from voiceman_pipeline_tests.test_cli_stop import materialized

    inbox = Path(env["VOICEMAN_DATA_DIR"]) / "inbox"
    shortest = sorted(SAMPLE_WAVS, key=lambda wav: wav.stat().st_size)[:3]
    good = [wav.name for wav in shortest]
    for wav in shortest:
        (inbox / wav.name).write_bytes(wav.read_bytes())
    (inbox / "broken.wav").write_bytes(b"RIFF" + bytes(range(256)) * 40)  # not audio
    out = run([BIN / "voiceman", "run", "--settle", "0.2", "--workers", "2"], env, check=False)
    assert out.returncode == 1, out.stdout + out.stderr  # one recording failed
    assert "Traceback" not in out.stdout + out.stderr
    assert out.stdout.count("run: 2 recording(s) ") == 2
    assert [line.split()[1] for line in out.stderr.splitlines() if "failed: " in line] == ["broken.wav"]
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        assert materialized(instance) == {(stage.name, key): 1 for stage in STAGES for key in good}
        analysis = [r for r in instance.get_runs() if r.job_name == "analysis_job"]
        (summary,) = [r for r in instance.get_runs() if r.job_name == "summary_job"]
    workers = {r.tags[runs.PID_TAG] for r in analysis}
    assert len(analysis) == 2 and len(workers) == 2
    assert summary.tags[runs.PID_TAG] not in workers  # the command's own run: its own pid
    rows = {line.split()[0]: line for line in out.stdout.splitlines()[-4:]}
    assert "failed at audio" in rows["broken.wav"]
    assert all(" done " in rows[key] for key in good)


def test_a_job_is_not_shared_out_when_the_analysis_step_is_in_the_gpu_pool(env):
    """With the analysis step in pool ``gpu`` (one such step at a time), two
    workers would only wait for each other: three recordings stay one run."""
    inbox = Path(env["VOICEMAN_DATA_DIR"]) / "inbox"
    for wav in sorted(SAMPLE_WAVS, key=lambda wav: wav.stat().st_size)[:3]:
        (inbox / wav.name).write_bytes(wav.read_bytes())
    out = run([BIN / "voiceman", "run", "--settle", "0", "--workers", "2"],
              {**env, "VOICEMAN_ANALYSIS_POOL": "gpu"})
    assert out.stdout.count("run: 3 recording(s) ") == 1 and out.stdout.count("run: ") == 1, out.stdout


def test_the_brake_with_two_workers_counts_runs_as_they_finish(env):
    """Eight broken files, one per run, two workers: the first run to finish
    (1 of 1 failed, under the minimum of 2) lets a third start; the second
    trips the brake, so no fourth starts; the third still finishes."""
    from dagster import DagsterInstance

    inbox = Path(env["VOICEMAN_DATA_DIR"]) / "inbox"
    for i in range(8):
        (inbox / f"bad{i}.wav").write_bytes(b"RIFF not really a wave file" * 10)
    settings = {"VOICEMAN_BRAKE_MIN_RECORDINGS": "2", "VOICEMAN_WORKERS": "2"}
    out = run([BIN / "voiceman", "run", "--settle", "0", "--batch-size", "1"], {**env, **settings},
              check=False)
    assert out.returncode == 1
    assert "Stopped by the error-rate brake: 2 of 2 recordings failed (100% > 50%): " \
           "5 recording(s) not started" in out.stderr
    assert out.stdout.count("run: 1 recording(s)") == 3
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        assert len([r for r in instance.get_runs() if r.job_name == "analysis_job"]) == 3


def voiceman_error_line(out, returncode: int) -> str:
    """The one ``voiceman: ...`` line a refused command printed (no traceback)."""
    assert out.returncode == returncode, out.stderr
    assert "Traceback" not in out.stderr
    (line,) = [line for line in out.stderr.splitlines() if line.startswith("voiceman: ")]
    return line


def test_a_broken_storage_is_one_clear_line_not_a_traceback(env):
    home = Path(env["DAGSTER_HOME"])
    (home / "dagster.yaml").write_text(
        f"storage:\n  sqlite:\n    base_dir: {home / 'storage'}\n"
    )
    run([BIN / "voiceman", "status"], env)  # creates the storage
    for database in (home / "storage").rglob("*.db"):
        database.write_bytes(b"this is not a database" * 100)  # as a disk fault leaves it
    out = run([BIN / "voiceman", "status"], env, check=False)
    line = voiceman_error_line(out, 3)
    assert "Dagster's storage under" in line and "MiB free" in line


def test_schema_stamps_dagster_cannot_use_are_one_clear_line_and_left_as_they_are(env):
    # Two stamps in runs.db that are not the pair the creation race leaves
    # (which is repaired, test_sqlite_pool.py): Dagster's alembic check fails.
    run([BIN / "voiceman", "status"], env)  # creates the storage
    runs_db = Path(env["DAGSTER_HOME"]) / "storage" / "history" / "runs.db"
    with closing(sqlite3.connect(runs_db)) as connection, connection:
        connection.execute("INSERT INTO alembic_version VALUES ('0123456789ab')")
    out = run([BIN / "voiceman", "status"], env, check=False)
    line = voiceman_error_line(out, 3)
    assert "Dagster's storage under" in line and "more than one head" in line
    with closing(sqlite3.connect(runs_db)) as connection:
        assert len(connection.execute("SELECT * FROM alembic_version").fetchall()) == 2


def test_a_home_dagster_cannot_use_is_one_line_naming_what_to_fix(env, tmp_path):
    home = Path(env["DAGSTER_HOME"])
    shipped = (home / "dagster.yaml").read_text()
    # A file where dagster.yaml's storage folder must go: Dagster cannot create it.
    (home / "storage").write_text("not a folder")
    line = voiceman_error_line(run([BIN / "voiceman", "status"], env, check=False), 3)
    assert f"{home / 'storage'} is a file, not a folder" in line
    (home / "storage").unlink()
    # A dagster.yaml Dagster rejects, by its schema and as YAML.
    for broken, says in ((shipped + "bogus_key: 1\n", 'unexpected config entry "bogus_key"'),
                         (shipped + "storage: [\n", "line ")):
        (home / "dagster.yaml").write_text(broken)
        line = voiceman_error_line(run([BIN / "voiceman", "status"], env, check=False), 2)
        assert f"{home}/dagster.yaml cannot be used" in line and says in line
        assert "Expected:" not in line  # not the list of every key Dagster knows
    # A home with no dagster.yaml: Dagster would go on with its own defaults.
    empty = tmp_path / "empty_home"
    empty.mkdir()
    for where in (empty, tmp_path / "no_such_folder"):
        line = voiceman_error_line(
            run([BIN / "voiceman", "status"], {**env, "DAGSTER_HOME": str(where)}, check=False), 2
        )
        assert f"DAGSTER_HOME={where}" in line
    assert not any(empty.iterdir())  # nothing was made there
    # Nothing of a storage was made while refused; with dagster.yaml back, it opens.
    assert not list(home.rglob("*.db"))
    (home / "dagster.yaml").write_text(shipped)
    run([BIN / "voiceman", "status"], env)
    assert list(home.rglob("*.db"))


def test_a_reader_that_stops_reading_ends_a_command_quietly(env):
    """`voiceman status | head`: the command's output pipe is closed before it
    writes; it ends with SIGPIPE's usual status and no traceback."""
    for command in (["status"], ["verify"]):
        child = subprocess.Popen([BIN / "voiceman", *command], cwd=REPO, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        child.stdout.close()  # before the command has started up, let alone printed
        stderr = child.stderr.read()
        assert child.wait(timeout=120) == 141, stderr
        assert stderr == ""


def test_a_bad_setting_is_one_line_naming_it_and_nothing_is_touched(env):
    data = Path(env["VOICEMAN_DATA_DIR"])
    (data / "inbox").mkdir(parents=True, exist_ok=True)
    (data / "inbox" / "a.wav").write_bytes(SAMPLE_WAVS[0].read_bytes())
    for name, value in (("VOICEMAN_WORKERS", "-1"), ("VOICEMAN_STT_ENGINE", "no-such-engine"),
                        ("VOICEMAN_OUTPUT_MODE", "abc"), ("VOICEMAN_OUTPUT_MODE", "0644x"),
                        ("VOICEMAN_MAX_FILE_MB", "0"), ("VOICEMAN_MAX_FILE_MB", "-5"),
                        ("VOICEMAN_MAX_FILE_MB", "inf"), ("VOICEMAN_SENSOR_INTERVAL_S", "-5"),
                        ("VOICEMAN_BATCH_SIZE", "abc"), ("VOICEMAN_BRAKE_FAILURE_RATE", "2"),
                        ("VOICEMAN_STT_LANGUAGE", "ko"),  # pocketsphinx (the default) is English only
                        ("VOICEMAN_MEMORY_THRESHOLD_PCT", "150"), ("VOICEMAN_GPU_THRESHOLD_PCT", "-1"),
                        ("VOICEMAN_GPU_THRESHOLD_PCT", "nan"), ("VOICEMAN_CRITICAL_THRESHOLD_PCT", "101"),
                        ("VOICEMAN_MEMORY_SAFETY_MARGIN", "-0.5"), ("VOICEMAN_MEMORY_SAFETY_MARGIN", "nan")):
        out = run([BIN / "voiceman", "run", "--settle", "0"], {**env, name: value}, check=False)
        line = voiceman_error_line(out, 2)
        assert re.findall(r"VOICEMAN_\w+", line) == [name] and f"={value}" in line.replace("'", "")
    # A data folder that is a file (or under one): one line, not a traceback.
    (data.parent / "a-file").write_text("")
    for where in ("a-file", "a-file/data", "a-file/x/y"):
        value = str(data.parent / where)
        out = run([BIN / "voiceman", "status"], {**env, "VOICEMAN_DATA_DIR": value}, check=False)
        assert voiceman_error_line(out, 2) == f"voiceman: VOICEMAN_DATA_DIR={value}: {data.parent / 'a-file'}" \
            " is a file, not a folder."
    # Refused before anything was opened: no storage made, no result written.
    assert not list(Path(env["DAGSTER_HOME"]).rglob("*.db"))
    assert not (data / "outputs").exists() or not any((data / "outputs").iterdir())
    # A data folder not there (a typo, an unmounted share) is said, not read as an empty inbox.
    out = run([BIN / "voiceman", "run", "--settle", "0"], {**env, "VOICEMAN_DATA_DIR": str(data) + "-typo"})
    assert f"the inbox '{data}-typo/inbox' is not there (or not a folder): nothing to take in" in out.stderr


def test_reading_commands_do_not_wait_for_a_command_taking_in_files(env):
    data = Path(env["VOICEMAN_DATA_DIR"])
    (data / "inbox" / "a.wav").write_bytes(SAMPLE_WAVS[0].read_bytes())
    run([BIN / "voiceman", "run", "--settle", "0"], env)  # one recording done, one run to report
    waiting = "waiting for another voiceman command to finish taking in files"
    # Held as a `voiceman run` holds it while it hashes and registers a large inbox.
    with open(Path(env["DAGSTER_HOME"]) / ".voiceman-intake.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for command, printed in (("status", "a.wav"), ("verify", "match what was recorded"),
                                 ("report", "Batch report")):
            out = subprocess.run([BIN / "voiceman", command], cwd=REPO, env=env, capture_output=True,
                                 text=True, timeout=120)
            assert out.returncode == 0 and waiting not in out.stderr, (command, out.stderr)
            assert printed in out.stdout
        # A command that takes in files still waits for it.
        ingest = subprocess.Popen([BIN / "voiceman", "ingest", "--settle", "0"], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert ingest.stderr.readline().strip() == waiting
            assert ingest.poll() is None
        finally:
            ingest.kill()
            ingest.communicate()


def test_status_loads_neither_the_code_location_nor_an_engine(env):
    """``voiceman status`` only reads storage and files: it imports neither
    definitions.py (the summary's pandas, the run machinery) nor an engine's
    libraries, which would cost seconds before the first row."""
    heavy = ("pandas", "matplotlib", "torch", "faster_whisper", "transformers", "librosa", "av")
    script = (
        "import sys\n"
        "from voiceman_pipeline import cli\n"
        "code = cli.main(['status'])\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}\n"
        "                or m == 'voiceman_pipeline.definitions')\n"
        "print(code, loaded)\n"
    )
    assert printed_last(script, env) == "0 []"


def test_the_command_leaves_python_no_last_collection_to_make(env):
    """The ``voiceman`` script is ``cli.command``: it runs the command, then
    puts every object still alive out of the garbage collector's reach, so
    the interpreter's exit does not walk them all once more (the seconds it
    saves are measured in bench/overhead.py, not here)."""
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "voiceman"]
    assert script.value == "voiceman_pipeline.cli:command"
    probe = (
        "import gc, sys\n"
        "from voiceman_pipeline import cli\n"
        "sys.argv = ['voiceman', 'status']\n"
        "alive = len(gc.get_objects())\n"
        "code = cli.command()\n"
        "print(code, gc.get_count()[0] < 1000, gc.get_freeze_count() >= alive)\n"
    )
    assert printed_last(probe, env) == "0 True True"


def test_a_command_freezes_what_its_startup_built_and_collects_what_came_after(env):
    """Startup (Dagster, the storage, the code location) is imported with the
    collector paused, then frozen: the collections that follow skip those
    objects (the time saved was measured with gc.callbacks; see
    cli.collection_paused). Garbage made before the command is collected, not
    frozen, and the collector is on again for the work."""
    probe = (
        "import gc, weakref\n"
        "from voiceman_pipeline import cli\n"
        "class Node: pass\n"
        "cycle = Node(); cycle.me = cycle; earlier = weakref.ref(cycle)\n"
        "gc.collect()\n"  # into the oldest generation: only a full collection frees it
        "del cycle\n"
        "before = gc.get_freeze_count()\n"
        "code = cli.main(['ingest', '--settle', '0'])\n"
        "later = Node(); later.me = later; after = weakref.ref(later); del later\n"
        "gc.collect()\n"
        "print(code, before, gc.get_freeze_count() > 100_000, earlier() is None,"
        " gc.isenabled(), after() is None)\n"
    )
    assert printed_last(probe, env) == "0 0 True True True True"


@pytest.mark.storage
def test_status_staleness_is_dagsters_from_a_few_queries(instance, store, monkeypatch):
    """``voiceman status`` decides staleness from batched records
    (status.first_stale_stages); it must name the stage that Dagster's own
    resolver (the UI's "out of date") calls stale first in chain order."""
    from dagster import materialize
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._core.loader import LoadingContextForTest

    from voiceman_pipeline.assets.stages import STAGES
    from voiceman_pipeline.definitions import defs, recording_analysis
    from voiceman_pipeline.partitions import range_tags
    from voiceman_pipeline.status import first_stale_stages, recording_statuses
    from voiceman_pipeline_tests.conftest import drop

    key = drop(store, "cards_001.wav").name
    instance.add_dynamic_partitions("audio_files", [key])
    assert materialize([recording_analysis], instance=instance, tags=range_tags([key]),
                       resources={**defs.resources, "store": store}).success
    graph = defs.resolve_asset_graph()

    class NewCode:
        """The asset graph as after an edit to one stage's code (a new code version)."""

        def __init__(self, changed):
            self.changed = changed

        def get(self, asset_key):
            node = graph.get(asset_key)
            if asset_key != self.changed:
                return node
            return type("Node", (), {"__getattr__": lambda _, name: getattr(node, name),
                                     "code_version": node.code_version + "-edited"})()

        def __getattr__(self, name):
            return getattr(graph, name)

    def dagsters_first_stale(asset_graph):
        resolver = CachingStaleStatusResolver(instance, lambda: asset_graph, LoadingContextForTest(instance))
        stale = [s.name for s in STAGES if resolver.get_status(s.key, key).value == "STALE"]
        return stale[:1]

    def no_resolver(*args):
        raise AssertionError("decided per (stage, recording) by Dagster's resolver")

    expected = [(graph, [], {})] + [  # edit transcript, then emotion
        (NewCode(s.key), [s.name], {key: s.name}) for s in (STAGES[1], STAGES[3])
    ]
    for edited, dagsters, ours in expected:
        assert dagsters_first_stale(edited) == dagsters
        with monkeypatch.context() as patched:
            patched.setattr("voiceman_pipeline.status.CachingStaleStatusResolver", no_resolver)
            assert first_stale_stages(instance, edited, [key]) == ours
    for stage in (STAGES[1], STAGES[3]):
        edited = NewCode(stage.key)
        (row,) = recording_statuses(instance, store, [key], asset_graph=edited)
        assert row.status == f"stale: re-run {stage.name}"


def test_a_run_that_failed_outside_any_recording_says_why(instance, capsys):
    """A run can fail where no recording did (its storage lost mid-run: PostgreSQL
    down for 30 s ended `voiceman run` with exit 1 and no reason). The command
    now prints the run's own error; here, a resource that refuses its config."""
    from dagster import DagsterRunStatus

    from voiceman_pipeline.cli import _report
    from voiceman_pipeline.definitions import defs

    instance.add_dynamic_partitions("audio_files", ["a.wav"])
    result = defs.resolve_job_def("analysis_job").execute_in_process(
        instance=instance, partition_key="a.wav", raise_on_error=False,
        run_config={"resources": {"memory": {"config": {"safety_margin": -1.0}}}})
    run = instance.get_run_by_id(result.run_id)
    assert run.status == DagsterRunStatus.FAILURE
    capsys.readouterr()
    _report(run, [], instance=instance)
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"  run {run.run_id[:8]} failed outside any recording: ")
    assert "safety_margin >= 0" in line and line.endswith("its recordings are left for voiceman retry-failed")


def test_run_computes_again_what_is_out_of_date_and_nothing_else(env, monkeypatch):
    """After an upgrade a stage's code version changes and `voiceman status` reads
    "stale: re-run <stage>"; `voiceman run` once said "Nothing new to process"
    then. It now computes that stage and what follows it, for those recordings only.
    (The older result is written as an earlier version would have: its code
    version tag says "forensic-1".)"""
    from dagster import AssetKey, AssetMaterialization, DagsterInstance
    from dagster._core.definitions.data_version import CODE_VERSION_TAG

    from voiceman_pipeline.assets.stages import STAGES

    inbox = Path(env["VOICEMAN_DATA_DIR"]) / "inbox"
    for name, sample in (("a.wav", 0), ("b.wav", 1)):
        (inbox / name).write_bytes(SAMPLE_WAVS[sample].read_bytes())
    env = {**env, "VOICEMAN_WORKERS": "1"}
    run([BIN / "voiceman", "run", "--settle", "0"], env)
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    with DagsterInstance.get() as instance:
        (latest,) = [r for r in instance.fetch_materializations(AssetKey("forensic"), limit=10).records
                     if r.partition_key == "a.wav"]
        mat = latest.asset_materialization
        instance.report_runless_asset_event(AssetMaterialization(
            asset_key="forensic", partition="a.wav", metadata=mat.metadata,
            tags={**mat.tags, CODE_VERSION_TAG: "forensic-1+0000000000"}))

        def counts():  # materializations per stage, both recordings
            return [len(instance.fetch_materializations(s.key, limit=100).records) for s in STAGES]

        before = counts()
    status = run([BIN / "voiceman", "status"], env).stdout
    assert re.search(r"^a\.wav .* stale: re-run forensic ", status, re.M), status
    again = run([BIN / "voiceman", "run", "--settle", "0"], env)
    assert "1 recording(s) with results out of date (1 from forensic): computing those again" in again.stdout
    with DagsterInstance.get() as instance:
        after = counts()
    # forensic and report of a.wav computed again; emotion does not read forensic.
    names = [s.name for s in STAGES]
    assert [a - b for a, b in zip(after, before)] == [int(n in ("forensic", "report")) for n in names]
    status = run([BIN / "voiceman", "status"], env).stdout
    assert "stale" not in status and status.count(" done ") == 2, status
    third = run([BIN / "voiceman", "run", "--settle", "0"], env)
    assert "Nothing new to process." in third.stdout


def test_a_library_warning_does_not_turn_on_dagster_info_lines(env):
    """dagster-postgres warns on Python's root logger while it retries a lost server;
    that set up a root handler of every level, and `voiceman` printed every INFO line
    of Dagster's step logger after it ("INFO:dagster.builtin:... Cleanup ...")."""
    script = (
        "import logging, sys\n"
        "from voiceman_pipeline.cli import warnings_only_at_the_root\n"
        "warnings_only_at_the_root()  # what the voiceman command and its workers do first\n"
        "logging.warning('Retrying failed database connection')\n"
        "from dagster import get_dagster_logger\n"
        "get_dagster_logger().info('Cleanup (after transcript): 1 services')\n"
        "get_dagster_logger().warning('memory critical while processing')\n"
    )
    out = run([sys.executable, "-c", script], env)
    assert out.stderr.splitlines() == ["Retrying failed database connection", "memory critical while processing"]


def test_a_name_that_is_not_utf8_is_named_once_escaped(instance, store, capsys):
    """`voiceman run` and `ingest` name a refused file as `validate` does: a name
    written by a Latin-1 system shows its byte as \\xe9, not doubled as \\\\xe9."""
    from voiceman_pipeline.cli import ingest_inbox

    (store.inbox_dir / os.fsdecode(b"caf\xe9 latin-1.wav")).write_bytes(b"RIFF")
    ingest_inbox(instance, store, settle_s=0, only=True)
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("skipped")]
    assert line == "skipped 'caf\\xe9 latin-1.wav': its name is not valid UTF-8 (shown with \\x escapes);" \
                   " rename the file"
