"""Speech emotion recognition with a wav2vec2-style audio-classification model.

Any model that transformers loads with ``AutoFeatureExtractor`` and
``AutoModelForAudioClassification`` works (wav2vec2, HuBERT, WavLM heads). It
comes from a local directory (``VOICEMAN_SER_MODEL``) or, when the machine is
online, by hub name; offline-by-name fails in seconds (see model_source).

How outputs are read (decided once, from the model's config at load):

- Categorical heads: ``id2label`` names the emotions; probabilities are the
  softmax of the logits (sigmoid for ``problem_type ==
  "multi_label_classification"``), the label is the most probable one.
- Dimensional heads: outputs whose ``id2label`` name is ``arousal``,
  ``valence`` or ``dominance`` (any case) are raw regression values, not
  logits. They fill ``SegmentEmotion.arousal`` / ``valence`` and are excluded
  from the softmax. A model with only such outputs has no categorical label:
  segments get label ``"dimensional"``, empty probabilities, and the result
  has no dominant label.

Memory estimate (``expected_load_mb``, before loading): the size of the
weights files (``model.safetensors`` or ``pytorch_model.bin``, or every shard
an index names), rescaled when the model will be held in another number
format than it is stored in. transformers 5 (pinned) loads with
``dtype="auto"``: the ``dtype`` (or older ``torch_dtype``) in config.json,
else the checkpoint's own type. So the rule is ``size x width(config dtype) /
width(stored dtype)`` where the stored type is the dominant float type in the
safetensors header (read without loading the tensors); when either is unknown
(pickled ``.bin`` weights, no dtype in config.json) the factor is 1. All of it
is GPU memory on CUDA (the model is moved there whole and its host tensors are
freed), host memory on CPU.
"""

from __future__ import annotations

import gc
import json
import math
import struct
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from voiceman_pipeline.audio_io import read_span
from voiceman_pipeline.engines.base import EmotionRecognizer
from voiceman_pipeline.engines.model_source import find_model_dir, resolve_model_dir
from voiceman_pipeline.engines.ser.descriptors import (
    HOP_S,
    arousal_descriptors,
    frame_levels_dbfs,
    speech_frame_mask,
)
from voiceman_pipeline.errors import (
    ModelUnavailableError,
    ResourceError,
    ServiceError,
)
from voiceman_pipeline.results import (
    SAMPLE_RATE,
    DecodedAudio,
    EmotionResult,
    EngineInfo,
    SegmentEmotion,
    Timings,
    Transcript,
)

ENV_HINT = "VOICEMAN_SER_MODEL"
WHAT = "speech-emotion model"
REQUIRED_FILES: list[str | tuple[str, ...]] = [
    "config.json",
    # Large models are saved sharded: the index file stands for the shards.
    (
        "model.safetensors",
        "pytorch_model.bin",
        "model.safetensors.index.json",
        "pytorch_model.bin.index.json",
    ),
    "preprocessor_config.json",
]
MB = 1024 * 1024
# Bytes per element of float types, by safetensors and torch/config names.
_FLOAT_WIDTH = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
}  # fmt: skip
DIMENSION_NAMES = ("arousal", "valence", "dominance")
DIMENSIONAL_LABEL = "dimensional"


