"""Where a model comes from: a local directory, or a hub name when online.

A local directory always works and is checked for the files the engine needs,
naming the missing one. A hub name is used from the local Hugging Face cache
when it is there; otherwise the hub is probed with a short timeout first, so
that an offline machine fails in seconds with a message that says what to set,
instead of retrying for tens of seconds inside the download library.

"org/name" is ambiguous: a hub id, or a relative directory that happens to
have one slash. An existing directory wins; otherwise it is taken as a hub id,
and if that fails the message also names the local directory that was looked
for (absolute), so a mistyped local path is obvious.

``find_model_dir`` is the no-network variant, for estimates made before loading.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from voiceman_pipeline.errors import ModelFetchError, ModelUnavailableError

HUB_PROBE_TIMEOUT_S = 3.0


def resolve_model_dir(
    model: str,
    *,
    required_files: list[str | tuple[str, ...]],
    what: str,
    env_hint: str,
    configured: str | None = None,
) -> Path:
    """Return a local directory holding ``model``, downloading it if allowed.

    Args:
        model: a local directory path, or a hub repository id ("org/name").
        required_files: files that must be in the directory; a tuple means
            "one of these" (e.g. weights in safetensors or bin form).
        what: what the model is for, for messages ("speech-to-text model").
        env_hint: the setting a user changes to point at a local directory.
        configured: the value as the user set it, when the engine mapped it to
            ``model`` (a size name such as "small" -> "Systran/..."): messages
            name the local directory of that name. Default: ``model``.

    Raises:
        ModelUnavailableError: with the cause and the fix.
    """
    path = Path(model).expanduser()
    if _looks_like_path(model):
        if not path.is_dir():
            raise ModelUnavailableError(
                f"The {what} directory {str(path)!r} does not exist. "
                f"Set {env_hint} to a directory that holds the model files."
            )
        check_model_dir(path, required_files, what=what, env_hint=env_hint)
        return path

    cached = _from_hub_cache(model)
    if cached is not None:
        try:
            check_model_dir(cached, required_files, what=what, env_hint=env_hint)
            return cached
        except ModelUnavailableError:
            pass  # an incomplete cached snapshot: try to complete it online

    no_local = _no_local_dir_note(configured or model)
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable():
        raise ModelUnavailableError(
            f"Cannot load the {what} {model!r} by name: the model hub is not "
            f"reachable from this machine (offline, or HF_HUB_OFFLINE=1) and the "
            f"model is not in the local cache. {no_local} Download it on a machine "
            f"with network access and set {env_hint} to that local directory."
        )
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(repo_id=model))
    except Exception as exc:  # repository missing, gated, network dropped...
        if is_network_failure(exc):  # the hub answered a moment ago: try again later
            raise ModelFetchError(
                f"Downloading the {what} {model!r} was cut off by a network error "
                f"({type(exc).__name__}: {exc}); it will be retried. To avoid the "
                f"network, set {env_hint} to a local model directory."
            ) from exc
        raise ModelUnavailableError(
            f"Downloading the {what} {model!r} failed: {exc}. {no_local} "
            f"Check the name, or set {env_hint} to a local model directory."
        ) from exc
    check_model_dir(local, required_files, what=what, env_hint=env_hint)
    return local


def is_network_failure(exc: BaseException) -> bool:
    """True when ``exc`` or what caused it is a dropped, reset, refused or timed-out
    connection (socket errors, and httpx's / requests' wrappers of them), as
    opposed to an answer from the hub (missing repository, no access)."""
    import importlib

    network_types: list[type] = [ConnectionError, TimeoutError, socket.timeout]
    # huggingface_hub 2.x downloads with httpx2 (its httpx fork); older ones with
    # httpx or requests. Their transport errors wrap the socket error.
    for module, names in (
        ("httpx2", ("NetworkError", "TimeoutException", "RemoteProtocolError")),
        ("httpx", ("NetworkError", "TimeoutException", "RemoteProtocolError")),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        try:
            found = importlib.import_module(module)
        except ImportError:
            continue
        network_types += [getattr(found, name) for name in names if hasattr(found, name)]
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, tuple(network_types)):
            return True
        current = current.__cause__ or current.__context__
    return False


def find_model_dir(model: str) -> Path | None:
    """The local directory ``resolve_model_dir`` would use, without any network.

    An existing directory, else a hub id's snapshot in the local Hugging Face
    cache, else None (it would have to be downloaded, or does not exist).
    Never probes the hub and never downloads: safe for cheap estimates.
    The directory is not checked for completeness.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if _looks_like_path(model):
        return None
    return _from_hub_cache(model)


def check_model_dir(
    path: Path, required_files: list[str | tuple[str, ...]], *, what: str, env_hint: str
) -> None:
    """Raise ModelUnavailableError naming the first required file that is missing."""
    for required in required_files:
        options = (required,) if isinstance(required, str) else required
        if not any((path / name).is_file() for name in options):
            shown = " or ".join(repr(name) for name in options)
            raise ModelUnavailableError(
                f"The {what} directory {str(path)!r} is incomplete: {shown} is "
                f"missing. Copy the complete model there, or set {env_hint} to "
                f"another directory."
            )


def hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """True when a TCP connection to the Hugging Face hub opens within the timeout."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _looks_like_path(model: str) -> bool:
    """A directory rather than a hub id ("org/name"): explicit path or existing dir."""
    return (
        model.startswith(("/", "./", "../", "~"))
        or model.count("/") != 1
        or Path(model).expanduser().is_dir()
    )


def _no_local_dir_note(value: str) -> str:
    """Sentence for a failed hub name: the same-named local directory is absent too."""
    absolute = Path(value).expanduser().absolute()
    return (
        f"No local directory {str(absolute)!r} exists either (if {value!r} was "
        f"meant as a local path, check it)."
    )


def _from_hub_cache(model: str) -> Path | None:
    """The cached snapshot of a hub model, if one was downloaded before."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=model, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError) or invalid id
        return None
