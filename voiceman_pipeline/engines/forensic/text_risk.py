"""Verbal risk from the transcript: pattern matches -> evidence -> category and overall scores.

Pattern sets are data (``patterns/<language>.json``, package data). Each match
becomes an :class:`Evidence` with its character span in ``Transcript.text``
and the times of the words under it, so every score can be traced back to
what was said and when.

Scoring:

- Category score 0-100 = ``100 * (1 - prod(1 - weight_i))`` over the category's
  evidence: one match of weight 0.6 gives 60, two give 84; repeats raise the
  score but it saturates below 100 unless a weight is 1.
- Within a category, overlapping matches of different patterns (e.g. "you made
  me do" inside "look what you made me do") are one piece of evidence: the
  highest-weight match is kept, so one utterance is not counted twice.
  Across categories overlaps stay ("do it or else" is coercion and threat).
- Overall risk 0-100 = weighted sum of category scores with
  :data:`CATEGORY_WEIGHTS` (sum 1). Levels: see :func:`risk_level`. One
  category alone reaches at most its weight x 100 overall (a call of death
  threats only: 25, "low"), so every reader also shows the strongest
  category with its own level (:func:`strongest_category`).
- A transcript with no text has nothing to assess: no overall score, level
  :data:`NO_WORDS`, never "minimal".
- No phrase is matched across a pause longer than :data:`MAX_PAUSE_IN_PHRASE_S`
  between two words: pocketsphinx writes no punctuation, and its segments
  are joined with a space, so "... or" and, 30 s later, "else ..." would
  otherwise read as "or else".

Language: ``transcript.language``'s primary subtag ("en", "en-US" -> "en")
selects the pattern set of that language; for any language without a set
(including "" or "unknown") every set runs. That is safe because the Korean
patterns only match Hangul and the English ones need Latin words.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from voiceman_pipeline.errors import PermanentError
from voiceman_pipeline.results import CategoryScore, Evidence, Transcript, Word

CATEGORY_WEIGHTS: dict[str, float] = {
    "gaslighting": 0.25,
    "threat": 0.25,
    "coercion": 0.20,
    "deception": 0.20,
    "emotional_manipulation": 0.10,
}
CATEGORIES = tuple(CATEGORY_WEIGHTS)
BUILTIN_LANGUAGES = ("en", "ko")
DEFAULT_LOW_CONFIDENCE_THRESHOLD = 0.5

# A pause longer than this (seconds) between two words ends any phrase (see above).
MAX_PAUSE_IN_PHRASE_S = 2.0
NO_WORDS = "no words"  # the level of a transcript with no text: nothing to assess
RiskLevel = Literal["minimal", "low", "moderate", "high", "critical", "no words"]

# Upper bounds (inclusive) of each level; above 80 is critical.
RISK_LEVELS: tuple[tuple[float, str], ...] = (
    (20.0, "minimal"),
    (40.0, "low"),
    (60.0, "moderate"),
    (80.0, "high"),
)

# Curly apostrophes/quotes -> straight, one character for one, so patterns need
# one spelling and character offsets in the matched copy equal those in the
# original text.
_STRAIGHTEN = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})

# How far past the previous word's end a word's text may be found in
# Transcript.text (punctuation, a dropped token) before we call it unmapped
# instead of jumping ahead and mis-timing everything after it.
MAX_WORD_SKIP_CHARS = 40


class PatternSetError(PermanentError):
    """A pattern file is malformed: bad JSON, unknown category, bad regex or weight."""


@dataclass(frozen=True)
class Pattern:
    id: str
    category: str
    regex: re.Pattern[str]
    weight: float
    description: str
    example: str = ""  # a phrase the regex must match (checked by the tests)


@dataclass(frozen=True)
class PatternSet:
    language: str
    version: str
    source: str  # file it was read from, for the audit trail
    patterns: tuple[Pattern, ...]


def load_pattern_set_file(path: str | Path) -> PatternSet:
    """Read and validate one pattern file; every problem raises PatternSetError."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise PatternSetError(f"cannot read pattern file {path}: {exc}") from exc
    return _parse_pattern_set(data, str(path))


