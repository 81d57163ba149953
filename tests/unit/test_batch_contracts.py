"""memora/contracts.py is the one home of the titles, UI keys and event names: web/memora.js carries an exact copy
of its front-end part, the shipped workflows have every title memora-batch sets, and the module needs nothing but
the standard library."""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import pytest

from memora import contracts as K
from memora_batch.sweep import PROMPT_CSV_CONVENTION

ROOT = Path(__file__).resolve().parents[2]
RECOVERY_WORKFLOWS = ("memora_recovery", "memora_recovery_sdxl", "recovery_sweep")


def _titles(name: str) -> set:
    ui = json.loads((ROOT / "example_workflows" / f"{name}.json").read_text())
    return {n.get("title") for n in ui["nodes"]}


def test_memora_js_carries_the_contract_of_the_python_module():
    js = (ROOT / "web" / "memora.js").read_text()
    m = re.search(r"/\* memora-contract \*/(.*?)/\* end memora-contract \*/", js, re.S)
    assert m, "web/memora.js has no /* memora-contract */ block"
    assert json.loads(m.group(1)) == K.frontend_contract()
    # and the script uses it rather than spelling the names again
    body = js[m.end():]
    for name in [*K.frontend_contract()["events"].values(), *K.frontend_contract()["ui"].values()]:
        assert f'"{name}"' not in body, f"web/memora.js spells {name!r} outside the contract block"


def test_contracts_needs_only_the_standard_library():
    tree = ast.parse(Path(K.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


@pytest.mark.parametrize("name", RECOVERY_WORKFLOWS)
def test_recovery_workflows_have_every_title_the_runner_sets(name):
    titles = _titles(name)
    missing = [t for t in K.RECOVERY_WORKFLOW_TITLES if t not in titles]
    assert not missing, f"{name}.json lacks {missing}"
    # the prompt-CSV convention's first choice of each column
    for column, choices in PROMPT_CSV_CONVENTION.items():
        assert choices[0][0] in titles, (name, column)


def test_every_title_of_the_micro_profile_is_in_the_shipped_workflows():
    from memora_batch.profiles import micro_world_profile

    prof = micro_world_profile()  # the weights are shipped: a missing file is a failure, not a skip
    addressed = {t for t in prof.swaps if not t.endswith("*")} | set(prof.texts)
    addressed |= {a.rsplit(".", 1)[0] for a in prof.defaults}
    for name in RECOVERY_WORKFLOWS:
        assert addressed - _titles(name) <= prof.optional_titles, name
    assert addressed - _titles("memora_from_images") <= prof.optional_titles
    assert prof.optional_titles < addressed  # each optional title is one the profile sets
    for name in (*RECOVERY_WORKFLOWS, "memora_from_images"):
        assert any(t.startswith(K.TITLE_CONCEPT_SCORE) for t in _titles(name) if t), name
