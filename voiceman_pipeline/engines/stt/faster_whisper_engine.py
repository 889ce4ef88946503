"""Production speech-to-text: Whisper through faster-whisper (CTranslate2).

Where the model comes from (``model``):

- a size name faster-whisper knows ("tiny", "base", "small", "large-v3", ...),
  mapped to the hub id faster-whisper itself downloads
  ("Systran/faster-whisper-small");
- a hub id "org/name" of a CTranslate2-converted Whisper model;
- a local directory (what ``VOICEMAN_STT_MODEL`` usually holds offline).

Hub names go through ``model_source.resolve_model_dir``: the local Hugging
Face cache is used when complete, the hub is probed with a short timeout, and
an offline machine fails within seconds (the probe's timeout, 3 s) with a
message naming ``VOICEMAN_STT_MODEL``. A directory must hold ``model.bin``, ``config.json``,
a vocabulary file and ``tokenizer.json`` (faster-whisper would otherwise fetch
a tokenizer from the hub on every load); ``preprocessor_config.json`` is
optional (without it 80 mel bins are assumed, which is wrong for large-v3).

Memory estimate (``expected_load_mb``, before loading): CTranslate2 holds
the weights of ``model.bin`` converted to the compute type, so the estimate is
``model.bin size x (compute-type width / stored width)`` in bytes per weight.
The stored width is the dominant weight type in ``model.bin``'s own header
(read without loading: variable headers only, their data is skipped); the
published faster-whisper models are float16, so int8 on CPU (the "auto"
choice there) halves them, float32 doubles them, float16 on CUDA keeps them;
a model converted to int8 stays the same size under int8. Measured on the tiny
test model (4.0 MiB int8 model.bin): +5.5 MiB RSS under int8, +15.8 MiB under
float32, i.e. the rule plus ~1.5 MiB of tokenizer and runtime, which is not
counted. On CUDA the weights are GPU memory (CTranslate2 reads them on the
host and frees that copy after the transfer), so host is 0; on CPU it is all
host memory.

Words always carry timestamps (cross-attention alignment). Word confidence is
faster-whisper's word probability (the mean token probability of the word);
segment and overall confidence are means of word confidences.
"""

from __future__ import annotations

import gc
import struct
import threading
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from voiceman_pipeline.audio_io import read_span
from voiceman_pipeline.engines.base import Transcriber
from voiceman_pipeline.engines.model_source import find_model_dir, resolve_model_dir
from voiceman_pipeline.errors import (
    InvalidAudioError,
    ModelUnavailableError,
    ResourceError,
    ServiceError,
)
from voiceman_pipeline.results import (
    SAMPLE_RATE,
    DecodedAudio,
    EngineInfo,
    Segment,
    Timings,
    Transcript,
    Word,
)

ENGINE_NAME = "faster-whisper"
ENV_HINT = "VOICEMAN_STT_MODEL"
WHAT = "speech-to-text (faster-whisper) model"
REQUIRED_FILES: list[str | tuple[str, ...]] = [
    "model.bin",
    "config.json",  # alignment heads (word timestamps), language ids, suppressed ids
    ("vocabulary.json", "vocabulary.txt"),  # CTranslate2 refuses to load without one
    "tokenizer.json",  # without it faster-whisper downloads "openai/whisper-tiny"'s
]
DEVICES = ("auto", "cpu", "cuda")
MB = 1024 * 1024
# Bytes per weight of each CTranslate2 compute type (int8_*: int8 weights).
COMPUTE_TYPE_WIDTH = {
    "int8": 1,
    "int8_float32": 1,
    "int8_float16": 1,
    "int8_bfloat16": 1,
    "int16": 2,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
}
# CTranslate2 model.bin type ids (include/ctranslate2/types.h order) -> bytes;
# int32 (id 3) holds ids and flags, not weights, so it is left out.
_CT2_TYPE_WIDTH = {0: 4, 1: 1, 2: 2, 4: 2, 5: 2}
# faster-whisper sends up to 223 tokens of previous text plus the start
# sequence as prompt, and refuses prompt + max_new_tokens > 448.
MAX_NEW_TOKENS_LIMIT = 220


