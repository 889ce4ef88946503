"""Speech emotion recognition: real loading and inference on a tiny local model.

The tiny model is randomly initialised, so these tests check structure
(one result per segment, labels, probabilities, times, chunking, loading and
freeing, error messages), never which emotion was found.
"""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from voiceman_pipeline.engines.ser import (
    DescriptorsOnlyRecognizer,
    Wav2Vec2EmotionRecognizer,
    build_emotion_recognizer,
)
from voiceman_pipeline.engines.ser.descriptors import arousal_descriptors, speech_rate_wps
from voiceman_pipeline.engines.ser.wav2vec2_engine import _device_errors
from voiceman_pipeline.errors import ModelUnavailableError, ResourceError, ServiceError
from voiceman_pipeline.results import (
    DecodedAudio,
    EmotionResult,
    EngineInfo,
    Segment,
    Transcript,
    Word,
    dumps,
    from_dict,
)

try:
    from voiceman_pipeline_tests.tiny_ser_model import DEFAULT_LABELS, build_tiny_wav2vec2_ser
except ModuleNotFoundError:  # tests folder not a package: pytest put it on sys.path
    from tiny_ser_model import DEFAULT_LABELS, build_tiny_wav2vec2_ser

SAMPLE = (
    Path(__file__).resolve().parents[1]
    / "data/samples/sense_and_sensibility_01_austen_64kb-0870.wav"
)
SHA = "0" * 64


