"""Error classification and what an asset raises, on exceptions really raised."""

import errno
import os
import socket

import dagster as dg
import pytest

from voiceman_pipeline.error_policy import (
    MAX_RETRIES,
    RETRY_POLICY,
    ErrorCategory,
    classify,
    retry_delay_s,
    to_dagster,
)
from voiceman_pipeline.errors import (
    ChainOfCustodyError,
    InvalidAudioError,
    ModelUnavailableError,
    ResourceError,
    ServiceError,
    TransientError,
)

P, T, R, S = (ErrorCategory.PERMANENT, ErrorCategory.TRANSIENT,
              ErrorCategory.RESOURCE, ErrorCategory.SERVICE)


def caught(fn, *args) -> BaseException:
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001 - the point is to catch anything
        return exc
    raise AssertionError(f"{fn} did not raise")


def raise_(exc: BaseException) -> None:
    raise exc


def test_missing_source_file_is_permanent(tmp_path):
    exc = caught(open, tmp_path / "gone.wav", "rb")
    assert isinstance(exc, FileNotFoundError) and exc.errno == errno.ENOENT
    assert classify(exc) is P


def test_directory_instead_of_file_is_permanent(tmp_path):
    exc = caught(open, tmp_path, "rb")
    assert isinstance(exc, IsADirectoryError)
    assert classify(exc) is P


def test_memory_error_is_resource():
    def allocate_too_much():
        raise MemoryError()
    assert classify(caught(allocate_too_much)) is R