class FasterWhisperTranscriber(Transcriber):
    """A faster-whisper ``WhisperModel``, loaded once and reused until unloaded.

    Args:
        model: size name, hub id "org/name", or local model directory.
        device: "auto" (CUDA when CTranslate2 sees a GPU, else CPU), "cpu",
            "cuda" or "cuda:N".
        compute_type: CTranslate2 compute type; "auto" = int8 on CPU, float16 on CUDA.
        language: language code ("en", "ko", ...); None = detect per file.
        vad_filter: skip non-speech with faster-whisper's bundled Silero VAD.
        beam_size: beam search width.
        max_new_tokens: most tokens generated per 30 s window (None = model
            limit); bounds the work a degenerate model can do.
        cpu_threads: CTranslate2 threads on CPU (0 = its default).
    """

    def __init__(
        self,
        model: str = "small",
        *,
        device: str = "auto",
        compute_type: str = "auto",
        language: str | None = None,
        vad_filter: bool = True,
        beam_size: int = 5,
        max_new_tokens: int | None = None,
        cpu_threads: int = 0,
    ) -> None:
        if not model or not str(model).strip():
            raise ModelUnavailableError(
                f"No faster-whisper model configured. Set {ENV_HINT} to a local model "
                "directory, a size name such as 'small', or a hub id 'org/name'."
            )
        if device.split(":")[0] not in DEVICES:
            raise ModelUnavailableError(
                f"Invalid device {device!r} for faster-whisper; choose one of {DEVICES} "
                "(or 'cuda:N')."
            )
        if beam_size < 1:
            raise ModelUnavailableError(f"beam_size must be at least 1, got {beam_size}")
        if max_new_tokens is not None and not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise ModelUnavailableError(
                f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS_LIMIT}, "
                f"got {max_new_tokens}"
            )
        self.model = str(model).strip()
        self.device = device
        self.compute_type = compute_type
        self.language = language or None
        self.vad_filter = bool(vad_filter)
        self.beam_size = int(beam_size)
        self.max_new_tokens = max_new_tokens
        self.cpu_threads = int(cpu_threads)
        self.load_count = 0  # how many times a WhisperModel was built (reuse check)
        self._whisper: Any = None
        self._model_dir: Path | None = None
        self._device_used: str | None = None  # "cpu" / "cuda" / "cuda:1" once loaded
        self._compute_type_used: str | None = None
        self._lock = threading.Lock()

    # --- Engine ---------------------------------------------------------------

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(
            name=ENGINE_NAME,
            model=self.model,
            device=self._device_used or self.device,
            options={
                "faster_whisper_version": _version("faster-whisper"),
                "ctranslate2_version": _version("ctranslate2"),
                "model_dir": str(self._model_dir) if self._model_dir else None,
                "compute_type": self._compute_type_used or self.compute_type,
                "language": self.language,
                "vad_filter": self.vad_filter,
                "beam_size": self.beam_size,
                "max_new_tokens": self.max_new_tokens,
                "word_timestamps": True,
                "confidence": "mean of word probabilities",
            },
        )

    @property
    def loaded(self) -> bool:
        return self._whisper is not None

    def load(self) -> None:
        with self._lock:
            if self._whisper is not None:
                return
            model_dir = self._resolve_model_dir()
            device, device_index = self._resolve_device()
            compute_type = self._resolve_compute_type(device)
            from faster_whisper import WhisperModel

            shown = "cpu" if device == "cpu" else f"cuda:{device_index}"
            try:
                whisper = WhisperModel(
                    str(model_dir),
                    device=device,
                    device_index=device_index,
                    compute_type=compute_type,
                    cpu_threads=self.cpu_threads,
                    local_files_only=True,  # the directory is complete (checked above)
                )
            except RuntimeError as exc:
                if device == "cuda":
                    _raise_device_error(exc, shown, "loading the model")
                raise ModelUnavailableError(
                    f"faster-whisper could not load the model in {str(model_dir)!r}: {exc}. "
                    f"Check the directory, or set {ENV_HINT} to another one."
                ) from exc
            except ValueError as exc:  # e.g. a compute type the device cannot run
                raise ModelUnavailableError(
                    f"faster-whisper could not load {str(model_dir)!r} on {shown} "
                    f"with compute type {compute_type!r}: {exc}"
                ) from exc
            if self.language is not None and self.language not in whisper.supported_languages:
                raise ModelUnavailableError(
                    f"Language {self.language!r} is not supported by the model in "
                    f"{str(model_dir)!r} (it supports: "
                    f"{', '.join(whisper.supported_languages)})."
                )
            self._whisper = whisper
            self._model_dir = model_dir
            self._device_used = shown
            self._compute_type_used = compute_type
            self.load_count += 1

    def expected_load_mb(self) -> tuple[float, float]:
        """(host MB, GPU MB) the loaded model is expected to hold: an estimate.

        ``model.bin`` size x (compute-type width / stored width), all on the
        GPU when the model would run on CUDA, all host memory on CPU (rule and
        measurements in the module docstring). Loads nothing and never touches
        the network: a hub name is looked up in the local cache only, and a
        model that cannot be found that way gives (0.0, 0.0) (``load()`` then
        raises its clear error). Tokenizer and runtime buffers are not counted.
        """
        model_dir = self._model_dir
        if model_dir is None:
            try:
                model_dir = find_model_dir(self._model_ref())
            except ModelUnavailableError:  # unknown size name: load() says so
                return 0.0, 0.0
        model_bin = model_dir / "model.bin" if model_dir is not None else None
        if model_bin is None or not model_bin.is_file():
            return 0.0, 0.0
        on_cuda = (self._device_used or self._expected_device()).startswith("cuda")
        stored = ct2_weight_width(model_bin)
        width = compute_width(
            self._compute_type_used or self.compute_type, on_cuda=on_cuda, stored_width=stored
        )
        ratio = width / stored if stored and width else 1.0
        mb = model_bin.stat().st_size / MB * ratio
        return (0.0, mb) if on_cuda else (mb, 0.0)

    def unload(self) -> None:
        with self._lock:
            if self._whisper is None:
                return
            on_cuda = (self._device_used or "").startswith("cuda")
            self._whisper = None
            gc.collect()
            if on_cuda:
                # CTranslate2 frees its own CUDA memory with the model; torch's
                # cache is emptied too since other stages on this GPU use torch.
                # Only on CUDA: importing torch costs seconds and a CPU run has
                # no CUDA cache to empty.
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    # --- Transcriber ----------------------------------------------------------

    def transcribe(self, audio: DecodedAudio, source_sha256: str) -> Transcript:
        samples = _check_audio(audio)
        started = time.perf_counter()
        load_s = 0.0
        if self._whisper is None:
            self.load()
            load_s = time.perf_counter() - started
        whisper = self._whisper
        processing = time.perf_counter()
        duration = audio.duration_s
        # Fed in chunks of at most CHUNK_S, cut at a quiet moment (memory: one
        # chunk of samples and its features, whatever the call's length); word
        # and segment times are shifted back onto the recording's timeline.
        # Without a configured language the first chunk's detection is kept
        # for the rest, so one call has one language.
        language, info = self.language, None
        segments: list[Segment] = []
        for start, end in _chunks(samples):
            chunk = read_span(samples, start, end)
            if not np.all(np.isfinite(chunk)):
                raise InvalidAudioError("the decoded audio contains NaN or infinite samples")
            with _device_errors(self._device_used or "cpu", "transcribing"):
                raw_segments, chunk_info = whisper.transcribe(
                    chunk,
                    language=language,
                    beam_size=self.beam_size,
                    vad_filter=self.vad_filter,
                    word_timestamps=True,
                    max_new_tokens=self.max_new_tokens,
                )
                # The segments are a lazy generator: decoding happens here.
                raw_segments = list(raw_segments)
            if info is None:
                info, language = chunk_info, chunk_info.language
            offset, upper = start / SAMPLE_RATE, min(duration, end / SAMPLE_RATE)
            segments += [_segment(raw, upper, offset) for raw in raw_segments]
        segments = [seg for seg in segments if seg.text or seg.words]
        process_s = time.perf_counter() - processing

        engine = self.info
        if self.language is None:
            # Detected, not configured: keep how sure the model was.
            engine.options["language_probability"] = float(info.language_probability)
        words = [w for seg in segments for w in seg.words]
        return Transcript(
            source_sha256=source_sha256,
            engine=engine,
            language=info.language,
            duration_s=duration,
            text=" ".join(seg.text for seg in segments if seg.text),
            segments=segments,
            words=words,
            confidence=_mean_confidence(words),
            timings=Timings(load_s=load_s, process_s=process_s, audio_s=duration),
        )

    # --- internals ------------------------------------------------------------

    def _model_ref(self) -> str:
        """The configured model as a directory path or hub id (size names mapped)."""
        model = self.model
        if Path(model).expanduser().is_dir():
            return model
        from faster_whisper.utils import available_models

        if model in available_models():
            # The size-name table lives in faster_whisper.utils._MODELS (no
            # public accessor); use it so names map exactly as faster-whisper does.
            from faster_whisper.utils import _MODELS

            return _MODELS[model]
        if "/" not in model and "\\" not in model:
            raise ModelUnavailableError(
                f"Unknown faster-whisper model {model!r}: use a size name "
                f"({', '.join(available_models())}), a hub id 'org/name', or a local "
                f"directory. Set {ENV_HINT} to a local model directory when offline."
            )
        return model

    def _resolve_model_dir(self) -> Path:
        """A local directory holding the model, from a size name, hub id or path."""
        return resolve_model_dir(
            self._model_ref(),
            required_files=REQUIRED_FILES,
            what=WHAT,
            env_hint=ENV_HINT,
            configured=self.model,
        )

    def _expected_device(self) -> str:
        """"cpu" or "cuda" as load() would choose, without raising (for estimates).

        An explicit "cuda[:N]" counts as CUDA even when no GPU is visible: load()
        then raises ServiceError and the caller falls back to a CPU engine,
        which makes its own estimate.
        """
        kind = self.device.partition(":")[0]
        if kind != "auto":
            return kind
        import ctranslate2  # the runtime library only; no model is read

        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"

    def _resolve_device(self) -> tuple[str, int]:
        import ctranslate2

        kind, _, index = self.device.partition(":")
        gpus = ctranslate2.get_cuda_device_count()
        if kind == "auto":
            return ("cuda", 0) if gpus > 0 else ("cpu", 0)
        if kind == "cpu":
            return "cpu", 0
        device_index = int(index) if index else 0
        if device_index >= gpus:
            # The pipeline falls back to the CPU on ServiceError.
            raise ServiceError(
                f"device {self.device!r} requested but CTranslate2 sees {gpus} CUDA GPU(s)"
            )
        return "cuda", device_index

    def _resolve_compute_type(self, device: str) -> str:
        import ctranslate2

        if self.compute_type == "auto":
            return "float16" if device == "cuda" else "int8"
        supported = ctranslate2.get_supported_compute_types(device)
        if self.compute_type not in supported and self.compute_type != "default":
            raise ModelUnavailableError(
                f"compute_type {self.compute_type!r} is not supported on {device}; "
                f"choose 'auto' or one of {sorted(supported)}."
            )
        return self.compute_type