def make_transcript(
    audio: DecodedAudio, spans: list[tuple[float, float]], words: list[Word] | None = None
) -> Transcript:
    return Transcript(
        source_sha256=SHA,
        engine=EngineInfo(name="hand-made", model="none"),
        language="en",
        duration_s=audio.duration_s,
        text="",
        segments=[Segment(text="", start=s, end=e) for s, e in spans],
        words=words or [],
        confidence=None,
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_wav2vec2_ser(tmp_path_factory.mktemp("ser") / "tiny")


@pytest.fixture(scope="module")
def speech() -> DecodedAudio:
    samples, rate = sf.read(SAMPLE, dtype="float32")
    assert rate == 16_000 and samples.ndim == 1
    return DecodedAudio(samples=samples)


@pytest.fixture(scope="module")
def recognizer(model_dir: Path) -> Wav2Vec2EmotionRecognizer:
    rec = Wav2Vec2EmotionRecognizer(str(model_dir), device="cpu")
    yield rec
    rec.unload()


# --- wav2vec2 engine ----------------------------------------------------------


def test_one_emotion_per_segment(recognizer, speech, model_dir):
    spans = [(0.2, 2.5), (2.6, 6.9), (6.95, 7.05)]  # the last is below min_segment_s
    result = recognizer.recognize(speech, make_transcript(speech, spans), SHA)

    assert result.status == "ok" and result.reason is None
    assert result.source_sha256 == SHA
    assert [(s.start, s.end) for s in result.segments] == spans[:2]
    for seg in result.segments:
        assert 0 <= seg.start < seg.end <= speech.duration_s
        assert seg.label in DEFAULT_LABELS
        assert set(seg.probabilities) == set(DEFAULT_LABELS)
        assert sum(seg.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert seg.label == max(seg.probabilities, key=seg.probabilities.get)
        assert seg.arousal is None and seg.valence is None  # categorical head only
    # dominant label: the label held for the most segment time
    held: dict[str, float] = {}
    for seg in result.segments:
        held[seg.label] = held.get(seg.label, 0.0) + seg.end - seg.start
    assert result.dominant_label == max(held, key=held.get)

    assert result.engine.name == "wav2vec2-ser"
    assert result.engine.model == str(model_dir)
    assert result.engine.device == "cpu"
    assert result.engine.options["max_segment_s"] == 10.0
    assert result.timings.audio_s == pytest.approx(7.1)
    assert result.timings.process_s > 0
    assert result.descriptors.pitch_mean_hz is not None

    # the result survives the JSON round trip the pipeline stores it through
    again = from_dict(EmotionResult, json.loads(dumps(result)))
    assert again == result


def test_long_segment_is_split_into_equal_chunks_and_averaged(model_dir, speech):
    chunked = Wav2Vec2EmotionRecognizer(str(model_dir), device="cpu", max_segment_s=2.0)
    whole = chunked.recognize(speech, make_transcript(speech, [(0.0, speech.duration_s)]), SHA)
    assert len(whole.segments) == 1
    assert (whole.segments[0].start, whole.segments[0].end) == (0.0, speech.duration_s)

    # 7.1 s with chunks of at most 2 s: 4 equal chunks (so the duration weights
    # are equal to within a sample). Classify each chunk on its own.
    bounds = np.linspace(0, len(speech.samples), 5).round().astype(int)
    spans = [(a / 16_000, b / 16_000) for a, b in zip(bounds[:-1], bounds[1:])]
    parts = chunked.recognize(speech, make_transcript(speech, spans), SHA).segments
    assert len(parts) == 4
    per_chunk = np.array([[p.probabilities[k] for k in DEFAULT_LABELS] for p in parts])
    # the chunks must disagree, or the averaging check below would prove nothing
    assert np.ptp(per_chunk, axis=0).max() > 1e-3
    expected = np.average(per_chunk, axis=0, weights=np.diff(bounds))
    got = np.array([whole.segments[0].probabilities[k] for k in DEFAULT_LABELS])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    chunked.unload()


def test_without_segments_uses_speech_windows(recognizer, speech):
    windowed = Wav2Vec2EmotionRecognizer(
        str(recognizer.model), device="cpu", max_segment_s=3.0
    )
    result = windowed.recognize(speech, make_transcript(speech, []), SHA)
    # 7.1 s in equal windows of at most 3 s: three windows covering the recording
    assert len(result.segments) == 3
    assert result.segments[0].start == 0.0
    assert result.segments[-1].end == pytest.approx(speech.duration_s)
    for a, b in zip(result.segments, result.segments[1:]):
        assert a.end == b.start
    windowed.unload()


def test_silence_gives_no_segments_and_says_why(recognizer):
    silence = DecodedAudio(samples=np.zeros(3 * 16_000, dtype=np.float32))
    result = recognizer.recognize(silence, make_transcript(silence, []), SHA)
    assert result.status == "unavailable"
    assert "no speech segment" in result.reason
    assert result.segments == [] and result.dominant_label is None


def test_model_loaded_once_across_calls(model_dir, speech, monkeypatch):
    from transformers import AutoModelForAudioClassification

    calls = []
    original = AutoModelForAudioClassification.from_pretrained

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForAudioClassification, "from_pretrained", counting)
    rec = Wav2Vec2EmotionRecognizer(str(model_dir), device="cpu")
    assert not rec.loaded
    transcript = make_transcript(speech, [(0.5, 3.0)])
    first = rec.recognize(speech, transcript, SHA)
    second = rec.recognize(speech, transcript, SHA)
    assert len(calls) == 1
    assert first.timings.load_s > 0 and second.timings.load_s == 0
    assert first.segments == second.segments  # same model, same answer
    rec.unload()


def test_unload_frees_the_model(model_dir, speech):
    rec = Wav2Vec2EmotionRecognizer(str(model_dir), device="cpu")
    rec.load()
    assert rec.loaded
    model_ref = weakref.ref(rec._model)
    rec.unload()
    rec.unload()  # idempotent
    gc.collect()
    assert not rec.loaded
    assert model_ref() is None, "something still holds the unloaded model"
    # and it loads again on demand
    result = rec.recognize(speech, make_transcript(speech, [(0.5, 3.0)]), SHA)
    assert result.timings.load_s > 0 and len(result.segments) == 1
    rec.unload()


@pytest.mark.parametrize(
    "missing", ["config.json", "model.safetensors", "preprocessor_config.json"]
)
def test_incomplete_model_dir_names_the_missing_file(model_dir, tmp_path, missing):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / missing).unlink()
    rec = Wav2Vec2EmotionRecognizer(str(broken))
    started = time.monotonic()
    with pytest.raises(ModelUnavailableError, match=missing.replace(".", r"\.")) as info:
        rec.load()
    assert time.monotonic() - started < 2.0
    assert "VOICEMAN_SER_MODEL" in str(info.value)
    assert not rec.loaded


def test_missing_model_dir(tmp_path):
    rec = Wav2Vec2EmotionRecognizer(str(tmp_path / "nowhere"))
    with pytest.raises(ModelUnavailableError, match="does not exist.*VOICEMAN_SER_MODEL"):
        rec.load()


