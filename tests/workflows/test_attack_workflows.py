"""example_workflows/attack_*.json: written by scripts/make_attack_workflows.py from the installed node definitions
(stale files fail here until regenerated), each with the titles memora-batch scoreboard reads; a workflow whose
attack node is not installed is not written, and the generator says which node is missing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from memora import contracts as K
from memora_batch import attacks as A
from memora_batch.workflow import Workflow, object_info_in_process, title_of

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def info(comfy):
    return object_info_in_process()


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("make_attack_workflows", ROOT / "scripts" /
                                                  "make_attack_workflows.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _saved_values(ui: dict) -> dict:
    """What the editor keeps of a workflow (not the output lists, which differ between ComfyUI versions)."""
    return {"nodes": [(n["id"], n["type"], n.get("title"), n.get("widgets_values"),
                       [(i.get("name"), i.get("link")) for i in n.get("inputs", [])]) for n in ui["nodes"]],
            "links": [tuple(link) for link in ui["links"]]}


def _newer_widgets_trimmed(built: dict, committed: dict) -> dict:
    """``built`` with widgets a newer ComfyUI appended to a stock node (0.33's LoraModelLoader gained one) cut back
    to the committed file's count when everything before them agrees (the generator sets no widget a stock node
    gained later: they hold their defaults, which the editor also fills in for a missing trailing widget, so the
    committed file means the same graph there)."""
    out = json.loads(json.dumps(built))
    for b, c in zip(out["nodes"], committed["nodes"]):
        wb, wc = b.get("widgets_values") or [], c.get("widgets_values") or []
        if not b["type"].startswith("MemoRa") and len(wb) > len(wc) and wb[:len(wc)] == wc:
            b["widgets_values"] = wc
    return out


def test_committed_attack_workflows_match_their_generator(info, gen):
    built, missing = gen.installed(info)
    assert {"attack_baseline", "attack_direct_relearning", "attack_resurgence"} <= set(built)
    for name, (build, _title) in built.items():
        ui = build(info).to_json(workflow_id=gen.mw.workflow_uuid(name))
        path = ROOT / "example_workflows" / f"{name}.json"
        assert path.is_file(), f"{path.name} missing: run python scripts/make_attack_workflows.py"
        committed = json.loads(path.read_text())
        assert _saved_values(_newer_widgets_trimmed(ui, committed)) == _saved_values(committed), \
            f"example_workflows/{name}.json is out of date: run python scripts/make_attack_workflows.py"
        assert not gen.mw.check_layout(committed), f"{name}: overlapping nodes"
    for line in missing:
        assert "not built, node type(s)" in line


def test_a_workflow_whose_attack_node_is_missing_is_not_written(info, gen):
    without = {k: v for k, v in info.items() if k != "MemoRaAutoGuider"}
    built, missing = gen.installed(without)
    assert "attack_automemora" not in built
    assert "attack_automemora: not built, node type(s) MemoRaAutoGuider not installed" in missing


def test_every_attack_workflow_has_the_titles_the_scoreboard_reads(info):
    for attack in A.ATTACKS:
        path = ROOT / "example_workflows" / f"{attack.workflow}.json"
        if not path.is_file():
            continue
        api = Workflow.load(path).to_api(info)
        titles = {title_of(api, nid) for nid in api}
        needed = {K.TITLE_ORIGINAL_MODEL, K.TITLE_UNLEARNED_MODEL, K.TITLE_CONCEPT_PROMPT, K.TITLE_EVALUATION_PROMPT,
                  K.TITLE_EVALUATION_SEED, K.TITLE_EVALUATION_IMAGE_SIZE, K.concept_score_title("recovered"),
                  K.concept_score_title("unlearned"), K.similarity_title("recovered")}
        assert needed <= titles, (attack.name, needed - titles)
        types = {n["class_type"] for n in api.values()}
        assert set(attack.nodes) <= types, attack.name
