"""docs/reliability.md names, for every guarantee, the test that checks it: each named file and test must exist, so
the page cannot keep citing a test that was renamed or removed."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "reliability.md"


def _references() -> list[tuple[str, str | None]]:
    refs: list[tuple[str, str | None]] = []
    for cell in re.findall(r"`([^`]+)`", DOC.read_text()):
        for part in re.split(r",\s*", cell):
            m = re.fullmatch(r"((?:unit|comfy|workflows|server|browser)/[\w/]+\.py)(?:::(\w+))?", part)
            if m:
                refs.append((m.group(1), m.group(2)))
            elif part.startswith("::"):  # '::name' continues the file named before it
                refs.append((refs[-1][0], part[2:]))
    return refs


def test_every_test_the_reliability_page_cites_exists():
    refs = _references()
    assert len(refs) > 40
    missing = []
    for file, name in refs:
        path = ROOT / "tests" / file
        if not path.is_file():
            missing.append(file)
        elif name and not re.search(rf"^(async )?def {name}\(", path.read_text(), re.M):
            missing.append(f"{file}::{name}")
    assert missing == []
