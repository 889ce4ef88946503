"""Which analysis steps share the GPU, and how many runs go at once.

``analysis_pool``: the Dagster pool of the analysis step, decided once at
definition time from the configured engines. A step whose engines would use
the GPU is in pool ``gpu`` (dagster.yaml: one such step at a time on the whole
instance, so two models never fight over one card); a CPU-only step is in no
pool, and CPU runs go side by side up to the run queue's limit. Two steps can
still never work on the same recording (``claims.py``).

Nothing here imports torch or loads a model (code-location load stays fast):
``auto`` is resolved with NVML (``memory_readings.nvml``, which honours
CUDA_VISIBLE_DEVICES), the same "is a CUDA device visible" question the
engines ask (ctranslate2.get_cuda_device_count(), torch.cuda.is_available()).

``RunCoordinator``: Dagster's queued run coordinator whose
``max_concurrent_runs`` defaults to ``VOICEMAN_MAX_CONCURRENT_RUNS``, else
one run per usable core when the analysis step is in no pool (as ``voiceman
run`` starts one worker per core), else 2 (dagster.yaml's own ``{env: VAR}``
has no default).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from dagster._core.run_coordinator.queued_run_coordinator import QueuedRunCoordinator
from dagster._serdes import ConfigurableClassData

GPU_POOL = "gpu"
CPU_ONLY_STT_ENGINES = frozenset({"pocketsphinx"})
# Runs at once under the daemon with GPU engines: more would only wait for the
# pool's one slot, each holding a process; 2 lets a summary or intake run pass.
GPU_MAX_CONCURRENT_RUNS = 2


def gpu_visible() -> bool:
    """A CUDA device is visible to this process (NVML; CUDA_VISIBLE_DEVICES honoured).

    Any NVML failure (no library, no driver, no device) reads as no GPU.
    """
    from voiceman_pipeline.resources.memory_readings import nvml

    return nvml()[1] is not None


def uses_gpu(device: str, visible: Callable[[], bool] | None = None) -> bool:
    """Whether an engine configured for ``device`` runs on the GPU.

    'cpu': no. 'cuda' / 'cuda:N': yes (even with no GPU visible: the engine
    then fails or falls back, and queueing it behind the GPU is the safe side).
    'auto': only if a GPU is visible (``visible``, by default ``gpu_visible``,
    looked up when called), as the engines resolve it.
    """
    if device == "cpu":
        return False
    if device == "auto":
        return (visible or gpu_visible)()
    return True  # "cuda", "cuda:N" (anything else is rejected by check_device)


def analysis_pool(
    *,
    stt_engine: str,
    stt_device: str,
    ser_model: str,
    ser_device: str,
    visible: Callable[[], bool] | None = None,
) -> str | None:
    """``"gpu"`` when any configured engine would use the GPU, else None.

    - speech-to-text: pocketsphinx is CPU-only whatever its device says;
      faster-whisper uses the GPU per ``uses_gpu(stt_device)``;
    - emotion: no model (empty) runs nothing on the GPU; a model uses it per
      ``uses_gpu(ser_device)``;
    - forensic/acoustic analyses (Praat) and audio decoding are CPU-only.

    NVML is asked at most once, and only when some engine's device is 'auto'.
    """
    stt_gpu = stt_engine not in CPU_ONLY_STT_ENGINES and uses_gpu(stt_device, visible)
    ser_gpu = bool(ser_model.strip()) and uses_gpu(ser_device, visible)
    return GPU_POOL if stt_gpu or ser_gpu else None


def configured_pool(stt: Any, ser: Any, visible: Callable[[], bool] | None = None) -> str | None:
    """The analysis step's pool for the SpeechToText and EmotionModel resources
    as deployed: ``analysis_pool`` of their engines and devices, unless
    VOICEMAN_ANALYSIS_POOL names a pool ("gpu" to queue every analysis step
    behind one another as before; "none" for no pool)."""
    override = os.environ.get("VOICEMAN_ANALYSIS_POOL", "").strip()
    if override:
        return None if override.lower() == "none" else override
    return analysis_pool(
        stt_engine=stt.engine,
        stt_device=stt.device,
        ser_model=ser.model,
        ser_device=ser.device,
        visible=visible,
    )


def settings_pool(settings: Any = None) -> str | None:
    """``configured_pool`` of the engines ``settings`` (default: this environment's)
    configure, without building their resources."""
    from types import SimpleNamespace

    from voiceman_pipeline.settings import Settings

    s = settings or Settings.from_env()
    return configured_pool(SimpleNamespace(engine=s.stt_engine, device=s.stt_device),
                           SimpleNamespace(model=s.ser_model, device=s.ser_device))


def default_max_concurrent_runs() -> int:
    """One run per usable core when the analysis step, as this environment
    configures its engines, is in no pool (CPU engines: runs go side by side);
    ``GPU_MAX_CONCURRENT_RUNS`` when it is in one. At least 2."""
    from voiceman_pipeline.workers import usable_cores

    return GPU_MAX_CONCURRENT_RUNS if settings_pool() else max(2, usable_cores())


def max_concurrent_runs() -> int:
    """VOICEMAN_MAX_CONCURRENT_RUNS, else ``default_max_concurrent_runs()``
    (-1: no limit, 0: launch nothing)."""
    text = os.environ.get("VOICEMAN_MAX_CONCURRENT_RUNS", "").strip()
    if not text:
        return default_max_concurrent_runs()
    try:
        value = int(text)
    except ValueError:
        value = -2
    if value < -1:
        from voiceman_pipeline.errors import ConfigurationError

        raise ConfigurationError(
            f"VOICEMAN_MAX_CONCURRENT_RUNS={text!r}: use a whole number of runs "
            "(-1: no limit, 0: launch nothing)."
        )
    return value


def analysis_slots(instance: Any, settings: Any = None) -> int:
    """Runs whose analysis steps go at once on ``instance``: one where the step is
    in a pool (``settings_pool``: GPU engines, one such step at a time); else the
    run queue's limit (dagster.yaml's ``max_concurrent_runs``, else
    ``max_concurrent_runs()``), or without a run queue (runs launched at once)
    ``max_concurrent_runs()`` (-1: no limit, 0: none)."""
    if settings_pool(settings):
        return 1
    coordinator = instance.run_coordinator
    if isinstance(coordinator, QueuedRunCoordinator):
        return coordinator.get_run_queue_config().max_concurrent_runs
    return max_concurrent_runs()


class RunCoordinator(QueuedRunCoordinator):
    """Dagster's run queue, its run limit taken from VOICEMAN_MAX_CONCURRENT_RUNS
    when dagster.yaml sets none (``config: max_concurrent_runs:`` still wins)."""

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]
    ) -> RunCoordinator:
        config = dict(config_value)
        if config.get("max_concurrent_runs") is None:
            config["max_concurrent_runs"] = max_concurrent_runs()
        return super().from_config_value(inst_data, config)
