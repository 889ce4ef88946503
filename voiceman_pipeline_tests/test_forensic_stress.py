"""Stress index: component mappings, weighting, level boundaries, missing components."""

from __future__ import annotations

import pytest

from voiceman_pipeline.engines.forensic.stress import stress_index, stress_level
from voiceman_pipeline.results import AcousticFeatures


def features(
    shimmer: float | None = None,
    hnr: float | None = None,
    stability: float | None = None,
    jitter: float | None = None,
) -> AcousticFeatures:
    return AcousticFeatures(
        f0_mean_hz=None, f0_std_hz=None, f0_min_hz=None, f0_max_hz=None, f0_range_hz=None,
        jitter_local_pct=jitter, shimmer_local_pct=shimmer, hnr_db=hnr,
        f1_mean_hz=None, f2_mean_hz=None, formant_stability=stability,
        voiced_fraction=0.5, speech_rate_wps=None, pause_count=0, pause_total_s=0.0,
        mean_pause_s=None,
    )  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, component, expected",
    [
        ({"shimmer": 0.0}, "shimmer", 0.0),
        ({"shimmer": 7.5}, "shimmer", 50.0),
        ({"shimmer": 15.0}, "shimmer", 100.0),
        ({"shimmer": 30.0}, "shimmer", 100.0),  # clipped
        ({"hnr": 40.0}, "hnr", 0.0),
        ({"hnr": 50.0}, "hnr", 0.0),  # clipped
        ({"hnr": 10.0}, "hnr", 75.0),
        ({"hnr": 0.0}, "hnr", 100.0),
        ({"hnr": -5.0}, "hnr", 100.0),  # clipped
        ({"stability": 1.0}, "formant_stability", 0.0),
        ({"stability": 0.6}, "formant_stability", 40.0),
        ({"stability": 0.0}, "formant_stability", 100.0),
        ({"jitter": 0.0}, "jitter", 0.0),
        ({"jitter": 2.5}, "jitter", 25.0),
        ({"jitter": 10.0}, "jitter", 100.0),
        ({"jitter": 12.0}, "jitter", 100.0),  # clipped
    ],
)
def test_component_mapping(kwargs, component, expected):
    s = stress_index(features(**kwargs))
    assert s.components == {component: pytest.approx(expected)}
    # a single measured component carries all the weight
    assert s.value == pytest.approx(expected)


def test_weighted_sum_of_all_four():
    # components: shimmer 40, hnr 75, formant 40, jitter 25 -> mean 45
    s = stress_index(features(shimmer=6.0, hnr=10.0, stability=0.6, jitter=2.5))
    assert s.components == pytest.approx(
        {"shimmer": 40.0, "hnr": 75.0, "formant_stability": 40.0, "jitter": 25.0}
    )
    assert s.weights == {"shimmer": 0.25, "hnr": 0.25, "formant_stability": 0.25, "jitter": 0.25}
    assert s.value == pytest.approx(45.0)
    assert s.level == "medium"


@pytest.mark.parametrize(
    "value, level",
    [
        (0.0, "low"),
        (32.999, "low"),
        (33.0, "medium"),
        (50.0, "medium"),
        (66.0, "medium"),
        (66.001, "high"),
        (100.0, "high"),
    ],
)
def test_level_boundaries(value, level):
    assert stress_level(value) == level


@pytest.mark.parametrize(
    "jitter, level",
    [(3.2, "low"), (3.3, "medium"), (6.6, "medium"), (6.7, "high")],
)
def test_level_boundaries_through_the_index(jitter, level):
    # jitter alone: value = jitter% * 10
    assert stress_index(features(jitter=jitter)).level == level


def test_missing_components_renormalise_and_are_recorded():
    s = stress_index(features(shimmer=15.0, hnr=40.0))  # 100 and 0
    assert s.components == {"shimmer": 100.0, "hnr": 0.0}
    assert s.weights == {"shimmer": 0.5, "hnr": 0.5, "formant_stability": 0.0, "jitter": 0.0}
    assert s.value == pytest.approx(50.0)
    assert sum(s.weights.values()) == pytest.approx(1.0)


def test_nothing_measured_is_not_measurable_not_zero():
    s = stress_index(features())
    assert s.value is None
    assert s.level == "not measurable"
    assert s.components == {}
    assert all(w == 0.0 for w in s.weights.values())
    assert set(s.weights) == {"shimmer", "hnr", "formant_stability", "jitter"}


def test_maximal_stress_stays_within_100():
    s = stress_index(features(shimmer=99.0, hnr=-50.0, stability=0.0, jitter=99.0))
    assert s.value == pytest.approx(100.0)
    assert 0.0 <= s.value <= 100.0
    assert s.level == "high"
