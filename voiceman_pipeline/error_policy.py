"""What a failure means for retrying: classify an exception into a category.

``classify(exc)`` puts any exception in one of four categories. When a
recording of a batch failed for a reason that is not PERMANENT, the batch step
asks Dagster for a step retry itself (``RetryRequested``, at most
``MAX_RETRIES``, waits from ``RETRY_POLICY``: exponential backoff with
jitter; the step has no retry policy of its own, assets/pipeline.py); a step
that is not retried fails with ``Failure(allow_retries=False)``:

- PERMANENT -> not retried: retrying cannot help.
- TRANSIENT -> retried as is.
- RESOURCE  -> out of memory or disk. Retried after an emergency cleanup. With
  the default ``in_process_executor`` (and on a Celery worker) a retry runs in
  the same process: nothing is freed by the retry itself; the
  ``MemoryManager``'s cleanup (unload models, gc, CUDA cache) frees memory.
- SERVICE   -> a model failed on its device (CUDA/cuDNN/cuBLAS). The pipeline
  first falls back to the CPU engine; what still fails is retried.

Unknown exceptions are TRANSIENT: a wrongly "permanent" verdict drops a file
until someone notices, while a wrongly "transient" one costs at most
``MAX_RETRIES`` bounded retries. Errors that only a code or environment change
can fix (TypeError, AttributeError, NameError, ImportError, AssertionError,
NotImplementedError, and UnicodeError: text that cannot be encoded or decoded)
are PERMANENT, so they fail fast instead of retrying.

torch is never imported here; its exception types are used only when some
engine has already imported it.
"""

from __future__ import annotations

import errno
import sys
from enum import Enum

import dagster as dg

from voiceman_pipeline.errors import (
    DiskFullError,
    PermanentError,
    ResourceError,
    ServiceError,
    TransientError,
)


class ErrorCategory(str, Enum):
    """How a failure should be retried (see the module docstring)."""

    PERMANENT = "permanent"
    TRANSIENT = "transient"
    RESOURCE = "resource"
    SERVICE = "service"


MAX_RETRIES = 3
RETRY_DELAY_S = 2.0

# The waits between the batch step's retries (it asks for them with
# RetryRequested): about 2, 6, 14 s (2 x (2^n - 1), +/- up to 2 s of jitter so
# that steps failing together do not retry together).
RETRY_POLICY = dg.RetryPolicy(
    max_retries=MAX_RETRIES,
    delay=RETRY_DELAY_S,
    backoff=dg.Backoff.EXPONENTIAL,
    jitter=dg.Jitter.PLUS_MINUS,
)

# OSError errnos that can succeed on a later attempt: flaky disks and network
# filesystems, busy devices, interrupted or reset connections.
TRANSIENT_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.EAGAIN,
        errno.EBUSY,
        errno.EINTR,
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ESTALE,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
    }
)
# Out of space, memory or descriptors: retrying blindly refills them; free
# something first (an emergency cleanup) -- a RESOURCE error.
RESOURCE_ERRNOS = frozenset({errno.ENOSPC, errno.ENOMEM, errno.EDQUOT, errno.EMFILE, errno.ENFILE})
# The path is wrong or forbidden: the same call will fail the same way.
PERMANENT_ERRNOS = frozenset(
    {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EROFS, errno.ENAMETOOLONG}
)

# Bugs and broken installs: only a code or environment change fixes them.
_PROGRAMMING_ERRORS = (
    TypeError,
    AttributeError,
    NameError,
    ImportError,
    AssertionError,
    NotImplementedError,
    SyntaxError,
    UnicodeError,  # the same name or text fails the same way on every try
)

# Lower-cased message fragments of device failures (torch, CTranslate2).
_OOM_MARKERS = ("out of memory", "cublas_status_alloc_failed")
_DEVICE_MARKERS = ("cuda error", "cuda failed", "cudnn", "cublas", "cufft", "nccl")


