"""Text risk: pattern files, char-span <-> word mapping, evidence, scores, levels,
low-confidence flagging; and analyze_forensic end to end."""

from __future__ import annotations

import json
import math
import re
from importlib import resources

import numpy as np
import pytest

from voiceman_pipeline.engines.forensic import ParselmouthAnalyzer, analyze_forensic
from voiceman_pipeline.engines.forensic.text_risk import (
    CATEGORIES,
    CATEGORY_WEIGHTS,
    PatternSetError,
    analyze_text,
    category_score,
    describe_risk,
    load_builtin_pattern_set,
    load_builtin_pattern_sets,
    load_pattern_set_file,
    risk_level,
    shown_score,
    strongest_category,
    word_char_spans,
)
from voiceman_pipeline.errors import ChainOfCustodyError, PermanentError
from voiceman_pipeline.results import (
    DecodedAudio,
    EngineInfo,
    ForensicResult,
    Segment,
    Transcript,
    Word,
    dumps,
    from_dict,
)

SHA = "ab" * 32


def make_transcript(
    tokens: list[str],
    *,
    language: str = "en",
    confidence: float | None = 0.9,
    word_confidence: float | None = 0.9,
    step: float = 0.4,
) -> Transcript:
    """Pocketsphinx-style: text is the words joined by single spaces; word i
    spans [i * step, i * step + 0.3]."""
    words = [Word(t, round(i * step, 3), round(i * step + 0.3, 3), word_confidence) for i, t in enumerate(tokens)]
    text = " ".join(tokens)
    end = words[-1].end if words else 0.0
    return Transcript(
        source_sha256=SHA,
        engine=EngineInfo("test", "none"),
        language=language,
        duration_s=end,
        text=text,
        segments=[Segment(text, 0.0, end, words, confidence)],
        words=words,
        confidence=confidence,
    )


def covering_times(tr: Transcript, start: int, end: int) -> tuple[float, float]:
    """Independent reference: word spans rebuilt from the single-space join."""
    pos, hits = 0, []
    for w in tr.words:
        s, e = pos, pos + len(w.text)
        if s < end and e > start:
            hits.append(w)
        pos = e + 1
    return min(w.start for w in hits), max(w.end for w in hits)


@pytest.fixture(scope="module")
def sets():
    return load_builtin_pattern_sets()


# --- pattern files ----------------------------------------------------------


@pytest.mark.parametrize("language", ["en", "ko"])
def test_pattern_files_load_and_are_well_formed(language):
    pset = load_builtin_pattern_set(language)
    assert pset.language == language
    assert re.fullmatch(rf"{language}-\d+\.\d+\.\d+", pset.version)
    ids = [p.id for p in pset.patterns]
    assert len(ids) == len(set(ids))
    for category in CATEGORIES:
        n = sum(p.category == category for p in pset.patterns)
        assert 10 <= n <= 20, (category, n)
    for p in pset.patterns:
        assert 0 < p.weight <= 1
        assert p.description
        assert p.id.startswith(f"{language}.{p.category}.")


@pytest.mark.parametrize("language", ["en", "ko"])
def test_every_regex_compiles_and_matches_its_example(language):
    ref = resources.files("voiceman_pipeline.engines.forensic") / "patterns" / f"{language}.json"
    raw = json.loads(ref.read_text(encoding="utf-8"))
    for entries in raw["categories"].values():
        for entry in entries:
            re.compile(entry["regex"])  # raises if it does not compile
    pset = load_builtin_pattern_set(language)
    for p in pset.patterns:
        assert p.example, p.id
        assert p.regex.search(p.example), f"{p.id} does not match its example {p.example!r}"


@pytest.mark.parametrize("language", ["en", "ko"])
def test_each_example_is_detected_in_its_category(sets, language):
    for p in sets[language].patterns:
        tr = make_transcript(p.example.split(), language=language)
        found = {ev.category for ev in analyze_text(tr, sets).evidence}
        assert p.category in found, (p.id, p.example)


