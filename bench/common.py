"""What several benchmarks share: a fresh Dagster home, waiting on a child command, the UI's GraphQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def fresh_home(home: Path, repo: Path = REPO) -> Path:
    """``home`` made as a DAGSTER_HOME holding ``repo``'s shipped dagster.yaml,
    its storage paths redirected into ``home`` (so nothing touches the checkout's)."""
    home.mkdir(parents=True)
    shipped = (repo / "dagster.yaml").read_text()
    (home / "dagster.yaml").write_text(shipped.replace("data/dagster", str(home / "dagster")))
    return home


def wait_or_stop(child: subprocess.Popen) -> int:
    """The exit status of ``child`` (started with ``start_new_session=True``);
    if this benchmark is interrupted meanwhile, the child's own process group
    is stopped first, so no pipeline keeps running behind it."""
    try:
        return child.wait()
    except BaseException:
        stop_group(child)
        raise


def stop_group(child: subprocess.Popen) -> None:
    """Stop ``child``'s own process group (it was started with
    ``start_new_session=True``) and reap it."""
    os.killpg(child.pid, signal.SIGTERM)
    child.wait()


def wait_until(what: str, found: Callable[[], Any], timeout_s: float, every_s: float = 0.2) -> Any:
    """``found()``'s first true value, polled every ``every_s``; RuntimeError naming
    ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := found():
            return value
        time.sleep(every_s)
    raise RuntimeError(f"gave up waiting for {what} after {timeout_s:.0f} s")


def write_figures(figures: dict, name: str, target: Path | None = None) -> Path:
    """``figures`` as JSON at ``target``, else bench/results/<name>-<UTC time>.json; the path."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    target = target or REPO / "bench" / "results" / f"{name}-{stamp}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(figures, indent=2) + "\n")
    return target


def graphql(url: str, query: str, **variables) -> dict:
    """The answer of the webserver's GraphQL endpoint at ``url`` (the UI's own calls)."""
    body = json.dumps({"query": query, "variables": variables}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())
