"""Distributed execution: steps on Celery workers, through a Redis broker.

Off unless ``VOICEMAN_CELERY_BROKER`` is set (e.g. ``redis://10.0.0.5:6379/0``);
then the code location's executor is dagster-celery's ``celery_executor`` on
that broker, and every step of a daemon-launched run (sensor, backfill, UI)
is a Celery task that some worker process executes. Without the variable
nothing here imports Celery and runs stay in one process
(``in_process_executor``). ``voiceman run`` executes in its own process
(``execute_in_process``) either way.

Queues: a step goes to ``gpu`` when its engines use the GPU (decided as
``devices.analysis_pool`` decides the ``gpu`` pool, from the configured
engines and devices on the machine that loads the code location), to ``cpu``
otherwise (the summary, and an analysis on pocketsphinx / Praat / no emotion
model). A GPU machine's worker listens on ``gpu``, the others on ``cpu``.

Workers use the same variables and this module's Celery app, so the executor
and the workers always agree on broker, result backend and queues::

    celery -A voiceman_pipeline.distributed worker -Q cpu -c 1 -n cpu1@%h

``VOICEMAN_CELERY_BACKEND``: where workers put each step's events for the
run to read back; default: the broker's URL.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from dagster import ExecutorDefinition

from voiceman_pipeline.devices import GPU_POOL, analysis_pool

BROKER_ENV = "VOICEMAN_CELERY_BROKER"
BACKEND_ENV = "VOICEMAN_CELERY_BACKEND"
CPU_QUEUE = "cpu"
GPU_QUEUE = "gpu"
# dagster-celery's step tag naming the queue (dagster_celery.tags; a string
# here so that nothing Celery is imported while the switch is off).
QUEUE_TAG = "dagster-celery/queue"


def broker_url() -> str | None:
    """``VOICEMAN_CELERY_BROKER``, or None: the switch is off."""
    return os.environ.get(BROKER_ENV, "").strip() or None


def celery_settings(broker: str) -> dict[str, Any]:
    """dagster-celery's executor config for ``broker`` (also what workers use)."""
    backend = os.environ.get(BACKEND_ENV, "").strip() or broker
    return {
        "broker": broker,
        "backend": backend,
        # Imported by a worker as it starts, before it forks its pool: a step
        # then starts without loading the code location first.
        "include": ["voiceman_pipeline.definitions"],
        "config_source": {
            # Steps without a queue tag (the summary) go to the CPU workers.
            "task_default_queue": CPU_QUEUE,
            # A worker takes a step only when it has a free process for it: an
            # analysis step runs for minutes, and a step reserved behind a busy
            # one would wait there while another worker idles.
            "worker_disable_prefetch": True,
            "worker_prefetch_multiplier": 1,
        },
    }


def executor(local: ExecutorDefinition) -> ExecutorDefinition:
    """``local`` while the switch is off; else celery_executor on the broker."""
    broker = broker_url()
    if broker is None:
        return local
    _require_celery()
    from dagster_celery import celery_executor

    return celery_executor.configured(celery_settings(broker), name="celery")


def _require_celery() -> None:
    """A clear error when the switch is on and the `distributed` extra is missing."""
    try:
        import dagster_celery  # noqa: F401
        import redis  # noqa: F401  (kombu's Redis transport)
    except ImportError as exc:
        from voiceman_pipeline.errors import ConfigurationError

        raise ConfigurationError(
            f"{BROKER_ENV} is set, but {exc.name} is not installed: install the "
            "project's `distributed` extra (dagster-celery, celery, redis)."
        ) from None


def step_queue(stt: Any, ser: Any, visible: Callable[[], bool] | None = None) -> str:
    """``gpu`` when the analysis step's engines use the GPU, else ``cpu``.

    From the engines alone, not VOICEMAN_ANALYSIS_POOL: forcing the pool to
    "gpu" or "none" changes how many steps run at once, not which machines
    can run them.
    """
    pool = analysis_pool(
        stt_engine=stt.engine,
        stt_device=stt.device,
        ser_model=ser.model,
        ser_device=ser.device,
        visible=visible,
    )
    return GPU_QUEUE if pool == GPU_POOL else CPU_QUEUE


def step_tags(stt: Any, ser: Any) -> dict[str, str]:
    """The analysis op's tags: none while the switch is off; else dagster-celery's
    queue tag naming ``step_queue``."""
    if broker_url() is None:
        return {}
    return {QUEUE_TAG: step_queue(stt, ser)}


def celery_app():
    """The Celery app workers run: dagster-celery's, with the executor's settings.

    Raises a clear error when ``VOICEMAN_CELERY_BROKER`` is not set.
    """
    broker = broker_url()
    if broker is None:
        from voiceman_pipeline.errors import ConfigurationError

        raise ConfigurationError(
            f"{BROKER_ENV} is not set: a worker needs the broker's URL, the same as "
            "the daemon's (e.g. redis://10.0.0.5:6379/0)."
        )
    _require_celery()
    from dagster._core.execution.retries import RetryMode
    from dagster_celery.executor import CeleryExecutor
    from dagster_celery.make_app import make_app
    from dagster_celery.tasks import create_task

    settings = celery_settings(broker)
    app_args = CeleryExecutor(retries=RetryMode(RetryMode.ENABLED), **settings).app_args()
    app = make_app(app_args)
    create_task(app)  # dagster-celery's "execute_plan": one step per task
    return app


def __getattr__(name: str):
    # `celery -A voiceman_pipeline.distributed` looks up `app` (or `celery`):
    # built on first use, so importing this module imports nothing of Celery.
    if name in ("app", "celery"):
        value = celery_app()
        globals()["app"] = globals()["celery"] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
