"""A disk that fills up in the middle of a batch, with real processes.

``voiceman run`` takes six recordings through the chain with
``$VOICEMAN_DATA_DIR/outputs`` on a real tmpfs (Dagster's storage stays on the
normal disk, in a temporary DAGSTER_HOME). Once the batch has written its
first transcripts, the test fills that tmpfs with a file that leaves less free
than the 64 MiB margin every result write keeps (``FREE_SPACE_MARGIN_BYTES``).
Then:

- the command exits non-zero, without a traceback, and says for each failed
  recording that the disk is full: which folder, its mount point, the space
  needed and the space free;
- nothing corrupt is left: no temporary file of an atomic write, and every
  result file on disk has the digest its latest materialization recorded;
- with the filler removed, one command finishes every recording, and every
  (stage, recording) was computed exactly once over both commands
  (``voiceman retry-failed``; ``voiceman run`` leaves failed recordings alone).

The second test fills the disk to the last byte before the batch: every
failure, the summary's included, is one line.

Skipped where a tmpfs cannot be mounted (not root, not Linux).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance

from voiceman_pipeline.assets.checkpoint import latest_materializations
from voiceman_pipeline.assets.pipeline import COMPUTED_KEY
from voiceman_pipeline.assets.stages import STAGES
from voiceman_pipeline.audio_io import sha256_file
from voiceman_pipeline.resources.outputs import FREE_SPACE_MARGIN_BYTES
from voiceman_pipeline_tests.conftest import POOL_OF_ONE_YAML, REPO, SAMPLE_WAVS, shipped_storage_yaml

VOICEMAN = str(Path(sys.executable).parent / "voiceman")
MIB = 2**20
# Room for the whole batch (~2 MiB of results for six recordings) on top of the
# margin, so the batch starts normally; the filler takes most of it away.
TMPFS_BYTES = FREE_SPACE_MARGIN_BYTES + 32 * MIB
LEFT_FREE = FREE_SPACE_MARGIN_BYTES - 1 * MIB  # below the margin: every result write is refused
FILL_AFTER_TRANSCRIPTS = 2  # of the six: the filler lands in the middle of the transcript stage
FILLER = "filler.bin"
DISK_FULL = re.compile(
    r"DiskFullError: not enough disk space to write (?P<file>\S+) in (?P<folder>\S+) "
    r"\(the disk mounted at (?P<mount>\S+)\): it needs (?P<needed>[\d.]+ (?:bytes|KiB|MiB|GiB)) "
    r"plus 64\.0 MiB kept free, and (?P<free>[\d.]+ (?:bytes|KiB|MiB|GiB)) is free\. "
    r"Free space on that disk"
)


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """A fresh DAGSTER_HOME and an inbox with six recordings (the five samples
    and a second copy of one under another name)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(shipped_storage_yaml(home) + POOL_OF_ONE_YAML)
    inbox = tmp_path / "data" / "inbox"
    inbox.mkdir(parents=True)
    for wav in SAMPLE_WAVS:
        shutil.copyfile(wav, inbox / wav.name)
    shutil.copyfile(SAMPLE_WAVS[0], inbox / f"copy_{SAMPLE_WAVS[0].name}")
    return {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "VOICEMAN_DATA_DIR": str(tmp_path / "data"),
        "VOICEMAN_BATCH_SIZE": "8",  # the six recordings in one run
        "PYTHONPATH": str(REPO),
    }


@pytest.fixture
def outputs_disk(env) -> Path:
    """``$VOICEMAN_DATA_DIR/outputs`` as a real tmpfs of ``TMPFS_BYTES``."""
    mount_point = Path(env["VOICEMAN_DATA_DIR"]) / "outputs"
    mount_point.mkdir()
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("needs Linux mount to make a tmpfs")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES},mode=0755", "tmpfs", str(mount_point)],
        capture_output=True, text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount_point.resolve()
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=True)  # still busy: detach


def recordings() -> int:
    return len(SAMPLE_WAVS) + 1


