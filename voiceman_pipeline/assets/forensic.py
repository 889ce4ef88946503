"""``forensic``: acoustic stress features + text risk indicators -> risk score."""

from __future__ import annotations

from dagster import MetadataValue

from voiceman_pipeline.recording_files import FORENSIC_JSON, RecordingFiles
from voiceman_pipeline.engines.base import AcousticAnalyzer
from voiceman_pipeline.markdown import escape_markdown
from voiceman_pipeline.results import ForensicResult

TOP_EVIDENCE = 5


def analyze(files: RecordingFiles, analyzer: AcousticAnalyzer, options: dict) -> dict:
    from voiceman_pipeline.engines.forensic import analyze_forensic
    from voiceman_pipeline.engines.forensic.text_risk import highest_category

    intake = files.intake()
    transcript = files.transcript()
    files.verify_custody()
    result = analyze_forensic(
        files.audio(),
        transcript,
        analyzer,
        source_sha256=intake.sha256,
        low_confidence_threshold=options["low_confidence_threshold"],
    )
    result.inputs = dict(files.inputs)
    path = files.store.write_result(files.key, FORENSIC_JSON, result)
    # The weighted overall score dilutes one strong category (a single explicit
    # threat scores 90 in its category but ~22 overall), so show the strongest.
    name, top, level = highest_category(result.categories)
    return {
        # Absent where the transcript has no text: nothing to score (level "no words").
        **({"risk_score": round(result.risk_score, 2)} if result.risk_score is not None else {}),
        "risk_level": result.risk_level,
        "highest_category": name,
        "highest_category_score": round(top, 2),
        "highest_category_level": level,
        # Absent (not 0) when no voice measure was possible: see StressIndex.
        **({"stress_index": round(result.stress.value, 2)} if result.stress.value is not None else {}),
        "stress_level": result.stress.level,
        "evidence_count": len(result.evidence),
        "low_confidence_transcript": result.low_confidence_transcript,
        "top_evidence": MetadataValue.md(evidence_table(result)),
        "process_s": round(result.timings.process_s, 3),
        "output": MetadataValue.path(str(path)),
    }


def evidence_table(result: ForensicResult, limit: int = TOP_EVIDENCE) -> str:
    """Markdown table of the heaviest evidence, for the UI."""
    evidence = sorted(result.evidence, key=lambda ev: ev.weight, reverse=True)[:limit]
    if not evidence:
        return "_No text risk indicators found._"
    rows = ["| category | matched text | time (s) | weight | low confidence |", "|---|---|---|---|---|"]
    for ev in evidence:
        when = f"{ev.time_start:.1f}-{ev.time_end:.1f}" if ev.time_start is not None else "?"
        text = escape_markdown(ev.matched_text)  # words from the recording: never markup
        rows.append(f"| {ev.category} | {text} | {when} | {ev.weight:.2f} | {ev.low_confidence} |")
    return "\n".join(rows)
