"""The summary table's columns, and one recording's row from its report.json.
No Dagster: the summary asset builds its table with these, and so does
``bench/bare_loop.py``, the pipeline's baseline."""

from __future__ import annotations

from voiceman_pipeline.engines.forensic.text_risk import highest_category

COLUMNS = [
    "partition_key",
    "status",  # as `voiceman status` says it: done, failed at <stage>: <reason>, retired: <reason>, ...
    "source", "sha256", "duration_s", "stt_engine", "word_count",
    "transcript_confidence", "risk_score", "risk_level", "highest_category",
    "highest_category_score", "highest_category_level", "stress_index", "stress_level",
    "evidence_count", "low_confidence_transcript", "emotion_status", "dominant_emotion",
    "replaced_contents",  # SHA-256 of earlier contents of the file; their results are kept
    "altered_results",  # altered/ folders: result files found edited or damaged, kept there
    "same_content_as",  # the other recordings whose SHA-256 is this one's (copies under other names)
]


# Counts stay integers and flags booleans where some rows have none (pandas
# would make them floats and objects); None is an empty cell.
INTEGERS, FLAGS, NUMBERS = ("word_count", "evidence_count"), ("low_confidence_transcript",), (
    "duration_s", "transcript_confidence", "risk_score", "highest_category_score", "stress_index")


def typed(table):
    """``table`` (a pandas DataFrame of COLUMNS) with each column's type: integers,
    booleans and floats as above, text as pandas' string type."""
    types = {column: "Int64" if column in INTEGERS else "boolean" if column in FLAGS
             else "float64" if column in NUMBERS else "string" for column in COLUMNS}
    return table.astype(types)


def report_columns(report: dict) -> dict:
    """The result columns of one report.json (as a dict)."""
    audio, transcript = report["audio"], report["transcript"]
    forensic, emotion = report["forensic"], report["emotion"]
    # No category with evidence: "none", as the forensic metadata says (blank is for not done).
    name, top, level = highest_category(forensic["categories"])
    return {
        "source": audio["source_path"],
        "sha256": audio["sha256"],
        "duration_s": audio["duration_s"],
        "stt_engine": transcript["engine"]["name"],
        "word_count": len(transcript["words"]),
        "transcript_confidence": transcript["confidence"],
        "risk_score": forensic["risk_score"],
        "risk_level": forensic["risk_level"],
        "highest_category": name,
        "highest_category_score": top,
        "highest_category_level": level,
        "stress_index": forensic["stress"]["value"],
        "stress_level": forensic["stress"]["level"],
        "evidence_count": sum(len(c["evidence"]) for c in forensic["categories"]),
        "low_confidence_transcript": forensic["low_confidence_transcript"],
        "emotion_status": emotion["status"],
        "dominant_emotion": emotion["dominant_label"],
    }