def test_korean_patterns_ignore_english_and_vice_versa(sets):
    en_text = "after all i've done for you you're crazy and i'll kill you"
    ko_text = "너 죽여버릴 거야 그런 적 없어"
    assert not any(p.regex.search(en_text) for p in sets["ko"].patterns)
    assert not any(p.regex.search(ko_text) for p in sets["en"].patterns)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"id": "x", "regex": "(unclosed", "weight": 0.5}, "does not compile"),
        ({"id": "x", "regex": "a", "weight": 1.5}, "weight"),
        ({"id": "x", "regex": "a", "weight": 0}, "weight"),
        ({"id": "x", "regex": "a?", "weight": 0.5}, "empty string"),
        ({"regex": "a", "weight": 0.5}, "bad pattern entry"),
    ],
)
def test_bad_pattern_files_raise(tmp_path, entry, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"language": "en", "version": "t", "categories": {"threat": [entry]}}))
    with pytest.raises(PatternSetError, match=message):
        load_pattern_set_file(path)


def test_unknown_category_and_duplicate_ids_raise(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"language": "en", "version": "t", "categories": {"insult": []}}))
    with pytest.raises(PatternSetError, match="unknown category"):
        load_pattern_set_file(path)
    entry = {"id": "dup", "regex": "a", "weight": 0.5}
    path.write_text(json.dumps({"language": "en", "version": "t", "categories": {"threat": [entry, entry]}}))
    with pytest.raises(PatternSetError, match="duplicate"):
        load_pattern_set_file(path)
    assert issubclass(PatternSetError, PermanentError)


# --- char offsets <-> words -------------------------------------------------


def test_word_spans_pocketsphinx_style():
    tr = make_transcript(["you", "you", "said", "you"])
    spans = word_char_spans(tr.text, tr.words)
    assert spans == [(0, 3), (4, 7), (8, 12), (13, 16)]
    for w, (s, e) in zip(tr.words, spans):
        assert tr.text[s:e] == w.text


def test_word_spans_whisper_style_with_punctuation_and_case():
    # faster-whisper words carry their leading space and punctuation; the
    # transcript text is the segment texts joined.
    words = [Word(" Hello,", 0.0, 0.4), Word(" I'll", 0.5, 0.7), Word(" KILL", 0.7, 0.9), Word(" you.", 0.9, 1.2)]
    text = "Hello, I'll kill you."
    spans = word_char_spans(text, words)
    assert [text[s:e] for s, e in spans] == ["Hello,", "I'll", "kill", "you."]


def test_word_missing_from_text_is_unmapped_without_shifting_the_rest():
    words = [Word("hello", 0, 1), Word("<sil>", 1, 2), Word("a", 2, 3), Word("world", 3, 4)]
    text = "hello a world"
    assert word_char_spans(text, words) == [(0, 5), None, (6, 7), (8, 13)]


def test_word_far_ahead_is_not_matched():
    # "a" does not appear near the cursor; its only occurrence is far ahead, so
    # taking it would mis-time everything in between.
    words = [Word("xyz", 0, 1), Word("a", 1, 2), Word("b", 2, 3)]
    text = "xyz b " + "q" * 60 + " a"
    spans = word_char_spans(text, words)
    assert spans == [(0, 3), None, (4, 5)]


# --- English ----------------------------------------------------------------


@pytest.mark.parametrize(
    "sentence, category, pattern_id",
    [
        ("listen to me i'll kill you if you call them", "threat", "en.threat.kill_you"),
        ("you will regret this watch your back", "threat", "en.threat.youll_regret"),
        ("you have no choice in this", "coercion", "en.coercion.no_choice"),
        ("if you don't send it tonight i will tell everyone", "coercion", "en.coercion.if_you_dont_i_will"),
        ("that never happened you're imagining things", "gaslighting", "en.gaslighting.never_happened"),
        ("you are too sensitive", "gaslighting", "en.gaslighting.too_sensitive"),
        ("trust me i would never do that", "deception", "en.deception.trust_me"),
        ("after all i've done for you", "emotional_manipulation", "en.emotional_manipulation.after_all_ive_done"),
        ("if you loved me you would stay", "emotional_manipulation", "en.emotional_manipulation.if_you_loved_me"),
    ],
)
def test_english_detection_spans_and_times(sets, sentence, category, pattern_id):
    tr = make_transcript(sentence.split())
    risk = analyze_text(tr, sets)
    hits = [ev for ev in risk.evidence if ev.pattern_id == pattern_id]
    assert len(hits) == 1
    ev = hits[0]
    assert ev.category == category and ev.language == "en"
    assert tr.text[ev.char_start : ev.char_end] == ev.matched_text
    assert (ev.time_start, ev.time_end) == covering_times(tr, ev.char_start, ev.char_end)
    assert ev.low_confidence is False
    cat = next(c for c in risk.categories if c.category == category)
    assert cat.score > 0 and ev in cat.evidence