class Wav2Vec2EmotionRecognizer(EmotionRecognizer):
    """Emotion per transcript segment from an audio-classification model.

    Args:
        model: local model directory or hub id ("org/name").
        device: "auto" (cuda when torch sees a GPU), "cpu", "cuda" or "cuda:N".
        max_segment_s: longer segments are split into equal chunks no longer
            than this; chunk outputs are averaged weighted by chunk duration.
            Also the window length when the transcript has no segments.
        min_segment_s: segments shorter than this are skipped (too little
            audio for a meaningful judgement).
    """

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        max_segment_s: float = 10.0,
        min_segment_s: float = 0.5,
    ) -> None:
        if not model:
            raise ValueError("model must be a model directory or hub name")
        if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', not {device!r}")
        if not 0 < min_segment_s < max_segment_s:
            raise ValueError("need 0 < min_segment_s < max_segment_s")
        self.model = model
        self.requested_device = device
        self.max_segment_s = float(max_segment_s)
        self.min_segment_s = float(min_segment_s)
        self._device: str | None = None if device == "auto" else device
        self._model: Any = None
        self._extractor: Any = None
        self._model_dir: Path | None = None
        self._labels: list[str] = []  # id order, as in config.id2label
        self._categorical: list[int] = []  # output indices that are emotion classes
        self._dimensions: dict[str, int] = {}  # "arousal"/"valence"/... -> output index
        self._multi_label = False

    # --- Engine ---------------------------------------------------------------

    @property
    def device(self) -> str:
        """The device the model runs on ("cpu", "cuda", "cuda:N")."""
        if self._device is None:
            import torch

            self._device = "cuda" if torch.cuda.is_available() else "cpu"
        return self._device

    @property
    def info(self) -> EngineInfo:
        options: dict[str, Any] = {
            "max_segment_s": self.max_segment_s,
            "min_segment_s": self.min_segment_s,
            "requested_device": self.requested_device,
        }
        if self._model_dir is not None:
            options["model_dir"] = str(self._model_dir)
        return EngineInfo(
            name="wav2vec2-ser", model=self.model, device=self.device, options=options
        )

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        if self._model is not None:
            return
        model_dir = resolve_model_dir(
            self.model, required_files=REQUIRED_FILES, what=WHAT, env_hint=ENV_HINT
        )
        import torch
        from transformers import AutoFeatureExtractor, AutoModelForAudioClassification

        device = self.device
        if device.startswith("cuda") and not torch.cuda.is_available():
            # A CPU-only machine asked for a GPU: the caller's CPU fallback applies.
            raise ServiceError(f"device {device!r} requested but torch sees no CUDA GPU")
        try:
            # local_files_only: the directory is complete (checked above), so
            # transformers must never reach for the network from here.
            extractor = AutoFeatureExtractor.from_pretrained(model_dir, local_files_only=True)
            model, loading = AutoModelForAudioClassification.from_pretrained(
                model_dir, local_files_only=True, output_loading_info=True
            )
        except (OSError, ValueError, KeyError) as exc:  # unreadable or unsupported model
            raise ModelUnavailableError(
                f"The {WHAT} in {str(model_dir)!r} cannot be loaded as an audio "
                f"classifier: {exc}. Set {ENV_HINT} to a wav2vec2-style "
                f"audio-classification model directory."
            ) from exc
        # transformers fills weights missing from the checkpoint with random
        # values and only warns; a randomly initialised head would produce
        # invented emotions, so refuse it.
        missing = sorted(loading.get("missing_keys") or [])
        mismatched = sorted(str(k) for k in loading.get("mismatched_keys") or [])
        if missing or mismatched:
            raise ModelUnavailableError(
                f"The {WHAT} in {str(model_dir)!r} lacks trained weights for "
                f"{', '.join((missing + mismatched)[:6])}: it is not a fine-tuned "
                f"audio-classification checkpoint (its head would be random). "
                f"Set {ENV_HINT} to a speech-emotion model."
            )
        rate = getattr(extractor, "sampling_rate", None)
        if rate != SAMPLE_RATE:
            raise ModelUnavailableError(
                f"The {WHAT} in {str(model_dir)!r} expects {rate} Hz audio; this "
                f"pipeline supplies {SAMPLE_RATE} Hz. Use a {SAMPLE_RATE} Hz model."
            )
        self._read_outputs(model.config, model_dir)
        model.eval()
        with _device_errors(device, "loading the model"):
            model.to(device)
        self._model, self._extractor, self._model_dir = model, extractor, model_dir

    def expected_load_mb(self) -> tuple[float, float]:
        """(host MB, GPU MB) the loaded model is expected to hold: an estimate.

        Weights-file size, rescaled to the dtype transformers will load it in
        (rule in the module docstring); on the GPU when the model would run on
        CUDA, else host memory. Loads nothing and never touches the network: a
        hub name is looked up in the local cache only, and a model that cannot
        be found that way gives (0.0, 0.0) (``load()`` then raises its clear
        error). The feature extractor and inference buffers are not counted.
        """
        model_dir = self._model_dir or find_model_dir(self.model)
        if model_dir is None:
            return 0.0, 0.0
        files = weight_files(model_dir)
        if not files:
            return 0.0, 0.0
        size = sum(f.stat().st_size for f in files)
        mb = size / MB * _load_dtype_ratio(model_dir, files)
        return (0.0, mb) if self.device.startswith("cuda") else (mb, 0.0)

    def unload(self) -> None:
        if self._model is None:
            return
        self._model = None
        self._extractor = None
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # --- EmotionRecognizer ----------------------------------------------------

    def recognize(
        self, audio: DecodedAudio, transcript: Transcript, source_sha256: str
    ) -> EmotionResult:
        if audio.sample_rate != SAMPLE_RATE:
            raise ValueError(f"expected {SAMPLE_RATE} Hz audio, got {audio.sample_rate} Hz")
        started = time.perf_counter()
        load_s = 0.0
        if not self.loaded:
            self.load()
            load_s = time.perf_counter() - started
        processing = time.perf_counter()

        segments: list[SegmentEmotion] = []
        for start, end in self._spans(audio, transcript):
            segments.append(self._classify_span(audio, start, end))
        descriptors = arousal_descriptors(audio, transcript)

        status, reason = "ok", None
        if not segments:
            status = "unavailable"
            reason = (
                f"no speech segment of at least {self.min_segment_s:g} s to classify"
            )
        return EmotionResult(
            source_sha256=source_sha256,
            status=status,  # type: ignore[arg-type]
            reason=reason,
            engine=self.info,
            segments=segments,
            dominant_label=dominant_label(segments),
            descriptors=descriptors,
            timings=Timings(
                load_s=load_s,
                process_s=time.perf_counter() - processing,
                audio_s=audio.duration_s,
            ),
        )

    # --- internals ------------------------------------------------------------

    def _read_outputs(self, config: Any, model_dir: Path) -> None:
        """Split the model outputs into emotion classes and dimensions (module doc)."""
        id2label = {int(k): str(v) for k, v in (config.id2label or {}).items()}
        num = int(config.num_labels)
        labels = [id2label.get(i, f"LABEL_{i}") for i in range(num)]
        if all(label == f"LABEL_{i}" for i, label in enumerate(labels)):
            # transformers' placeholder names: the outputs cannot be reported
            # as emotions, because nobody said which output is which.
            raise ModelUnavailableError(
                f"The {WHAT} in {str(model_dir)!r} has no label names (config.json "
                f"id2label is LABEL_0..LABEL_{num - 1}). Add the emotion names to "
                f"id2label or set {ENV_HINT} to another model."
            )
        self._labels = labels
        self._dimensions = {
            label.lower(): i for i, label in enumerate(labels) if label.lower() in DIMENSION_NAMES
        }
        self._categorical = [i for i in range(num) if i not in self._dimensions.values()]
        self._multi_label = getattr(config, "problem_type", None) == "multi_label_classification"

    def _spans(self, audio: DecodedAudio, transcript: Transcript) -> list[tuple[float, float]]:
        """Time spans to classify: transcript segments, else speech windows."""
        duration = audio.duration_s
        if transcript.segments:
            spans = [
                (max(0.0, seg.start), min(duration, seg.end)) for seg in transcript.segments
            ]
            return [(s, e) for s, e in spans if e - s >= self.min_segment_s]
        # No segmentation (e.g. STT found nothing or was skipped): fixed windows,
        # keeping only those with enough speech-like frames, since a label for
        # a silent window would be noise.
        levels = frame_levels_dbfs(audio.samples, audio.sample_rate)
        speech = speech_frame_mask(levels)
        # Equal windows no longer than max_segment_s, so there is no short tail.
        n_windows = max(1, math.ceil(duration / self.max_segment_s - 1e-9))
        edges = np.linspace(0.0, duration, n_windows + 1)
        spans = []
        for start, end in zip(edges[:-1].round(3).tolist(), edges[1:].round(3).tolist()):
            first, last = int(start / HOP_S), int(end / HOP_S)
            speech_s = float(np.count_nonzero(speech[first:last])) * HOP_S
            if end - start >= self.min_segment_s and speech_s >= self.min_segment_s:
                spans.append((start, end))
        return spans

    def _classify_span(self, audio: DecodedAudio, start: float, end: float) -> SegmentEmotion:
        """One segment: split into equal chunks <= max_segment_s, average by duration."""
        n_chunks = max(1, math.ceil((end - start) / self.max_segment_s - 1e-9))
        first = int(round(start * audio.sample_rate))
        last = int(round(end * audio.sample_rate))
        bounds = np.linspace(first, last, n_chunks + 1).round().astype(int)
        outputs, weights = [], []
        for a, b in zip(bounds[:-1], bounds[1:]):
            outputs.append(self._forward(read_span(audio.samples, a, b)))
            weights.append(b - a)
        mean = np.average(np.stack(outputs), axis=0, weights=np.asarray(weights, dtype=float))

        dims = {name: float(mean[i]) for name, i in self._dimensions.items()}
        if self._categorical:
            probs = {self._labels[i]: float(mean[i]) for i in self._categorical}
            label = max(probs, key=probs.__getitem__)
        else:
            probs, label = {}, DIMENSIONAL_LABEL
        return SegmentEmotion(
            start=start,
            end=end,
            label=label,
            probabilities=probs,
            arousal=dims.get("arousal"),
            valence=dims.get("valence"),
        )

    def _forward(self, samples: np.ndarray) -> np.ndarray:
        """Model outputs for one chunk: class probabilities, raw dimension values.

        One chunk per forward pass: batching would need padding, which changes
        the output of wav2vec2 models that take no attention mask.
        """
        import torch

        inputs = self._extractor(
            np.asarray(samples, dtype=np.float32), sampling_rate=SAMPLE_RATE, return_tensors="pt"
        )
        with _device_errors(self.device, "running the model"), torch.inference_mode():
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            logits = self._model(**inputs).logits[0].float()
            out = logits.clone()
            if self._categorical:
                idx = torch.tensor(self._categorical, device=logits.device)
                cat = logits[idx]
                out[idx] = torch.sigmoid(cat) if self._multi_label else torch.softmax(cat, dim=0)
            return out.cpu().numpy()