def compute_width(compute_type: str, *, on_cuda: bool, stored_width: int | None) -> int | None:
    """Bytes per weight CTranslate2 holds for ``compute_type`` (None = unknown).

    "auto" is float16 on CUDA and int8 on CPU (as ``load()`` resolves it).
    "default" keeps the converted type, except that the CPU has no 16-bit
    float kernels, so a float16/bfloat16 model runs as float32 there
    (measured: the float16 tiny model loads as float32 on CPU).
    """
    if compute_type == "auto":
        compute_type = "float16" if on_cuda else "int8"
    if compute_type == "default":
        if stored_width is None or on_cuda or stored_width == 1:
            return stored_width
        return 4
    return COMPUTE_TYPE_WIDTH.get(compute_type)


def ct2_weight_width(model_bin: Path) -> int | None:
    """Bytes per weight as stored in a CTranslate2 ``model.bin`` (None = unreadable).

    Reads only the variable headers (name, shape, type, byte count) and skips
    their data, as CTranslate2's own reader lays them out, so it is cheap even
    for multi-GB models. The weight type is the one holding the most bytes
    (int8 models also keep small float32 scales, norms and biases).
    """
    try:
        size = model_bin.stat().st_size
        totals: dict[int, int] = {}
        with model_bin.open("rb") as f:

            def read(fmt: str) -> Any:
                data = f.read(struct.calcsize(fmt))
                return struct.unpack("<" + fmt, data)[0]

            def skip_string() -> None:
                f.seek(read("H"), 1)  # length (including the trailing NUL), chars

            version = read("I")
            if not 1 <= version <= 6:  # 6 is what ctranslate2 4.x writes
                return None
            if version >= 2:
                skip_string()  # spec name
                read("I")  # spec revision
            for _ in range(read("I")):
                skip_string()
                rank = read("B")
                f.seek(4 * rank, 1)  # dimensions
                if version >= 4:
                    width = _CT2_TYPE_WIDTH.get(read("B"), 0)
                    num_bytes = read("I")
                else:  # older files give the item size and the item count
                    width = read("B")
                    num_bytes = read("I") * width
                f.seek(num_bytes, 1)
                if f.tell() > size:
                    return None  # not the layout we expected: do not guess
                if width:
                    totals[width] = totals.get(width, 0) + num_bytes
    except (OSError, struct.error):
        return None
    return max(totals, key=totals.__getitem__) if totals else None


