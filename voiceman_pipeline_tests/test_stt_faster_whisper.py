"""faster-whisper engine on a tiny random-weight Whisper model built locally.

The model's words are noise, so these tests check what the engine controls:
loading (and failing to load) by directory, size name and hub id offline, the
Transcript structure, times inside the audio, confidences, language handling,
device and compute type, model reuse and unloading. ``max_new_tokens`` bounds
decoding so that a random model cannot generate for long.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from voiceman_pipeline.engines.stt import build_transcriber
from voiceman_pipeline.engines.stt.faster_whisper_engine import (
    FasterWhisperTranscriber,
    _segment,
    ct2_weight_width,
)
from voiceman_pipeline.errors import (
    InvalidAudioError,
    ModelUnavailableError,
    ServiceError,
)
from voiceman_pipeline.results import DecodedAudio, EngineInfo, Segment, Timings, Transcript, Word
from voiceman_pipeline_tests.tiny_models import build_tiny_whisper_ct2, copy_model_dir

pytestmark = pytest.mark.timeout(120)

SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples"
# CPU everywhere, so the random model's output is the same on every machine;
# few tokens, so a random model cannot generate for long.
FAST = dict(device="cpu", max_new_tokens=8, beam_size=2, cpu_threads=2, vad_filter=False)


def load(name: str) -> DecodedAudio:
    samples, rate = sf.read(SAMPLES / f"{name}.wav", dtype="float32")
    assert rate == 16_000
    return DecodedAudio(samples=samples)


@pytest.fixture(scope="module")
def engine(tiny_whisper) -> FasterWhisperTranscriber:
    engine = FasterWhisperTranscriber(str(tiny_whisper), **FAST)
    yield engine
    engine.unload()


@pytest.fixture
def isolated_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, so a model cached on this machine cannot mask the test."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def check_structure(transcript: Transcript, audio: DecodedAudio) -> None:
    assert isinstance(transcript, Transcript)
    assert isinstance(transcript.engine, EngineInfo) and isinstance(transcript.timings, Timings)
    assert transcript.duration_s == pytest.approx(audio.duration_s)
    assert isinstance(transcript.language, str) and transcript.language
    assert transcript.segments, "the random model always emits some tokens"
    assert [w for s in transcript.segments for w in s.words] == transcript.words
    for seg in transcript.segments:
        assert isinstance(seg, Segment) and isinstance(seg.text, str)
        assert 0.0 <= seg.start <= seg.end <= audio.duration_s
        for w in seg.words:
            assert isinstance(w, Word) and w.text == w.text.strip() and w.text
            assert 0.0 <= w.start <= w.end <= audio.duration_s
            assert seg.start - 0.02 <= w.start and w.end <= seg.end + 0.02
            assert 0.0 <= w.confidence <= 1.0
        if seg.words:
            assert seg.confidence == pytest.approx(np.mean([w.confidence for w in seg.words]))
    if transcript.words:
        assert 0.0 <= transcript.confidence <= 1.0
    assert transcript.text == " ".join(s.text for s in transcript.segments if s.text)
    assert transcript.timings.audio_s == pytest.approx(audio.duration_s)
    assert transcript.timings.process_s > 0


def test_transcript_structure_and_engine_info(engine, tiny_whisper):
    audio = load("sense_and_sensibility_01_austen_64kb-0870")
    transcript = engine.transcribe(audio, source_sha256="abc123")
    check_structure(transcript, audio)
    assert transcript.source_sha256 == "abc123"
    info = transcript.engine
    assert info.name == "faster-whisper" and info.model == str(tiny_whisper)
    assert info.device == "cpu" and info.options["compute_type"] == "int8"
    assert info.options["model_dir"] == str(tiny_whisper)
    assert info.options["word_timestamps"] is True
    assert info.options["max_new_tokens"] == 8
    # Nothing configured: the language was detected, and how surely is kept.
    assert 0.0 <= info.options["language_probability"] <= 1.0


def test_auto_device_and_compute_type(tiny_whisper):
    import ctranslate2

    engine = FasterWhisperTranscriber(str(tiny_whisper), device="auto", compute_type="auto")
    assert engine.info.device == "auto"  # nothing resolved before loading
    engine.load()
    if ctranslate2.get_cuda_device_count() > 0:
        expected = ("cuda:0", "float16")
    else:
        expected = ("cpu", "int8")
    assert (engine.info.device, engine.info.options["compute_type"]) == expected
    engine.unload()


@pytest.mark.parametrize("language", ["ko", "en"])
def test_configured_language_is_used(tiny_whisper, language):
    engine = FasterWhisperTranscriber(str(tiny_whisper), language=language, **FAST)
    audio = load("cards_002")
    transcript = engine.transcribe(audio, "x")
    check_structure(transcript, audio)
    assert transcript.language == language
    assert transcript.engine.options["language"] == language
    assert "language_probability" not in transcript.engine.options


def test_words_are_kept_inside_their_segment_on_the_recording_timeline():
    # What faster-whisper 1.2.1 returned once for the random model (a word
    # moved before its segment by its long-word rule), and a last word past
    # the segment's end, in a chunk that starts 30 s into the recording.
    from faster_whisper.transcribe import Segment as RawSegment
    from faster_whisper.transcribe import Word as RawWord

    raw = RawSegment(
        id=1, seek=0, start=1.16, end=2.0, text=" w5913 w7", tokens=[], avg_logprob=-1.0,
        compression_ratio=1.0, no_speech_prob=0.0, temperature=0.0,
        words=[RawWord(start=0.64, end=1.22, word=" w5913", probability=0.5),
               RawWord(start=1.5, end=2.6, word=" w7", probability=0.25)],
    )
    segment = _segment(raw, duration=32.4, offset=30.0)
    assert (segment.start, segment.end) == pytest.approx((31.16, 32.0))
    assert [(w.text, w.start, w.end) for w in segment.words] == [
        ("w5913", pytest.approx(31.16), pytest.approx(31.22)),
        ("w7", pytest.approx(31.5), pytest.approx(32.0)),
    ]
    assert segment.confidence == pytest.approx(0.375)


def test_vad_filter_keeps_times_on_the_original_timeline(tiny_whisper):
    # 2 s of silence before the speech: with VAD the words must still be
    # placed after it, on the recording's own clock.
    speech = load("cards_001").samples
    audio = DecodedAudio(np.concatenate([np.zeros(32_000, np.float32), speech]))
    options = {**FAST, "vad_filter": True}
    engine = FasterWhisperTranscriber(str(tiny_whisper), language="en", **options)
    transcript = engine.transcribe(audio, "x")
    check_structure(transcript, audio)
    assert transcript.engine.options["vad_filter"] is True
    assert transcript.words and transcript.words[0].start >= 1.5


def test_long_audio_is_fed_in_chunks_on_the_recording_timeline(tiny_whisper, monkeypatch):
    """Chunks of at most CHUNK_S cut at the quietest 10 ms (here 1.5 s chunks
    of three recordings in a row): every segment lies in the chunk it came
    from and later chunks' words are shifted past their chunk's start."""
    from voiceman_pipeline.engines.stt import faster_whisper_engine as fw

    monkeypatch.setattr(fw, "CHUNK_S", 1.5)
    monkeypatch.setattr(fw, "CUT_SEARCH_S", 0.5)
    speech = load("cards_001").samples
    audio = DecodedAudio(np.concatenate([speech, np.zeros(4_000, np.float32), speech]))
    chunks = fw._chunks(audio.samples)
    assert len(chunks) >= 2 and chunks[0][0] == 0 and chunks[-1][1] == len(audio.samples)
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    assert all(end - start <= 1.5 * 16_000 for start, end in chunks)
    engine = FasterWhisperTranscriber(str(tiny_whisper), language="en", **FAST)
    transcript = engine.transcribe(audio, "x")
    check_structure(transcript, audio)
    bounds = [(a / 16_000, b / 16_000) for a, b in chunks]
    for seg in transcript.segments:
        assert any(a - 1e-6 <= seg.start <= seg.end <= b + 1e-6 for a, b in bounds)
    assert transcript.segments[-1].start >= bounds[1][0] - 1e-6  # the later chunks were placed


def test_model_loaded_once_then_unloaded(tiny_whisper):
    engine = build_transcriber("faster-whisper", model=str(tiny_whisper), **FAST)
    assert isinstance(engine, FasterWhisperTranscriber) and not engine.loaded
    first = engine.transcribe(load("cards_001"), "a")
    model = weakref.ref(engine._whisper)
    second = engine.transcribe(load("cards_002"), "b")
    assert engine.load_count == 1 and engine._whisper is model()
    assert first.timings.load_s > 0 and second.timings.load_s == 0.0

    engine.unload()
    gc.collect()
    assert not engine.loaded and model() is None, "something still holds the model"
    engine.unload()  # idempotent
    engine.transcribe(load("cards_001"), "c")
    assert engine.load_count == 2


def test_missing_directory_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    started = time.perf_counter()
    with pytest.raises(ModelUnavailableError, match="no-such-model") as err:
        FasterWhisperTranscriber(str(missing)).load()
    assert time.perf_counter() - started < 5
    assert "VOICEMAN_STT_MODEL" in str(err.value)


@pytest.mark.parametrize(
    "missing", ["tokenizer.json", "model.bin", "config.json", "vocabulary.json"]
)
def test_incomplete_directory_names_the_missing_file(tiny_whisper, tmp_path, missing):
    model_dir = copy_model_dir(tiny_whisper, tmp_path / "partial", without=(missing,))
    engine = FasterWhisperTranscriber(str(model_dir), **FAST)
    with pytest.raises(ModelUnavailableError, match=missing.replace(".", r"\.")):
        engine.load()
    assert not engine.loaded


def test_corrupt_model_file_is_a_model_error(tiny_whisper, tmp_path):
    model_dir = copy_model_dir(tiny_whisper, tmp_path / "corrupt")
    (model_dir / "model.bin").write_bytes(b"not a CTranslate2 model")
    with pytest.raises(ModelUnavailableError, match="corrupt"):
        FasterWhisperTranscriber(str(model_dir), **FAST).load()


@pytest.mark.parametrize("offline_flag", [True, False], ids=["HF_HUB_OFFLINE=1", "no-flag"])
@pytest.mark.parametrize(
    ("model", "hub_id"),
    [("tiny", "Systran/faster-whisper-tiny"), ("Systran/faster-whisper-base", None)],
)
def test_hub_name_offline_fails_fast(isolated_hub_cache, monkeypatch, offline_flag, model, hub_id):
    if offline_flag:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        from voiceman_pipeline.engines.model_source import hub_reachable

        if hub_reachable():
            pytest.skip("the hub is reachable: this case is about offline machines")
    started = time.perf_counter()
    with pytest.raises(ModelUnavailableError) as err:
        FasterWhisperTranscriber(model).load()
    elapsed = time.perf_counter() - started
    how = "HF_HUB_OFFLINE=1" if offline_flag else "hub probe"
    print(f"offline load of {model!r} ({how}) failed in {elapsed:.2f} s")
    assert elapsed < 10
    message = str(err.value)
    assert "VOICEMAN_STT_MODEL" in message and "local directory" in message
    assert (hub_id or model) in message


@pytest.mark.parametrize("failure", ["offline", "download-failed"])
def test_mistyped_relative_path_says_no_such_local_directory(
    isolated_hub_cache, monkeypatch, tmp_path, failure
):
    # "models/whisper-small" has one slash, so it may be a hub id; it is tried
    # as one, and the message must also say the local directory is not there.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # the parent exists, the model directory does not
    if failure == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        import huggingface_hub

        from voiceman_pipeline.engines import model_source

        def no_such_repo(*args, **kwargs):
            raise RuntimeError("404 Client Error: Repository Not Found")

        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(model_source, "hub_reachable", lambda *a, **k: True)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", no_such_repo)
    with pytest.raises(ModelUnavailableError) as err:
        FasterWhisperTranscriber("models/whisper-small").load()
    message = str(err.value)
    assert "'models/whisper-small'" in message and "VOICEMAN_STT_MODEL" in message
    expected = Path.cwd() / "models" / "whisper-small"
    assert f"No local directory {str(expected)!r} exists either" in message
    if failure == "download-failed":
        assert "Repository Not Found" in message


def test_unknown_model_name_lists_the_sizes():
    with pytest.raises(ModelUnavailableError, match="large-v3") as err:
        FasterWhisperTranscriber("tiny-ish").load()
    assert "VOICEMAN_STT_MODEL" in str(err.value)


@pytest.mark.parametrize(
    "options",
    [
        {"model": ""},
        {"model": "x", "device": "tpu"},
        {"model": "x", "beam_size": 0},
        {"model": "x", "max_new_tokens": 0},
        {"model": "x", "max_new_tokens": 400},
    ],
    ids=["no-model", "device", "beam", "tokens-0", "tokens-400"],
)
def test_invalid_options_are_refused_at_construction(options):
    with pytest.raises(ModelUnavailableError):
        FasterWhisperTranscriber(**options)


def test_compute_type_the_cpu_cannot_run(tiny_whisper):
    engine = FasterWhisperTranscriber(str(tiny_whisper), device="cpu", compute_type="float16")
    with pytest.raises(ModelUnavailableError, match="float16"):
        engine.load()


def test_language_the_model_does_not_know(tiny_whisper):
    engine = FasterWhisperTranscriber(str(tiny_whisper), language="xx", **FAST)
    with pytest.raises(ModelUnavailableError, match="'xx'"):
        engine.load()


def test_cuda_requested_without_gpu_asks_for_cpu_fallback(tiny_whisper):
    import ctranslate2

    if ctranslate2.get_cuda_device_count() > 0:
        pytest.skip("this machine has a GPU")
    with pytest.raises(ServiceError, match="cuda"):
        FasterWhisperTranscriber(str(tiny_whisper), device="cuda").load()


@pytest.mark.parametrize(
    "audio",
    [
        DecodedAudio(samples=np.zeros(0, dtype=np.float32)),
        DecodedAudio(samples=np.zeros(8_000, dtype=np.float32), sample_rate=8_000),
        DecodedAudio(samples=np.full(16_000, np.inf, dtype=np.float32)),
    ],
    ids=["empty", "8kHz", "inf"],
)
def test_invalid_audio_is_refused(engine, audio):
    with pytest.raises(InvalidAudioError):
        engine.transcribe(audio, "bad")


def test_factory_rejects_unknown_engine():
    with pytest.raises(ValueError, match=r"Invalid STT engine: 'whisper'; choose one of"):
        build_transcriber("whisper")


def test_importing_the_stt_package_imports_no_speech_library():
    code = (
        "import sys, voiceman_pipeline, voiceman_pipeline.engines.stt as s;"
        "s.build_transcriber('pocketsphinx'); s.build_transcriber('faster-whisper', model='x');"
        "heavy = [m for m in ('pocketsphinx', 'faster_whisper', 'ctranslate2', 'torch') "
        "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- memory estimate before loading -----------------------------------------


def test_expected_load_mb_is_the_rule_applied_to_model_bin(tiny_whisper, tmp_path):
    """model.bin MiB x (compute-type width / stored width), on the GPU for CUDA,
    on the host for CPU; nothing is loaded (no GPU needed to estimate for CUDA)."""
    int8_mb = (tiny_whisper / "model.bin").stat().st_size / 2**20
    assert ct2_weight_width(tiny_whisper / "model.bin") == 1  # converted to int8
    f16_dir = build_tiny_whisper_ct2(tmp_path / "f16", quantization="float16")
    f16_mb = (f16_dir / "model.bin").stat().st_size / 2**20
    assert ct2_weight_width(f16_dir / "model.bin") == 2

    cases = [
        # (model dir, device, compute type) -> (host MB, GPU MB)
        ((tiny_whisper, "cpu", "auto"), (int8_mb, 0.0)),  # int8 stays int8
        ((tiny_whisper, "cpu", "default"), (int8_mb, 0.0)),
        ((tiny_whisper, "cpu", "float32"), (4 * int8_mb, 0.0)),
        ((tiny_whisper, "cuda", "auto"), (0.0, 2 * int8_mb)),  # float16 on CUDA
        ((f16_dir, "cpu", "auto"), (f16_mb / 2, 0.0)),  # int8 halves float16
        ((f16_dir, "cpu", "default"), (2 * f16_mb, 0.0)),  # no float16 on CPU: float32
        ((f16_dir, "cuda:0", "auto"), (0.0, f16_mb)),
        ((f16_dir, "cuda", "int8_float16"), (0.0, f16_mb / 2)),
    ]
    for (model_dir, device, compute_type), expected in cases:
        engine = FasterWhisperTranscriber(str(model_dir), device=device, compute_type=compute_type)
        assert engine.expected_load_mb() == pytest.approx(expected), (device, compute_type)
        assert not engine.loaded and engine.load_count == 0

    # A loaded engine gives the same answer (from the directory and compute type it used).
    engine = FasterWhisperTranscriber(str(tiny_whisper), **FAST)
    before = engine.expected_load_mb()
    engine.load()
    assert engine.expected_load_mb() == before == pytest.approx((int8_mb, 0.0))
    engine.unload()


def test_expected_load_mb_is_zero_when_the_model_cannot_be_found_offline(
    isolated_hub_cache, monkeypatch, tmp_path
):
    from voiceman_pipeline.engines import model_source

    def no_network(*args, **kwargs):
        raise AssertionError("an estimate must not probe the hub")

    monkeypatch.setattr(model_source, "hub_reachable", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    started = time.perf_counter()
    for model in ("tiny", "Systran/faster-whisper-base", "tiny-ish", str(tmp_path / "none")):
        engine = FasterWhisperTranscriber(model, device="cpu")
        assert engine.expected_load_mb() == (0.0, 0.0), model
        assert not engine.loaded
    assert time.perf_counter() - started < 5
    # load() still gives the clear error.
    with pytest.raises(ModelUnavailableError, match="tiny-ish"):
        FasterWhisperTranscriber("tiny-ish").load()
