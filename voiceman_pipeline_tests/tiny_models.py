"""Tiny, randomly initialised Whisper models built locally for tests (no download).

The weights are random, so what such a model "says" is noise; tests use it to
run the real loading and transcription code (CTranslate2 conversion,
faster-whisper tokenizer, feature extractor, word timestamps) on small data,
and assert the structure of the result, never its words.

The layout mirrors a real multilingual Whisper checkpoint, because CTranslate2
and faster-whisper depend on it:

- CTranslate2 4.8 treats a Whisper model as multilingual only when its
  vocabulary contains an empty-string token, as real multilingual vocabularies
  do (older releases required exactly 51,865 entries); otherwise
  ``language="ko"`` is silently replaced by English. It counts languages as
  ids between ``<|startoftranscript|>`` and ``<|nocaptions|>``. So the
  vocabulary keeps the real size and id layout: 50,257 text tokens (the last
  one empty), ``<|endoftext|>`` = 50257, ``<|startoftranscript|>``, 99
  language tokens, task and control tokens, ``<|notimestamps|>`` = 50363,
  then 1,501 timestamp tokens ``<|0.00|>`` .. ``<|30.00|>``.
- faster-whisper decodes only ids below ``<|endoftext|>`` as text and treats
  every id above ``<|notimestamps|>`` as a timestamp.

Only the model dimensions are tiny (d_model 64, one encoder and one decoder
layer), so building and converting takes a few seconds and the CTranslate2
model is a few MB.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

# Whisper's language tokens, in the order (and so at the ids) of the original
# multilingual vocabulary (<|en|> = 50259 ... <|su|> = 50357).
WHISPER_LANGUAGES = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs "
    "ro da hu ta no th ur hr bg lt la mi ml cy sk te fa lv bn sr az sl kn et mk "
    "br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so af oc ka be tg sd gu "
    "am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su"
).split()

N_TEXT_TOKENS = 50257  # ids 0..50256, as in the GPT-2 based Whisper vocabulary
N_TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|> in 0.02 s steps
VOCAB_SIZE = 51865  # the size CTranslate2 requires to treat the model as multilingual


def _special_tokens() -> list[str]:
    """Special tokens from id 50257 up to <|notimestamps|>, in Whisper's order."""
    return [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *[f"<|{code}|>" for code in WHISPER_LANGUAGES],
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nocaptions|>",
        "<|notimestamps|>",
    ]


