"""The benchmark results README.md and docs/ cite are in the repository, readable."""

import json
import re

from voiceman_pipeline_tests.conftest import REPO

RESULTS = REPO / "bench" / "results"


def cited_results() -> set[str]:
    """Every bench/results file the README or docs/ name (in full, with or without the folder)."""
    text = "\n".join(path.read_text(encoding="utf-8") for path in [REPO / "README.md", *REPO.glob("docs/*.md")])
    return set(re.findall(r"`(?:bench/results/)?([a-z][\w.-]*-2\d{7}[\w.-]*\.json)`", text))


def test_every_cited_benchmark_result_is_in_the_repository():
    cited = cited_results()
    assert len(cited) >= 20  # the pattern still finds the citations
    missing = sorted(name for name in cited if not (RESULTS / name).is_file())
    assert not missing, f"cited in README.md or docs/, not in bench/results/: {missing}"
    for name in cited:
        figures = json.loads((RESULTS / name).read_text(encoding="utf-8"))
        assert figures, name
