"""Error classification on exceptions really raised. (The retries each class
leads to are tested through real runs in test_pipeline.py.)"""

import errno
import os
import socket

import pytest

from voiceman_pipeline.error_policy import (
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
    assert classify(caught(lambda: "caf\udce9.wav".encode())) is P  # a name not UTF-8
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


# --- corrections found in use, each with its real cause ---------------------


def test_a_wrong_device_setting_is_a_permanent_configuration_error_naming_the_variable(monkeypatch):
    from voiceman_pipeline.errors import ConfigurationError
    from voiceman_pipeline.settings import Settings

    monkeypatch.setenv("VOICEMAN_SER_DEVICE", "gpu")
    exc = caught(Settings.from_env)
    assert isinstance(exc, ConfigurationError) and classify(exc) is P
    assert "VOICEMAN_SER_DEVICE='gpu'" in str(exc)
    monkeypatch.setenv("VOICEMAN_SER_DEVICE", "cpu")
    monkeypatch.setenv("VOICEMAN_BATCH_SIZE", "eight")
    exc = caught(Settings.from_env)
    assert classify(exc) is P and "VOICEMAN_BATCH_SIZE='eight'" in str(exc)


def test_a_wrong_device_in_run_config_fails_the_recording_once_naming_the_setting(instance, store):
    """The launchpad can bypass the environment: the resource checks it too."""
    from dagster import AssetKey, DagsterEventType, materialize
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    from voiceman_pipeline.definitions import defs, recording_analysis
    from voiceman_pipeline.resources.engines import EmotionModel
    from voiceman_pipeline_tests.conftest import SAMPLE_WAVS, drop

    key = drop(store, SAMPLE_WAVS[0], "dev.wav").name
    instance.add_dynamic_partitions("audio_files", [key])
    result = materialize(
        [recording_analysis],
        instance=instance,
        resources={**defs.resources, "store": store, "ser": EmotionModel(model="/models/ser", device="gpu")},
        tags={ASSET_PARTITION_RANGE_START_TAG: key, ASSET_PARTITION_RANGE_END_TAG: key},
        raise_on_error=False,
    )
    assert not result.success
    types = [e.event_type for e in result.all_events]
    assert DagsterEventType.STEP_UP_FOR_RETRY not in types
    failure = result.get_step_failure_events()[0].step_failure_data.user_failure_data
    assert "[permanent]" in failure.description and "VOICEMAN_SER_DEVICE" in failure.description
    status = instance.get_status_by_partition(AssetKey("transcript"), [key], recording_analysis.partitions_def)
    assert status[key].value == "MATERIALIZED"  # the stages before emotion are kept


def test_a_connection_reset_while_fetching_a_model_is_transient(tmp_path, monkeypatch):
    """A hub on loopback that accepts connections and resets them mid-request."""
    import struct
    import threading

    import huggingface_hub.constants

    from voiceman_pipeline.engines import model_source
    from voiceman_pipeline.errors import ModelFetchError

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    port = server.getsockname()[1]
    stop = threading.Event()

    def reset_every_connection():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.recv(1024)  # the request arrives ...
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # ... and the connection is reset (RST), as a dropped link does

    thread = threading.Thread(target=reset_every_connection, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_ETAG_TIMEOUT", 2)
    try:
        exc = caught(
            lambda: model_source.resolve_model_dir(
                "some-org/some-model",
                required_files=["config.json"],
                what="test model",
                env_hint="VOICEMAN_TEST_MODEL",
            )
        )
    finally:
        stop.set()
        thread.join()
        server.close()
    assert isinstance(exc, ModelFetchError), f"{type(exc).__name__}: {exc}"
    assert classify(exc) is T
    assert "VOICEMAN_TEST_MODEL" in str(exc)


def test_an_unreadable_upstream_result_asks_for_that_stage_to_run_again(store):
    from voiceman_pipeline.errors import UnreadableResultError
    from voiceman_pipeline.recording_files import RecordingFiles

    folder = store.file_dir("x.wav")
    folder.mkdir(parents=True)
    (folder / "transcript.json").write_text('{"text": "cut off in the mid')
    exc = caught(RecordingFiles(store, "x.wav").transcript)
    assert isinstance(exc, UnreadableResultError) and classify(exc) is P
    assert "re-materialize 'transcript'" in str(exc)