def weight_files(model_dir: Path) -> list[Path]:
    """The weights files transformers would read, in its order of preference.

    A sharded checkpoint's index names its shards (``weight_map`` values);
    shards that are missing are left out (``load()`` reports them). Empty when
    the directory holds no weights.
    """
    for name in REQUIRED_FILES[1]:
        path = model_dir / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8")).get("weight_map", {})
        except (OSError, ValueError, AttributeError):
            return []
        shards = (model_dir / shard for shard in sorted(set(weight_map.values())))
        return [shard for shard in shards if shard.is_file()]
    return []


def _load_dtype_ratio(model_dir: Path, files: list[Path]) -> float:
    """width(dtype transformers loads in) / width(dtype stored); 1.0 when unknown."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        target = _FLOAT_WIDTH.get(str(config.get("dtype") or config.get("torch_dtype")))
    except (OSError, ValueError, AttributeError):
        return 1.0
    totals: dict[int, int] = {}
    for path in files:
        if path.suffix != ".safetensors":
            return 1.0  # pickled weights: the stored type is unknown without loading
        for width, num_bytes in _safetensors_float_bytes(path).items():
            totals[width] = totals.get(width, 0) + num_bytes
    if target is None or not totals:
        return 1.0
    return target / max(totals, key=totals.__getitem__)


def _safetensors_float_bytes(path: Path) -> dict[int, int]:
    """Bytes of float tensors per element width, from a safetensors header only."""
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > path.stat().st_size:
                return {}
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error):
        return {}
    totals: dict[int, int] = {}
    for name, entry in header.items():
        if name == "__metadata__" or not isinstance(entry, dict):
            continue
        width = _FLOAT_WIDTH.get(str(entry.get("dtype")))
        start, end = entry.get("data_offsets", (0, 0))
        if width:
            totals[width] = totals.get(width, 0) + int(end) - int(start)
    return totals


def dominant_label(segments: list[SegmentEmotion]) -> str | None:
    """The label held for the most total segment time (ties: first seen)."""
    totals: dict[str, float] = {}
    for seg in segments:
        if seg.label != DIMENSIONAL_LABEL:
            totals[seg.label] = totals.get(seg.label, 0.0) + (seg.end - seg.start)
    if not totals:
        return None
    return max(totals, key=totals.__getitem__)


@contextmanager
def _device_errors(device: str, doing: str) -> Iterator[None]:
    """Map GPU failures to the pipeline's error classes (CPU errors pass as-is).

    CUDA out-of-memory -> ResourceError (clean up, then retry);
    any other RuntimeError on a CUDA device -> ServiceError (fall back to CPU).
    """
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        if not device.startswith("cuda"):
            raise
        raise ResourceError(f"GPU out of memory while {doing} on {device}: {exc}") from exc
    except RuntimeError as exc:
        if not device.startswith("cuda"):
            raise
        raise ServiceError(f"speech-emotion model failed on {device} while {doing}: {exc}") from exc
