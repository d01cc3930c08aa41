"""The repository's parity fixture is a byte-identical copy of the project's reference in ../shared/fixtures."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from conftest import FIXTURES, REPO_ROOT


REFERENCE = REPO_ROOT.parent / "shared" / "fixtures"


def _digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="no ../shared/fixtures beside this clone to compare with")
def test_repository_fixture_is_byte_identical_to_the_reference():
    assert _digests(FIXTURES) == _digests(REFERENCE)


def test_repository_fixture_holds_the_parity_samples():
    # What the parity tests read; a partial copy would fail them one by one with less clear errors.
    names = set(_digests(FIXTURES))
    for sample in ("video", "image"):
        assert {f"vica2_tiny_raw/{sample}/logits.npy", f"vica2_tiny_raw/{sample}/input_ids.npy"} <= names
    assert {"vica2_tiny_raw/model.safetensors", "vica2_7b_raw_keys.json", "vica2_7b_raw_config.json"} <= names
