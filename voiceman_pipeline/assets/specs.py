"""Asset keys and specs of the per-recording chain (one partition per recording)."""

from dagster import AssetKey, AssetSpec

from voiceman_pipeline.partitions import audio_files

GROUP = "voice_analysis"

AUDIO = AssetSpec(
    "audio",
    group_name=GROUP,
    partitions_def=audio_files,
    description="Intake: the recording decoded once to 16 kHz mono, with its SHA-256 "
    "(the chain-of-custody anchor), codec, sample rate, channels and duration.",
    kinds={"python", "audio"},
)
TRANSCRIPT = AssetSpec(
    "transcript",
    deps=[AUDIO],
    group_name=GROUP,
    partitions_def=audio_files,
    description="Speech to text: text, segments and words with start/end times and confidence.",
    kinds={"python"},
)
FORENSIC = AssetSpec(
    "forensic",
    deps=[AUDIO, TRANSCRIPT],
    group_name=GROUP,
    partitions_def=audio_files,
    description="Acoustic stress features and text risk indicators, combined into a "
    "0-100 risk score; every score keeps the evidence that produced it.",
    kinds={"python"},
)
EMOTION = AssetSpec(
    "emotion",
    deps=[AUDIO, TRANSCRIPT],
    group_name=GROUP,
    partitions_def=audio_files,
    description="Speech emotion per segment, or 'unavailable' plus acoustic arousal "
    "descriptors when no emotion model is configured.",
    kinds={"python", "pytorch"},
)
REPORT = AssetSpec(
    "report",
    deps=[AUDIO, TRANSCRIPT, FORENSIC, EMOTION],
    group_name=GROUP,
    partitions_def=audio_files,
    description="One recording's joined results (JSON) and a plot of energy, pitch, "
    "words and risk evidence over time (PNG).",
    kinds={"python"},
)

STAGE_KEYS: list[AssetKey] = [s.key for s in (AUDIO, TRANSCRIPT, FORENSIC, EMOTION, REPORT)]
