"""What a report says of the code that made it, from real git checkouts."""

from __future__ import annotations

import subprocess

import pytest

from voiceman_pipeline import provenance


def git(folder, *args: str) -> str:
    return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path):
    """A git checkout with one commit of a voiceman_pipeline/ folder."""
    repo = tmp_path / "repo"
    (repo / "voiceman_pipeline").mkdir(parents=True)
    (repo / "voiceman_pipeline" / "x.py").write_text("A = 1\n")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    return repo


def test_its_own_checkout_gives_the_commit_and_whether_the_package_changed(checkout, monkeypatch):
    monkeypatch.setattr(provenance, "SOURCE_DIR", checkout.resolve())
    assert provenance._git_source() == {"commit": git(checkout, "rev-parse", "HEAD"), "local_changes": False}
    (checkout / "voiceman_pipeline" / "new.py").write_text("B = 1\n")  # untracked
    assert provenance._git_source()["local_changes"] is True
    (checkout / "voiceman_pipeline" / "new.py").unlink()
    (checkout / "voiceman_pipeline" / "x.py").write_text("A = 2\n")
    assert provenance._git_source()["local_changes"] is True


def test_a_package_inside_another_checkout_names_no_commit(checkout, monkeypatch):
    # An installed package in a virtual environment that lives inside some project's checkout.
    site = checkout / ".venv" / "site-packages"
    site.mkdir(parents=True)
    monkeypatch.setattr(provenance, "SOURCE_DIR", site.resolve())
    said = provenance._git_source()
    assert said["commit"] is None and "not in a git checkout of its own" in said["commit_unknown"]


def test_no_checkout_names_no_commit_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "SOURCE_DIR", tmp_path.resolve())
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # not a checkout above it
    said = provenance._git_source()
    assert said["commit"] is None and said["commit_unknown"].startswith("git could not say: fatal: not a git")