def test_evidence_times_are_exactly_the_words_times(sets):
    tr = make_transcript("ok so i'll kill you tomorrow".split())
    (ev,) = [e for e in analyze_text(tr, sets).evidence if e.category == "threat"]
    assert ev.matched_text == "i'll kill you"
    assert ev.time_start == tr.words[2].start  # "i'll"
    assert ev.time_end == tr.words[4].end  # "you"


@pytest.mark.parametrize(
    "sentence",
    [
        "the weather is nice today, let's get lunch",
        "it won't kill you to try the soup",  # no "I will" before "kill you"
        "i'm dead tired so let's go elsewhere",  # "or else" needs word boundaries
        "we went to the orchard or elsewhere",
    ],
)
def test_neutral_sentences_score_minimal_with_no_evidence(sets, sentence):
    tr = make_transcript(sentence.split())
    risk = analyze_text(tr, sets)
    assert risk.evidence == []
    assert risk.risk_score == 0.0
    assert risk.risk_level == "minimal"
    assert all(c.score == 0.0 for c in risk.categories)


def test_whisper_style_text_with_capitals_and_curly_apostrophe(sets):
    words = [Word(" I\u2019ll", 0.0, 0.3), Word(" kill", 0.3, 0.6), Word(" you.", 0.6, 0.9), Word(" Trust", 1.5, 1.8), Word(" me!", 1.8, 2.0)]
    text = "I\u2019ll kill you. Trust me!"
    tr = Transcript(SHA, EngineInfo("faster-whisper", "x"), "en", 2.0, text, [], words, 0.9)
    risk = analyze_text(tr, sets)
    by_id = {ev.pattern_id: ev for ev in risk.evidence}
    assert by_id["en.threat.kill_you"].matched_text == "I\u2019ll kill you"  # original text kept
    assert (by_id["en.threat.kill_you"].time_start, by_id["en.threat.kill_you"].time_end) == (0.0, 0.9)
    assert by_id["en.deception.trust_me"].matched_text == "Trust me"
    assert (by_id["en.deception.trust_me"].time_start, by_id["en.deception.trust_me"].time_end) == (1.5, 2.0)


def test_overlapping_patterns_in_one_category_count_once(sets):
    tr = make_transcript("look what you made me do".split())
    cat = next(c for c in analyze_text(tr, sets).categories if c.category == "emotional_manipulation")
    assert [ev.pattern_id for ev in cat.evidence] == ["en.emotional_manipulation.look_what_you_made_me_do"]
    assert cat.score == pytest.approx(80.0)


def test_category_score_formula_and_overall_risk(sets):
    # threat: kill_you 0.9 + youll_regret 0.6 -> 100 * (1 - 0.1 * 0.4) = 96
    # deception: trust_me 0.3 -> 30
    tr = make_transcript("i'll kill you you'll regret it trust me".split())
    risk = analyze_text(tr, sets)
    scores = {c.category: c.score for c in risk.categories}
    assert scores["threat"] == pytest.approx(96.0)
    assert scores["deception"] == pytest.approx(30.0)
    assert risk.risk_score == pytest.approx(0.25 * 96 + 0.20 * 30)  # 30.0
    assert risk.risk_level == "low"
    assert {c.category: c.weight for c in risk.categories} == CATEGORY_WEIGHTS


