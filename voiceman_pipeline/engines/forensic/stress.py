"""Voice stress index 0-100 from four acoustic measures (the original Voice.Man formula).

Each component is mapped linearly to 0-100 stress and clipped:

- ``shimmer``: local shimmer 0 % -> 0, 15 % or more -> 100
- ``hnr``: harmonics-to-noise ratio, inverted: 40 dB or more -> 0, 0 dB or less -> 100
- ``formant_stability``: inverted: 1 -> 0, 0 -> 100
- ``jitter``: local jitter 0 % -> 0, 10 % or more -> 100

The index is the weighted sum, nominal weights 0.25 each. It is a screening
figure over the whole recording, not a lie or emotion detector.
"""

from __future__ import annotations

from typing import Literal

from voiceman_pipeline.results import AcousticFeatures, StressIndex

WEIGHTS: dict[str, float] = {
    "shimmer": 0.25,
    "hnr": 0.25,
    "formant_stability": 0.25,
    "jitter": 0.25,
}
SHIMMER_MAX_PCT = 15.0
HNR_MAX_DB = 40.0
JITTER_MAX_PCT = 10.0
LOW_BELOW = 33.0  # value < 33 -> low
HIGH_ABOVE = 66.0  # value > 66 -> high; 33 <= value <= 66 -> medium
NOT_MEASURABLE = "not measurable"  # the level when no component was measured

FORMULA = {
    "weights": WEIGHTS,
    "shimmer": f"clip(shimmer_pct / {SHIMMER_MAX_PCT}, 0, 1) * 100",
    "hnr": f"clip(1 - hnr_db / {HNR_MAX_DB}, 0, 1) * 100",
    "formant_stability": "clip(1 - formant_stability, 0, 1) * 100",
    "jitter": f"clip(jitter_pct / {JITTER_MAX_PCT}, 0, 1) * 100",
    "missing": "weights renormalised over the measured components; "
    "a missing component has weight 0 and no entry in components",
    "levels": f"low < {LOW_BELOW} <= medium <= {HIGH_ABOVE} < high; "
    f"'{NOT_MEASURABLE}' (value null) when no component was measured",
}


def _clip100(x: float) -> float:
    return min(max(x, 0.0), 1.0) * 100.0


def stress_components(features: AcousticFeatures) -> dict[str, float]:
    """Each measured component as 0-100 stress; unmeasured ones are absent."""
    out: dict[str, float] = {}
    if features.shimmer_local_pct is not None:
        out["shimmer"] = _clip100(features.shimmer_local_pct / SHIMMER_MAX_PCT)
    if features.hnr_db is not None:
        out["hnr"] = _clip100(1.0 - features.hnr_db / HNR_MAX_DB)
    if features.formant_stability is not None:
        out["formant_stability"] = _clip100(1.0 - features.formant_stability)
    if features.jitter_local_pct is not None:
        out["jitter"] = _clip100(features.jitter_local_pct / JITTER_MAX_PCT)
    return out


def stress_level(value: float) -> Literal["low", "medium", "high"]:
    """low: value < 33; medium: 33 <= value <= 66; high: value > 66."""
    if value < LOW_BELOW:
        return "low"
    if value > HIGH_ABOVE:
        return "high"
    return "medium"


def stress_index(features: AcousticFeatures) -> StressIndex:
    """Weighted stress index with the weights actually used.

    Missing measures (None, e.g. too little voiced speech) are not guessed:
    the nominal weights of the measured components are renormalised to sum to
    1, and ``weights`` records every component with the weight it actually got
    (0 for a missing one, which also has no entry in ``components``), so a
    reader sees on how much the figure rests. With nothing measured there is
    no figure: value None, level "not measurable", every weight 0.
    """
    components = stress_components(features)
    if not components:
        return StressIndex(
            value=None, level=NOT_MEASURABLE, components={}, weights={k: 0.0 for k in WEIGHTS}
        )
    available = sum(WEIGHTS[k] for k in components)
    weights = {k: (WEIGHTS[k] / available if k in components else 0.0) for k in WEIGHTS}
    value = sum(weights[k] * v for k, v in components.items())
    # Round to 1e-6 so binary float error cannot move a value across a level
    # boundary (3.3 % jitter -> 32.99999999999999 instead of 33), and clip so
    # 100.00000000000001 stays in 0-100.
    value = min(max(round(value, 6), 0.0), 100.0)
    return StressIndex(
        value=value, level=stress_level(value), components=components, weights=weights
    )
