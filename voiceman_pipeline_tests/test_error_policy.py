"""Error classification on exceptions really raised, and the retry it leads to."""

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


def test_interrupts_are_permanent():
    assert classify(caught(raise_, KeyboardInterrupt())) is P
    assert classify(caught(raise_, SystemExit(1))) is P


def test_retry_policy():
    assert RETRY_POLICY.max_retries == MAX_RETRIES == 3
    assert RETRY_POLICY.backoff is dg.Backoff.EXPONENTIAL
    assert RETRY_POLICY.jitter is dg.Jitter.PLUS_MINUS


def test_in_a_run_permanent_is_not_retried_and_others_are_in_the_same_process():
    # As the pipeline does it: Failure(allow_retries=<not permanent>) under a
    # retry policy. (RETRY_POLICY's own waits are left out to keep this fast.)
    policy = dg.RetryPolicy(max_retries=MAX_RETRIES)
    attempts: dict[str, list[int]] = {"bad": [], "flaky": []}

    def fail(exc: Exception) -> None:
        try:
            raise exc
        except Exception as caught_exc:
            retryable = classify(caught_exc) is not ErrorCategory.PERMANENT
            raise dg.Failure(str(caught_exc), allow_retries=retryable) from caught_exc

    @dg.asset(retry_policy=policy)
    def bad(context: dg.AssetExecutionContext) -> None:
        attempts["bad"].append(os.getpid())
        fail(InvalidAudioError("not audio"))

    @dg.asset(retry_policy=policy)
    def flaky(context: dg.AssetExecutionContext) -> None:
        attempts["flaky"].append(os.getpid())
        if context.retry_number == 0:
            fail(MemoryError())

    with dg.instance_for_test() as instance:
        bad_result = dg.materialize([bad], instance=instance, raise_on_error=False)
        flaky_result = dg.materialize([flaky], instance=instance)
    assert not bad_result.success and len(attempts["bad"]) == 1
    assert flaky_result.success and len(attempts["flaky"]) == 2
    # The retry ran in this very process (in-process executor): memory held
    # before it is still held; only a cleanup frees it.
    assert attempts["flaky"] == [os.getpid(), os.getpid()]
