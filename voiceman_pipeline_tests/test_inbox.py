"""Partition keys, inbox scanning and the two-look stability rule."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time

import pytest

from voiceman_pipeline.inbox import (
    Cursor,
    Known,
    find_recording,
    partition_key_for,
    plan_intake,
    scan_inbox,
)

SAFE = re.compile(r"[A-Za-z0-9._-]+")

AWKWARD_NAMES = [
    "call with spaces.wav",
    "통화 녹음 2024.m4a",
    "Ünïcödé café.mp3",
    "a,b,c.wav",
    "dots..in...name.wav",  # ".." and "..." mean ranges to Dagster
    "case 12/evening call.wav",  # a path: the slash must not survive
    "x" * 300 + ".wav",
    "d" * 150 + "/" + "y" * 200 + ".wav",  # a 355-character relative path
    "tab\tname.wav",
    "-leading-dash.wav",
    "???.wav",
]


@pytest.mark.parametrize("name", AWKWARD_NAMES)
def test_awkward_names_become_safe_keys(name):
    key = partition_key_for(name)
    assert SAFE.fullmatch(key), key
    assert 0 < len(key) <= 200
    assert ".." not in key and not key.startswith((".", "-"))
    assert partition_key_for(name) == key  # deterministic


def test_keys_are_unique_when_names_clean_to_the_same_text():
    names = ["a b.wav", "a_b.wav", "a,b.wav", "a\tb.wav", "a  b.wav"]
    keys = [partition_key_for(n) for n in names]
    assert len(set(keys)) == len(keys)
    assert partition_key_for("a_b.wav") == "a_b.wav"  # safe names are their own key


def test_long_names_keep_distinct_keys():
    a, b = "x" * 300 + "1.wav", "x" * 300 + "2.wav"
    assert partition_key_for(a) != partition_key_for(b)


def test_scan_finds_audio_and_maps_keys_back_to_files(tmp_path):
    inbox = tmp_path / "inbox"
    # Linux allows 255 bytes per name component; longer paths come via folders.
    storable = [n for n in AWKWARD_NAMES if all(len(p) < 250 for p in n.split("/"))]
    for name in storable + ["notes.txt", ".hidden.wav", "upload.wav.part", "~$lock.wav"]:
        path = inbox / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"RIFF")
    scan = scan_inbox(inbox, max_file_bytes=10**6)
    found = {f.relative_path for f in scan.files}
    assert found == set(storable)  # text, hidden and temporary files ignored
    for f in scan.files:
        assert find_recording(inbox, f.key) == f.path
    with pytest.raises(FileNotFoundError, match="partition key 'missing.wav'"):
        find_recording(inbox, "missing.wav")


def test_scan_rejects_symlinks_escapes_and_oversized(tmp_path):
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    inbox.mkdir()
    outside.mkdir()
    (outside / "secret.wav").write_bytes(b"x" * 10)
    os.symlink(outside / "secret.wav", inbox / "link.wav")
    os.symlink(outside, inbox / "linked_dir")  # a folder link is not followed
    (inbox / "big.wav").write_bytes(b"x" * 2000)
    (inbox / "ok.wav").write_bytes(b"x" * 10)
    scan = scan_inbox(inbox, max_file_bytes=1000)
    assert [f.relative_path for f in scan.files] == ["ok.wav"]
    reasons = {r.relative_path: r.reason for r in scan.rejected}
    assert "symbolic link" in reasons["link.wav"]
    assert "over the" in reasons["big.wav"] and "max_file_bytes" in reasons["big.wav"]


def look(inbox, cursor=None, known=None, registered=(), cap=10):
    """One look, as a sensor tick: the plan, and the cursor it leaves."""
    plan = plan_intake(
        scan_inbox(inbox, 10**6), Cursor.parse(cursor), known or {}, set(registered), max_new_per_tick=cap
    )
    return plan, plan.cursor()


def test_file_is_ready_only_after_two_identical_looks(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    path = inbox / "growing.wav"
    path.write_bytes(b"a" * 100)
    first, cursor = look(inbox)
    assert first.ready == [] and first.waiting == ["growing.wav"]
    with open(path, "ab") as handle:  # still being written
        handle.write(b"b" * 100)
    second, cursor = look(inbox, cursor)
    assert second.ready == []
    third, cursor = look(inbox, cursor)
    assert [r.file.key for r in third.ready] == ["growing.wav"]
    assert third.ready[0].is_new_key
    # Requested once: not again while its run is on its way.
    fourth, cursor = look(inbox, cursor, registered={"growing.wav"})
    assert fourth.ready == [] and "growing.wav" in fourth.requested


def test_a_requested_file_is_not_read_again_after_a_restart(tmp_path, monkeypatch):
    """A file handed to a run whose intake is not recorded yet (the run is
    queued) is recognised by the size and mtime kept in the cursor, also by a
    process that has not hashed it (the SHA cache is per process)."""
    from voiceman_pipeline import inbox as inbox_module

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    path = inbox / "queued.wav"
    path.write_bytes(b"a" * 100)
    _, cursor = look(inbox)
    plan, cursor = look(inbox, cursor)
    assert [r.file.key for r in plan.ready] == ["queued.wav"]
    monkeypatch.setattr(inbox_module, "_SHA_CACHE", {})  # a restarted sensor
    hashed = []
    monkeypatch.setattr(inbox_module, "sha256_file", lambda p: hashed.append(p) or "0" * 64)
    for _ in range(2):
        plan, cursor = look(inbox, cursor, registered={"queued.wav"})
        assert plan.ready == [] and plan.waiting == [] and hashed == []
    assert "queued.wav" in json.loads(cursor)["requested"]
    # Replaced while queued (another size): read after two looks, requested again.
    path.write_bytes(b"b" * 200)
    monkeypatch.setattr(inbox_module, "sha256_file", lambda p: hashlib.sha256(p.read_bytes()).hexdigest())
    plan, cursor = look(inbox, cursor, registered={"queued.wav"})
    plan, cursor = look(inbox, cursor, registered={"queued.wav"})
    assert [(r.file.key, r.is_new_key) for r in plan.ready] == [("queued.wav", False)]


def test_a_file_as_dagster_recorded_it_is_settled_without_reading_it(tmp_path, monkeypatch):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    path = inbox / "done.wav"
    path.write_bytes(b"a" * 100)
    stat = path.stat()
    known = {"done.wav": Known("f" * 64, stat.st_size, stat.st_mtime_ns)}
    def no_reading(path):
        raise AssertionError(f"{path} was read")

    monkeypatch.setattr("voiceman_pipeline.inbox.sha256_file", no_reading)
    plan, cursor = look(inbox, known=known, registered={"done.wav"})
    assert plan.ready == [] and plan.waiting == [] and plan.unchanged == []
    assert json.loads(cursor) == {"pending": {}, "requested": {}}


def test_content_already_taken_in_is_not_run_again_whoever_took_it_in(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    path = inbox / "fixed.mp3"
    path.write_bytes(b"fixed content")
    sha = hashlib.sha256(b"fixed content").hexdigest()
    known = {"fixed.mp3": Known(sha, None, None)}  # e.g. a backfill took it in
    plan, cursor = look(inbox, known=known, registered={"fixed.mp3"})
    plan, cursor = look(inbox, cursor, known=known, registered={"fixed.mp3"})
    assert plan.ready == [] and plan.unchanged == ["fixed.mp3"]
    # Said once: the sensor logged it on every tick (the file hashed only once).
    plan, cursor = look(inbox, cursor, known=known, registered={"fixed.mp3"})
    assert plan.ready == [] and plan.unchanged == []
    path.write_bytes(b"other content")  # replaced: runs again
    plan, cursor = look(inbox, cursor, known=known, registered={"fixed.mp3"})
    plan, cursor = look(inbox, cursor, known=known, registered={"fixed.mp3"})
    assert [r.file.key for r in plan.ready] == ["fixed.mp3"] and not plan.ready[0].is_new_key


def test_cap_defers_the_rest_to_the_next_tick(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(5):
        (inbox / f"f{i}.wav").write_bytes(bytes([i]) * 10)
    _, cursor = look(inbox, cap=2)
    plan, cursor = look(inbox, cursor, cap=2)
    assert len(plan.ready) == 2 and plan.deferred == 3
    plan, cursor = look(inbox, cursor, cap=2)
    assert len(plan.ready) == 2 and plan.deferred == 1
    plan, cursor = look(inbox, cursor, cap=2)
    assert len(plan.ready) == 1 and plan.deferred == 0


def test_the_cursor_stays_small_with_ten_thousand_settled_files(tmp_path, monkeypatch):
    """The sensor's cursor is ``plan.cursor()``: with every file as Dagster
    recorded it, it holds nothing per file, and no file is read."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(10_000):
        (inbox / f"call{i:05d}.wav").write_bytes(b"x")
    scan = scan_inbox(inbox, 10**6)
    known = {f.key: Known("a" * 64, f.size, f.mtime_ns) for f in scan.files}

    def no_reading(path):
        raise AssertionError(f"{path} was read")

    monkeypatch.setattr("voiceman_pipeline.inbox.sha256_file", no_reading)
    plan = plan_intake(scan, Cursor(), known, set(known), max_new_per_tick=100)
    assert len(scan.files) == 10_000 and plan.ready == [] and plan.waiting == []
    assert len(plan.cursor()) < 100