def voiceman(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [VOICEMAN, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def materializations(instance: DagsterInstance) -> dict[tuple[str, str], list]:
    """Every materialization record of each (stage, recording)."""
    found: dict[tuple[str, str], list] = {}
    for stage in STAGES:
        for record in instance.fetch_materializations(AssetKey(stage.name), limit=10_000).records:
            found.setdefault((stage.name, record.partition_key), []).append(record)
    return found


def fill(disk: Path) -> int:
    """A file taking all but ``LEFT_FREE`` bytes of ``disk``; returns its size."""
    size = shutil.disk_usage(disk).free - LEFT_FREE
    assert size > 0, "the batch already used more of the tmpfs than expected"
    fd = os.open(disk / FILLER, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    return size


def temporary_files(outputs: Path) -> list[Path]:
    """What an atomic write leaves while (or if) it is interrupted: '.<name>.<random>.tmp'."""
    return [p for p in outputs.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


def assert_nothing_corrupt(instance: DagsterInstance, outputs: Path, keys: list[str]) -> int:
    """No temporary file; every file in a recording's folder is one that the
    latest materialization of its stage recorded, with that digest; every file
    a latest materialization recorded is there. Returns the files checked."""
    assert temporary_files(outputs) == []
    recorded: dict[tuple[str, str], tuple[str, str]] = {}  # (key, file) -> (stage, digest)
    for stage in STAGES:
        for key, latest in latest_materializations(instance, stage, keys).items():
            assert set(latest.outputs) == set(stage.writes), (stage.name, key, latest.outputs)
            for name, digest in latest.outputs.items():
                recorded[(key, name)] = (stage.name, digest)
    on_disk = {
        (key, path.name): path
        for key in keys
        if (outputs / key).is_dir()
        for path in (outputs / key).iterdir()
    }
    unrecorded = sorted(str(path) for pair, path in on_disk.items() if pair not in recorded)
    assert unrecorded == [], f"result files no materialization records: {unrecorded}"
    missing = sorted(f"{key}/{name}" for (key, name) in recorded if (key, name) not in on_disk)
    assert missing == [], f"recorded results missing on disk: {missing}"
    damaged = [
        f"{key}/{name} ({stage})"
        for (key, name), (stage, digest) in recorded.items()
        if sha256_file(on_disk[(key, name)]) != digest
    ]
    assert damaged == [], f"result files whose digest differs from the recorded one: {damaged}"
    return len(on_disk)


def status_rows(stdout: str) -> dict[str, str]:
    """The status table's rows: key -> its status cell (which may hold spaces)."""
    lines = stdout[stdout.index("partition key") :].splitlines()
    start, end = lines[0].index("status"), lines[0].index("risk")
    return {line.split()[0]: line[start:end].strip() for line in lines[2:] if line.strip()}


def failure_lines(stderr: str) -> dict[str, str]:
    """The command's one line per failed recording: key -> the line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip().startswith("failed: ")]
    return {line.split()[1]: line for line in lines}


def assert_says_the_disk_is_full(line: str, outputs: Path, key: str) -> None:
    """The reason names the file, its folder, the disk, the space needed and free."""
    match = DISK_FULL.search(line)
    assert match, f"not a disk-full reason: {line}"
    assert Path(match["folder"]) == outputs / key
    assert Path(match["mount"]) == outputs
    assert match["file"] in {name for stage in STAGES for name in stage.writes}
    number, unit = match["free"].split()
    free = float(number) * {"bytes": 1, "KiB": 2**10, "MiB": MIB, "GiB": 2**30}[unit]
    assert free < FREE_SPACE_MARGIN_BYTES, line


@pytest.mark.timeout(240)
def test_disk_filling_mid_batch_fails_clearly_leaves_nothing_corrupt_and_one_command_resumes(
    env, outputs_disk, tmp_path
):
    outputs = outputs_disk
    keys = sorted([wav.name for wav in SAMPLE_WAVS] + [f"copy_{SAMPLE_WAVS[0].name}"])
    began = time.monotonic()
    out_file, err_file = tmp_path / "first.out", tmp_path / "first.err"
    with open(out_file, "w") as out, open(err_file, "w") as err:
        process = subprocess.Popen(
            [VOICEMAN, "run", "--settle", "0.1"], cwd=REPO, env=env, stdout=out, stderr=err, text=True
        )
    try:
        with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
            # --- the disk fills in the middle of the transcript stage ----------
            deadline = time.monotonic() + 90
            while True:
                assert process.poll() is None, (
                    f"voiceman exited ({process.returncode}) before the batch reached its "
                    f"transcripts:\n{out_file.read_text()}\n{err_file.read_text()}"
                )
                assert time.monotonic() < deadline, "the batch never reached its transcripts"
                transcripts = [k for (stage, k) in materializations(instance) if stage == "transcript"]
                if len(transcripts) >= FILL_AFTER_TRANSCRIPTS:
                    break
                time.sleep(0.1)
            filler = fill(outputs)
            print(f"\nfilled {filler / MIB:.1f} MiB at {time.monotonic() - began:.1f} s, after "
                  f"{len(transcripts)} transcript(s); {shutil.disk_usage(outputs).free / MIB:.1f} "
                  f"MiB left free on {outputs}")
            process.wait(timeout=150)
            stdout, stderr = out_file.read_text(), err_file.read_text()
            print(f"first `voiceman run`: exit {process.returncode} after "
                  f"{time.monotonic() - began:.1f} s\n{stdout}{stderr}")

            # --- a clear resource error, no traceback ---------------------------
            assert process.returncode == 1, stdout + stderr
            assert "Traceback" not in stdout + stderr
            failed = failure_lines(stderr)
            assert failed, stderr
            for key, line in failed.items():
                assert_says_the_disk_is_full(line, outputs, key)
            rows = status_rows(stdout)
            assert sorted(rows) == keys
            for key, cell in rows.items():
                if key in failed:
                    assert cell.startswith("failed at "), cell
                    assert "DiskFullError: not enough disk space to write" in cell, cell
                else:
                    assert cell == "done", cell

            # --- it was mid-batch, and nothing is corrupt -----------------------
            after_failure = materializations(instance)
            assert {k for (stage, k) in after_failure if stage == "audio"} == set(keys)
            assert len([1 for (stage, _) in after_failure if stage == "transcript"]) >= FILL_AFTER_TRANSCRIPTS
            assert {k for (stage, k) in after_failure if stage == "report"} == set(keys) - set(failed)
            assert len(failed) >= 2, "the disk filled only at the end of the batch"
            # A full disk is not an out-of-memory error: no memory cleanup ran for it
            # (it frees no disk), and no run counts an OOM recovery.
            cleanups = [r.event_log_entry.asset_observation.metadata.get("memory_cleanup_reason")
                        for stage in STAGES for r in instance.fetch_observations(stage.key, limit=100).records]
            assert not any(cleanups), cleanups
            assert {run.tags.get("voiceman/oom_recoveries", "0") for run in instance.get_runs()} == {"0"}
            checked = assert_nothing_corrupt(instance, outputs, keys)
            print(f"after the failure: {len(after_failure)} (stage, recording) result(s) recorded, "
                  f"{checked} result file(s) on disk, each as recorded; no temporary file")
            loose = {path.name for path in outputs.iterdir() if not path.is_dir()}
            assert loose <= {FILLER, "summary.csv", "summary.parquet"}, loose

            # --- free the space: one command finishes the rest ------------------
            (outputs / FILLER).unlink()
            resumed_at = time.monotonic()
            # (`voiceman run` does not take up failed recordings: it reports
            # "Nothing new to process." and leaves them failed.)
            again = voiceman(env, "retry-failed")
            print(f"`voiceman retry-failed`: exit {again.returncode} after "
                  f"{time.monotonic() - resumed_at:.1f} s\n{again.stdout}{again.stderr}")
            assert again.returncode == 0, again.stdout + again.stderr
            assert "Traceback" not in again.stdout + again.stderr

            status = voiceman(env, "status")
            assert status.returncode == 0, status.stderr
            assert status_rows(status.stdout) == {key: "done" for key in keys}, status.stdout

            final = materializations(instance)
            assert set(final) == {(stage.name, key) for stage in STAGES for key in keys}
            counts = Counter({pair: len(records) for pair, records in final.items()})
            assert {pair: n for pair, n in counts.items() if n != 1} == {}, "computed more than once"
            assert all(
                records[0].asset_materialization.metadata[COMPUTED_KEY].value is True
                for records in final.values()
            )
            # What was finished before the disk filled was kept, not redone.
            for pair, records in after_failure.items():
                assert [r.storage_id for r in final[pair]] == [r.storage_id for r in records]
            assert_nothing_corrupt(instance, outputs, keys)
            assert (outputs / "summary.csv").is_file()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    print(f"whole test: {time.monotonic() - began:.1f} s")


@pytest.mark.timeout(120)
def test_disk_full_to_the_last_byte_is_still_one_line_per_recording(env, outputs_disk):
    """The same, with the disk filled to the last byte before the batch starts
    (another program filled it): every stage write is refused up front, and
    the summary the command writes after its batch must not end it in a
    traceback either."""
    fd = os.open(outputs_disk / FILLER, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.posix_fallocate(fd, 0, shutil.disk_usage(outputs_disk).free)
    finally:
        os.close(fd)
    assert shutil.disk_usage(outputs_disk).free == 0
    inbox = Path(env["VOICEMAN_DATA_DIR"]) / "inbox"
    for extra in list(inbox.iterdir())[1:]:
        extra.unlink()  # one recording is enough here
    (key,) = [path.name for path in inbox.iterdir()]
    began = time.monotonic()
    first = voiceman(env, "run", "--settle", "0.1")
    print(f"\n`voiceman run` on a full disk: exit {first.returncode} after "
          f"{time.monotonic() - began:.1f} s\n{first.stdout}{first.stderr[-3000:]}")
    assert first.returncode == 1
    assert list(failure_lines(first.stderr)) == [key]
    assert_says_the_disk_is_full(failure_lines(first.stderr)[key], outputs_disk, key)
    assert temporary_files(outputs_disk) == []
    assert "Traceback" not in first.stdout + first.stderr
    # Refused up front: no stage of it was materialized, and the disk holds
    # nothing but the filler (no partial result, no summary).
    with DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        assert [stage for stage, k in materializations(instance) if k == key] == []
    assert [p.name for p in outputs_disk.rglob("*") if p.is_file()] == [FILLER]
