"""Configuration from the environment, read in this one place.

Everything has a default that runs the embedded pipeline offline on the CPU;
each ``VOICEMAN_*`` variable overrides one setting. Resources receive these
values as ordinary Dagster config, so the UI's launchpad can override them too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from voiceman_pipeline.engines.stt import ENGINES as STT_ENGINES
from voiceman_pipeline.errors import ConfigurationError

DEVICES = ("auto", "cpu", "cuda")  # and "cuda:N"


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


def _number(name: str, default: str, kind: type = float):
    """A numeric variable, or a ConfigurationError that names it."""
    text = _env(name, default)
    try:
        return kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ConfigurationError(f"{name}={text!r} is not {what}.") from None


def check_device(value: str, setting: str) -> str:
    """``value`` if it names a device; else a ConfigurationError naming ``setting``
    (a configuration error is permanent: retrying the same value cannot help)."""
    if value in DEVICES or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise ConfigurationError(
        f"{setting}={value!r} is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N'."
    )


def default_data_dir() -> str:
    """``data/`` beside the instance: under ``$DAGSTER_HOME`` (the repository, as
    the Makefile sets it), so every command finds the same folder wherever it
    is started from; the current folder only when DAGSTER_HOME is unset."""
    home = os.environ.get("DAGSTER_HOME", "").strip()
    return str(Path(home or os.getcwd()).resolve() / "data")


def _check_folders(data_dir: str) -> None:
    """A ConfigurationError where the data folder, the first of its parents that
    exists, or its inbox or outputs is a file (every intake and write would
    fail). A folder not there yet is fine: outputs/ is made on first use, and a
    missing inbox (an unmounted share) is said where it is scanned."""
    root = Path(data_dir)
    try:
        there = next((folder for folder in (root, *root.parents) if folder.exists()), None)
        is_file = [f for f in (there, root / "inbox", root / "outputs") if f and f.exists() and not f.is_dir()]
    except OSError:  # no permission to look: said where it is used
        return
    if is_file:
        raise ConfigurationError(f"VOICEMAN_DATA_DIR={data_dir}: {is_file[0]} is a file, not a folder.")


@dataclass(frozen=True)
class Settings:
    data_dir: str
    stt_engine: str
    stt_model: str
    stt_device: str
    stt_language: str
    ser_model: str
    ser_device: str
    max_file_mb: float
    batch_size: int  # recordings per run (backfills and sensor runs)
    sensor_interval_s: int
    max_new_per_tick: int
    memory_threshold_pct: float  # system memory: warn above this
    gpu_threshold_pct: float
    critical_threshold_pct: float  # predicted above this: clean up first; still above: wait, retry
    safety_margin: float  # added to per-file memory predictions
    output_mode: str  # permission bits of result files (folders get the x bits)
    # Error-rate brake (brake.py): no further batch once more than this share
    # of the recordings tried so far failed, after at least this many.
    brake_failure_rate: float = 0.5
    brake_min_recordings: int = 8
    # Batches `voiceman run` / `retry-failed` run side by side, each in its own
    # worker process; 0: one per usable core with CPU engines, 1 with GPU ones.
    workers: int = 0

    def __post_init__(self) -> None:
        # Caught at code-location load, with the variable to fix, rather than
        # as a failing run for every recording.
        _check_folders(self.data_dir)
        if self.stt_engine not in STT_ENGINES:
            raise ConfigurationError(
                f"VOICEMAN_STT_ENGINE={self.stt_engine!r} is not an engine; "
                f"choose one of {', '.join(STT_ENGINES)}."
            )
        if self.stt_engine == "pocketsphinx" and self.stt_language not in ("", "en"):
            # Else every recording would fail at transcript, done ones too once stale.
            raise ConfigurationError(
                f"VOICEMAN_STT_LANGUAGE={self.stt_language!r}: the embedded pocketsphinx engine has only"
                " an English model (leave it empty or 'en'); other languages need the faster-whisper"
                " engine (README: \"Production engines\")."
            )
        check_device(self.stt_device, "VOICEMAN_STT_DEVICE")
        check_device(self.ser_device, "VOICEMAN_SER_DEVICE")
        from voiceman_pipeline.resources.outputs import parse_mode

        try:
            parse_mode(self.output_mode)
        except ValueError as exc:
            raise ConfigurationError(f"VOICEMAN_OUTPUT_MODE={self.output_mode!r}: {exc}.") from None
        if not 0 < self.brake_failure_rate <= 1:
            raise ConfigurationError(
                f"VOICEMAN_BRAKE_FAILURE_RATE={self.brake_failure_rate:g} must be above 0 and at most 1"
                " (1: never brake)."
            )
        if not 0 < self.max_file_mb < float("inf"):  # 0 or less would refuse every recording
            raise ConfigurationError(
                f"VOICEMAN_MAX_FILE_MB={self.max_file_mb:g} must be a size in MiB above 0."
            )
        # Checked here too (MemoryManager checks its config when a run starts): else every
        # recording of every run would fail at its first stage.
        if not 0 < self.critical_threshold_pct <= 100:
            raise ConfigurationError(
                f"VOICEMAN_CRITICAL_THRESHOLD_PCT={self.critical_threshold_pct:g} must be above 0 and at most 100.")
        for name, value in (("VOICEMAN_MEMORY_THRESHOLD_PCT", self.memory_threshold_pct),
                            ("VOICEMAN_GPU_THRESHOLD_PCT", self.gpu_threshold_pct)):
            if not 0 < value <= self.critical_threshold_pct:
                raise ConfigurationError(f"{name}={value:g} must be above 0 and at most the critical"
                                         f" threshold ({self.critical_threshold_pct:g}).")
        if not 0 <= self.safety_margin < float("inf"):
            raise ConfigurationError(f"VOICEMAN_MEMORY_SAFETY_MARGIN={self.safety_margin:g} must be 0 or more"
                                     " (0.3 adds 30% to each prediction).")
        if self.workers < 0:
            raise ConfigurationError(f"VOICEMAN_WORKERS={self.workers} must be 0 (automatic) or more.")
        for name, value in (("VOICEMAN_BATCH_SIZE", self.batch_size), ("VOICEMAN_MAX_NEW_PER_TICK",
                            self.max_new_per_tick), ("VOICEMAN_SENSOR_INTERVAL_S", self.sensor_interval_s),
                            ("VOICEMAN_BRAKE_MIN_RECORDINGS", self.brake_min_recordings)):
            if value < 1:
                raise ConfigurationError(f"{name}={value} must be at least 1.")

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            data_dir=str(Path(_env("VOICEMAN_DATA_DIR", default_data_dir())).resolve()),
            stt_engine=_env("VOICEMAN_STT_ENGINE", "pocketsphinx"),
            stt_model=_env("VOICEMAN_STT_MODEL", ""),
            stt_device=_env("VOICEMAN_STT_DEVICE", "auto"),
            stt_language=_env("VOICEMAN_STT_LANGUAGE", ""),
            ser_model=_env("VOICEMAN_SER_MODEL", ""),
            ser_device=_env("VOICEMAN_SER_DEVICE", "auto"),
            max_file_mb=_number("VOICEMAN_MAX_FILE_MB", "2048"),
            batch_size=_number("VOICEMAN_BATCH_SIZE", "8", int),
            sensor_interval_s=_number("VOICEMAN_SENSOR_INTERVAL_S", "30", int),
            max_new_per_tick=_number("VOICEMAN_MAX_NEW_PER_TICK", "100", int),
            memory_threshold_pct=_number("VOICEMAN_MEMORY_THRESHOLD_PCT", "85"),
            gpu_threshold_pct=_number("VOICEMAN_GPU_THRESHOLD_PCT", "90"),
            critical_threshold_pct=_number("VOICEMAN_CRITICAL_THRESHOLD_PCT", "95"),
            safety_margin=_number("VOICEMAN_MEMORY_SAFETY_MARGIN", "0.30"),
            output_mode=_env("VOICEMAN_OUTPUT_MODE", "0600"),
            brake_failure_rate=_number("VOICEMAN_BRAKE_FAILURE_RATE", "0.5"),
            brake_min_recordings=_number("VOICEMAN_BRAKE_MIN_RECORDINGS", "8", int),
            workers=_number("VOICEMAN_WORKERS", "0", int),
        )
