"""Per-recording claims: exclusive between steps and processes, dropped by the
kernel when the holder dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from voiceman_pipeline.claims import Claims
from voiceman_pipeline_tests.conftest import REPO


def test_a_claim_held_by_one_step_is_not_taken_by_another(tmp_path):
    first, second = Claims(tmp_path), Claims(tmp_path)
    assert first.take(["a.wav", "b.wav"]) == ["a.wav", "b.wav"]
    assert second.take(["b.wav", "c.wav", "a.wav"]) == ["c.wav"]
    first.release(["b.wav"])
    assert second.take(["b.wav", "a.wav"]) == ["b.wav"]
    assert sorted(second.held) == ["b.wav", "c.wav"]
    first.release_all()
    assert second.take(["a.wav"]) == ["a.wav"]
    second.release_all()
    assert first.take(["a.wav", "b.wav", "c.wav"]) == ["a.wav", "b.wav", "c.wav"]


def test_odd_keys_get_their_own_lock_files(tmp_path):
    keys = ["sub/dir/x.wav", "a" * 300 + ".wav", "통화 1.wav", "x\ny.wav"]
    claims = Claims(tmp_path / "claims")
    assert claims.take(keys) == keys
    assert len(list((tmp_path / "claims").iterdir())) == len(keys)


def test_a_killed_holder_strands_no_claim(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from voiceman_pipeline.claims import Claims
            claims = Claims(Path({str(tmp_path)!r}))
            assert claims.take(["held.wav"]) == ["held.wav"]
            print("held", flush=True)
            time.sleep(600)
        """)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert Claims(tmp_path).take(["held.wav"]) == []
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        assert Claims(tmp_path).take(["held.wav"]) == ["held.wav"]
    finally:
        holder.kill()
        holder.wait()
