"""One recording's results on disk, read back with chain-of-custody checks.

Stages hand data to each other through ``outputs/<key>/*.json`` (and the
decoded signal ``audio_16k.npy``), so any stage can run in a later run than
the one before it. Before a stage uses a recording, the file in the inbox is
hashed again and compared with the SHA-256 recorded at intake, and every
upstream result must have been computed from that same recording.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from voiceman_pipeline import results
from voiceman_pipeline.audio_io import sha256_file
from voiceman_pipeline.errors import (
    ChainOfCustodyError,
    MissingUpstreamError,
    UnreadableResultError,
)
from voiceman_pipeline.resources.outputs import RecordingStore
from voiceman_pipeline.results import (
    AudioIntake,
    DecodedAudio,
    EmotionResult,
    ForensicResult,
    Transcript,
    T,
)

AUDIO_JSON = "audio.json"
DECODED_NPY = "audio_16k.npy"
TRANSCRIPT_JSON = "transcript.json"
FORENSIC_JSON = "forensic.json"
EMOTION_JSON = "emotion.json"
REPORT_JSON = "report.json"
REPORT_PNG = "report.png"


class RecordingFiles:
    """Lazy, checked access to one partition's upstream results."""

    def __init__(self, store: RecordingStore, partition_key: str):
        self.store = store
        self.key = partition_key
        self._intake: AudioIntake | None = None
        self.inputs: dict[str, str] = {}  # upstream file name -> SHA-256 of what was read
        self._digests: dict[Path, str] = {}  # within one stage, hash each file once
        # Who computes the stage's result (``provenance.produced_by``), set by the
        # pipeline: the report writes it.
        self.produced_by: dict | None = None

    @property
    def folder(self) -> Path:
        return self.store.file_dir(self.key)

    def intake(self) -> AudioIntake:
        if self._intake is None:
            self._intake = self._read("audio", AUDIO_JSON, AudioIntake)
        return self._intake

    def remember_intake(self, intake: AudioIntake) -> None:
        """The intake just written (replacing any cached earlier one)."""
        self._intake = intake

    def verify_custody(self) -> str:
        """Re-hash the recording; raise if it is not the one taken in at intake."""
        intake = self.intake()
        source = Path(intake.source_path)
        if not source.is_file():
            raise ChainOfCustodyError(
                f"{self.key}: the recording {str(source)!r} taken in at intake is gone; "
                f"its results cannot be tied to evidence any more. Restore the file as it was, then"
                f" run `voiceman retry-failed` (the inbox sensor does not run a file it has taken"
                f" in already); or re-materialize 'audio' for a new recording; or, if it is gone"
                f" for good, `voiceman retire {self.key} --reason \"...\"`."
            )
        current = sha256_file(source)
        if current != intake.sha256:
            raise ChainOfCustodyError(
                f"{self.key}: chain of custody broken: {source.name} now has SHA-256 "
                f"{current[:16]}…, but intake recorded {intake.sha256[:16]}…. The recording "
                f"changed after intake; re-materialize 'audio' to take in the new version."
            )
        return current

    def audio(self) -> DecodedAudio:
        """The decoded signal, checked against the digest intake recorded for it."""
        path = self.folder / DECODED_NPY
        if not path.is_file():
            raise MissingUpstreamError(
                f"{self.key}: decoded audio {DECODED_NPY} is missing; materialize 'audio' first."
            )
        digest = self._digest(path)
        if digest != self.intake().decoded_sha256:
            raise ChainOfCustodyError(
                f"{self.key}: the decoded signal {DECODED_NPY} does not match the SHA-256 "
                f"intake recorded for it (changed or half-written); re-materialize 'audio'."
            )
        self.inputs[DECODED_NPY] = digest
        return DecodedAudio(samples=self.store.read_array(self.key, DECODED_NPY))

    def transcript(self) -> Transcript:
        return self._read_checked("transcript", TRANSCRIPT_JSON, Transcript)

    def forensic(self) -> ForensicResult:
        return self._read_checked("forensic", FORENSIC_JSON, ForensicResult)

    def emotion(self) -> EmotionResult:
        return self._read_checked("emotion", EMOTION_JSON, EmotionResult)

    def _digest(self, path: Path) -> str:
        if path not in self._digests:
            self._digests[path] = sha256_file(path)
        return self._digests[path]

    def _read(self, stage: str, name: str, cls: type[T]) -> T:
        path = self.folder / name
        if not path.is_file():
            raise MissingUpstreamError(
                f"{self.key}: {name} is missing; materialize '{stage}' for this "
                f"partition first."
            )
        data = path.read_bytes()  # hashed and parsed from the same bytes
        self.inputs[name] = hashlib.sha256(data).hexdigest()
        try:
            return results.from_dict(cls, json.loads(data))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            # Re-reading cannot help (not transient); re-running that stage can.
            raise UnreadableResultError(
                f"{self.key}: {name} cannot be read ({type(exc).__name__}: {exc}); it is "
                f"damaged or from an incompatible version: re-materialize '{stage}'."
            ) from exc

    def _read_checked(self, stage: str, name: str, cls: type[T]) -> T:
        """An upstream result, refused if it was computed from other inputs than
        the ones on disk now (another recording, signal or transcript)."""
        result = self._read(stage, name, cls)
        if result.source_sha256 != self.intake().sha256:  # type: ignore[attr-defined]
            raise MissingUpstreamError(
                f"{self.key}: {name} was computed from an earlier version of the "
                f"recording; re-materialize '{stage}' first."
            )
        for upstream, digest in result.inputs.items():  # type: ignore[attr-defined]
            current = self.folder / upstream
            if not current.is_file() or self._digest(current) != digest:
                raise MissingUpstreamError(
                    f"{self.key}: {name} was computed from a different {upstream} than "
                    f"the one there now; re-materialize '{stage}' first."
                )
        return result


def changed_json_inputs(folder: Path, inputs: dict[str, str]) -> list[str]:
    """The JSON upstream files whose bytes no longer match the digests a result
    recorded: that result is stale. (The decoded .npy is left out: it is
    large, and every stage verifies it against audio.json before use.)"""
    changed = []
    for name, digest in inputs.items():
        path = folder / name
        if name.endswith(".json") and (not path.is_file() or sha256_file(path) != digest):
            changed.append(name)
    return changed
