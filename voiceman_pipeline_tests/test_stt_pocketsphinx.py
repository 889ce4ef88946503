"""PocketSphinx transcription on real speech (data/samples, with reference texts).

Audio is read with soundfile (an independent reader: the samples are 16 kHz
mono PCM already), so these tests exercise only the STT engine.
"""

from __future__ import annotations

import re
from pathlib import Path

import jiwer
import numpy as np
import pytest
import soundfile as sf

from voiceman_pipeline.engines.stt import build_transcriber
from voiceman_pipeline.engines.stt import pocketsphinx_engine
from voiceman_pipeline.engines.stt.pocketsphinx_engine import PocketsphinxTranscriber, _Pcm16
from voiceman_pipeline.errors import InvalidAudioError
from voiceman_pipeline.resources.memory import MemoryManager
from voiceman_pipeline.results import DecodedAudio, Segment, Transcript, Word

pytestmark = pytest.mark.timeout(120)

SAMPLES = Path(__file__).resolve().parent.parent / "data" / "samples"
SAMPLE_WAVS = sorted(SAMPLES.glob("*.wav"))
MAX_WER = 0.40  # measured 0.314 on these samples with the bundled en-us model


def load(path: Path) -> DecodedAudio:
    samples, rate = sf.read(path, dtype="float32")
    assert rate == 16_000 and samples.ndim == 1, f"{path.name} is not 16 kHz mono"
    return DecodedAudio(samples=samples)


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


@pytest.fixture(scope="module")
def engine() -> PocketsphinxTranscriber:
    engine = PocketsphinxTranscriber()
    yield engine
    engine.unload()


@pytest.fixture(scope="module")
def transcripts(engine) -> dict[str, tuple[DecodedAudio, Transcript]]:
    assert SAMPLE_WAVS, f"no samples in {SAMPLES}"
    out = {}
    for wav in SAMPLE_WAVS:
        audio = load(wav)
        out[wav.stem] = (audio, engine.transcribe(audio, source_sha256="sha-" + wav.stem))
    return out


def test_word_error_rate_on_real_speech(transcripts):
    refs, hyps = [], []
    for name, (_, transcript) in transcripts.items():
        refs.append(normalise((SAMPLES / f"{name}.txt").read_text(encoding="utf-8")))
        hyps.append(normalise(transcript.text))
    wer = jiwer.wer(refs, hyps)  # corpus level: total errors / total reference words
    print(f"pocketsphinx WER over {len(refs)} samples: {wer:.3f}")
    assert wer <= MAX_WER
    # Every sample has speech; an engine returning nothing would fail here too.
    assert all(hyps)


def test_word_timestamps_ordered_and_inside_audio(transcripts):
    for name, (audio, transcript) in transcripts.items():
        assert transcript.duration_s == pytest.approx(audio.duration_s)
        assert transcript.words, name
        starts = [w.start for w in transcript.words]
        assert starts == sorted(starts), f"{name}: word starts go backwards"
        for w in transcript.words:
            assert 0.0 <= w.start <= w.end <= audio.duration_s, (name, w)
            assert w.end > w.start, (name, w)  # every decoded word spans frames


def test_segments_hold_their_words(transcripts):
    for name, (audio, transcript) in transcripts.items():
        assert transcript.segments, name
        assert [w for s in transcript.segments for w in s.words] == transcript.words
        previous_end = 0.0
        for seg in transcript.segments:
            assert isinstance(seg, Segment) and seg.words, name
            assert seg.start == seg.words[0].start and seg.end == seg.words[-1].end
            assert seg.text == " ".join(w.text for w in seg.words)
            assert seg.start >= previous_end, f"{name}: segments overlap"
            previous_end = seg.end
        assert transcript.text == " ".join(s.text for s in transcript.segments)


def test_words_are_clean(transcripts):
    """No decoder fillers (<s>, <sil>, [NOISE]) and no pronunciation variants (word(2))."""
    for _, transcript in transcripts.values():
        for w in transcript.words:
            assert isinstance(w, Word)
            assert re.fullmatch(r"[a-z0-9'.\-_]+", w.text), w.text


def test_confidences_are_probabilities_and_informative(transcripts):
    all_conf = []
    for name, (_, transcript) in transcripts.items():
        for w in transcript.words:
            assert 0.0 <= w.confidence <= 1.0, (name, w)
            all_conf.append(w.confidence)
        for seg in transcript.segments:
            assert seg.confidence == pytest.approx(np.mean([w.confidence for w in seg.words]))
        assert transcript.confidence == pytest.approx(
            np.mean([w.confidence for w in transcript.words])
        )
    # Lattice posteriors vary; a constant 1.0 would mean they were not computed.
    assert min(all_conf) < 0.5 < max(all_conf)