def test_scattered_recordings_share_range_runs_up_to_the_caps():
    from voiceman_pipeline.partitions import spanning_batches

    keys = [f"k{i}" for i in range(20)]
    picked = ["k1", "k4", "k5", "k9", "k18"]
    assert spanning_batches(keys, picked, batch_size=2, max_span=100) == [
        keys[1:5], keys[5:10], keys[18:19]
    ]
    assert spanning_batches(keys, picked, batch_size=8, max_span=6) == [keys[1:6], keys[9:10], keys[18:19]]
    assert spanning_batches(keys, [], batch_size=8, max_span=6) == []
    # A failed key between two picked ones is not covered: the range ends before it.
    assert spanning_batches(keys, picked, batch_size=8, max_span=100, unspannable={"k3", "k12"}) == [
        keys[1:2], keys[4:10], keys[18:19]
    ]
    assert spanning_batches(keys, picked, batch_size=8, max_span=100, unspannable={"k4"}) == [
        keys[1:19]  # picked itself: covered
    ]


def test_recordings_are_shared_evenly_among_the_runs_that_go_at_once():
    from voiceman_pipeline.partitions import balanced_batch_size, contiguous_batches

    def sizes(count: int, batch_size: int, parallel: int) -> list[int]:
        keys = [f"k{i}" for i in range(count)]
        size = balanced_batch_size(count, batch_size, parallel)
        return [len(batch) for batch in contiguous_batches(keys, keys, size)]

    assert sizes(6, 8, 2) == [3, 3]  # both workers busy, not one run of 6
    assert sizes(3, 8, 2) == [2, 1]
    assert sizes(1, 8, 2) == [1]
    assert sizes(10, 8, 2) == [5, 5]  # not 8 and 2
    assert sizes(20, 8, 2) == [5, 5, 5, 5]  # two rounds of two runs, none over 8
    assert sizes(16, 8, 1) == [8, 8]  # one at a time: runs as large as allowed
    assert sizes(10, 8, 1) == [5, 5]
    assert sizes(40, 8, 16) == [3] * 13 + [1]  # 14 of 16 cores busy, not 5
    assert sizes(4, 8, -1) == [4]  # no limit on the run queue: the batch size alone
    assert sizes(0, 8, 2) == []


def test_a_file_untouched_for_the_settle_time_is_ready_at_once(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    old, fresh = inbox / "old.wav", inbox / "fresh.wav"
    old.write_bytes(b"a" * 10)
    fresh.write_bytes(b"b" * 10)
    an_hour_ago = time.time_ns() - 3600 * 10**9
    os.utime(old, ns=(an_hour_ago, an_hour_ago))
    plan = plan_intake(scan_inbox(inbox, 10**6), Cursor(), {}, set(), max_new_per_tick=10,
                       settled_after_s=30)
    assert [r.file.key for r in plan.ready] == ["old.wav"] and plan.waiting == ["fresh.wav"]
