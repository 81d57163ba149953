"""Sweep files (CSV, JSON, YAML, grids), the field's prompt-CSV convention and --set parsing, on real files and on
the shipped recovery_sweep workflow converted with the stored node definitions (no ComfyUI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memora_batch import sweep as sw
from memora_batch.workflow import Workflow

from batch_kit import DEFINITIONS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def api():
    wf = Workflow.load(ROOT / "example_workflows" / "recovery_sweep.json")
    return wf.to_api(DEFINITIONS), wf.aliases


def test_csv_rows_keep_strings_and_skip_blank_headers(tmp_path):
    p = tmp_path / "s.csv"
    p.write_text("\ufeffTrain LoRA.steps, label.tag ,\n10,a,\n50,b,\n", encoding="utf-8")
    assert sw.load_rows(p) == [{"Train LoRA.steps": "10", "label.tag": "a"},
                               {"Train LoRA.steps": "50", "label.tag": "b"}]
    bad = tmp_path / "bad.csv"
    bad.write_text("a.b\n1,2\n")
    with pytest.raises(sw.SweepError, match="line 2: more cells than header columns"):
        sw.load_rows(bad)


def test_json_and_yaml_grids_are_every_combination(tmp_path):
    j = tmp_path / "g.json"
    j.write_text(json.dumps({"rows": [{"label.r": 1}, {"label.r": 2}], "grid": {"A.x": [1, 2], "B.y": ["u"]}}))
    rows = sw.load_rows(j)
    assert rows == [{"label.r": r, "A.x": x, "B.y": "u"} for r in (1, 2) for x in (1, 2)]
    y = tmp_path / "g.yaml"
    y.write_text("grid:\n  A.x: [1, 2]\n  B.y: [3, 4]\n")
    assert len(sw.load_rows(y)) == 4
    with pytest.raises(sw.SweepError, match="unknown top-level keys"):
        sw.rows_from_data({"rows": [], "gird": {}})
    with pytest.raises(sw.SweepError, match="non-empty list"):
        sw.rows_from_data({"grid": {"A.x": []}})
    with pytest.raises(sw.SweepError, match="unknown sweep file type"):
        (tmp_path / "s.txt").write_text("x")
        sw.load_rows(tmp_path / "s.txt")


def test_prompt_csv_maps_by_title_and_keeps_other_columns_as_labels(api):
    graph, aliases = api
    columns = ["case_number", "prompt", "evaluation_seed", "evaluation_guidance", "label.x"]
    plan = sw.plan_columns(columns, graph, DEFINITIONS, aliases)
    assert plan == {"case_number": None, "prompt": "Evaluation prompt.value", "evaluation_seed":
                    "Evaluation seed.value", "evaluation_guidance": "Evaluation guidance.value", "label.x": None}
    ov, labels = sw.row_overrides({"case_number": "7", "prompt": "a cat", "evaluation_seed": "", "label.x": 1}, plan)
    assert ov == {"Evaluation prompt.value": "a cat"}  # an empty cell keeps the workflow's value
    assert labels == {"case_number": "7", "x": 1}


def test_columns_that_address_nothing_are_all_named(api):
    graph, aliases = api
    with pytest.raises(sw.SweepError) as e:
        sw.plan_columns(["Train LoRA.stepz", "Nowhere.seed", "Train LoRA.steps"], graph, DEFINITIONS, aliases)
    text = str(e.value)
    assert "'Train LoRA.stepz'" in text and "Candidates: Train LoRA.steps" in text and "'Nowhere.seed'" in text


def test_set_items_keep_their_text_and_need_an_equals_sign():
    assert sw.parse_set_texts(["Train LoRA.steps=100", "P.value=a=b", "D.e="]) == {
        "Train LoRA.steps": "100", "P.value": "a=b", "D.e": ""}
    with pytest.raises(sw.SweepError, match="expected '<node title or id>.<input>=<value>'"):
        sw.parse_set_texts(["no equals sign"])