def test_engine_info_and_timings(transcripts):
    audio, transcript = next(iter(transcripts.values()))
    info = transcript.engine
    assert info.name == "pocketsphinx" and info.model == "builtin" and info.device == "cpu"
    for key in ("hmm", "lm", "dict"):
        assert Path(info.options[key]).exists(), key
    assert info.options["sample_rate"] == 16_000
    assert info.options["frame_rate"] == 100
    assert info.options["pocketsphinx_version"].startswith("5.")
    assert transcript.language == "en"
    assert transcript.source_sha256.startswith("sha-")
    assert transcript.timings.audio_s == pytest.approx(audio.duration_s)
    assert transcript.timings.process_s > 0


def test_decoder_loaded_once_across_files_then_unloaded():
    engine = build_transcriber("pocketsphinx")
    assert isinstance(engine, PocketsphinxTranscriber) and not engine.loaded
    first = engine.transcribe(load(SAMPLE_WAVS[0]), "a")
    decoder = engine._decoder
    second = engine.transcribe(load(SAMPLE_WAVS[1]), "b")
    assert engine.load_count == 1 and engine._decoder is decoder
    assert first.timings.load_s > 0 and second.timings.load_s == 0.0

    engine.unload()
    assert not engine.loaded and engine._decoder is None
    engine.unload()  # idempotent
    again = engine.transcribe(load(SAMPLE_WAVS[1]), "b")
    assert engine.load_count == 2
    assert again.text == second.text  # a fresh decoder gives the same result


def test_result_does_not_depend_on_previous_files(engine, transcripts):
    """The shared decoder keeps no state between files: the last sample, decoded
    after all the others (the fixture) and again after only the first, comes
    out the same. (Against a decoder that saw nothing before: the next test.)"""
    name = SAMPLE_WAVS[-1].stem
    audio, before = transcripts[name]
    engine.transcribe(load(SAMPLE_WAVS[0]), "other")
    after = engine.transcribe(audio, "again")
    assert after.text == before.text
    assert [(w.start, w.end) for w in after.words] == [(w.start, w.end) for w in before.words]


def _five_seconds_from(first: int) -> DecodedAudio:
    """The samples joined round-robin from sample ``first``, cut to 5 s (as
    bench/overhead.py makes its short recordings)."""
    parts = [sf.read(SAMPLE_WAVS[(first + i) % len(SAMPLE_WAVS)], dtype="float32")[0] for i in range(2)]
    return DecodedAudio(np.concatenate(parts)[: 5 * 16_000])


def test_a_recording_decodes_the_same_after_another_as_alone():
    """The decoder's feature state is reset per recording. Without the reset,
    this pair came out different: the second recording's last word "are"
    alone, "car" after the first, and its confidence 0.744 against 0.686."""
    first, second = _five_seconds_from(2), _five_seconds_from(3)
    alone = PocketsphinxTranscriber().transcribe(second, "b")
    shared = PocketsphinxTranscriber()
    shared.transcribe(first, "a")
    after = shared.transcribe(second, "b")
    assert shared.load_count == 1  # the same decoder, not a new one
    assert after.text == alone.text
    assert after.confidence == alone.confidence
    assert [(w.start, w.end, w.confidence) for w in after.words] == [
        (w.start, w.end, w.confidence) for w in alone.words
    ]


def test_long_recording_is_split_into_bounded_utterances():
    """Continuous speech longer than max_utterance_s is cut, and still transcribed in order."""
    audios = [load(p) for p in SAMPLE_WAVS if "sense" in p.name]
    refs = [(SAMPLES / f"{p.stem}.txt").read_text() for p in SAMPLE_WAVS if "sense" in p.name]
    samples = np.concatenate([a.samples for a in audios] * 2)  # ~31 s, barely a pause
    audio = DecodedAudio(samples=samples)
    engine = PocketsphinxTranscriber(max_utterance_s=5.0)

    utterances = engine._utterances(_Pcm16(audio.samples))
    assert len(utterances) >= 31 // 5
    assert all(0 < (end - start) / 16_000 <= 5.0 for start, end in utterances)
    assert all(a[1] <= b[0] for a, b in zip(utterances, utterances[1:]))

    transcript = engine.transcribe(audio, "long")
    starts = [w.start for w in transcript.words]
    assert starts == sorted(starts) and transcript.words[-1].end <= audio.duration_s
    assert transcript.words[-1].end > audio.duration_s - 5  # reached the end of the file
    wer = jiwer.wer(normalise(" ".join(refs * 2)), normalise(transcript.text))
    print(f"pocketsphinx WER on 31 s cut into <=5 s utterances: {wer:.3f}")
    assert wer <= 0.5