def test_torch_cuda_out_of_memory_is_resource():
    torch = pytest.importorskip("torch")
    exc = caught(raise_, torch.cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert classify(exc) is R


def test_oom_matched_by_name_and_message_without_torch_types():
    class OutOfMemoryError(RuntimeError):  # e.g. from a library we do not import
        pass
    assert classify(caught(raise_, OutOfMemoryError("allocation failed"))) is R
    assert classify(caught(raise_, RuntimeError("CUDA out of memory. Tried to allocate"))) is R


def test_device_failures_are_service():
    for message in ("CUDA error: an illegal memory access was encountered",
                    "cuDNN error: CUDNN_STATUS_EXECUTION_FAILED",
                    "CUBLAS_STATUS_EXECUTION_FAILED when calling cublasSgemm"):
        assert classify(caught(raise_, RuntimeError(message))) is S, message
    # Other RuntimeErrors are not device failures.
    assert classify(caught(raise_, RuntimeError("generator raised StopIteration"))) is T


def test_os_errors_by_errno():
    for code in (errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET):
        exc = caught(raise_, OSError(code, os.strerror(code)))
        assert classify(exc) is T, errno.errorcode[code]
    assert classify(caught(raise_, OSError(errno.ENOSPC, "No space left on device"))) is R
    assert classify(caught(raise_, OSError(errno.EACCES, "Permission denied"))) is P


def test_timeouts_and_connections_are_transient():
    # A real connection to a closed port: ConnectionRefusedError.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    server.close()
    refused = caught(socket.create_connection, ("127.0.0.1", port), 1.0)
    assert isinstance(refused, ConnectionError)
    assert classify(refused) is T
    assert classify(caught(raise_, TimeoutError("read timed out"))) is T


def test_our_classes():
    for exc, category in (
        (InvalidAudioError("no samples"), P),
        (ChainOfCustodyError("sha256 changed"), P),
        (ModelUnavailableError("no model dir"), P),
        (TransientError("gpu busy"), T),
        (ResourceError("oom"), R),
        (ServiceError("cuda failed"), S),
    ):
        assert classify(caught(raise_, exc)) is category, type(exc).__name__


def test_bugs_are_permanent_unknowns_transient():
    assert classify(caught(lambda: None + 1)) is P  # TypeError
    assert classify(caught(lambda: object().missing)) is P  # AttributeError
    assert classify(caught(lambda: {}["key"])) is T  # unknown: bounded retries


def test_explicit_cause_is_followed():
    def decode():
        try:
            raise OSError(errno.EIO, "Input/output error")
        except OSError as io:
            raise ValueError("decoder failed") from io
    assert classify(caught(decode)) is T
    # Our own class wins over its cause.
    def wrapped():
        try:
            raise MemoryError()
        except MemoryError as oom:
            raise InvalidAudioError("header says 10^12 samples") from oom
    assert classify(caught(wrapped)) is P


def test_interrupts_are_not_converted():
    exc = caught(raise_, KeyboardInterrupt())
    assert classify(exc) is P
    assert to_dagster(exc) is exc


def test_permanent_becomes_failure_without_retries(tmp_path):
    exc = caught(open, tmp_path / "gone.wav", "rb")
    out = to_dagster(exc, what="call-1/audio")
    assert isinstance(out, dg.Failure)
    assert out.allow_retries is False
    assert out.description.startswith("call-1/audio: permanent error, not retried: FileNotFoundError")
    assert out.metadata["error_class"].value == "builtins.FileNotFoundError"
    assert out.metadata["error_category"].value == "permanent"
    assert out.__cause__ is exc


@pytest.mark.parametrize("exc,category", [
    (OSError(errno.EIO, "Input/output error"), T),
    (MemoryError(), R),
    (RuntimeError("CUDA error: device-side assert"), S),
])
def test_retryable_becomes_retry_requested_with_backoff(exc, category):
    exc = caught(raise_, exc)
    for retry_number, (low, high) in enumerate([(0, 4), (4, 8), (12, 16)]):
        out = to_dagster(exc, retry_number=retry_number)
        assert isinstance(out, dg.RetryRequested)
        assert out.max_retries == MAX_RETRIES
        assert low <= out.seconds_to_wait <= high  # 2 x (2^n - 1) +/- 2 s
        assert out.__cause__ is exc
        assert f"{category.value} error, retry {retry_number + 1} of 3" in str(out)


def test_retry_delay_follows_the_policy():
    assert RETRY_POLICY.max_retries == 3
    assert RETRY_POLICY.backoff is dg.Backoff.EXPONENTIAL
    assert RETRY_POLICY.jitter is dg.Jitter.PLUS_MINUS
    waits = [retry_delay_s(2) for _ in range(200)]
    assert min(waits) >= 12 and max(waits) <= 16
    assert max(waits) - min(waits) > 1  # jitter spreads steps failing together


def test_dagster_exceptions_pass_through():
    failure = dg.Failure("already decided", allow_retries=False)
    retry = dg.RetryRequested(max_retries=1)
    assert to_dagster(failure) is failure
    assert to_dagster(retry) is retry


def test_in_a_run_permanent_is_not_retried_and_transient_is():
    attempts = {"bad": 0, "flaky": 0}

    @dg.asset(retry_policy=RETRY_POLICY)
    def bad(context: dg.AssetExecutionContext) -> None:
        attempts["bad"] += 1
        try:
            raise InvalidAudioError("not audio")
        except InvalidAudioError as exc:
            raise to_dagster(exc, retry_number=context.retry_number) from exc

    @dg.asset
    def flaky(context: dg.AssetExecutionContext) -> None:
        attempts["flaky"] += 1
        if context.retry_number == 0:
            try:
                raise OSError(errno.EIO, "Input/output error")
            except OSError as exc:
                out = to_dagster(exc, retry_number=context.retry_number)
                out.seconds_to_wait = 0  # keep the test fast; the wait is tested above
                raise out from exc

    with dg.instance_for_test() as instance:
        bad_result = dg.materialize([bad], instance=instance, raise_on_error=False)
        flaky_result = dg.materialize([flaky], instance=instance)
    assert not bad_result.success and attempts["bad"] == 1
    assert flaky_result.success and attempts["flaky"] == 2