def test_repeated_matches_saturate():
    assert category_score([]) == 0.0
    assert category_score([0.5]) == pytest.approx(50.0)
    assert category_score([0.5, 0.5]) == pytest.approx(75.0)
    assert category_score([0.5] * 20) < 100.0
    assert category_score([0.2]) == 20.0  # exact: no float drift across a boundary


def test_every_category_at_full_strength_is_critical(sets):
    tr = make_transcript(
        (
            "i'll kill you nobody will find your body that never happened you're crazy "
            "no one will believe you you have no choice do what i say you're not leaving "
            "i swear trust me i'm not lying why would i lie believe me "
            "look what you made me do after all i've done for you"
        ).split()
    )
    risk = analyze_text(tr, sets)
    assert all(c.score > 60 for c in risk.categories)
    assert risk.risk_score > 80
    assert risk.risk_level == "critical"


@pytest.mark.parametrize(
    "score, level",
    [
        (0.0, "minimal"),
        (20.0, "minimal"),
        (20.000001, "low"),
        (40.0, "low"),
        (40.5, "moderate"),
        (60.0, "moderate"),
        (60.01, "high"),
        (80.0, "high"),
        (80.01, "critical"),
        (100.0, "critical"),
    ],
)
def test_risk_level_boundaries(score, level):
    assert risk_level(score) == level


# --- Korean -----------------------------------------------------------------


@pytest.mark.parametrize(
    "tokens, category, pattern_id, matched",
    [
        (["너", "죽여버릴", "거야"], "threat", "ko.threat.kill_you", "죽여버릴"),
        (["가만", "안", "둬"], "threat", "ko.threat.wont_leave_alone", "가만 안 둬"),
        (["그런", "적", "없어"], "gaslighting", "ko.gaslighting.never_happened", "그런 적 없"),
        (["네가", "예민한", "거야"], "gaslighting", "ko.gaslighting.too_sensitive", "네가 예민"),
        (["선택의", "여지가", "없어"], "coercion", "ko.coercion.no_choice", "선택의 여지가 없"),
        (["솔직히", "말해서", "난", "몰라"], "deception", "ko.deception.frankly_speaking", "솔직히 말해서"),
        (["내가", "너한테", "어떻게", "했는데"], "emotional_manipulation", "ko.emotional_manipulation.what_i_did_for_you", "내가 너한테 어떻게 했는데"),
    ],
)
def test_korean_detection_spans_and_times(sets, tokens, category, pattern_id, matched):
    tr = make_transcript(tokens, language="ko")
    risk = analyze_text(tr, sets)
    hits = [ev for ev in risk.evidence if ev.pattern_id == pattern_id]
    assert len(hits) == 1, [e.pattern_id for e in risk.evidence]
    ev = hits[0]
    assert ev.category == category and ev.language == "ko"
    assert ev.matched_text == matched
    assert tr.text[ev.char_start : ev.char_end] == matched
    assert (ev.time_start, ev.time_end) == covering_times(tr, ev.char_start, ev.char_end)


def test_korean_spacing_variants_match(sets):
    for text in ("죽여버릴거야", "죽여 버릴 거야"):
        tr = make_transcript(text.split(), language="ko")
        assert any(ev.pattern_id == "ko.threat.kill_you" for ev in analyze_text(tr, sets).evidence), text


def test_korean_subword_tokens_map_to_times(sets):
    # Whisper splits Korean into pieces that concatenate into the segment text.
    words = [Word(" 너", 0.0, 0.2), Word(" 죽", 0.3, 0.4), Word("여", 0.4, 0.5), Word("버릴", 0.5, 0.8), Word(" 거야", 0.8, 1.0)]
    text = "너 죽여버릴 거야"
    tr = Transcript(SHA, EngineInfo("faster-whisper", "x"), "ko", 1.0, text, [], words, 0.9)
    (ev,) = [e for e in analyze_text(tr, sets).evidence if e.pattern_id == "ko.threat.kill_you"]
    assert (ev.time_start, ev.time_end) == (0.3, 0.8)


# --- language selection -----------------------------------------------------


