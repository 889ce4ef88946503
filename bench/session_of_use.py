"""A session of use, as a user at a terminal would run it, in a fresh home and data dir.

    python bench/session_of_use.py [--root DIR]

Each step is the real `voiceman` command, a process of its own (default settings:
sqlite storage, CPU engines, a worker per core):

1. ``voiceman run --samples``: the bundled samples (what ``make run`` does);
2. ten calls of about 18 s (the samples joined), an oddly named copy of one, an
   empty file, a text file named .wav and a WAV cut to its first 30 bytes;
3. six calls of about 55 s, the command killed (SIGKILL, the command's process
   alone) once three transcripts are stored, then the same command again;
4. three more, stopped with SIGINT to its process group (Ctrl+C at a terminal)
   once five results are stored, then the same command again;
5. ``voiceman verify`` and ``voiceman status``;
6. ``bench/memory_prediction.py --from-home``: predicted against measured peak
   of every result the session computed (its own result file).

Per step: the exit status, wall seconds, the output's last lines, and for the
stopped commands the seconds from the signal to the exit, the command's child
processes still alive 5 s after it, and of the step's results (one per stage
and recording) how many the stopped command left, how many the next one
computed and how many are still missing. Over the session, the most
materializations any (stage, recording) got (1: nothing was computed twice). A record, not a test: it asserts
nothing. Figures go to bench/results/session-of-use-<time>.json.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from common import REPO, fresh_home, wait_or_stop, write_figures  # bench/common.py
from memory_prediction import computed_results, write_call

sys.path.insert(0, str(REPO))
VOICEMAN = str(Path(sys.executable).with_name("voiceman"))
ODD_NAME = "Anruf 3. März (Kopie) #2 — ü's.wav"


class Session:
    """The home and data dir of the session, and what its commands did."""

    def __init__(self, root: Path):
        self.home = fresh_home(root / "home")
        self.data = root / "data"
        self.inbox = self.data / "inbox"
        self.inbox.mkdir(parents=True)
        self.env = {**os.environ, "DAGSTER_HOME": str(self.home), "VOICEMAN_DATA_DIR": str(self.data)}
        self.env.pop("VOICEMAN_WORKERS", None)  # the default: a worker per core
        self.steps: list[dict] = []
        self._instance = None

    def start(self, *args: str) -> tuple[subprocess.Popen, float]:
        child = subprocess.Popen([VOICEMAN, *args], env=self.env, cwd=self.data.parent, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        return child, time.perf_counter()

    def finish(self, name: str, child: subprocess.Popen, began: float, **more) -> dict:
        rc = wait_or_stop(child)
        output = child.stdout.read()
        step = {"step": name, "command": child.args[1:], "exit_status": rc,
                "wall_s": round(time.perf_counter() - began, 2), **more,
                "output_tail": output.strip().splitlines()[-12:]}
        self.steps.append(step)
        print(f"{name}: exit {rc} in {step['wall_s']} s", flush=True)
        return step

    def command(self, name: str, *args: str) -> dict:
        return self.finish(name, *self.start(*args))

    def instance(self):
        """The home's Dagster instance, opened once its storage exists (after the first command)."""
        if self._instance is None:
            os.environ["DAGSTER_HOME"] = str(self.home)
            from dagster import DagsterInstance

            self._instance = DagsterInstance.get()
        return self._instance

    def results(self, keys: list[str] | None = None) -> Counter:
        """Computed results per (stage, partition key), of ``keys`` (all where None)."""
        from voiceman_pipeline.assets.stages import STAGES

        return Counter((stage.name, key) for stage in STAGES
                       for key, _ in computed_results(self.instance(), stage.name) if keys is None or key in keys)

    def new_keys(self, before: set[str]) -> list[str]:
        return sorted(set(self.instance().get_dynamic_partitions("audio_files")) - before)

    def stopped_then_again(self, name: str, sig: signal.Signals, when: str, enough: int) -> None:
        """``voiceman run`` on what is new in the inbox, stopped with ``sig`` once
        ``enough`` results of ``when`` (a stage, or "any") are stored, then run again."""
        import psutil

        known = set(self.instance().get_dynamic_partitions("audio_files"))
        child, began = self.start("run")
        keys: list[str] = []
        while child.poll() is None:
            keys = keys or self.new_keys(known)
            done = self.results(keys) if keys else Counter()
            if sum(n for (stage, _), n in done.items() if when in ("any", stage)) >= enough:
                break
            time.sleep(0.1)
        running = child.poll() is None  # else it finished first: nothing was stopped
        family = psutil.Process(child.pid).children(recursive=True) if running else []
        signalled = time.perf_counter()
        if running and sig is signal.SIGKILL:
            child.kill()  # the command's process alone, as `kill -9 PID` does
        elif running:
            os.killpg(child.pid, sig)  # the terminal's Ctrl+C goes to the whole foreground group
        child.wait()
        to_exit = time.perf_counter() - signalled
        time.sleep(5)
        alive = [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        kept = self.results(keys)
        self.finish(f"{name}: stopped", child, began, signal=sig.name if running else None,
                    signal_to_exit_s=round(to_exit, 2),
                    children_alive_5s_later=alive, recordings=len(keys), results_stored=sum(kept.values()))
        again = self.command(f"{name}: again", "run")
        computed = self.results(keys) - kept
        missing = [pair for pair in self.pairs(keys) if pair not in kept and pair not in computed]
        again.update(results_kept=sum(kept.values()), results_computed=sum(computed.values()),
                     results_missing=len(missing))

    @staticmethod
    def pairs(keys: list[str]) -> list[tuple[str, str]]:
        from voiceman_pipeline.assets.stages import STAGES

        return [(stage.name, key) for stage in STAGES for key in keys]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, help="an empty folder for the home and data dir"
                        " (default: a temporary one, deleted after)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vm-session-") as tmp:
        s = Session(args.root or Path(tmp))
        s.command("samples", "run", "--samples")
        for i in range(10):
            write_call(s.inbox / f"call18_{i:02d}.wav", i, 18.0)
        (s.inbox / ODD_NAME).write_bytes((s.inbox / "call18_03.wav").read_bytes())
        (s.inbox / "empty.wav").write_bytes(b"")
        (s.inbox / "not_audio.wav").write_text("Notizen zum Anruf, keine Aufnahme.\n")
        (s.inbox / "cut_short.wav").write_bytes((s.inbox / "call18_00.wav").read_bytes()[:30])
        s.command("18 s calls, a copy and three bad files", "run")
        for i in range(6):
            write_call(s.inbox / f"call55_{i:02d}.wav", i, 55.0)
        s.stopped_then_again("six 55 s calls", signal.SIGKILL, "transcript", 3)
        for i in range(6, 9):
            write_call(s.inbox / f"call55_{i:02d}.wav", i, 55.0)
        s.stopped_then_again("three 55 s calls", signal.SIGINT, "any", 5)
        s.command("verify", "verify")
        s.command("status", "status")
        counts = s.results()
        prediction = subprocess.run([sys.executable, str(REPO / "bench" / "memory_prediction.py"),
                                     "--from-home", str(s.home)], env=s.env, text=True, capture_output=True)
        figures = {"bench": "session_of_use", "steps": s.steps,
                   "recordings": len(s.instance().get_dynamic_partitions("audio_files")),
                   "results": sum(counts.values()), "most_materializations_of_one_result": max(counts.values()),
                   "memory_prediction": prediction.stdout.strip().splitlines()}
        s.instance().dispose()
    print(f"wrote {write_figures(figures, 'session-of-use')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
