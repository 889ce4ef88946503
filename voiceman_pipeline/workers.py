"""Worker processes for ``voiceman run`` / ``retry-failed``: batches side by side.

With W > 1 workers the command starts W worker processes
(``python -m voiceman_pipeline.workers``) and hands each a batch at a time;
a worker executes its batch's run with ``execute_in_process`` on the same
instance, exactly as the command does itself with one worker, so every run
is tagged with the worker's own host, pid and start time (``runs.launch_tags``)
and ``runs.clean_up`` recognises a dead worker's runs.

Why plain subprocesses rather than a ``ProcessPoolExecutor``: the native
thread-pool caps (``OMP_NUM_THREADS`` ...) must be in the environment before
the worker imports numpy or torch, which ``env=`` gives directly; the command
needs each worker's pid to forward a stop to it, and to notice that one died
(a pool breaks as a whole); and each worker sits in its own process group, so
a terminal's Ctrl+C reaches only the command, which stops every worker's run
in order (a worker that got the terminal's SIGINT while idle would die with a
traceback).

Protocol: one JSON line per task on the worker's stdin (EOF: exit), one JSON
line per message on its stdout (``progress``: a recording's progress note;
``say``: a line to print; ``done``: the run's outcome). The worker's own
prints and Dagster's console go to stderr, as the command's do.

Stop: the command sends SIGINT to each busy worker; Dagster cancels the run (CANCELED, nothing partial written) and the worker
reports it and exits. If the command itself is killed (kill -9), each worker
is killed by the kernel (``PR_SET_PDEATHSIG``, Linux), and its run, tagged
with the worker's pid, is cleaned up by the next command.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

WORKERS_ENV = "VOICEMAN_WORKERS"
_PARENT_ENV = "VOICEMAN_WORKER_PARENT"  # the command's pid: a worker whose parent is gone exits
# Native thread pools a worker caps (read by the libraries at import).
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity, as a container's cpuset sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(pool: str | None) -> int:
    """Batches side by side when nothing says: one per usable core with CPU
    engines; one when the analysis step is in a pool (``gpu``), which lets
    one such step run at a time anyway."""
    return 1 if pool else usable_cores()


def threads_per_worker(workers: int, cores: int | None = None) -> int:
    """Native threads each of ``workers`` workers may use so that together they
    do not oversubscribe the cores."""
    return max(1, (cores or usable_cores()) // workers)


@dataclass
class Worker:
    """One worker process, as the command sees it."""

    process: subprocess.Popen
    batch: list[str] | None = None  # the batch it is running, None while idle
    stop_sent: float = 0.0  # monotonic time the stop was forwarded (0: not yet)

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, task: dict) -> None:
        try:
            self.process.stdin.write(json.dumps(task) + "\n")
            self.process.stdin.flush()
        except OSError:
            pass  # it has just died: its exit is reported on the message queue


class WorkerPool:
    """``workers`` worker processes; messages from all of them on one queue."""

    def __init__(self, workers: int):
        self.messages: queue.Queue = queue.Queue()  # (worker, message dict or None at exit)
        threads = threads_per_worker(workers)
        env = {**os.environ, _PARENT_ENV: str(os.getpid())}
        for name in THREAD_ENV:  # a person's own setting wins
            env.setdefault(name, str(threads))
        package_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        self.workers = []
        for _ in range(workers):
            process = subprocess.Popen(
                [sys.executable, "-m", "voiceman_pipeline.workers"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                process_group=0,  # the terminal's Ctrl+C reaches the command only (see above)
            )
            worker = Worker(process)
            threading.Thread(target=self._read, args=(worker,), daemon=True).start()
            self.workers.append(worker)

    def _read(self, worker: Worker) -> None:
        for line in worker.process.stdout:
            try:
                self.messages.put((worker, json.loads(line)))
            except ValueError:
                continue  # not ours (a library writing to fd 1 directly)
        worker.process.wait()
        self.messages.put((worker, None))

    def idle(self) -> list[Worker]:
        return [w for w in self.workers if w.batch is None and w.process.poll() is None]

    def busy(self) -> list[Worker]:
        return [w for w in self.workers if w.batch is not None]

    def interrupt_busy(self, instance) -> int:
        """SIGINT, once, to every busy worker, its run marked canceling first
        (``runs.mark_canceling``): the run ends CANCELED. (Once: a second SIGINT
        while Dagster cancels the run interrupts the cleanup.) How many got one now."""
        from voiceman_pipeline.runs import mark_canceling

        sent = 0
        for worker in self.busy():
            if not worker.stop_sent and worker.process.poll() is None:
                mark_canceling(instance, worker.process.pid)
                worker.process.send_signal(signal.SIGINT)
                worker.stop_sent = time.monotonic()
                sent += 1
        return sent

    def close(self, timeout_s: float = 60) -> None:
        """Let every worker exit (EOF on its stdin); kill one that does not."""
        for worker in self.workers:
            try:
                worker.process.stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + timeout_s
        for worker in self.workers:
            try:
                worker.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()


# --- the worker process -----------------------------------------------------


def _die_with_parent() -> None:
    """Be killed when the command's process ends, however it ends (Linux)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return  # no prctl (not Linux): a worker ends at its stdin's EOF instead
    if str(os.getppid()) != os.environ.get(_PARENT_ENV):
        os._exit(1)  # the parent died before prctl took effect


