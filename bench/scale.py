"""Scale: the inbox sensor, ``voiceman status`` and the UI with many recordings.

    python bench/scale.py [--files 10000] [--process 200] [--batch-size 25]
                          [--max-new N] [--no-browser] [--keep] [--json PATH]
    python bench/scale.py --status-of /tmp/voiceman-scale-XXXX [--json PATH]

Everything happens in a fresh temporary DAGSTER_HOME (the shipped dagster.yaml
with its storage paths redirected there) and data dir:

1. ``--files`` tiny distinct valid recordings are written into the inbox: a
   0.5 s slice of real speech (data/samples/cards_001.wav, 16 kHz mono PCM)
   with two samples set from the file's number, so every file has its own
   SHA-256 (16 kB each).
2. **Registration**: ``inbox_sensor`` ticks in this process (through
   ``build_sensor_context``, the partition requests applied as the daemon
   applies them) until every file is a partition. Per tick: seconds, files
   hashed, partitions added, run requests, cursor size. The run requests are
   not launched (no daemon): every recording stays "requested" in the cursor.
3. **Processing**: the first ``--process`` recordings (in partition order) go
   through the real pipeline (``recording_analysis``, default engines) in one
   subprocess, one run per ``--batch-size``; Dagster storage (event-log rows,
   bytes on disk) and the outputs folder are measured before and after, and
   the difference divided by the count (per processed recording).
4. **Steady tick**: with all registered and nothing changed, ticks in this
   process (its SHA cache warm, as in the daemon's long-lived code server)
   and one tick in a fresh process (cache empty: as after a restart).
5. **Status**: ``voiceman status`` (the installed command, a subprocess),
   wall time and CPU seconds (user + system: on a shared machine the wall
   time mostly measures the other jobs), three times; the count of rows per
   status. ``--status-of DIR`` does only this, on a folder ``--keep`` left.
6. **UI**: ``dagster-webserver`` on 127.0.0.1 over this home; headless
   chromium (selenium) opens the ``report`` asset's partitions page, timed
   from the navigation until the partition list shows a partition key, three
   loads (each a fresh page).

This is a benchmark, not a test: it asserts nothing. Figures go to
bench/results/scale-<time>.json (git-ignored) unless ``--json`` says where.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

from common import fresh_home, graphql  # bench/common.py (this script's folder is on sys.path)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

RESULTS = REPO / "bench" / "results"
SOURCE = REPO / "data" / "samples" / "cards_001.wav"
VENV_BIN = Path(sys.executable).parent
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


# --- setup --------------------------------------------------------------------


def make_home(root: Path) -> tuple[Path, Path]:
    home, data = root / "home", root / "data"
    fresh_home(home)
    (data / "inbox").mkdir(parents=True)
    (data / "outputs").mkdir()
    return home, data


def write_recordings(inbox: Path, files: int) -> list[str]:
    """``files`` distinct 0.5 s recordings of real speech; their names, in order."""
    with wave.open(str(SOURCE)) as source:
        rate, width, channels = source.getframerate(), source.getsampwidth(), source.getnchannels()
        source.setpos(int(0.3 * rate))
        frames = bytearray(source.readframes(int(0.5 * rate)))
    names = []
    for i in range(files):
        body = bytearray(frames)
        body[0:4] = i.to_bytes(4, "little")  # two 16-bit samples: the file's own content
        name = f"call_{i:05d}.wav"
        with wave.open(str(inbox / name), "wb") as out:
            out.setnchannels(channels)
            out.setsampwidth(width)
            out.setframerate(rate)
            out.writeframes(bytes(body))
        names.append(name)
    return names


# --- storage size ---------------------------------------------------------------


def storage_figures(home: Path, data: Path) -> dict:
    """Rows in every event_logs table under the storage folder, and bytes on disk.

    Each database's write-ahead log is first checkpointed into it (what sqlite
    does itself every 1000 pages): while the sensor's connections are open the
    log holds up to about 4 MB of pages not yet in the database, which would
    otherwise count, and vanish, depending on the moment."""
    storage = home / "dagster" / "storage"
    rows = {"index": 0, "per_run": 0}
    for db in storage.rglob("*.db"):
        with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(db)) as conn:
            conn.execute("pragma wal_checkpoint(truncate)")
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                n = conn.execute("select count(*) from event_logs").fetchone()[0]
        except sqlite3.Error:
            continue  # a db without events (runs.db, schedules.db)
        rows["index" if db.name == "index.db" else "per_run"] += n
    return {
        "event_rows_index_db": rows["index"],
        "event_rows_run_dbs": rows["per_run"],
        "dagster_bytes": folder_bytes(home / "dagster"),
        "storage_bytes": folder_bytes(storage),
        "outputs_bytes": folder_bytes(data / "outputs"),
    }


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


# --- sensor ticks -----------------------------------------------------------------


def one_tick(instance, store, settings, cursor):
    """One inbox_sensor evaluation, its partition request applied; (result, seconds, apply seconds)."""
    from dagster import build_sensor_context

    from voiceman_pipeline.sensors import build_inbox_sensor

    sensor = build_inbox_sensor(settings)
    context = build_sensor_context(instance=instance, cursor=cursor, resources={"store": store})
    began = time.perf_counter()
    result = sensor(context)
    seconds = time.perf_counter() - began
    began = time.perf_counter()
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result, seconds, time.perf_counter() - began


def tick_row(result, seconds, apply_s, hashed) -> dict:
    added = sum(len(r.partition_keys or []) for r in result.dynamic_partitions_requests or [])
    return {
        "seconds": round(seconds, 3),
        "apply_seconds": round(apply_s, 3),
        "added": added,
        "run_requests": len(result.run_requests or []),
        "hashed": hashed,
        "cursor_bytes": len(result.cursor or ""),
    }


def hashes_done() -> int:
    from voiceman_pipeline import inbox

    return inbox.HASHES_DONE


def register_all(instance, store, settings, files: int) -> tuple[list[dict], str]:
    """Ticks until every file is a partition (or a tick adds none twice running)."""
    ticks, cursor, idle = [], None, 0
    while len(instance.get_dynamic_partitions("audio_files")) < files and idle < 3:
        before = hashes_done()
        result, seconds, apply_s = one_tick(instance, store, settings, cursor)
        row = tick_row(result, seconds, apply_s, hashes_done() - before)
        ticks.append(row)
        cursor = result.cursor
        idle = 0 if row["added"] else idle + 1
        if len(ticks) % 10 == 1:
            print(f"  tick {len(ticks)}: {row}", flush=True)
    return ticks, cursor


def cold_tick(home: Path, data: Path, cursor: str) -> dict:
    """One tick in a fresh process (no SHA cache); its row, as JSON from the child."""
    env = bench_env(home, data)
    out = subprocess.run(
        [sys.executable, __file__, "--tick"], input=cursor, env=env, cwd=REPO,
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def tick_worker() -> int:
    """Child of cold_tick: one tick with the cursor from stdin; a JSON line out."""
    from dagster import DagsterInstance

    from voiceman_pipeline.resources.outputs import RecordingStore
    from voiceman_pipeline.settings import Settings

    settings = Settings.from_env()
    store = RecordingStore(data_dir=settings.data_dir)
    cursor = sys.stdin.read()
    with DagsterInstance.get() as instance:
        result, seconds, apply_s = one_tick(instance, store, settings, cursor)
        print(json.dumps(tick_row(result, seconds, apply_s, hashes_done())))
    return 0


# --- processing -------------------------------------------------------------------


def process_worker(batch_size: int, count: int) -> int:
    """The first ``count`` partitions through recording_analysis, ``batch_size`` per run."""
    from dagster import DagsterInstance, materialize

    from voiceman_pipeline.definitions import defs, recording_analysis
    from voiceman_pipeline.partitions import contiguous_batches, range_tags

    failed = 0
    with DagsterInstance.get() as instance:
        keys = list(instance.get_dynamic_partitions("audio_files"))
        for batch in contiguous_batches(keys, keys[:count], batch_size):
            result = materialize([recording_analysis], instance=instance, resources=defs.resources,
                                 tags=range_tags(batch), run_config=QUIET, raise_on_error=False)
            failed += not result.success
    print(json.dumps({"failed_runs": failed}))
    return 0


def process(home: Path, data: Path, count: int, batch_size: int) -> dict:
    env = bench_env(home, data)
    began = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--process-worker", str(batch_size), str(count)],
        env=env, cwd=REPO, capture_output=True, text=True,
    )
    if out.returncode != 0:
        raise SystemExit(f"processing failed:\n{out.stderr[-3000:]}")
    report = json.loads(out.stdout.strip().splitlines()[-1])
    return {"recordings": count, "batch_size": batch_size, "wall_s": round(time.perf_counter() - began, 1),
            **report}


# --- voiceman status --------------------------------------------------------------


def status_runs(home: Path, data: Path, repeats: int = 3) -> dict:
    from voiceman_pipeline.status import status_kind

    env = bench_env(home, data)
    import resource

    times, cpu, counts = [], [], {}
    load_before = os.getloadavg()
    for _ in range(repeats):
        began = time.perf_counter()
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run([str(VENV_BIN / "voiceman"), "status"], env=env, cwd=REPO,
                             capture_output=True, text=True)
        times.append(round(time.perf_counter() - began, 2))
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        # CPU seconds (user + system): what the wall time would be on idle cores
        cpu.append(round(after.ru_utime + after.ru_stime - used.ru_utime - used.ru_stime, 2))
        if out.returncode != 0:
            raise SystemExit(f"voiceman status failed:\n{out.stderr[-3000:]}")
        counts = {}
        for line in out.stdout.splitlines()[2:]:
            cells = line.split("  ")
            status = next((c.strip() for c in cells[2:] if c.strip() and not _number(c)), None)
            if status is None:
                continue
            try:
                kind = status_kind(status)
            except ValueError:
                continue  # the intake line after the table
            counts[kind] = counts.get(kind, 0) + 1
    # Where the time goes: one process times its imports (Dagster, its
    # storage, ours), then the status command itself twice (see status_breakdown).
    out = subprocess.run([sys.executable, __file__, "--status-breakdown"], env=env, cwd=REPO,
                         capture_output=True, text=True, check=True)
    return {"wall_s": times, "wall_s_median": sorted(times)[len(times) // 2], "cpu_s": cpu,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "rows_by_status": counts,
            "in_process": json.loads(out.stdout.strip().splitlines()[-1])}


def status_breakdown() -> int:
    """Seconds since start at each step of ``voiceman status``, in one process
    with the cyclic garbage collector off, as the command runs: importing
    Dagster, then its sqlite storage (SQLAlchemy, Alembic, the run machinery
    its run storage imports), then ours; then the command itself twice (each
    opens the storage, with Dagster's Alembic revision checks; the first
    costs more)."""
    import gc
    import io

    gc.disable()
    began = time.perf_counter()
    import dagster  # noqa: F401

    dagster_s = time.perf_counter() - began
    import dagster._core.storage.sqlite_storage  # noqa: F401

    storage_s = time.perf_counter() - began
    from voiceman_pipeline import cli, intake_control, runs, status  # noqa: F401  what status imports

    imports_s = time.perf_counter() - began
    calls = []
    for _ in range(2):
        began = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            cli.main(["status"])
        calls.append(round(time.perf_counter() - began, 2))
    print(json.dumps({"import_dagster_s": round(dagster_s, 2), "import_dagster_storage_s": round(storage_s, 2),
                      "import_all_s": round(imports_s, 2), "status_call_s": calls}))
    return 0


def status_of_kept(root: Path, target: Path | None) -> int:
    """Time ``voiceman status`` again on a folder an earlier ``--keep`` left."""
    home, data = root / "home", root / "data"
    if not (home / "dagster.yaml").is_file():
        raise SystemExit(f"{root} is not a folder kept by `bench/scale.py --keep`")
    figures = {"machine": machine(), "tmp": str(root), "status": status_runs(home, data)}
    figures["machine"]["loadavg_end"] = os.getloadavg()
    print(f"status: {figures['status']}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = target or RESULTS / f"scale-status-{time.strftime('%Y%m%d-%H%M%S')}.json"
    target.write_text(json.dumps(figures, indent=2))
    print(f"figures: {target}")
    return 0


def _number(cell: str) -> bool:
    try:
        float(cell.strip())
        return True
    except ValueError:
        return cell.strip() == "-"


# --- the UI -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def page_loads(home: Path, data: Path, first_key: str, repeats: int = 3) -> dict:
    """Seconds from navigating to the report asset's partitions page until a
    partition key is shown, ``repeats`` times, with dagster-webserver on this home."""
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    log = open(home / "webserver.log", "w")
    server = subprocess.Popen(
        [str(VENV_BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-w", "workspace.yaml"],
        cwd=REPO, env=bench_env(home, data), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    driver = None
    try:
        began = time.perf_counter()
        while True:  # the server up and the code location loaded
            if server.poll() is not None:
                raise SystemExit(f"dagster-webserver exited; see {home / 'webserver.log'}")
            try:
                loaded = graphql(f"http://127.0.0.1:{port}/graphql",
                                 "{ workspaceOrError { ... on Workspace { locationEntries { loadStatus } } } }")
                entries = loaded["data"]["workspaceOrError"]["locationEntries"]
                if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                    break
            except OSError:
                pass
            if time.perf_counter() - began > 300:
                raise SystemExit("dagster-webserver did not load the code location in 300 s")
            time.sleep(1)
        server_ready_s = time.perf_counter() - began
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=webdriver.ChromeService("/usr/bin/chromedriver"), options=options)
        url = f"http://127.0.0.1:{port}/assets/report?view=partitions"
        loads = []
        for _ in range(repeats):
            driver.get("about:blank")
            began = time.perf_counter()
            driver.get(url)
            dom_s = time.perf_counter() - began
            WebDriverWait(driver, 120, poll_frequency=0.05).until(
                lambda d: d.find_elements(By.XPATH, f"//*[text()='{first_key}']")
            )
            loads.append({"until_partition_shown_s": round(time.perf_counter() - began, 2),
                          "until_dom_loaded_s": round(dom_s, 2)})
        driver.save_screenshot(str(home / "partitions.png"))
        return {"server_ready_s": round(server_ready_s, 1), "loads": loads, "url_path": url.split(str(port))[1]}
    finally:
        if driver is not None:
            driver.quit()
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


# --- main -------------------------------------------------------------------------


def bench_env(home: Path, data: Path) -> dict:
    env = {**os.environ, "DAGSTER_HOME": str(home), "VOICEMAN_DATA_DIR": str(data),
           "PYTHONPATH": str(REPO)}
    return env


def machine() -> dict:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "memory_gib": round(mem_gib, 1),
            "python": platform.python_version(), "loadavg_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--tick"]:
        return tick_worker()
    if argv[:1] == ["--status-breakdown"]:
        return status_breakdown()
    if argv[:1] == ["--process-worker"]:
        return process_worker(int(argv[1]), int(argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000, help="recordings in the inbox")
    parser.add_argument("--process", type=int, default=200, help="recordings run through the pipeline")
    parser.add_argument("--batch-size", type=int, default=25, help="recordings per run when processing")
    parser.add_argument("--max-new", type=int, default=None,
                        help="VOICEMAN_MAX_NEW_PER_TICK for the sensor (default: the setting's)")
    parser.add_argument("--no-browser", action="store_true", help="skip the UI page load")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--json", type=Path, help="where the figures go")
    parser.add_argument("--status-of", type=Path, metavar="DIR",
                        help="only time `voiceman status` on a folder kept by --keep")
    args = parser.parse_args(argv)
    if args.status_of:
        return status_of_kept(args.status_of, args.json)

    import logging

    logging.disable(logging.INFO)  # the sensor's line per new file
    root = Path(tempfile.mkdtemp(prefix="voiceman-scale-"))
    home, data = make_home(root)
    os.environ.update(bench_env(home, data))  # before voiceman_pipeline reads its settings
    if args.max_new:
        os.environ["VOICEMAN_MAX_NEW_PER_TICK"] = str(args.max_new)
    figures: dict = {"machine": machine(), "files": args.files, "tmp": str(root)}
    try:
        from dagster import DagsterInstance

        from voiceman_pipeline.resources.outputs import RecordingStore
        from voiceman_pipeline.settings import Settings

        settings = Settings.from_env()
        store = RecordingStore(data_dir=settings.data_dir)
        figures["max_new_per_tick"] = settings.max_new_per_tick

        began = time.perf_counter()
        names = write_recordings(data / "inbox", args.files)
        figures["write_files_s"] = round(time.perf_counter() - began, 1)
        figures["inbox_bytes"] = folder_bytes(data / "inbox")
        print(f"wrote {len(names)} recordings in {figures['write_files_s']} s", flush=True)

        with DagsterInstance.get() as instance:
            empty = storage_figures(home, data)
            ticks, cursor = register_all(instance, store, settings, args.files)
            registered = storage_figures(home, data)
            figures["registration"] = {
                "ticks": len(ticks),
                "first_ticks": ticks[:3],
                "max_added_per_tick": max(t["added"] for t in ticks),
                "max_tick_s": max(t["seconds"] for t in ticks),
                "median_tick_s": sorted(t["seconds"] for t in ticks)[len(ticks) // 2],
                "last_tick": ticks[-1],
                "registered": len(instance.get_dynamic_partitions("audio_files")),
                "storage_before": empty,
                "storage_after": registered,
            }
            print(f"registered in {len(ticks)} ticks", flush=True)

            if args.process:
                print(f"processing {args.process} recordings ...", flush=True)
                figures["processing"] = process(home, data, args.process, args.batch_size)
                after = storage_figures(home, data)
                k = args.process
                figures["processing"].update({
                    "storage_before": registered,
                    "storage_after": after,
                    "per_recording": {
                        "event_rows": (after["event_rows_index_db"] + after["event_rows_run_dbs"]
                                       - registered["event_rows_index_db"]
                                       - registered["event_rows_run_dbs"]) / k,
                        "event_rows_index_db": (after["event_rows_index_db"]
                                                - registered["event_rows_index_db"]) / k,
                        "dagster_bytes": (after["dagster_bytes"] - registered["dagster_bytes"]) / k,
                        "storage_bytes": (after["storage_bytes"] - registered["storage_bytes"]) / k,
                        "outputs_bytes": (after["outputs_bytes"] - registered["outputs_bytes"]) / k,
                    },
                })
                print(f"processed: {figures['processing']}", flush=True)

            steady = []
            for _ in range(3):
                before = hashes_done()
                result, seconds, apply_s = one_tick(instance, store, settings, cursor)
                steady.append(tick_row(result, seconds, apply_s, hashes_done() - before))
                cursor = result.cursor
            figures["steady_tick_warm"] = steady
        figures["steady_tick_cold_process"] = cold_tick(home, data, cursor)
        print(f"steady ticks: {steady} cold: {figures['steady_tick_cold_process']}", flush=True)

        figures["status"] = status_runs(home, data)
        print(f"status: {figures['status']}", flush=True)
        if not args.no_browser:
            figures["ui_partitions_page"] = page_loads(home, data, names[0])
            print(f"ui: {figures['ui_partitions_page']}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root} (time `voiceman status` on it again: --status-of {root})", flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    target = args.json or RESULTS / f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    target.write_text(json.dumps(figures, indent=2))
    print_table(figures)
    print(f"\nfigures: {target}")
    return 0


def print_table(f: dict) -> None:
    reg = f["registration"]
    rows = [
        ("recordings in the inbox", f"{f['files']}"),
        ("sensor cap (VOICEMAN_MAX_NEW_PER_TICK)", f"{f['max_new_per_tick']}"),
        ("ticks to register all", f"{reg['ticks']}"),
        ("first ticks: added / seconds",
         ", ".join(f"{t['added']} / {t['seconds']:.2f}" for t in reg["first_ticks"])),
        ("registration tick: max / median s", f"{reg['max_tick_s']:.2f} / {reg['median_tick_s']:.2f}"),
        ("steady tick (warm) s", ", ".join(f"{t['seconds']:.2f}" for t in f["steady_tick_warm"])),
        ("steady tick (fresh process) s / hashed",
         f"{f['steady_tick_cold_process']['seconds']:.2f} / {f['steady_tick_cold_process']['hashed']}"),
        ("voiceman status wall s", ", ".join(f"{s:.2f}" for s in f["status"]["wall_s"])),
        ("voiceman status rows", json.dumps(f["status"]["rows_by_status"])),
        ("  in one process: imports s / status calls s",
         f"{f['status']['in_process']['import_all_s']:.2f} / "
         + ", ".join(f"{s:.2f}" for s in f["status"]["in_process"]["status_call_s"])),
    ]
    if "processing" in f:
        p = f["processing"]
        per = p["per_recording"]
        rows += [
            ("processed (real pipeline)", f"{p['recordings']} in {p['wall_s']} s"),
            ("event-log rows per recording", f"{per['event_rows']:.1f} (index.db {per['event_rows_index_db']:.1f})"),
            ("Dagster bytes per recording", f"{per['dagster_bytes'] / 1024:.1f} KiB "
             f"(storage {per['storage_bytes'] / 1024:.1f} KiB)"),
            ("outputs bytes per recording", f"{per['outputs_bytes'] / 1024:.1f} KiB"),
        ]
    if "ui_partitions_page" in f:
        rows.append(("report partitions page s",
                     ", ".join(f"{x['until_partition_shown_s']:.2f}" for x in f["ui_partitions_page"]["loads"])))
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")


if __name__ == "__main__":
    sys.exit(main())
