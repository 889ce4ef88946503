"""Which software, on which machine and in which Dagster runs, produced a report.

A report handed on outside the pipeline (to a colleague, a court) must name
what made it, as forensic tools do: ``report.json``'s ``produced_by`` holds
this package's version and, run from a git checkout, its commit; Python's and
the analysis libraries' versions; the host; and, for the report and every
stage result it joins, the stage's code version and the Dagster run that
computed it (its event log holds the rest: timings, memory, who launched it).
"""

from __future__ import annotations

import functools
import platform
import socket
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGE = "voiceman-pipeline"
# The libraries whose versions decide the numbers in a result (those installed).
LIBRARIES = ("dagster", "numpy", "av", "pocketsphinx", "praat-parselmouth", "faster-whisper",
             "transformers", "torch", "pandas", "matplotlib")
SOURCE_DIR = Path(__file__).resolve().parent.parent


@functools.cache
def software() -> dict[str, Any]:
    """This process's software: the same for every report it writes (read once)."""
    installed = {}
    for name in LIBRARIES:
        try:
            installed[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass  # an optional engine not installed: it produced nothing here
    try:
        version = {"version": metadata.version(PACKAGE)}
    except metadata.PackageNotFoundError:  # run from a source folder on PYTHONPATH
        version = {"version": None, "version_unknown": f"{PACKAGE} is not installed in this Python"}
    return {"package": PACKAGE, **version, **_git_source(), "python": platform.python_version(),
            "libraries": installed}


def _git_source() -> dict[str, Any]:
    """The checkout's commit and whether it has local changes; where the code is not
    a git checkout (an installed wheel) or git cannot say, why not."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(SOURCE_DIR), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        top, commit = git("rev-parse", "--show-toplevel", "HEAD").splitlines()
        if Path(top).resolve() != SOURCE_DIR:  # installed inside some other checkout (a venv in it)
            return {"commit": None, "commit_unknown": f"the package is not in a git checkout of its own ({top})"}
        # Edited, deleted or new files of the package (a new module or pattern file
        # changes results as much as an edit; git-ignored ones such as __pycache__ do not).
        changed = bool(git("status", "--porcelain", "--", "voiceman_pipeline"))
    except (OSError, subprocess.SubprocessError, ValueError) as exc:  # e.g. "fatal: not a git repository"
        said = (getattr(exc, "stderr", None) or "").strip().splitlines() or [f"{type(exc).__name__}: {exc}"]
        return {"commit": None, "commit_unknown": f"git could not say: {said[0]}"}
    return {"commit": commit, "local_changes": changed}


def produced_by(stage: str, run_id: str, code_version: str,
                upstream: dict[str, tuple[str | None, str]]) -> dict[str, Any]:
    """A result's ``produced_by``: ``stage`` computed by Dagster run ``run_id`` with
    ``code_version`` (``Stage.versioned_code``), from ``upstream``: stage name ->
    (code version, run id) of each result it read, as Dagster's storage recorded them;
    ``started_utc``: when the stage began computing it."""
    stages = {name: {"code_version": version, "run_id": run} for name, (version, run) in upstream.items()}
    stages[stage] = {"code_version": code_version, "run_id": run_id}
    return {"software": software(), "host": socket.gethostname(),
            "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "stages": stages}
