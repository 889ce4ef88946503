"""Evidence kept: earlier results are never overwritten, and all of it can be re-checked.

When a recording's content changes in the inbox and it is taken in again,
intake first moves the results computed from the earlier content into
``outputs/<key>/superseded/<old SHA-256, first 16 hex>/`` (a ``-2``, ``-3``
... suffix when that content was superseded before), next to a
``superseded.json`` saying when, and which content replaced which. Nothing
is deleted.

Likewise, before a result whose files no longer hold what Dagster recorded when
they were written (edited or damaged) is computed again, those files are moved
into ``outputs/<key>/altered/<UTC time>-<stage>/`` beside an ``altered.json``
with both digests: what was found altered is kept, not overwritten.

``verify_all`` re-hashes every registered recording and every result file
and compares them with the SHA-256 digests Dagster's storage recorded when
they were taken in and written (``voiceman verify``).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from dagster import DagsterInstance, MetadataValue, get_dagster_logger

from voiceman_pipeline.assets import checkpoint
from voiceman_pipeline.assets.stages import STAGES
from voiceman_pipeline.audio_io import sha256_file
from voiceman_pipeline.errors import PermanentError
from voiceman_pipeline.inbox import find_recording
from voiceman_pipeline.partitions import audio_files
from voiceman_pipeline.recording_files import AUDIO_JSON
from voiceman_pipeline.resources.outputs import RecordingStore
from voiceman_pipeline.retire import retirements

SUPERSEDED_DIR = "superseded"
SUPERSEDED_JSON = "superseded.json"
SUPERSEDES_KEY = "supersedes"  # intake metadata: SHA-256 of the content replaced
KEPT_KEY = "superseded_results"  # intake metadata: folder the earlier results went to
ALTERED_DIR = "altered"
ALTERED_JSON = "altered.json"
# audio.json last: while it is still in place an interrupted move is finished
# by the next intake (it names the content the remaining files came from).
RESULT_FILES = sorted({n for s in STAGES for n in s.writes}, key=lambda n: n == AUDIO_JSON)


def superseded_contents(store: RecordingStore, key: str) -> list[str]:
    """SHA-256 of each earlier content of this recording whose results were kept."""
    found = []
    for record in sorted((store.file_dir(key) / SUPERSEDED_DIR).glob(f"*/{SUPERSEDED_JSON}")):
        try:
            found.append(json.loads(record.read_text())["old_sha256"])
        except (OSError, ValueError, KeyError):
            found.append(f"unreadable {record}")
    return found


def keep_earlier_results(store: RecordingStore, key: str, new_sha256: str) -> dict:
    """Before intake writes results for content ``new_sha256``, move the results
    of earlier, different content into a superseded/ folder (one ``os.rename``
    per file: atomic, same filesystem).

    Returns the intake's extra metadata: ``supersedes`` (the old SHA-256) and
    ``superseded_results`` (the folder), or {} when nothing was moved (first
    intake, or the same content taken in again)."""
    folder = store.file_dir(key)
    old = _taken_in(folder)
    present = [name for name in RESULT_FILES if (folder / name).is_file()]
    if old is None or old == new_sha256 or not present:
        return {}
    kept, n = folder / SUPERSEDED_DIR / old[:16], 1
    # Never rename over a kept file: same content superseded again gets its own
    # folder; a folder holding none of these names (a move interrupted halfway) is finished.
    while any((kept / name).exists() for name in present):
        n += 1
        kept = kept.with_name(f"{old[:16]}-{n}")
    if not (kept / SUPERSEDED_JSON).exists():
        note = {
            "superseded_at": datetime.now(timezone.utc).isoformat(),
            "old_sha256": old,  # the recording these results were computed from
            "new_sha256": new_sha256,  # the content that replaced it in the inbox
            "files": present,
            # What each file held when set aside: `voiceman verify` checks them again.
            "sha256": {name: _digest_of(folder, name) for name in present},
        }
        data = json.dumps(note, indent=2).encode()
        store.write_file(kept / SUPERSEDED_JSON, lambda handle: handle.write(data), len(data))
    for name in present:
        os.rename(folder / name, kept / name)
    get_dagster_logger().warning(
        f"{key}: the recording's content changed (SHA-256 {old[:16]}… -> {new_sha256[:16]}…); "
        f"the results computed from the earlier content ({len(present)} files) are kept "
        f"in {kept}, not overwritten."
    )
    return {SUPERSEDES_KEY: old, KEPT_KEY: MetadataValue.path(str(kept))}


def set_aside_altered(store: RecordingStore, key: str, stage: str, recorded: dict[str, str]) -> Path | None:
    """Move the files of ``stage``'s result that no longer hold what was recorded
    when they were written (``recorded``: name -> SHA-256) into a new altered/
    folder, with ``altered.json`` (both digests), before the stage computes them
    again; the folder, or None when every file is as recorded or gone."""
    folder = store.file_dir(key)
    found = {name: sha256_file(folder / name) for name in recorded if (folder / name).is_file()}
    altered = {name: digest for name, digest in found.items() if digest != recorded[name]}
    if not altered:
        return None
    now = datetime.now(timezone.utc)
    kept = folder / ALTERED_DIR / f"{now.strftime('%Y%m%dT%H%M%S.%fZ')}-{stage}"
    note = {"set_aside_at": now.isoformat(), "stage": stage,
            "recorded_sha256": {name: recorded[name] for name in altered},  # when written
            "sha256": altered}  # as found, and set aside: `voiceman verify` checks them again
    data = json.dumps(note, indent=2).encode()
    store.write_file(kept / ALTERED_JSON, lambda handle: handle.write(data), len(data))
    for name in altered:
        os.rename(folder / name, kept / name)
    return kept


def altered_results(store: RecordingStore, key: str) -> list[str]:
    """The altered/ folders of this recording (``<UTC time>-<stage>``), oldest first."""
    return sorted(note.parent.name for note in (store.file_dir(key) / ALTERED_DIR).glob(f"*/{ALTERED_JSON}"))


def _digest_of(folder: Path, name: str) -> str:
    """SHA-256 of a result file; the decoded signal's as its intake recorded it
    (``decoded_sha256``, checked by every stage that read it), not hashed again:
    a long call's is GBs."""
    if name.endswith(".npy"):
        try:
            return json.loads((folder / AUDIO_JSON).read_bytes())["decoded_sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return sha256_file(folder / name)


def _taken_in(folder: Path) -> str | None:
    """SHA-256 of the recording the results in ``folder`` were computed from:
    audio.json's, else any other result's ``source_sha256`` (audio.json deleted);
    None when no result says (nothing there, or nothing readable)."""
    for name in RESULT_FILES[::-1]:  # audio.json first
        if not name.endswith(".json"):
            continue
        try:
            data = json.loads((folder / name).read_bytes())
        except (OSError, ValueError):
            continue
        field = "sha256" if name == AUDIO_JSON else "source_sha256"
        sha = data.get(field) if isinstance(data, dict) else None
        if isinstance(sha, str) and sha:
            return sha
    return None


GONE = "gone from the inbox"


@dataclass(frozen=True)
class Mismatch:
    """One difference between what Dagster recorded and what is on disk now."""

    key: str  # the recording's partition key
    # "recording" (the inbox file), "<stage>/<file name>" in outputs/<key>/, or
    # "<stage>/<file name> input <upstream file name>" (what it was computed from)
    what: str
    expected: str  # SHA-256 recorded at intake / when the stage wrote or read the file
    found: str  # SHA-256 now, or "missing", or "gone from the inbox"

    def __str__(self) -> str:
        return f"{self.key}: {self.what}: recorded {self.expected}, found {self.found}"


def verify_all(instance: DagsterInstance, store: RecordingStore) -> list[Mismatch]:
    """Re-hash every registered recording and every result file of it against the
    latest materialization of each stage. Recordings never taken in have nothing
    recorded and are skipped, as are retired ones (set aside: deleted, or bad and
    accepted as such; ``retire.py``). A file missing from outputs/<key>/ whose result is
    older than the latest intake counts as kept when a superseded/ copy has its
    digest (the chain has not been re-run since the content changed)."""
    return _verify(instance, store)[2]


def _verify(instance: DagsterInstance, store: RecordingStore) -> tuple[int, int, list[Mismatch]]:
    """(how many recordings with an intake recorded were checked, how many such
    were skipped as retired, the mismatches found)."""
    keys = sorted(instance.get_dynamic_partitions(audio_files.name))
    recorded = {s.name: checkpoint.latest_materializations(instance, s, keys) for s in STAGES}
    retired = retirements(instance, keys)
    found: list[Mismatch] = []
    for key in keys:
        intake = recorded["audio"].get(key)
        if intake is None or key in retired:
            continue
        try:
            now = sha256_file(find_recording(store.inbox_dir, key))
        except (OSError, ValueError, PermanentError):  # deleted, moved, or now a link
            now = GONE
        if now != intake.data_version:
            found.append(Mismatch(key, "recording", str(intake.data_version), now))
        folder = store.file_dir(key)
        for stage in STAGES:
            result = recorded[stage.name].get(key)
            in_place = result is not None  # every file there, with its recorded digest
            for name, digest in (result.outputs if result else {}).items():
                path = folder / name
                if path.is_file():
                    now = sha256_file(path)
                elif result.storage_id < intake.storage_id and any(
                    sha256_file(p) == digest for p in folder.glob(f"{SUPERSEDED_DIR}/*/{name}")
                ):
                    in_place = False  # kept aside with the earlier content: nothing to check
                    continue
                else:
                    now = "missing"
                if now != digest:
                    found.append(Mismatch(key, f"{stage.name}/{name}", digest, now))
                    in_place = False
            # Intact and in place, but computed from an upstream file since computed again.
            upstream = {name: recorded[name].get(key) for name in stage.reads}
            if in_place and None not in upstream.values():
                changed = checkpoint.changed_inputs(folder, stage, upstream)  # type: ignore[arg-type]
                for name, (digest, now) in changed.items():
                    what = "inputs" if name == checkpoint.INPUTS_NOT_RECORDED else f"input {name}"
                    found.append(Mismatch(key, f"{stage.name}/{stage.writes[0]} {what}", digest, now))
        found += _kept_mismatches(key, folder)
    skipped = len(retired.keys() & recorded["audio"].keys())
    return len(recorded["audio"]) - skipped, skipped, found + _summary_mismatches(instance, store)


SUMMARY_TABLE = "summary table"  # a Mismatch's key for the summary's files (no recording's)


def _summary_mismatches(instance: DagsterInstance, store: RecordingStore) -> list[Mismatch]:
    """The latest summary's files (summary.csv, summary.parquet) that no longer hold
    what it wrote; a summary built before it recorded them is not checked."""
    from voiceman_pipeline.assets.summary import summary

    found, seen = [], None
    for _ in range(2):  # a summary built while these were hashed: check that one
        built = instance.fetch_materializations(summary.key, limit=1).records
        if not built or (seen is not None and built[0].storage_id == seen):
            return found
        seen, recorded = built[0].storage_id, built[0].asset_materialization.metadata.get(checkpoint.OUTPUTS_KEY)
        found = []
        for name, digest in (recorded.value if recorded else {}).items():
            path = store.outputs_dir / name
            now = sha256_file(path) if path.is_file() else "missing"
            if now != digest:
                found.append(Mismatch(SUMMARY_TABLE, name, digest, now))
        if not found:
            return found
    return found


def _kept_mismatches(key: str, folder: Path) -> list[Mismatch]:
    """Files set aside in superseded/ or altered/ that no longer hold what they
    held then (their note's ``sha256``; superseded/ folders kept before it
    recorded them are not checked)."""
    found = []
    notes = [*sorted((folder / SUPERSEDED_DIR).glob(f"*/{SUPERSEDED_JSON}")),
             *sorted((folder / ALTERED_DIR).glob(f"*/{ALTERED_JSON}"))]
    for note_path in notes:
        where = f"{note_path.parent.parent.name}/{note_path.parent.name}"
        try:
            digests = json.loads(note_path.read_bytes()).get("sha256") or {}
        except (OSError, ValueError, AttributeError):
            found.append(Mismatch(key, f"{where}/{note_path.name}", "readable JSON", "unreadable"))
            continue
        for name, digest in digests.items():
            path = note_path.parent / name
            now = sha256_file(path) if path.is_file() else "missing"
            if now != digest:
                found.append(Mismatch(key, f"{where}/{name}", digest, now))
    return found


def verify_command(instance: DagsterInstance, store: RecordingStore) -> int:
    """``voiceman verify``: print one line per mismatch, or that all match.
    Returns the exit code: 0 when everything matches, 1 otherwise."""
    checked, retired, mismatches = _verify(instance, store)
    for mismatch in mismatches:
        print(mismatch)
    if not mismatches:
        print(f"all {checked} recordings and their results match what was recorded")
    if retired:
        print(f"{retired} retired recording(s) not checked (voiceman status lists them)")
    for line in repair_commands(mismatches):
        print(line)
    return 1 if mismatches else 0


def repair_commands(mismatches: list[Mismatch]) -> list[str]:
    """How to put each mismatch right: materializing ``audio`` takes a recording
    changed in the inbox in again, and with it computes every stage again (the
    earlier results kept aside); damaged or missing result files are computed
    again by materializing their stages (a selected stage whose files do not
    match is computed again; the stages after it are kept when still current).
    Not ``voiceman run``: it reads only files whose size or mtime changed; it
    then brings the summary up to date, which these runs leave behind. An edited
    summary table is built again by materializing ``summary``."""
    materialize = f"{dagster_command()} asset materialize -m voiceman_pipeline.definitions --select"
    changed = [m.key for m in mismatches if m.what == "recording" and m.found != GONE]  # gone: nothing to take in
    stages: dict[str, list[str]] = {}
    kept = [m for m in mismatches if m.what.startswith((f"{SUPERSEDED_DIR}/", f"{ALTERED_DIR}/"))]
    summary = [m for m in mismatches if m.key == SUMMARY_TABLE]
    for mismatch in mismatches:
        if mismatch.what != "recording" and mismatch.key not in changed and mismatch not in kept + summary:
            names = stages.setdefault(mismatch.key, [])
            stage = mismatch.what.split("/")[0]
            if stage not in names:
                names.append(stage)
    lines = [f"to take in {key}'s changed recording and compute its results again: {materialize}"
             f" audio --partition {key}" for key in changed]
    lines += [f"{m.key}'s recording is gone from the inbox: put it back as it was, or, if it is"
              f" gone for good, set it aside: voiceman retire {m.key} --reason \"...\""
              for m in mismatches if m.what == "recording" and m.found == GONE]
    for key, names in stages.items():
        lines.append(f"to compute {key}'s results again: {materialize} {','.join(names)} --partition {key}")
    if changed or stages:
        lines.append("then `voiceman run` brings the summary up to date")
    if summary:  # built from the results: after theirs, where any are computed again
        lines.append(f"to build the summary table again{', after those,' if changed or stages else ''}:"
                     f" {materialize} summary")
    lines += [f"{m.key}'s {m.what} was changed after it was set aside with the earlier content; it"
              " cannot be computed again (that recording is no longer in the inbox): restore it from"
              " a backup" for m in kept if m.what.startswith(f"{SUPERSEDED_DIR}/")]
    lines += [f"{m.key}'s {m.what} was changed after it was set aside as found altered; it is a record"
              " of that alteration, which nothing computes again: restore it from a backup"
              for m in kept if m.what.startswith(f"{ALTERED_DIR}/")]
    return lines


# Settings whose values may hold a password (a URL's user:password@): a line of
# advice names the shell's variable instead, which fails loudly where it is not set,
# never running on other storage unseen.
SECRET_SETTINGS = ("VOICEMAN_PG_URL", "VOICEMAN_CELERY_BROKER", "VOICEMAN_CELERY_BACKEND")


def dagster_command() -> str:
    """``dagster`` as this process would run it: the one beside this Python (the
    project's .venv/bin, often not on PATH), with the DAGSTER_HOME and the
    VOICEMAN_* settings voiceman uses (data folder, engines, storage), so that a
    line of advice works pasted into any shell."""
    exe = Path(sys.executable).parent / "dagster"
    voiceman = sorted(name for name in os.environ if name.startswith("VOICEMAN_")
                      and not name.startswith("VOICEMAN_TEST_") and name != "VOICEMAN_WORKER_PARENT")
    names = (["DAGSTER_HOME"] if "DAGSTER_HOME" in os.environ else []) + voiceman
    return " ".join([*map(_assignment, names), shlex.quote(str(exe) if exe.is_file() else "dagster")])


def _assignment(name: str) -> str:
    """``NAME=value`` for a shell; a value that may hold a password as the shell's own."""
    value = os.environ[name]
    if name in SECRET_SETTINGS or ("://" in value and "@" in value):
        return f'{name}="${{{name}:?set {name} as for voiceman}}"'
    return f"{name}={shlex.quote(value)}"