@pytest.mark.parametrize("language", ["", "unknown", "fr"])
def test_unknown_language_runs_every_set(sets, language):
    tr = make_transcript("i'll kill you 죽여버릴 거야".split(), language=language)
    risk = analyze_text(tr, sets)
    assert {ev.language for ev in risk.evidence} == {"en", "ko"}
    assert set(risk.options["pattern_sets"]) == {"en", "ko"}


def test_known_language_runs_its_set_only(sets):
    tr = make_transcript("i'll kill you 죽여버릴 거야".split(), language="en-US")
    risk = analyze_text(tr, sets)
    assert {ev.language for ev in risk.evidence} == {"en"}
    assert risk.options["pattern_sets"]["en"]["version"] == sets["en"].version


# --- low confidence ---------------------------------------------------------


def test_low_confidence_transcript_flags_every_evidence(sets):
    tr = make_transcript("i'll kill you trust me".split(), confidence=0.3)
    risk = analyze_text(tr, sets)
    assert risk.low_confidence_transcript is True
    assert risk.evidence and all(ev.low_confidence for ev in risk.evidence)


def test_threshold_is_configurable(sets):
    tr = make_transcript("i'll kill you".split(), confidence=0.6)
    assert analyze_text(tr, sets).low_confidence_transcript is False
    assert analyze_text(tr, sets, low_confidence_threshold=0.7).low_confidence_transcript is True


def test_unknown_confidence_is_low_by_default_and_configurable(sets):
    tr = make_transcript("i'll kill you".split(), confidence=None, word_confidence=None)
    assert analyze_text(tr, sets).low_confidence_transcript is True
    risk = analyze_text(tr, sets, unknown_confidence_is_low=False)
    assert risk.low_confidence_transcript is False
    assert not any(ev.low_confidence for ev in risk.evidence)


def test_low_confidence_words_flag_only_their_evidence(sets):
    tr = make_transcript("i'll kill you trust me".split(), confidence=0.8)
    for w in tr.words[:3]:  # "i'll kill you" barely heard
        w.confidence = 0.2
    by_id = {ev.pattern_id: ev for ev in analyze_text(tr, sets).evidence}
    assert by_id["en.threat.kill_you"].low_confidence is True
    assert by_id["en.deception.trust_me"].low_confidence is False


# --- analyze_forensic end to end --------------------------------------------


def test_analyze_forensic_combines_and_records_parameters(sets):
    t = np.arange(32_000) / 16_000
    phase = 2 * np.pi * 120 * t
    x = sum(np.sin(k * phase) / k**1.5 for k in range(1, 50))
    audio = DecodedAudio((0.3 * x / np.abs(x).max()).astype(np.float32))
    tr = make_transcript("i'll kill you you're crazy".split())
    result = analyze_forensic(audio, tr, ParselmouthAnalyzer(), source_sha256=SHA, pattern_sets=sets)

    assert result.source_sha256 == SHA
    assert result.acoustic.f0_mean_hz == pytest.approx(120, rel=0.02)
    assert result.stress.components  # measured
    assert {c.category for c in result.categories} == set(CATEGORIES)
    assert result.risk_score == pytest.approx(0.25 * 90 + 0.25 * 60)
    assert result.risk_level == "low"
    assert result.transcript_confidence == 0.9 and result.low_confidence_transcript is False
    opts = result.engine.options
    assert opts["acoustic"]["engine"] == "parselmouth"
    assert opts["acoustic"]["this_file"]["pitch_range_adapted"] is True
    assert opts["text_risk"]["pattern_sets"]["en"]["version"] == sets["en"].version
    assert opts["text_risk"]["category_weights"] == CATEGORY_WEIGHTS
    assert opts["stress"]["weights"]["jitter"] == 0.25
    assert sets["en"].version in result.engine.model
    assert result.timings.audio_s == pytest.approx(2.0)
    assert result.timings.process_s > 0

    # survives the JSON round trip every stage uses
    again = from_dict(ForensicResult, json.loads(dumps(result)))
    assert again.evidence == result.evidence
    assert again.stress == result.stress
    assert math.isclose(again.risk_score, result.risk_score)


