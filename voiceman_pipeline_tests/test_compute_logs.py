"""Each run's raw stdout/stderr: in its compute log files and on the terminal, with no helper process."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading

from voiceman_pipeline.compute_logs import captured
from voiceman_pipeline_tests.conftest import REPO, shipped_storage_yaml

# A run of one op that writes through Python, the raw descriptors and C's stdio,
# and reports the processes it has at that moment.
RUN_ONE_OP = """
import ctypes, json, os, sys
import psutil
from dagster import DagsterInstance, job, op

@op
def speak():
    print("python to stdout")
    print("python to stderr", file=sys.stderr)
    os.write(1, b"descriptor 1\\n")
    os.write(2, b"descriptor 2\\n")
    libc = ctypes.CDLL(None)
    libc.puts(b"C puts")
    libc.fflush(None)
    children = [p.name() for p in psutil.Process().children(recursive=True)]
    print("children=" + json.dumps(children))

@job
def one_op():
    speak()

with DagsterInstance.get() as instance:
    result = one_op.execute_in_process(instance=instance)
    print("run=" + result.run_id, file=sys.__stderr__)
"""


def test_a_run_s_output_lands_in_its_files_and_on_the_terminal_with_no_child_process(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(shipped_storage_yaml(home))
    done = subprocess.run(
        [sys.executable, "-c", RUN_ONE_OP], env={**os.environ, "DAGSTER_HOME": str(home)},
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    run_id = done.stderr.rsplit("run=", 1)[1].strip()

    # The files the UI shows: one capture for the run's process, marked complete.
    (log_dir,) = (home / "compute_logs" / run_id / "compute_logs").glob("*.out")
    out_file = log_dir.read_text()
    err_file = log_dir.with_suffix(".err").read_text()
    assert log_dir.with_suffix(".complete").exists()
    for line in ("python to stdout", "descriptor 1", "C puts"):
        assert line in out_file and line in done.stdout
    for line in ("python to stderr", "descriptor 2", "STEP_SUCCESS"):
        assert line in err_file and line in done.stderr
    assert "python to stderr" not in out_file and "python to stdout" not in err_file
    # Dagster's own manager has a `tail` and a Python watcher per stream here.
    children = json.loads(out_file.split("children=", 1)[1].splitlines()[0])
    assert children == []


def _reading(fd: int, into: bytearray) -> threading.Thread:
    def read():
        while chunk := os.read(fd, 1 << 16):
            into.extend(chunk)
    reader = threading.Thread(target=read)
    reader.start()
    return reader


def test_everything_written_reaches_the_terminal_before_the_capture_ends(tmp_path):
    """1 MiB written in the capture's last instant is all echoed by the time it
    ends (``tail -F``, read once a second and then killed, can drop it), and
    the stream writes to the terminal again afterwards."""
    log = tmp_path / "run.out"
    log.write_bytes(b"an earlier attempt\n")
    read_end, write_end = os.pipe()
    echoed = bytearray()
    reader = _reading(read_end, echoed)
    payload = bytes(range(256)) * 4096
    with os.fdopen(write_end, "w") as terminal:
        with captured(terminal, str(log)):
            os.write(write_end, payload)
        terminal.write("after\n")
    reader.join(timeout=30)
    os.close(read_end)
    assert bytes(echoed) == payload + b"after\n"  # not the earlier attempt's output
    assert log.read_bytes() == b"an earlier attempt\n" + payload


def test_a_terminal_that_went_away_loses_only_the_echo(tmp_path):
    log = tmp_path / "run.err"
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody reads: every echo write fails (EPIPE)
    with os.fdopen(write_end, "w") as terminal:
        with captured(terminal, str(log)):
            for n in range(3):
                os.write(write_end, f"line {n}\n".encode())
    assert log.read_text() == "line 0\nline 1\nline 2\n"


def test_a_stream_without_a_descriptor_is_left_alone(tmp_path):
    stream = io.StringIO()
    with captured(stream, str(tmp_path / "run.out")):
        stream.write("kept in the stream")
    assert stream.getvalue() == "kept in the stream"
    assert (tmp_path / "run.out").read_text() == ""