def worker_main() -> int:
    _die_with_parent()
    state = {"idle": True, "stop": False, "again": False}

    def on_interrupt(_signum, _frame):
        # While a run executes Dagster has SIGINT itself (the run is canceled).
        # Between runs a stop ends the worker. Between taking a task and
        # Dagster taking over SIGINT, the flag keeps the run from starting, or,
        # if it got past that check, SIGINT again shortly reaches Dagster's
        # handler. (Just after a run the second one finds the worker gone.)
        state["stop"] = True
        if state["idle"]:
            raise KeyboardInterrupt
        if not state["again"]:
            state["again"] = True
            again = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
            again.daemon = True
            again.start()

    signal.signal(signal.SIGINT, on_interrupt)
    signal.signal(signal.SIGTERM, on_interrupt)
    # Messages go over the original stdout; anything else printed goes to stderr.
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    lock = threading.Lock()

    def send(message: dict) -> None:
        with lock:
            channel.write(json.dumps(message) + "\n")
            channel.flush()

    try:
        from voiceman_pipeline.cli import collection_paused

        with collection_paused(then_freeze=True):  # startup, as the command's
            from dagster import DagsterInstance

            from voiceman_pipeline import definitions, progress, storage  # noqa: F401 (loaded while idle)

        # torch, numpy's BLAS and OpenMP size their thread pools from the
        # THREAD_ENV variables the command set (engines import them inside runs).
        progress._CURRENT["bar"] = progress.Forwarder(lambda note: send({"progress": note}))
        with DagsterInstance.get() as instance:
            while not state["stop"]:
                line = sys.stdin.readline()
                if not line:
                    return 0
                if state["stop"]:
                    break
                state["idle"] = False
                send({"done": run_batch(instance, json.loads(line), send, state)})
                state["idle"] = True
    except KeyboardInterrupt:
        pass
    return 130


def run_batch(instance, task: dict, send, state: dict) -> dict:
    """Execute one batch's run in this process; its outcome for the command."""
    from voiceman_pipeline import runs
    from voiceman_pipeline.cli import failed_recordings
    from voiceman_pipeline.definitions import defs, recording_analysis
    from voiceman_pipeline.jobs import source_tags
    from voiceman_pipeline.partitions import range_tags

    batch = task["batch"]
    if recording_analysis.op.pool:  # --workers above 1 with GPU engines: wait stoppably
        state["idle"] = True  # a stop ends the wait at once
        try:
            if not state["stop"]:
                runs.wait_for_pool(instance, recording_analysis.op.pool,
                                   say=lambda line: send({"say": line}))
        except KeyboardInterrupt:
            pass
        finally:
            state["idle"] = False
    if state["stop"]:
        return {"run_id": None}  # stopped before it started
    result = defs.resolve_job_def("analysis_job").execute_in_process(
        instance=instance,
        tags={**range_tags(batch), **runs.launch_tags(), **source_tags(task["source"])},
        run_config=task["run_config"],
        raise_on_error=False,
    )
    return {  # the command reads the rest (the run's tags) from the instance
        "run_id": result.run_id,
        "success": result.success,
        "status": result.dagster_run.status.value,
        "failed": failed_recordings(result.all_events),
    }


if __name__ == "__main__":
    from voiceman_pipeline.cli import skip_final_collection, warnings_only_at_the_root

    warnings_only_at_the_root()
    code = worker_main()
    skip_final_collection()
    sys.exit(code)
