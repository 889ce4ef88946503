"""``voiceman pause`` / ``voiceman resume``: stop and start the ``inbox_sensor``.

The sensor's on/off state is the instigator state Dagster stores for it. The
sensor daemon and the UI find that state by the sensor's *selector* (code
location, repository, sensor name); ``dagster sensor list`` matches it by the
*origin* id, which also hashes how the code location is loaded. The two
disagree when a state was written through another load target: ``dagster
sensor stop inbox_sensor`` run without ``-w`` loads pyproject.toml's
``[tool.dagster]`` (an absolute working directory), so it stops the sensor for
the daemon and the UI while ``dagster sensor list -w workspace.yaml`` still
shows the default, RUNNING.

So these commands load the code location from ``workspace.yaml``, as ``dagster
dev`` (UI and daemon) does, and call ``instance.stop_sensor`` /
``instance.start_sensor`` as the UI's Stop/Start buttons do; a state stored
under another origin is first moved to the workspace's origin, keeping its
cursor, so every view reads the same row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

SENSOR_NAME = "inbox_sensor"
WORKSPACE_YAML = Path(__file__).resolve().parent.parent / "workspace.yaml"
REPOSITORY_NAME = "__repository__"  # what Dagster names a Definitions object's repository
PAUSED_LINE = "intake paused (voiceman resume to restart)"


@contextlib.contextmanager
def _inbox_sensor(instance, workspace: Path = WORKSPACE_YAML) -> Iterator:
    """The ``inbox_sensor`` as ``dagster dev -w workspace.yaml`` sees it (a
    RemoteSensor; loading it starts a code server for a few seconds)."""
    from dagster import __version__
    from dagster._cli.workspace.cli_target import (
        WorkspaceOpts,
        get_code_location_from_workspace,
        get_remote_repository_from_code_location,
        get_workspace_from_cli_opts,
    )

    # The loader of `dagster sensor ... -w workspace.yaml` (get_repository_from_cli_opts):
    # the same origin as the UI's and the daemon's, and as `dagster sensor list` computes;
    # its code server at WARNING, not INFO (it printed four coloured lines on starting and stopping).
    with get_workspace_from_cli_opts(
        instance, version=__version__, workspace_opts=WorkspaceOpts(workspace=(str(workspace),)),
        log_level="WARNING",
    ) as context:
        location = get_code_location_from_workspace(context, None)
        yield get_remote_repository_from_code_location(location, None).get_sensor(SENSOR_NAME)


def _adopt_stored_state(instance, sensor) -> None:
    """Move a state stored under another origin of the same sensor (same
    selector) to ``sensor``'s origin, status and cursor kept."""
    from dagster._core.scheduler.instigation import InstigatorState

    stored = instance.get_instigator_state(sensor.get_remote_origin_id(), sensor.selector_id)
    if stored is None or stored.instigator_origin_id == sensor.get_remote_origin_id():
        return
    instance.delete_instigator_state(stored.instigator_origin_id, stored.selector_id)
    instance.add_instigator_state(
        InstigatorState(
            sensor.get_remote_origin(),
            stored.instigator_type,
            stored.status,
            stored.instigator_data,  # the cursor: files still settling stay known
        )
    )


def pause(instance, workspace: Path = WORKSPACE_YAML):
    """Stop the inbox sensor (the UI's Stop); returns the stored InstigatorState."""
    with _inbox_sensor(instance, workspace) as sensor:
        _adopt_stored_state(instance, sensor)
        return instance.stop_sensor(sensor.get_remote_origin_id(), sensor.selector_id, sensor)


def resume(instance, workspace: Path = WORKSPACE_YAML):
    """Start the inbox sensor (the UI's Start); returns the stored InstigatorState."""
    with _inbox_sensor(instance, workspace) as sensor:
        _adopt_stored_state(instance, sensor)
        return instance.start_sensor(sensor)


def is_paused(instance, workspace: Path = WORKSPACE_YAML) -> bool:
    """Whether the stored state stops the sensor, found by selector as the
    daemon finds it. No code is loaded: cheap enough for ``voiceman status``.
    No stored state means the code's default, RUNNING."""
    from dagster._core.definitions.run_request import InstigatorType
    from dagster._core.definitions.selector import InstigatorSelector
    from dagster._core.scheduler.instigation import InstigatorStatus

    selector_id = InstigatorSelector(
        location_name=_location_name(workspace), repository_name=REPOSITORY_NAME, name=SENSOR_NAME
    ).get_id()
    return any(
        state.selector_id == selector_id and state.status == InstigatorStatus.STOPPED
        for state in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR)
    )


def _location_name(workspace: Path) -> str:
    import yaml

    entry = yaml.safe_load(Path(workspace).read_text())["load_from"][0]
    return next(iter(entry.values()))["location_name"]


def pause_command(instance) -> int:
    state = pause(instance)
    print(f"intake paused: {SENSOR_NAME} is {state.status.value}; files dropped in the inbox "
          f"wait until `voiceman resume` (`voiceman run` still takes them in by hand)")
    return 0


def resume_command(instance) -> int:
    state = resume(instance)
    print(f"intake resumed: {SENSOR_NAME} is {state.status.value}; the daemon "
          f"(`dagster dev`) takes in the inbox on its next tick")
    return 0


def print_intake_state(instance) -> None:
    """The line ``voiceman status`` shows while intake is paused."""
    if is_paused(instance):
        print(PAUSED_LINE)
