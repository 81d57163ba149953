"""The results store (results.jsonl + results.csv), metrics read from the nodes' UI outputs, the report and the
recovery curve's aggregation: real files in tmp_path, UI outputs shaped as the nodes return them (keys from
memora/contracts.py)."""

from __future__ import annotations

import csv
import json
import math

import pytest

from memora import contracts as K
from memora_batch.curve import aggregate, print_verdict
from memora_batch.report import write_report
from memora_batch.results import ResultsStore, files_from_ui, metrics_from_ui, tables_from_ui

TITLES = {"5": "Concept score (recovered)", "6": "Train LoRA", "7": "Save", "8": "Micro detector"}
UI = {
    "5": {K.UI_SCORES: [{"title": "summary", "columns": ["rate", "images"], "rows": [[0.25, 4]]},
                        {"title": "per image", "columns": ["image", "score"], "rows": [[0, 0.1], [1, 0.9]]}]},
    "6": {K.UI_LOSS: [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}], K.UI_LORA: ["memora/r_00001_.safetensors"]},
    "7": {"images": [{"filename": "a.png", "subfolder": "x/y", "type": "output"},
                     {"filename": "t.png", "subfolder": "", "type": "temp"}]},
    "8": {K.UI_SCORES: [{"title": "d", "columns": ["concept", "rate"], "rows": [["star", 0.5], ["circle", 0.0]]}]},
}


def test_metrics_from_the_nodes_ui_outputs():
    m = metrics_from_ui(UI, TITLES)
    assert m == {"Concept score (recovered).rate": 0.25, "Concept score (recovered).images": 4,
                 "Train LoRA.final_loss": 0.25, "Train LoRA.train_steps": 2,
                 "Micro detector.star.rate": 0.5, "Micro detector.circle.rate": 0.0}
    tables = tables_from_ui(UI, TITLES)
    assert [(t["node"], t["title"]) for t in tables] == [("Concept score (recovered)", "summary"),
                                                         ("Concept score (recovered)", "per image"),
                                                         ("Micro detector", "d")]
    files, loras = files_from_ui(UI)
    assert files == ["x/y/a.png"] and loras == ["memora/r_00001_.safetensors"]  # temp previews are not outputs


def test_only_multi_row_tables_give_means():
    ui = {"1": {K.UI_SCORES: [{"columns": ["image", "ssim"], "rows": [[0, 0.5], [1, 1.0], [2, float("inf")]]}]}}
    assert metrics_from_ui(ui, {"1": "Similarity"}) == {"Similarity.image.mean": 1.0, "Similarity.ssim.mean": 0.75}


def _record(key, status="ok", row=0, **kw):
    return {"key": key, "status": status, "row": row, "overrides": {"Train LoRA.steps": kw.get("steps", 10)},
            "labels": {"tag": key}, "outputs": {"files": ["o/a.png"], "loras": []},
            "metrics": kw.get("metrics", {"Concept score (recovered).rate": 0.5}),
            "seconds": 1.5, "started": "t", "server": "embedded", "prompt_id": "p", "error": kw.get("error")}


def test_store_appends_resumes_and_writes_the_latest_record_of_each_key(tmp_path):
    store = ResultsStore(tmp_path)
    store.append(_record("k1", "error", row=0, error="boom"))
    store.append(_record("k2", row=1, metrics={"A.psnr": float("inf")}))
    store.append(_record("k1", row=0))
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write('{"key": "k3", "status": "o')  # a line cut short by a crash
    again = ResultsStore(tmp_path)
    assert again.finished_keys() == {"k1", "k2"}
    assert [r["key"] for r in again.latest()] == ["k1", "k2"]
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert json.loads(lines[1])["metrics"]["A.psnr"] == "inf"  # JSON has no inf
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["key"], r["status"], r["label.tag"], r["error"]) for r in rows] == [("k1", "ok", "k1", ""),
                                                                                ("k2", "ok", "k2", "")]
    assert rows[0]["Train LoRA.steps"] == "10" and rows[0]["seconds"] == "1.5" and rows[0]["outputs"] == "o/a.png"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_report_lists_jobs_inputs_and_tables(tmp_path):
    store = ResultsStore(tmp_path)
    rec = _record("abcdef0123456789")
    rec["tables"] = tables_from_ui(UI, TITLES)[:1]
    store.append(rec)
    store.append(_record("fedcba9876543210", "error", row=1, error="node 3 failed"))
    path = write_report(tmp_path, "my workflow")
    text = path.read_text()
    assert text.startswith("# memora-batch: my workflow\n\n1 job(s) ok, 1 failed.")
    # the summary: a row per job, the recovered rate read from the node's summary table (1 of 4 images), with its
    # Wilson interval; the failed job with its error
    assert "| job | inputs | concept rate (original) | concept rate (unlearned) | concept rate (recovered) |" in text
    assert ("| abcdef0123 | tag=abcdef0123456789, Train LoRA.steps=10 | - | - | 0.250 (1/4; 95% CI 0.046-0.699; "
            "convention not reported) | - | no concept score for the unlearned and recovered models |") in text
    assert "| fedcba9876 | tag=fedcba9876543210, Train LoRA.steps=10 | - | - | 0.500 (n not reported: no " \
           "interval) | - | failed: node 3 failed |" in text
    assert "**Concept score (recovered): summary**" in text and "| 0.25 | 4 |" in text
    assert "- error: node 3 failed" in text


def test_curve_averages_each_step_count_and_writes_curve_json(tmp_path, capsys):
    store = ResultsStore(tmp_path)
    for i, (steps, rate, ssim) in enumerate([(10, 0.1, 0.9), (10, 0.3, 0.7), (50, 0.6, 0.5), (50, 0.8, 0.3)]):
        store.append(_record(f"k{i}", row=i, steps=steps, metrics={
            "Concept score (recovered).rate": rate, "Similarity to original (recovered).ssim": ssim}))
    records = store.latest()
    assert aggregate(records, "Train LoRA", [10, 50, 100], "Concept score (recovered).rate") == \
        pytest.approx([0.2, 0.7, None])
    assert print_verdict(tmp_path, "Train LoRA", [10, 50], None, None) == 0
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert curve["detector"] == pytest.approx([0.2, 0.7]) and curve["similarity"] == pytest.approx([0.8, 0.4])
    assert curve["similarity_metric"] == "Similarity to original (recovered).ssim"
    assert "forgetting verdict:" in capsys.readouterr().out
    assert all(math.isfinite(v) for v in curve["detector"])
