"""The license, citation metadata and README's Citing section agree with each other and with pyproject."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_license_is_an_spdx_expression_with_its_text() -> None:
    pyproject = _pyproject()
    assert pyproject["project"]["license"] == "Apache-2.0"  # a string: no setuptools deprecation warning
    assert "setuptools>=77" in pyproject["build-system"]["requires"]  # the first to read SPDX strings
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert len(re.findall(r"^\s+\d\. ", text, flags=re.M)) >= 9  # all nine sections, not an excerpt


def test_citation_cff_is_valid_and_matches_pyproject() -> None:
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    for key in ("cff-version", "message", "title", "authors"):
        assert cff.get(key), f"CITATION.cff lacks the required key {key!r}"
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    project = _pyproject()["project"]
    assert str(cff["version"]) == project["version"]
    assert cff["license"] == project["license"]
    for author in cff["authors"]:
        assert author.get("name") or author.get("family-names")

    paper = cff["preferred-citation"]
    assert paper["type"] == "conference-paper" and paper["year"] == 2023
    assert paper["title"].startswith("Learning Multi-Modal Class-Specific Tokens")
    assert (paper["start"], paper["end"]) == (19596, 19605)
    assert [a["family-names"] for a in paper["authors"]] == ["Xu", "Ouyang", "Bennamoun", "Boussaid", "Xu"]
    titles = {ref["title"] for ref in cff["references"]}
    assert paper["title"] in titles
    assert "Multi-class Token Transformer for Weakly Supervised Semantic Segmentation" in titles
    assert "Learning Deep Features for Discriminative Localization" in titles


def test_readme_cites_every_reference_with_the_same_pages() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Citing", 1)[1].split("\n## ", 1)[0]
    assert "independent implementation" in section and "not affiliated" in section
    entries = re.findall(r"@inproceedings\{[^@]*?\n\}", section)
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert len(entries) == len(cff["references"])
    for ref in cff["references"]:
        entry = next((e for e in entries if f"title     = {{{ref['title']}}}" in e), None)
        assert entry is not None, f"README's Citing section has no BibTeX for {ref['title']!r}"
        assert f"{{{ref['start']}--{ref['end']}}}" in entry and f"{{{ref['year']}}}" in entry
        authors = " and ".join(f"{a['family-names']}, {a['given-names']}" for a in ref["authors"])
        assert f"{{{authors}}}" in entry