def shortage(exc: BaseException) -> str:
    """What a RESOURCE error ran out of: "disk" (a full disk or quota: no memory
    cleanup helps), "file descriptors", or "memory"; from ``exc`` or what it was
    raised from."""
    while exc is not None:
        if isinstance(exc, DiskFullError) or (
            isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        ):
            return "disk"
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            return "file descriptors"
        exc = exc.__cause__ or exc.__context__
    return "memory"


def _torch_error_types() -> tuple[type | None, type | None]:
    """(OutOfMemoryError, AcceleratorError) of an already-imported torch."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None, None
    cuda = getattr(torch, "cuda", None)
    oom = getattr(cuda, "OutOfMemoryError", None) or getattr(torch, "OutOfMemoryError", None)
    accel = getattr(cuda, "AcceleratorError", None) or getattr(torch, "AcceleratorError", None)
    return oom, accel


def _classify_one(exc: BaseException) -> ErrorCategory | None:
    """Category of this exception alone, or None when nothing identifies it."""
    # Our own classes say what they mean.
    if isinstance(exc, PermanentError):
        return ErrorCategory.PERMANENT
    if isinstance(exc, TransientError):
        return ErrorCategory.TRANSIENT
    if isinstance(exc, ResourceError):
        return ErrorCategory.RESOURCE
    if isinstance(exc, ServiceError):
        return ErrorCategory.SERVICE
    # Dagster's own control-flow exceptions, if they reach us.
    if isinstance(exc, dg.RetryRequested):
        return ErrorCategory.TRANSIENT
    if isinstance(exc, dg.Failure):
        return ErrorCategory.PERMANENT

    if isinstance(exc, MemoryError):
        return ErrorCategory.RESOURCE
    torch_oom, torch_accel = _torch_error_types()
    if torch_oom is not None and isinstance(exc, torch_oom):
        return ErrorCategory.RESOURCE
    message = str(exc).lower()
    # torch without the type at hand (or an older torch that raised a plain
    # RuntimeError): match by class name and message.
    if type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and any(m in message for m in _OOM_MARKERS)
    ):
        return ErrorCategory.RESOURCE
    if torch_accel is not None and isinstance(exc, torch_accel):
        return ErrorCategory.SERVICE
    if isinstance(exc, RuntimeError) and any(m in message for m in _DEVICE_MARKERS):
        return ErrorCategory.SERVICE

    if isinstance(exc, OSError):
        # Subclasses first: TimeoutError and ConnectionError may carry no errno.
        if isinstance(exc, (TimeoutError, ConnectionError, BlockingIOError, InterruptedError)):
            return ErrorCategory.TRANSIENT
        if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return ErrorCategory.PERMANENT
        if exc.errno in RESOURCE_ERRNOS:
            return ErrorCategory.RESOURCE
        if exc.errno in TRANSIENT_ERRNOS:
            return ErrorCategory.TRANSIENT
        if exc.errno in PERMANENT_ERRNOS:
            return ErrorCategory.PERMANENT
        return None

    if isinstance(exc, _PROGRAMMING_ERRORS):
        return ErrorCategory.PERMANENT
    return None


def classify(exc: BaseException) -> ErrorCategory:
    """Category of ``exc``: itself first, then its explicit causes (``raise ... from``).

    A library that wraps a CUDA OOM or an EIO in its own exception type keeps
    the original as ``__cause__``; following it recovers the real category.
    Unknown -> TRANSIENT (bounded by MAX_RETRIES; see the module docstring).
    Interrupts (KeyboardInterrupt, SystemExit) are PERMANENT: never retried.
    """
    if not isinstance(exc, Exception):
        return ErrorCategory.PERMANENT
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 10:
        seen.add(id(current))
        category = _classify_one(current)
        if category is not None:
            return category
        current = current.__cause__
    return ErrorCategory.TRANSIENT