def test_memory_mapped_signal_read_in_blocks_gives_the_same_transcript(
    engine, transcripts, tmp_path, monkeypatch
):
    """The decoded file, memory-mapped as the stages read it, and speech
    regions searched 1 s at a time: the same words at the same times."""
    name = SAMPLE_WAVS[-1].stem
    audio, before = transcripts[name]
    np.save(tmp_path / "audio_16k.npy", audio.samples)
    mapped = np.load(tmp_path / "audio_16k.npy", mmap_mode="r")
    monkeypatch.setattr(pocketsphinx_engine, "BLOCK_SAMPLES", 16_000)
    after = engine.transcribe(DecodedAudio(samples=mapped), before.source_sha256)
    assert after.text == before.text
    assert [(w.start, w.end) for w in after.words] == [(w.start, w.end) for w in before.words]


def test_silence_gives_an_empty_transcript(engine):
    transcript = engine.transcribe(DecodedAudio(np.zeros(16_000, dtype=np.float32)), "quiet")
    assert transcript.text == "" and transcript.words == [] and transcript.segments == []
    assert transcript.confidence is None and transcript.duration_s == 1.0


@pytest.mark.parametrize(
    "audio",
    [
        DecodedAudio(samples=np.zeros(0, dtype=np.float32)),
        DecodedAudio(samples=np.zeros(8_000, dtype=np.float32), sample_rate=8_000),
        DecodedAudio(samples=np.full(16_000, np.nan, dtype=np.float32)),
        DecodedAudio(samples=np.zeros((16_000, 2), dtype=np.float32)),
    ],
    ids=["empty", "8kHz", "nan", "stereo"],
)
def test_invalid_audio_is_refused(engine, audio):
    with pytest.raises(InvalidAudioError):
        engine.transcribe(audio, "bad")


def test_expected_load_mb_from_the_model_files_without_loading():
    engine = PocketsphinxTranscriber()
    host_mb, gpu_mb = engine.expected_load_mb()
    assert not engine.loaded and engine.load_count == 0
    assert gpu_mb == 0.0  # CPU only
    files = []
    for path in map(Path, engine._model_paths().values()):
        files += [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
    files_mb = sum(f.stat().st_size for f in files) / 2**20
    assert files_mb > 10  # the bundled en-us set (35 MiB)
    assert files_mb <= host_mb <= 4 * files_mb  # measured: 2.6x the files once loaded

    # A missing file counts as nothing (load() names it); the estimate never raises.
    partial = PocketsphinxTranscriber(lm="/no/such/file.lm.bin")
    assert 0 < partial.expected_load_mb()[0] < host_mb


def _speech(seconds: float) -> DecodedAudio:
    """The "sense" samples joined (barely a pause: one utterance) and cut to ``seconds``."""
    joined = np.concatenate([load(p).samples for p in SAMPLE_WAVS if "sense" in p.name] * 4)
    return DecodedAudio(samples=joined[: int(seconds * 16_000)])


def _longest_utterance_s(engine: PocketsphinxTranscriber, audio: DecodedAudio) -> float:
    return max(end - start for start, end in engine._utterances(_Pcm16(audio.samples))) / 16_000


def test_decoder_reports_the_longest_utterance_it_has_grown_for():
    """``grown_for_s``, which the transcript's memory prediction reads: 0 before a
    decoder is built; then the longest utterance decoded since it was, kept after a
    shorter recording; 0 again once unloaded, and a reloaded decoder starts over."""
    engine = PocketsphinxTranscriber()
    long, short = _speech(20.0), _speech(6.0)
    assert engine.grown_for_s() == 0.0
    engine.transcribe(long, "long")
    assert engine.grown_for_s() == pytest.approx(_longest_utterance_s(engine, long))
    assert engine.grown_for_s() > 15.0
    engine.transcribe(short, "short")
    assert engine.grown_for_s() == pytest.approx(_longest_utterance_s(engine, long))
    engine.unload()
    assert engine.grown_for_s() == 0.0
    engine.transcribe(short, "short")
    assert engine.grown_for_s() == pytest.approx(_longest_utterance_s(engine, short))
    assert 0.0 < engine.grown_for_s() < 15.0
    engine.unload()


def test_a_decoder_grown_for_a_longer_utterance_grows_less_for_a_shorter_one():
    """What ``grown_for_s`` stands for, measured on the real decoder by the pipeline's
    own ``MemoryManager.track`` (heap trimmed, then the kernel's peak counter): the same
    12 s of speech takes less memory after a 24 s utterance than after a 3 s one."""
    memory, peaks, twelve = MemoryManager(watchdog_interval_s=10.0), {}, _speech(12.0)
    for before in (3.0, 24.0):
        engine = PocketsphinxTranscriber()
        engine.transcribe(_speech(before), "before")
        with memory.track("transcript", 12.0) as measured:
            engine.transcribe(twelve, "measured")
        engine.unload()
        if measured.peak_source != "kernel":  # a sampled peak misses what native code holds
            pytest.skip("the kernel's peak counter cannot be reset here")
        peaks[before] = measured.peak_delta_mb
    print(f"12 s of speech after 3 s: {peaks[3.0]:.1f} MB, after 24 s: {peaks[24.0]:.1f} MB")
    assert peaks[24.0] < peaks[3.0] / 1.5