def _check_audio(audio: DecodedAudio) -> np.ndarray:
    """The samples (16 kHz mono float32), checked for shape; finiteness is
    checked chunk by chunk as they are read."""
    if audio.sample_rate != SAMPLE_RATE:
        raise InvalidAudioError(
            f"faster-whisper needs {SAMPLE_RATE} Hz audio, got {audio.sample_rate} Hz"
        )
    samples = audio.samples
    if np.ndim(samples) != 1 or np.size(samples) == 0:
        raise InvalidAudioError(
            f"expected a non-empty mono signal, got an array of shape {np.shape(samples)}"
        )
    return samples


# Longest stretch handed to faster-whisper at once (ten of Whisper's 30 s
# windows); a cut falls at the quietest 10 ms in the CUT_SEARCH_S before it.
CHUNK_S = 300.0
CUT_SEARCH_S = 10.0


def _chunks(samples: np.ndarray) -> list[tuple[int, int]]:
    """Sample ranges [start, end) of at most CHUNK_S that tile the signal."""
    size, search = int(CHUNK_S * SAMPLE_RATE), int(CUT_SEARCH_S * SAMPLE_RATE)
    out, start = [], 0
    while len(samples) - start > size:
        cut = _quietest_point(samples, start + size - search, start + size)
        out.append((start, cut))
        start = cut
    out.append((start, len(samples)))
    return out


