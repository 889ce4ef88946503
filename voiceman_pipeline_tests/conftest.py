"""Shared fixtures: real sample recordings, a temporary data dir and instance."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from dagster import instance_for_test

from voiceman_pipeline.resources.outputs import RecordingStore

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "data" / "samples"
SAMPLE_WAVS = sorted(SAMPLES.glob("*.wav"))
# An instance's dagster.yaml for CLI tests: the shipped `gpu` pool limit, no telemetry.
POOL_OF_ONE_YAML = """\
concurrency:
  pools:
    default_limit: 1
telemetry:
  enabled: false
"""


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory) -> Path:
    """A tiny random multilingual Whisper model in CTranslate2 format (built once)."""
    from voiceman_pipeline_tests.tiny_models import build_tiny_whisper_ct2

    return build_tiny_whisper_ct2(tmp_path_factory.mktemp("tiny-whisper") / "ct2")


@pytest.fixture
def store(tmp_path: Path) -> RecordingStore:
    data = tmp_path / "data"
    (data / "inbox").mkdir(parents=True)
    (data / "outputs").mkdir()
    return RecordingStore(data_dir=str(data))


@pytest.fixture
def instance():
    with instance_for_test() as inst:
        yield inst


def drop(store: RecordingStore, sample: str | Path, name: str | None = None) -> Path:
    """Copy a sample recording into the inbox under ``name``."""
    source = SAMPLES / sample if isinstance(sample, str) else sample
    target = store.inbox_dir / (name or source.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


@pytest.fixture
def env(tmp_path):
    """Environment of a `voiceman` subprocess: a fresh DAGSTER_HOME (no dagster.yaml) and data dir."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    data = tmp_path / "data"
    (data / "inbox").mkdir(parents=True)
    return {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "VOICEMAN_DATA_DIR": str(data),
        "PYTHONPATH": str(REPO),
    }
