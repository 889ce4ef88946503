"""A tiny randomly initialised wav2vec2 emotion classifier, built locally.

No SER weights can be downloaded on test machines, so tests run the real
loading and inference code on this model instead. Its outputs are random:
tests may assert structure (labels, probabilities, times), never meaning.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_LABELS = ("angry", "happy", "neutral", "sad")


def build_tiny_wav2vec2_ser(
    directory: str | Path, labels: tuple[str, ...] = DEFAULT_LABELS, seed: int = 0
) -> Path:
    """Save a ~30 kB Wav2Vec2ForSequenceClassification + feature extractor to ``directory``.

    The convolutional front end keeps wav2vec2's total stride of 320 samples
    (50 frames per second at 16 kHz) so sequence lengths, and therefore memory
    and time, match a real model's shape on long chunks, at a tiny width.
    """
    import torch
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForSequenceClassification,
    )

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = Wav2Vec2Config(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8, 8, 8),
        conv_kernel=(10, 8, 4),
        conv_stride=(5, 8, 8),  # 5 * 8 * 8 = 320, as in the real 7-layer stack
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        classifier_proj_size=8,
        # Wider initial weights than the default 0.02 so that different audio
        # gives visibly different (still meaningless) class probabilities.
        initializer_range=0.5,
        num_labels=len(labels),
        id2label={i: label for i, label in enumerate(labels)},
        label2id={label: i for i, label in enumerate(labels)},
    )
    with torch.random.fork_rng():  # leave the caller's random state alone
        torch.manual_seed(seed)
        model = Wav2Vec2ForSequenceClassification(config).eval()
    model.save_pretrained(directory)
    Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=16_000,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=False,
    ).save_pretrained(directory)
    return directory
