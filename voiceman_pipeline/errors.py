"""Error classes. Each class maps to one Dagster behaviour (``error_policy.classify``; the batch step in ``assets/pipeline.py`` acts on it).

- ``PermanentError``: the input itself is bad (corrupt, unsupported, tampered,
  misconfigured model). Retrying cannot help: ``Failure(allow_retries=False)``.
- ``TransientError``: an I/O hiccup or a GPU that is briefly unavailable.
  Retried by Dagster with exponential backoff and jitter.
- ``ResourceError``: out of memory or disk. Emergency cleanup (keeping the model
  in use), then a step retry of what is not current.
- ``ServiceError``: a model failed on its device (e.g. GPU). Fall back to CPU,
  then retry.
"""

from __future__ import annotations


class VoicemanError(Exception):
    """Base class of every error this pipeline raises on purpose."""


class PermanentError(VoicemanError):
    """Retrying will not help: the input or configuration must change."""


class InvalidAudioError(PermanentError):
    """The file is empty, truncated, not audio, or has no samples."""


class ChainOfCustodyError(PermanentError):
    """The recording on disk no longer matches the SHA-256 taken at intake."""


class ModelUnavailableError(PermanentError):
    """A model cannot be loaded: offline hub name, missing directory or file."""


class MissingUpstreamError(PermanentError):
    """A stage ran before the stage it reads from produced its output."""


class UnreadableResultError(PermanentError):
    """An upstream result file exists but cannot be parsed: that stage must run again."""


class ConfigurationError(PermanentError):
    """A setting is invalid; the message names the variable to fix."""


class TransientError(VoicemanError):
    """A temporary failure (I/O hiccup, GPU briefly unavailable): retry later."""


class ModelFetchError(TransientError):
    """The network failed while a model was being downloaded: try again later."""


class ResourceError(VoicemanError):
    """Out of memory (host or GPU) or disk: clean up, then retry."""


class ServiceError(VoicemanError):
    """A model failed on its device: fall back to CPU, then retry."""


class UnsafePathError(PermanentError):
    """An inbox path that must not be opened: a symbolic link, a path through a
    linked folder, one resolving outside the inbox, or not a regular file."""


class DiskFullError(ResourceError):
    """Not enough free disk space for an output (checked up front, or the disk
    filled up while writing). Free space on that disk, then retry."""