def load_builtin_pattern_set(language: str) -> PatternSet:
    """The pattern set shipped in the package for ``language`` ("en" or "ko")."""
    if language not in BUILTIN_LANGUAGES:
        raise PatternSetError(f"no built-in pattern set for language {language!r}")
    ref = resources.files("voiceman_pipeline.engines.forensic") / "patterns" / f"{language}.json"
    try:
        data = json.loads(ref.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise PatternSetError(f"cannot read built-in pattern set {language}: {exc}") from exc
    return _parse_pattern_set(data, f"voiceman_pipeline/engines/forensic/patterns/{language}.json")


def pattern_sets_digest() -> str:
    """SHA-256 over the shipped pattern files: an edited pattern changes it, and so
    the forensic stage's data version (its results show as out of date)."""
    import hashlib

    digest = hashlib.sha256()
    for language in sorted(BUILTIN_LANGUAGES):
        ref = resources.files("voiceman_pipeline.engines.forensic") / "patterns" / f"{language}.json"
        digest.update(ref.read_bytes())
    return digest.hexdigest()


def load_builtin_pattern_sets() -> dict[str, PatternSet]:
    return {lang: load_builtin_pattern_set(lang) for lang in BUILTIN_LANGUAGES}


def _parse_pattern_set(data: Any, source: str) -> PatternSet:
    def fail(msg: str) -> PatternSetError:
        return PatternSetError(f"{source}: {msg}")

    if not isinstance(data, dict):
        raise fail("top level must be an object")
    for key in ("language", "version", "categories"):
        if key not in data:
            raise fail(f"missing {key!r}")
    categories = data["categories"]
    if not isinstance(categories, dict):
        raise fail("'categories' must be an object")
    patterns: list[Pattern] = []
    seen: set[str] = set()
    for category, entries in categories.items():
        if category not in CATEGORY_WEIGHTS:
            raise fail(f"unknown category {category!r} (known: {', '.join(CATEGORIES)})")
        for entry in entries:
            try:
                pid, regex, weight = entry["id"], entry["regex"], float(entry["weight"])
                description = entry.get("description", "")
                example = entry.get("example", "")
            except (KeyError, TypeError, ValueError) as exc:
                raise fail(f"bad pattern entry {entry!r}: {exc}") from exc
            if pid in seen:
                raise fail(f"duplicate pattern id {pid!r}")
            seen.add(pid)
            if not 0.0 < weight <= 1.0:
                raise fail(f"pattern {pid}: weight {weight} not in (0, 1]")
            try:
                compiled = re.compile(regex, re.IGNORECASE)
            except re.error as exc:
                raise fail(f"pattern {pid}: regex does not compile: {exc}") from exc
            if compiled.search("") is not None:
                raise fail(f"pattern {pid}: regex matches the empty string")
            patterns.append(Pattern(pid, category, compiled, weight, description, example))
    return PatternSet(str(data["language"]), str(data["version"]), source, tuple(patterns))


# --- char offsets <-> words -------------------------------------------------


def word_char_spans(text: str, words: list[Word]) -> list[tuple[int, int] | None]:
    """Character span of each word in ``text``, None where it cannot be placed.

    Words are searched in order, each from the end of the previous one found
    (exact first, then case-insensitive), and only within
    ``MAX_WORD_SKIP_CHARS`` of that point: a word the text does not contain
    (a filler token, a normalised spelling) is left unmapped instead of being
    matched far ahead, which would shift every later word. Works for
    "words joined by spaces" (pocketsphinx) and for segment texts with
    punctuation whose words carry their own spaces/punctuation (Whisper).
    """
    spans: list[tuple[int, int] | None] = []
    cursor = 0
    for word in words:
        token = word.text.strip()
        if not token:
            spans.append(None)
            continue
        limit = cursor + MAX_WORD_SKIP_CHARS + len(token)
        pos = text.find(token, cursor, limit)
        if pos >= 0:
            span = (pos, pos + len(token))
        else:
            # Searching the original text (not a lower-cased copy, whose length
            # can differ) keeps offsets valid.
            m = re.compile(re.escape(token), re.IGNORECASE).search(text, cursor, limit)
            span = m.span() if m else None
        spans.append(span)
        if span is not None:
            cursor = span[1]
    return spans


def _times_for_span(
    start: int, end: int, words: list[Word], spans: list[tuple[int, int] | None]
) -> tuple[float | None, float | None, list[Word]]:
    """Start/end time of the words overlapping [start, end), and those words."""
    covered = [w for w, s in zip(words, spans) if s is not None and s[0] < end and s[1] > start]
    if not covered:
        return None, None, []
    return min(w.start for w in covered), max(w.end for w in covered), covered


# --- scoring ----------------------------------------------------------------


def risk_level(score: float) -> RiskLevel:
    """<= 20 minimal, <= 40 low, <= 60 moderate, <= 80 high, > 80 critical."""
    for upper, level in RISK_LEVELS:
        if score <= upper:
            return level  # type: ignore[return-value]
    return "critical"


def category_score(weights: list[float]) -> float:
    """100 * (1 - prod(1 - w)): 0 with no evidence, saturating towards 100.

    Rounded to 1e-6 so float error cannot cross a level boundary
    (one match of weight 0.2 is 20, not 19.999999999999996).
    """
    remaining = 1.0
    for w in weights:
        remaining *= 1.0 - w
    return round(100.0 * (1.0 - remaining), 6)


def strongest_category(categories: list) -> tuple[str, float] | None:
    """(name, score) of the category with the highest score, None where none has
    any evidence. ``categories``: CategoryScores or their dicts (forensic.json)."""
    scores = [(c["category"], c["score"]) if isinstance(c, dict) else (c.category, c.score)
              for c in categories]
    name, top = max(scores, key=lambda pair: pair[1], default=("", 0.0))
    return (name, top) if top > 0 else None


def highest_category(categories: list) -> tuple[str, float, str]:
    """(name, score, level) of the strongest category, as the forensic metadata and the
    summary show it: ("none", 0.0, "none") where no category has any evidence."""
    name, top = strongest_category(categories) or ("none", 0.0)
    return name, top, risk_level(top) if top > 0 else "none"


def describe_risk(score: float | None, level: str, categories: list, low_confidence: bool = False) -> str:
    """One line for readers: the overall score and level, then the strongest
    category with its own level where any has evidence, e.g. "20 (minimal),
    threat 80 (high)"; "none (no words)" without a score; then whether the
    transcript is of low confidence (``low_confidence``). ``categories``:
    CategoryScores or their dicts (forensic.json)."""
    line = f"none ({level})" if score is None else f"{shown_score(score)} ({level})"
    if strongest := strongest_category(categories):
        name, top = strongest
        line += f", {name} {shown_score(top)} ({risk_level(top)})"
    # Without words there is nothing whose confidence to doubt.
    return line + (", low-confidence transcript" if low_confidence and score is not None else "")


def shown_score(score: float) -> str:
    """``score`` to one decimal, rounded up: never across a level's bound (20.5
    shows as 20.5, not as a "20" that reads "minimal"; 20.04 as 20.1)."""
    return f"{math.ceil(round(score * 10, 6)) / 10:g}"


def _ends_of_phrases(matchable: str, words: list[Word], spans: list[tuple[int, int] | None],
                     max_pause_s: float) -> str:
    """``matchable`` with what lies between two words more than ``max_pause_s``
    apart turned into ".", which no pattern matches across (one character for
    one, so offsets stay those of ``Transcript.text``)."""
    chars = list(matchable)
    placed = [(word, span) for word, span in zip(words, spans) if span is not None]
    for (before, (_, end)), (after, (start, _)) in zip(placed, placed[1:]):
        if after.start - before.end > max_pause_s:
            chars[end:start] = "." * (start - end)
    return "".join(chars)


@dataclass
class TextRisk:
    """Text-risk part of a ForensicResult, plus the settings that produced it."""

    categories: list[CategoryScore]
    risk_score: float | None  # None: no text to assess (level NO_WORDS)
    risk_level: RiskLevel
    low_confidence_transcript: bool
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def evidence(self) -> list[Evidence]:
        return [ev for cat in self.categories for ev in cat.evidence]


def select_pattern_sets(language: str, sets: dict[str, PatternSet]) -> list[PatternSet]:
    """The set for the transcript's language, or every set if it has none."""
    primary = (language or "").split("-")[0].split("_")[0].lower()
    return [sets[primary]] if primary in sets else list(sets.values())


def analyze_text(
    transcript: Transcript,
    pattern_sets: dict[str, PatternSet] | None = None,
    *,
    low_confidence_threshold: float = DEFAULT_LOW_CONFIDENCE_THRESHOLD,
    unknown_confidence_is_low: bool = True,
    max_pause_s: float = MAX_PAUSE_IN_PHRASE_S,
) -> TextRisk:
    """Match the pattern sets against ``transcript.text`` and score.

    Low confidence: the transcript is flagged when its mean confidence is below
    ``low_confidence_threshold``, and also when it is None if
    ``unknown_confidence_is_low`` (default: an investigator should not read
    evidence of unknown reliability as reliable). Every evidence is flagged
    when the transcript is, and also on its own when the words under it have
    a mean confidence below the threshold.
    """
    sets = pattern_sets if pattern_sets is not None else load_builtin_pattern_sets()
    selected = select_pattern_sets(transcript.language, sets)
    conf = transcript.confidence
    low_transcript = (conf is None and unknown_confidence_is_low) or (
        conf is not None and conf < low_confidence_threshold
    )

    text = transcript.text
    spans = word_char_spans(text, transcript.words)
    matchable = _ends_of_phrases(text.translate(_STRAIGHTEN), transcript.words, spans, max_pause_s)

    by_category: dict[str, list[Evidence]] = {c: [] for c in CATEGORIES}
    for pset in selected:
        for pattern in pset.patterns:
            for m in pattern.regex.finditer(matchable):
                t0, t1, covered = _times_for_span(m.start(), m.end(), transcript.words, spans)
                word_confs = [w.confidence for w in covered if w.confidence is not None]
                low_words = bool(word_confs) and (
                    sum(word_confs) / len(word_confs) < low_confidence_threshold
                )
                by_category[pattern.category].append(
                    Evidence(
                        category=pattern.category,
                        pattern_id=pattern.id,
                        language=pset.language,
                        matched_text=text[m.start() : m.end()],
                        char_start=m.start(),
                        char_end=m.end(),
                        time_start=t0,
                        time_end=t1,
                        weight=pattern.weight,
                        low_confidence=low_transcript or low_words,
                    )
                )

    categories: list[CategoryScore] = []
    for category in CATEGORIES:
        kept = _drop_overlaps(by_category[category])
        categories.append(
            CategoryScore(
                category=category,
                score=category_score([ev.weight for ev in kept]),
                weight=CATEGORY_WEIGHTS[category],
                evidence=kept,
            )
        )
    # Rounded and clipped against float error only; the weights sum to 1.
    score = min(max(round(sum(c.score * c.weight for c in categories), 6), 0.0), 100.0)
    level = risk_level(score)
    if not text.strip():
        score, level = None, NO_WORDS
    options = {
        "pattern_sets": {
            s.language: {"version": s.version, "source": s.source, "patterns": len(s.patterns)}
            for s in selected
        },
        "transcript_language": transcript.language,
        "category_weights": dict(CATEGORY_WEIGHTS),
        "category_score": "100 * (1 - prod(1 - weight)) over non-overlapping evidence",
        "overlaps": "within a category, overlapping matches keep the highest weight",
        "risk_levels": "<=20 minimal, <=40 low, <=60 moderate, <=80 high, >80 critical;"
                       f" {NO_WORDS!r} (no score) where the transcript has no text",
        "max_pause_in_phrase_s": max_pause_s,
        "low_confidence_threshold": low_confidence_threshold,
        "unknown_confidence_is_low": unknown_confidence_is_low,
        "regex_flags": "IGNORECASE; curly apostrophes straightened before matching",
    }
    return TextRisk(categories, score, level, low_transcript, options)


def _drop_overlaps(evidence: list[Evidence]) -> list[Evidence]:
    """Keep the highest-weight match of each group of overlapping spans, in text order."""
    kept: list[Evidence] = []
    # Highest weight first; ties: earlier, then longer span (deterministic).
    order = sorted(evidence, key=lambda e: (-e.weight, e.char_start, e.char_start - e.char_end))
    for ev in order:
        if all(ev.char_end <= k.char_start or ev.char_start >= k.char_end for k in kept):
            kept.append(ev)
    return sorted(kept, key=lambda e: (e.char_start, e.char_end))