def build_whisper_tokenizer():
    """A byte-level BPE ``tokenizers.Tokenizer`` with Whisper's id layout.

    Text ids 0..255 are the 256 byte-level symbols (so any text, Korean
    included, can be encoded); the rest of the 50,257 text ids are filler
    words ("Ġw300" decodes to " w300") so that whatever a random model emits
    decodes to space-separated words that faster-whisper can time.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # Sorted so the byte symbols get the same ids on every build.
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    next_id = len(vocab)
    while next_id < N_TEXT_TOKENS - 1:
        vocab[f"\u0120w{next_id}"] = next_id  # \u0120 "Ġ" is the byte-level space
        next_id += 1
    # CTranslate2 (4.8) decides "multilingual" by whether the vocabulary holds
    # an empty-string token (``vocabulary.to_id("") != unk_id``), which real
    # multilingual Whisper vocabularies do; without it language="ko" would be
    # replaced by English. It takes the last text id.
    vocab[""] = next_id

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = _special_tokens()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in specials])
    # Timestamp tokens are not part of tokenizer.json in faster-whisper's own
    # models either: it computes them from <|notimestamps|> + 1.
    assert tokenizer.token_to_id("<|endoftext|>") == N_TEXT_TOKENS
    assert tokenizer.token_to_id("<|notimestamps|>") == N_TEXT_TOKENS + len(specials) - 1
    assert tokenizer.get_vocab_size() + N_TIMESTAMPS == VOCAB_SIZE
    return tokenizer


def build_tiny_whisper_ct2(out_dir: str | Path, *, quantization: str = "int8") -> Path:
    """Build a tiny random multilingual Whisper model as a CTranslate2 directory.

    Steps: transformers ``WhisperConfig`` with tiny dimensions ->
    ``WhisperForConditionalGeneration(config).save_pretrained`` with a locally
    built tokenizer and a generation config -> ``ctranslate2.converters.
    TransformersConverter`` -> ``tokenizer.json`` and ``preprocessor_config.json``
    copied beside ``model.bin``, as in faster-whisper's published models.

    Returns:
        ``out_dir``, holding model.bin, config.json, vocabulary.json,
        tokenizer.json and preprocessor_config.json.
    """
    import ctranslate2
    import torch
    from transformers import (
        GenerationConfig,
        PreTrainedTokenizerFast,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    out_dir = Path(out_dir)
    eot = N_TEXT_TOKENS
    sot = eot + 1
    lang_to_id = {f"<|{code}|>": sot + 1 + i for i, code in enumerate(WHISPER_LANGUAGES)}
    translate = sot + 1 + len(WHISPER_LANGUAGES)
    transcribe = translate + 1
    no_timestamps = translate + 5
    assert no_timestamps == 50363

    config = WhisperConfig(
        vocab_size=VOCAB_SIZE,
        num_mel_bins=80,
        d_model=64,
        encoder_layers=1,
        encoder_attention_heads=2,
        decoder_layers=1,
        decoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        # 1500 encoder positions = 30 s of 10 ms frames after the stride-2 conv:
        # faster-whisper always pads its input to 30 s windows.
        max_source_positions=1500,
        max_target_positions=448,
        decoder_start_token_id=sot,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        begin_suppress_tokens=[220, eot],
        suppress_tokens=[],
    )
    # The same random weights on every build, without touching the global
    # RNG state other tests may rely on.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = WhisperForConditionalGeneration(config).eval()

    tokenizer = build_whisper_tokenizer()
    with tempfile.TemporaryDirectory(prefix="tiny-whisper-hf-") as tmp:
        hf_dir = Path(tmp)
        model.generation_config = GenerationConfig(
            decoder_start_token_id=sot,
            eos_token_id=eot,
            pad_token_id=eot,
            bos_token_id=eot,
            max_length=448,
            suppress_tokens=[],
            begin_suppress_tokens=[220, eot],
            # The ctranslate2 Whisper loader reads these three: language ids
            # (for language detection), and the cross-attention heads used to
            # time words (the tiny model has one decoder layer of two heads).
            lang_to_id=lang_to_id,
            alignment_heads=[[0, 0], [0, 1]],
            no_timestamps_token_id=no_timestamps,
            task_to_id={"translate": translate, "transcribe": transcribe},
            is_multilingual=True,
        )
        model.save_pretrained(hf_dir)
        PreTrainedTokenizerFast(
            tokenizer_object=tokenizer,
            bos_token="<|endoftext|>",
            eos_token="<|endoftext|>",
            unk_token="<|endoftext|>",
            pad_token="<|endoftext|>",
        ).save_pretrained(hf_dir)
        WhisperFeatureExtractor(feature_size=80).save_pretrained(hf_dir)

        converter = ctranslate2.converters.TransformersConverter(
            str(hf_dir), copy_files=["tokenizer.json", "preprocessor_config.json"]
        )
        converter.convert(str(out_dir), quantization=quantization, force=True)

    vocabulary = json.loads((out_dir / "vocabulary.json").read_text(encoding="utf-8"))
    if len(vocabulary) != VOCAB_SIZE:
        raise RuntimeError(
            f"converted vocabulary has {len(vocabulary)} entries, expected {VOCAB_SIZE}"
        )
    return out_dir


def copy_model_dir(src: Path, dst: Path, *, without: tuple[str, ...] = ()) -> Path:
    """Copy a model directory, leaving out the named files (to test missing files)."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name not in without and item.is_file():
            shutil.copy2(item, dst / item.name)
    return dst