def test_hub_name_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rec = Wav2Vec2EmotionRecognizer("voiceman-tests/no-such-ser-model")
    started = time.monotonic()
    with pytest.raises(ModelUnavailableError, match="VOICEMAN_SER_MODEL"):
        rec.load()
    assert time.monotonic() - started < 5.0


def test_expected_load_mb_is_the_weights_file_without_loading(model_dir, tmp_path, monkeypatch):
    """Weights MiB x width(config dtype) / width(stored dtype); GPU on CUDA, host on CPU."""
    weights_mb = (model_dir / "model.safetensors").stat().st_size / 2**20
    assert json.loads((model_dir / "config.json").read_text())["dtype"] == "float32"
    for device, expected in [("cpu", (weights_mb, 0.0)), ("cuda", (0.0, weights_mb))]:
        rec = Wav2Vec2EmotionRecognizer(str(model_dir), device=device)
        assert rec.expected_load_mb() == pytest.approx(expected)
        assert not rec.loaded  # nothing was loaded (no GPU needed for the CUDA estimate)

    # float16 weights with config dtype float32: transformers loads float32, 2x.
    from safetensors.torch import load_file, save_file

    half = tmp_path / "half"
    shutil.copytree(model_dir, half)
    tensors = load_file(half / "model.safetensors")
    save_file({k: v.half() for k, v in tensors.items()}, half / "model.safetensors")
    half_mb = (half / "model.safetensors").stat().st_size / 2**20
    rec = Wav2Vec2EmotionRecognizer(str(half), device="cpu")
    assert rec.expected_load_mb() == pytest.approx((2 * half_mb, 0.0))
    assert not rec.loaded

    # Sharded: every shard the index names counts once.
    sharded = tmp_path / "sharded"
    shutil.copytree(model_dir, sharded)
    names = sorted(tensors)
    (sharded / "model.safetensors").unlink()
    parts = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    for shard, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, sharded / shard)
    index = {"weight_map": {k: shard for shard, keys in parts.items() for k in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    shards_mb = sum((sharded / shard).stat().st_size for shard in parts) / 2**20
    rec = Wav2Vec2EmotionRecognizer(str(sharded), device="cpu")
    assert rec.expected_load_mb() == pytest.approx((shards_mb, 0.0))


def test_expected_load_mb_is_zero_without_a_model(tmp_path, monkeypatch):
    from voiceman_pipeline.engines import model_source

    def no_network(*args, **kwargs):
        raise AssertionError("an estimate must not probe the hub")

    monkeypatch.setattr(model_source, "hub_reachable", no_network)
    for model in ("voiceman-tests/no-such-ser-model", str(tmp_path / "nowhere")):
        rec = Wav2Vec2EmotionRecognizer(model, device="cpu")
        assert rec.expected_load_mb() == (0.0, 0.0)
    assert DescriptorsOnlyRecognizer().expected_load_mb() == (0.0, 0.0)  # nothing to load


def test_untrained_classification_head_is_refused(model_dir, tmp_path):
    """A base wav2vec2 checkpoint would get a random head: invented emotions."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    base = tmp_path / "base"
    Wav2Vec2Model(Wav2Vec2Config.from_pretrained(model_dir)).save_pretrained(base)
    shutil.copy(model_dir / "preprocessor_config.json", base)
    with pytest.raises(ModelUnavailableError, match="classifier|projector"):
        Wav2Vec2EmotionRecognizer(str(base)).load()


def test_unnamed_labels_are_refused(tmp_path):
    unnamed = build_tiny_wav2vec2_ser(tmp_path / "unnamed", labels=("LABEL_0", "LABEL_1"))
    with pytest.raises(ModelUnavailableError, match="id2label"):
        Wav2Vec2EmotionRecognizer(str(unnamed)).load()


def test_dimensional_outputs_fill_arousal_and_valence(tmp_path, speech):
    dims = build_tiny_wav2vec2_ser(tmp_path / "dims", labels=("arousal", "dominance", "valence"))
    result = Wav2Vec2EmotionRecognizer(str(dims)).recognize(
        speech, make_transcript(speech, [(0.2, 3.0)]), SHA
    )
    (seg,) = result.segments
    assert seg.label == "dimensional" and seg.probabilities == {}
    assert isinstance(seg.arousal, float) and isinstance(seg.valence, float)
    assert result.dominant_label is None  # no categorical label to win

    mixed = build_tiny_wav2vec2_ser(tmp_path / "mixed", labels=("angry", "calm", "Arousal"))
    (seg,) = Wav2Vec2EmotionRecognizer(str(mixed)).recognize(
        speech, make_transcript(speech, [(0.2, 3.0)]), SHA
    ).segments
    assert set(seg.probabilities) == {"angry", "calm"}  # arousal is not a class
    assert sum(seg.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert isinstance(seg.arousal, float) and seg.valence is None


def test_gpu_errors_map_to_pipeline_errors():
    with pytest.raises(ServiceError, match="cuda"):
        with _device_errors("cuda", "running the model"):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
    with pytest.raises(ResourceError):
        with _device_errors("cuda:0", "running the model"):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(RuntimeError, match="shape mismatch") as info:  # CPU: unchanged
        with _device_errors("cpu", "running the model"):
            raise RuntimeError("shape mismatch")
    assert type(info.value) is RuntimeError


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_cuda_requested_without_gpu_is_a_service_error(model_dir):
    with pytest.raises(ServiceError, match="no CUDA"):
        Wav2Vec2EmotionRecognizer(str(model_dir), device="cuda").load()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_runs_on_gpu(model_dir, speech, recognizer, monkeypatch):
    # full fp32 convolutions, so GPU and CPU outputs are comparable closely
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    transcript = make_transcript(speech, [(0.2, 2.5), (2.6, 6.9)])
    rec = Wav2Vec2EmotionRecognizer(str(model_dir), device="cuda")
    result = rec.recognize(speech, transcript, SHA)
    assert result.engine.device == "cuda"
    params = list(rec._model.parameters())
    assert all(p.device.type == "cuda" for p in params)
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    del params
    on_cpu = recognizer.recognize(speech, transcript, SHA)
    assert len(result.segments) == len(on_cpu.segments) == 2
    for g, c in zip(result.segments, on_cpu.segments):
        for k in DEFAULT_LABELS:
            assert g.probabilities[k] == pytest.approx(c.probabilities[k], abs=1e-3)
    loaded = torch.cuda.memory_allocated()
    rec.unload()
    # compare with the loaded state, not zero: cuBLAS keeps its workspace
    assert loaded - torch.cuda.memory_allocated() >= weight_bytes


def test_invalid_options_rejected():
    with pytest.raises(ValueError):
        Wav2Vec2EmotionRecognizer("x/y", device="tpu")
    with pytest.raises(ValueError):
        Wav2Vec2EmotionRecognizer("x/y", min_segment_s=5, max_segment_s=2)


# --- descriptors-only default and descriptors -----------------------------------


def test_descriptors_only_default(speech):
    rec = build_emotion_recognizer(None)
    assert isinstance(rec, DescriptorsOnlyRecognizer)
    result = rec.recognize(speech, make_transcript(speech, [(0.2, 6.9)]), SHA)
    assert result.status == "unavailable"
    assert "VOICEMAN_SER_MODEL" in result.reason
    assert result.segments == [] and result.dominant_label is None
    assert result.engine == EngineInfo(name="descriptors-only", model="none")
    d = result.descriptors
    assert 70 <= d.pitch_mean_hz <= 300
    assert 0 < d.pitch_std_hz < 100
    assert -60 < d.loudness_mean_db < 0
    assert 0 < d.loudness_std_db < 30
    assert d.speech_rate_wps is None  # the transcript has no words
    assert "not emotion labels" in d.note
    assert result.timings.audio_s == pytest.approx(7.1)


def test_descriptors_of_silence_are_none():
    for samples in (np.zeros(2 * 16_000, np.float32), np.zeros(80, np.float32)):
        audio = DecodedAudio(samples=samples)
        d = arousal_descriptors(audio, make_transcript(audio, []))
        assert (d.pitch_mean_hz, d.pitch_std_hz, d.loudness_mean_db, d.loudness_std_db) == (
            None,
            None,
            None,
            None,
        )
        assert d.speech_rate_wps is None
    faint = DecodedAudio(samples=np.full(16_000, 1e-5, np.float32))  # -100 dBFS hum
    assert arousal_descriptors(faint, None).loudness_mean_db is None


def test_loudness_of_a_known_tone():
    t = np.arange(2 * 16_000) / 16_000
    tone = (0.1 * np.sin(2 * np.pi * 150 * t)).astype(np.float32)  # RMS 0.0707: -23 dBFS
    d = arousal_descriptors(DecodedAudio(samples=tone), None)
    assert d.loudness_mean_db == pytest.approx(-23.01, abs=0.1)
    assert d.pitch_mean_hz == pytest.approx(150, abs=2)


def test_speech_rate_counts_speaking_time_only(speech):
    words = [
        Word("a", 0.0, 0.4),
        Word("b", 0.5, 0.9),  # 0.1 s gap: still speaking
        Word("c", 2.0, 2.4),  # 1.1 s gap: a pause, not speaking time
        Word("d", 2.45, 2.8),
    ]
    transcript = make_transcript(speech, [], words)
    assert speech_rate_wps(transcript) == pytest.approx(4 / (0.9 + 0.8))
    assert arousal_descriptors(speech, transcript).speech_rate_wps == pytest.approx(4 / 1.7)


def test_build_emotion_recognizer(model_dir):
    assert isinstance(build_emotion_recognizer(""), DescriptorsOnlyRecognizer)
    assert isinstance(build_emotion_recognizer("   "), DescriptorsOnlyRecognizer)
    rec = build_emotion_recognizer(f" {model_dir} ", device="cpu", max_segment_s=4.0)
    assert isinstance(rec, Wav2Vec2EmotionRecognizer)
    assert rec.model == str(model_dir) and rec.max_segment_s == 4.0
    assert not rec.loaded  # nothing loads until first use


def test_importing_ser_stays_light():
    code = (
        "import sys, voiceman_pipeline.engines.ser; "
        "print(sorted(m for m in ('torch', 'transformers', 'parselmouth') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- descriptors: memory flat in the call's length -------------------------------

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


def _samples_in_a_row(times: int) -> np.ndarray:
    x = np.concatenate([sf.read(p, dtype="float32")[0] for p in sorted(SAMPLES.glob("*.wav"))])
    return np.tile(x, times)


def test_descriptors_are_those_of_the_pooled_frames():
    """Recorded with the implementation that pooled every pitch frame and every
    level (float64) in arrays (commit ddeb206), on the 5 samples 10 times in a
    row (184 s, 4 Praat windows). Pitch: running moments, same to rounding
    (1e-16); loudness: levels kept as float32, measured 1.6e-12 (mean) and
    6.2e-11 (std) relative, the same speech frames (1692 of them on 18 s)."""
    d = arousal_descriptors(DecodedAudio(_samples_in_a_row(10)), None)
    assert d.pitch_mean_hz == pytest.approx(102.74121782116427, rel=1e-12)
    assert d.pitch_std_hz == pytest.approx(38.646073300295335, rel=1e-12)
    assert d.loudness_mean_db == pytest.approx(-28.63541043451422, rel=1e-9)
    assert d.loudness_std_db == pytest.approx(8.086760537623352, rel=1e-9)

    from voiceman_pipeline.engines.ser.descriptors import frame_levels_dbfs, speech_frame_mask

    levels = frame_levels_dbfs(_samples_in_a_row(1), 16_000)
    before = levels.copy()
    assert int(np.count_nonzero(speech_frame_mask(levels))) == 1692
    assert np.array_equal(levels, before)  # the mask leaves the caller's levels in order


def test_descriptors_keep_no_frames_that_grow_with_the_call():
    """4x the call (2 vs 8 minutes of speech) peaks higher by the float32
    levels (4 bytes per 10 ms) and no more. Measured: +100 KB; pooling F0
    frames and float64 levels, as before, took +340 KB."""
    import tracemalloc

    # 2 and 8 minutes exactly: Praat's windows are then 60 s in both.
    short, long = _samples_in_a_row(7)[: 120 * 16_000], _samples_in_a_row(27)[: 480 * 16_000]
    arousal_descriptors(DecodedAudio(short), None)  # first-call imports and caches
    peaks = []
    for x in (short, long):
        tracemalloc.start()
        try:
            arousal_descriptors(DecodedAudio(x), None)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    extra_frames = (len(long) - len(short)) / 16_000 / 0.01
    assert peaks[1] - peaks[0] < 4 * extra_frames * 1.1 + 32 * 1024