def _quietest_point(samples: np.ndarray, lo: int, hi: int) -> int:
    """Sample index at the centre of the lowest-energy 10 ms frame in [lo, hi)."""
    hop = SAMPLE_RATE // 100
    n = (hi - lo) // hop
    frames = read_span(samples, lo, lo + n * hop).reshape(n, hop)
    return lo + int(np.argmin(np.sum(frames * frames, axis=1))) * hop + hop // 2


def _segment(raw: Any, duration: float, offset: float = 0.0) -> Segment:
    """faster-whisper segment -> Segment on the recording's timeline: times
    shifted by ``offset`` (the chunk's start) and clipped to ``duration`` (the
    chunk's end); each word's times clipped to its segment's."""
    start = _clip(offset + raw.start, duration)
    end = max(start, _clip(offset + raw.end, duration))
    words = []
    for w in raw.words or []:
        text = w.word.strip()
        if not text:
            continue
        # Alignment can place the last word past the end of the audio (the
        # model sees 30 s windows padded with silence), and a first or last
        # word outside its segment: where a word's alignment runs long,
        # faster-whisper keeps the segment's timestamp and moves the word's
        # by a median word length, which can land before the segment starts
        # (seen: a segment from 1.16 s whose only word started at 0.64 s).
        # Clipped, a segment holds its words, as readers of the timeline expect.
        w_start = _clip(offset + w.start, end, lower=start)
        w_end = _clip(offset + w.end, end, lower=w_start)
        words.append(Word(text=text, start=w_start, end=w_end, confidence=_clip(w.probability, 1.0)))
    return Segment(
        text=raw.text.strip(),
        start=start,
        end=end,
        words=words,
        confidence=_mean_confidence(words),
    )


def _clip(value: float, upper: float, lower: float = 0.0) -> float:
    return float(min(upper, max(lower, value)))


def _mean_confidence(words: list[Word]) -> float | None:
    values = [w.confidence for w in words if w.confidence is not None]
    return float(np.mean(values)) if values else None


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def _raise_device_error(exc: Exception, device: str, doing: str) -> None:
    """Map a CUDA failure to the pipeline's error classes (see errors.py)."""
    if "out of memory" in str(exc).lower():
        raise ResourceError(f"GPU out of memory while {doing} on {device}: {exc}") from exc
    raise ServiceError(f"faster-whisper failed on {device} while {doing}: {exc}") from exc


@contextmanager
def _device_errors(device: str, doing: str) -> Iterator[None]:
    """CUDA out-of-memory -> ResourceError, other CUDA RuntimeError -> ServiceError.

    Errors on the CPU pass unchanged: they are bugs or bad input, not a device
    to fall back from.
    """
    try:
        yield
    except RuntimeError as exc:
        if not device.startswith("cuda"):
            raise
        _raise_device_error(exc, device, doing)