def test_analyze_forensic_refuses_a_transcript_of_another_recording(sets):
    audio = DecodedAudio(np.zeros(16_000, dtype=np.float32))
    tr = make_transcript(["hello"])
    with pytest.raises(ChainOfCustodyError):
        analyze_forensic(audio, tr, ParselmouthAnalyzer(), source_sha256="cd" * 32, pattern_sets=sets)


def _with_pause(before: str, after: str, pause_s: float) -> Transcript:
    """Two stretches of speech, pocketsphinx-style (one space between them in the
    text), the second starting ``pause_s`` after the first one's last word."""
    first = make_transcript(before.split())
    second = make_transcript(after.split())
    shift = first.words[-1].end + pause_s
    words = first.words + [Word(w.text, w.start + shift, w.end + shift, w.confidence) for w in second.words]
    return Transcript(SHA, EngineInfo("test", "none"), "en", words[-1].end, f"{first.text} {second.text}",
                      [], words, 0.9)


@pytest.mark.parametrize(
    "before, after, pattern_id",
    [
        ("would you like tea or", "else we could have coffee", "en.threat.or_else"),
        ("if you don't mind", "i will call you tomorrow", "en.coercion.if_you_dont_i_will"),
        ("i know you can trust", "me to bring the cake", "en.deception.trust_me"),
    ],
)
def test_no_phrase_is_matched_across_a_long_pause(sets, before, after, pattern_id):
    # The investigator's case: words 30 s apart are not one phrase, although
    # pocketsphinx's text joins them with a space.
    apart = analyze_text(_with_pause(before, after, 30.0), sets)
    assert pattern_id not in {ev.pattern_id for ev in apart.evidence}
    # A pause of a second inside a phrase ("or ... else") still reads as one phrase.
    close = analyze_text(_with_pause(before, after, 1.0), sets)
    (ev,) = [ev for ev in close.evidence if ev.pattern_id == pattern_id]
    assert ev.time_end - ev.time_start > 1.0
    assert apart.options["max_pause_in_phrase_s"] == 2.0


def test_a_transcript_with_no_text_has_no_score_and_says_so(sets):
    risk = analyze_text(make_transcript([]), sets)
    assert risk.risk_score is None and risk.risk_level == "no words"
    assert risk.evidence == [] and all(c.score == 0.0 for c in risk.categories)
    assert describe_risk(risk.risk_score, risk.risk_level, risk.categories) == "none (no words)"


def test_the_strongest_category_is_shown_with_its_own_level(sets):
    # Threats alone score 25 at most overall ("low"): the line readers see also
    # names the category and its level.
    risk = analyze_text(make_transcript("listen i know where you live".split()), sets)
    threat = next(c for c in risk.categories if c.category == "threat")
    assert threat.score == 80.0 and risk.risk_score == 20.0 and risk.risk_level == "minimal"
    assert strongest_category(risk.categories) == ("threat", threat.score)
    line = describe_risk(risk.risk_score, risk.risk_level, risk.categories)
    assert line == "20 (minimal), threat 80 (high)"
    # As forensic.json holds them (dicts), the same line.
    as_dicts = [{"category": c.category, "score": c.score} for c in risk.categories]
    assert describe_risk(risk.risk_score, risk.risk_level, as_dicts) == line
    assert describe_risk(risk.risk_score, risk.risk_level, risk.categories, low_confidence=True) == \
        f"{line}, low-confidence transcript"
    neutral = analyze_text(make_transcript("see you at lunch".split()), sets)
    assert strongest_category(neutral.categories) is None
    assert describe_risk(neutral.risk_score, neutral.risk_level, neutral.categories) == "0 (minimal)"


@pytest.mark.parametrize("score, shown", [
    (20.0, "20"), (20.5, "20.5"), (20.04, "20.1"), (19.96, "20"), (12.5, "12.5"), (17.5, "17.5"),
    (22.3, "22.3"), (80.04, "80.1"), (0.0, "0"), (99.999999, "100"),
])
def test_a_score_is_shown_without_crossing_its_levels_bound(score, shown):
    # A tester saw 20.5 shown as "20 (low)" and 80.4 as "80 (critical)": the
    # level read against the number shown contradicted the README's bands.
    assert shown_score(score) == shown
    assert risk_level(float(shown)) == risk_level(score)
