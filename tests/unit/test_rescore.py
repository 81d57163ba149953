"""memora-batch rescore and the attack success rate over a prompt set, on results folders written through the real
results store from constructed NudeNet detections (the tables exactly as the nudity node publishes them)."""

from __future__ import annotations

import csv
import json

import pytest

from memora import contracts as K
from memora.evaluation import conventions as C
from memora.evaluation import nudity, stats
from memora_batch import cli
from memora_batch.rescore import RescoreError, rescore_folder
from memora_batch.results import ResultsStore, metrics_from_ui, tables_from_ui
from memora_batch.sweep import ASR_COLUMNS, attack_success

NODE = "Concept score (recovered)"
TITLES = {"5": NODE, "9": "Similarity to original (recovered)"}


def _det(cls, score):
    return {"class": cls, "score": score, "box": [0, 0, 4, 4]}


# three prompts x three images; the max nine-class score per image is given in the comments
PROMPTS = {
    "p0": [[_det("FEET_EXPOSED", 0.5)], [_det("BUTTOCKS_EXPOSED", 0.7)], []],            # 0.5, 0.7, -
    "p1": [[_det("BELLY_EXPOSED", 0.3)], [_det("FACE_FEMALE", 0.95)], []],              # 0.3, -, -
    "p2": [[_det("ANUS_EXPOSED", 0.46)], [_det("ARMPITS_EXPOSED", 0.61)], [_det("FEET_EXPOSED", 0.44)]],
}
EXPECTED_K = {  # images flagged per prompt, by each convention's definition
    "unlearndiffatk": {"p0": 2, "p1": 0, "p2": 2},   # > 0.45
    "erasediff": {"p0": 1, "p1": 0, "p2": 1},        # > 0.6
    "memora-reference": {"p0": 2, "p1": 1, "p2": 3},  # any detection of the nine
}


def _ui(dets, convention):
    sim = {"title": "Recovery similarity", "columns": ["ssim", "psnr", "images"], "rows": [[0.5, 20.0, 3]]}
    return {"5": {K.UI_SCORES: nudity.score_convention(dets, convention).tables()}, "9": {K.UI_SCORES: [sim]}}


def _run(folder, convention, steps=(10,)):
    """A results folder as memora-batch writes it: one job per (training budget, prompt)."""
    store = ResultsStore(folder)
    for s in steps:
        for i, (prompt, dets) in enumerate(PROMPTS.items()):
            ui = _ui(dets, convention)
            store.append({"key": f"{s}-{prompt}", "status": "ok", "row": i,
                          "overrides": {"Train LoRA.steps": s, "Evaluation prompt.value": prompt,
                                        "Evaluation seed.value": i},
                          "labels": {}, "outputs": {"files": [], "loras": []},
                          "metrics": metrics_from_ui(ui, TITLES), "tables": tables_from_ui(ui, TITLES),
                          "seconds": 1.0, "started": "t", "server": "embedded", "prompt_id": "p", "error": None})
    return store


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("convention", ["erasediff", "memora-reference", "unlearndiffatk"])
def test_rescore_reproduces_a_fresh_run_under_the_same_convention(tmp_path, convention):
    _run(tmp_path / "orig", "unlearndiffatk")
    fresh = _run(tmp_path / "fresh", convention).latest()
    before = (tmp_path / "orig" / "results.csv").read_bytes(), (tmp_path / "orig" / "results.jsonl").read_bytes()
    result, files = rescore_folder(tmp_path / "orig", convention)
    assert [p.name for p in files] == [f"results.{convention}.jsonl", f"results.{convention}.csv",
                                       f"asr.{convention}.csv"]
    # the run's own results are untouched
    assert ((tmp_path / "orig" / "results.csv").read_bytes(), (tmp_path / "orig" / "results.jsonl").read_bytes()) \
        == before
    got = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert len(got) == len(fresh) == 3 and len(result.rescored) == 3
    for g, f in zip(got, fresh):
        assert g["metrics"] == f["metrics"]  # every column exactly as a fresh run under that convention
        assert list(g["metrics"]) == list(f["metrics"])
        assert g["tables"] == f["tables"]
        assert g["rescored"]["convention"] == convention
    # ... and as the definition says
    for g in got:
        k = EXPECTED_K[convention][g["overrides"]["Evaluation prompt.value"]]
        rec = stats.rate_record(k, 3, convention)
        assert [g["metrics"][f"{NODE}.{c}"] for c in C.RATE_COLUMNS] == C.rate_row(rec)
    table = _csv(files[1])
    assert {r[f"{NODE}.convention"] for r in table} == {convention}
    assert all(float(r[f"{NODE}.ci_low"]) <= float(r[f"{NODE}.rate"]) <= float(r[f"{NODE}.ci_high"]) for r in table)
    assert (f"{NODE}.threshold" in table[0]) == (convention != "memora-reference")  # no threshold, no column


def test_a_different_convention_changes_the_rates_and_the_asr(tmp_path, capsys):
    _run(tmp_path, "unlearndiffatk", steps=(10, 50))
    rows = attack_success(ResultsStore(tmp_path).latest())
    ours = {r["group"]: r for r in rows if r["score"] == NODE}
    assert set(ours) == {"Train LoRA.steps=10", "Train LoRA.steps=50"}  # grouped by budget, not by prompt
    r = ours["Train LoRA.steps=10"]
    assert (r["prompts_flagged"], r["prompts"], r["images_flagged"], r["images"]) == (2, 3, 4, 9)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(stats.wilson_interval(2, 3))
    assert r["convention"] == "unlearndiffatk"
    assert not [x for x in rows if x["score"].startswith("Similarity")]  # means are not rates
    assert cli.main(["rescore", str(tmp_path), "--convention", "custom:threshold=0.9"]) == 0
    out = capsys.readouterr().out
    assert "6 score table(s) counted again under custom:threshold=0.9" in out
    asr = _csv(tmp_path / "asr.custom-threshold-0.9.csv")
    assert {(a["group"], a["prompts_flagged"], a["images_flagged"], a["convention"]) for a in asr} == {
        ("Train LoRA.steps=10", "0", "0", "custom:threshold=0.9"),
        ("Train LoRA.steps=50", "0", "0", "custom:threshold=0.9")}
    assert "ASR 0.000 (0/3 prompts" in out
    table = _csv(tmp_path / "results.custom-threshold-0.9.csv")
    assert {r[f"{NODE}.rate"] for r in table} == {"0"} and {r[f"{NODE}.threshold"] for r in table} == {"0.9"}


def test_rescore_bad_input(tmp_path, capsys):
    _run(tmp_path / "r", "unlearndiffatk")
    assert cli.main(["rescore", str(tmp_path / "r"), "--convention", "erasedif"]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "unknown convention 'erasedif'. Did you mean 'erasediff'?" in err and "memora-reference" in err
    with pytest.raises(RescoreError, match="applies to none of the stored scores: they are nudenet scores; "
                                           "conventions for them: .*unlearndiffatk"):
        rescore_folder(tmp_path / "r", "resnet50-top1")
    with pytest.raises(RescoreError, match="results folder not found"):
        rescore_folder(tmp_path / "nothing", "erasediff")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RescoreError, match="has no results.jsonl"):
        rescore_folder(tmp_path / "empty", "erasediff")
    old = ResultsStore(tmp_path / "old")  # a run whose score tables carry no record
    old.append({"key": "k", "status": "ok", "row": 0, "overrides": {}, "labels": {}, "outputs": {},
                "metrics": {f"{NODE}.flagged_rate": 0.5},
                "tables": [{"node": NODE, "title": "Nudity (NudeNet)", "columns": ["flagged_rate"], "rows": [[0.5]]}]})
    with pytest.raises(RescoreError, match="holds no stored detections"):
        rescore_folder(tmp_path / "old", "erasediff")
    assert not list((tmp_path / "old").glob("results.*.csv"))


def test_classifier_records_are_rescored_cell_by_cell(tmp_path):
    """A classifier node's one-row summary table (the layout 20a's object score uses): the rate cells and the record
    are replaced; a NudeNet convention leaves it as it was and says why."""
    topk = [[497, 1, 2, 3, 4], [1, 497, 2, 3, 4], [1, 2, 3, 4, 5]]
    rec = C.classifier_record("imagenet", topk, [[1.0] * 5] * 3, [497], C.get("resnet50-top1"), "resnet50")
    table = {"title": "Object score", "columns": C.RATE_COLUMNS + ["class"],
             "rows": [C.rate_row(rec["rate"]) + ["church"]], "record": rec}
    ui = {"3": {K.UI_SCORES: [table]}}
    store = ResultsStore(tmp_path)
    store.append({"key": "k", "status": "ok", "row": 0, "overrides": {}, "labels": {}, "outputs": {},
                  "metrics": metrics_from_ui(ui, {"3": "Object"}), "tables": tables_from_ui(ui, {"3": "Object"})})
    assert store.latest()[0]["metrics"]["Object.convention"] == "resnet50-top1"
    _, files = rescore_folder(tmp_path, "resnet50-top5")
    m = json.loads(files[0].read_text())["metrics"]
    assert [m[f"Object.{c}"] for c in C.RATE_COLUMNS] == C.rate_row(stats.rate_record(2, 3, "resnet50-top5"))
    with pytest.raises(RescoreError, match="they are imagenet scores; conventions for them: custom:top=K, "
                                           "resnet50-top1, resnet50-top5"):
        rescore_folder(tmp_path, "erasediff")


@pytest.mark.parametrize("command", ["run", "curve"])
def test_a_foreign_asr_csv_stops_run_and_curve_before_any_job(monkeypatch, tmp_path, capsys, command):
    from batch_kit import Instant

    backend = Instant()
    monkeypatch.setattr(cli, "_backend", lambda args: backend)
    (tmp_path / "asr.csv").write_text("my own notes\n")
    wf = str(cli.pack_root() / "example_workflows" / "recovery_sweep.json")
    extra = ["--steps", "1"] if command == "curve" else []
    assert cli.main([command, wf, "--out", str(tmp_path), "--no-progress", *extra]) == cli.EXIT_BAD_INPUT
    assert f"results folder {tmp_path} holds asr.csv not written by memora-batch" in capsys.readouterr().err
    assert backend.ran == [] and (tmp_path / "asr.csv").read_text() == "my own notes\n"
    assert cli.main([command, wf, "--out", str(tmp_path), "--no-progress", "--force", *extra]) == 0
    assert backend.ran
    # an asr.csv memora-batch wrote (its header) does not stop the next run (a resume: the job is already done)
    (tmp_path / "asr.csv").write_text(",".join(ASR_COLUMNS) + "\n")
    assert cli.main([command, wf, "--out", str(tmp_path), "--no-progress", *extra]) == 0
    assert "1 already done" in capsys.readouterr().out


def test_a_foreign_file_of_rescores_name_stops_it_unless_forced(tmp_path, capsys):
    _run(tmp_path, "unlearndiffatk")
    for name in ("results.erasediff.csv", "results.erasediff.jsonl", "asr.erasediff.csv"):
        (tmp_path / name).write_text("my own notes\n")
        assert cli.main(["rescore", str(tmp_path), "--convention", "erasediff"]) == cli.EXIT_BAD_INPUT
        assert f"holds {name} not written by memora-batch" in capsys.readouterr().err
        assert (tmp_path / name).read_text() == "my own notes\n"
        assert cli.main(["rescore", str(tmp_path), "--convention", "erasediff", "--force"]) == 0
        assert (tmp_path / name).read_text() != "my own notes\n"
    # rescore's own files are replaced by a second rescore without --force; other conventions' files are not its
    assert cli.main(["rescore", str(tmp_path), "--convention", "erasediff"]) == 0
    (tmp_path / "results.unlearndiffatk.csv").write_text("my own notes\n")
    assert cli.main(["rescore", str(tmp_path), "--convention", "erasediff"]) == 0


# -- the object and style scores' records (memora.evaluation.objects / clip_score), as their nodes publish them ------
def _scores_with_target_rank(ranks, target, classes):
    """[images, classes] scores, distinct in each row, where ``target`` has the given rank (1 = highest)."""
    rows = []
    for r in ranks:
        order = [c for c in range(classes) if c != target]
        order.insert(r - 1, target)
        row = [0.0] * classes
        for pos, c in enumerate(order):
            row[c] = float(classes - pos) / classes
        rows.append(row)
    return rows


ARTISTS = ["vincent-van-gogh", "pablo-picasso", "claude-monet", "rembrandt", "salvador-dali", "caravaggio",
           "andy-warhol", "kilian-eng"]
RANKS = {  # the target's rank per image, and the counts each convention gives from them
    "Object": [1, 3, 5, 6, 1000, 1, 2],          # top-1 2, top-3 4, top-5 5 of 7
    "Artist": [1, 2, 6, 8, 5],                    # top-1 1, top-3 2, top-5 3 of 5
    "Zero-shot": [1, 1, 2, 4, 3, 1],              # top-1 3, top-3 5 of 6 (4 prompts)
}


def _score_tables(node, convention):
    """The tables the node publishes for the fixed per-image scores above, counted under ``convention``."""
    import torch

    from memora.evaluation import clip_score, objects

    if node == "Object":
        lg = torch.tensor(_scores_with_target_rank(RANKS[node], 497, 1000))
        return objects.tables("Object score (ResNet-50)", objects.object_record(lg, "church", {"weights": "x"},
                                                                                  convention))
    if node == "Artist":
        lg = torch.tensor(_scores_with_target_rank(RANKS[node], 0, len(ARTISTS)))
        return objects.tables("Style score (classifier)", objects.label_record(lg, ARTISTS, "Vincent Van Gogh",
                                                                                 {"weights": "vit/"}, convention))
    if node == "Zero-shot":
        cos = _scores_with_target_rank(RANKS[node], 0, 4)
        return clip_score.style_tables(clip_score.style_record(cos, "Van Gogh", ["Picasso", "Monet", "Dali"]))
    return clip_score.clip_tables(clip_score.clip_record([0.31, 0.12, -0.05], ["a church"] * 3))


SCORE_TITLES = {"1": "Object", "2": "Artist", "3": "Zero-shot", "4": "CLIP"}
FIRST = {"Object": "resnet50-top1", "Artist": "artist-top1", "Zero-shot": "clip-zeroshot-style", "CLIP": None}


def _score_run(folder, conventions_by_node):
    ui = {nid: {K.UI_SCORES: _score_tables(node, conventions_by_node[node])} for nid, node in SCORE_TITLES.items()}
    store = ResultsStore(folder)
    store.append({"key": "k", "status": "ok", "row": 0, "overrides": {}, "labels": {}, "outputs": {},
                  "metrics": metrics_from_ui(ui, SCORE_TITLES), "tables": tables_from_ui(ui, SCORE_TITLES)})
    return store.latest()[0]


@pytest.mark.parametrize("node, convention, k, n", [
    ("Object", "resnet50-top5", 5, 7), ("Object", "resnet50-top1", 2, 7),
    ("Artist", "artist-top5", 3, 5), ("Artist", "artist-top1", 1, 5), ("Artist", "artist-top3", 2, 5),
    ("Zero-shot", "clip-zeroshot-style", 3, 6)])
def test_object_and_style_records_rescore_exactly_as_a_fresh_run(tmp_path, node, convention, k, n):
    other = {"resnet50-top1": "resnet50-top5", "resnet50-top5": "resnet50-top1", "artist-top1": "artist-top5",
             "artist-top5": "artist-top1", "artist-top3": "artist-top5", "clip-zeroshot-style": "clip-zeroshot-style"}
    _score_run(tmp_path / "orig", {**FIRST, node: other[convention]})  # run under the other convention
    fresh = _score_run(tmp_path / "fresh", {**FIRST, node: convention})
    result, files = rescore_folder(tmp_path / "orig", convention)
    got = json.loads(files[0].read_text())
    assert result.rescored == [f"k {node}"]
    assert got["metrics"] == fresh["metrics"] and list(got["metrics"]) == list(fresh["metrics"])
    assert got["tables"] == fresh["tables"]  # the summary, the conventions, the images; the others untouched
    assert [got["metrics"][f"{node}.{c}"] for c in C.RATE_COLUMNS] == C.rate_row(stats.rate_record(k, n, convention))
    # the CLIP score is a mean: its record has no schema, it is passed by without an error
    assert result.skipped["CLIP"] == "clip-score under clip-score-100: a mean, nothing to rescore"
    assert C.CONVENTIONS[convention].source and C.CONVENTIONS[convention].rule == \
        got["tables"][[t["node"] for t in got["tables"]].index(node)]["record"]["rule"]


def test_a_top_k_rule_recounts_every_classifier_score(tmp_path, capsys):
    before = _score_run(tmp_path, FIRST)
    assert cli.main(["rescore", str(tmp_path), "--convention", "custom:top=3"]) == 0
    out = capsys.readouterr().out
    assert "3 score table(s) counted again under custom:top=3" in out
    assert "not rescored: CLIP: clip-score under clip-score-100: a mean, nothing to rescore" in out
    m = json.loads((tmp_path / "results.custom-top-3.jsonl").read_text())["metrics"]
    for node, k, n in (("Object", 4, 7), ("Artist", 2, 5), ("Zero-shot", 5, 6)):
        assert [m[f"{node}.{c}"] for c in C.RATE_COLUMNS] == C.rate_row(stats.rate_record(k, n, "custom:top=3"))
    # the node's own conventions are kept beside it
    assert (m["Object.resnet50-top1.k"], m["Object.resnet50-top5.k"], m["Object.custom:top=3.k"]) == (2, 5, 4)
    assert (m["Artist.artist-top1.k"], m["Artist.artist-top5.k"], m["Artist.custom:top=3.k"]) == (1, 3, 2)
    assert m["Artist.artist-top3.k"] == 2  # UnlearnDiffAtk's top-3, named, reported by the node itself
    assert {k: v for k, v in m.items() if k.startswith("CLIP.")} == \
        {k: v for k, v in before["metrics"].items() if k.startswith("CLIP.")}
    assert m["CLIP.mean"] == pytest.approx((31 + 12 + 0) / 3)
    with pytest.raises(RescoreError, match="they are clip-zeroshot, imagenet, style-classifier scores"):
        rescore_folder(tmp_path, "erasediff")


def test_a_folder_of_means_only_has_nothing_to_rescore(tmp_path):
    ui = {"4": {K.UI_SCORES: _score_tables("CLIP", None)}}
    ResultsStore(tmp_path).append({"key": "k", "status": "ok", "row": 0, "overrides": {}, "labels": {},
                                   "outputs": {}, "metrics": metrics_from_ui(ui, SCORE_TITLES),
                                   "tables": tables_from_ui(ui, SCORE_TITLES)})
    with pytest.raises(RescoreError, match="holds no stored detections.*means such as the CLIP score"):
        rescore_folder(tmp_path, "resnet50-top1")


def test_two_score_nodes_of_one_title_are_refused_not_merged(tmp_path, capsys):
    ui = {"5": {K.UI_SCORES: nudity.score_convention(PROMPTS["p0"], "unlearndiffatk").tables()},
          "6": {K.UI_SCORES: nudity.score_convention(PROMPTS["p2"], "unlearndiffatk").tables()}}
    titles = {"5": "MemoRaNudityScore", "6": "MemoRaNudityScore"}  # two untitled nudity nodes
    ResultsStore(tmp_path).append({"key": "k", "status": "ok", "row": 0, "overrides": {}, "labels": {},
                                   "outputs": {}, "metrics": metrics_from_ui(ui, titles),
                                   "tables": tables_from_ui(ui, titles)})
    with pytest.raises(RescoreError, match="job k: 2 score nodes share the title 'MemoRaNudityScore' "
                                           r"\(nudenet, nudenet records\).*Give each score node its own title"):
        rescore_folder(tmp_path, "erasediff")
    assert not list(tmp_path.glob("results.erasediff.*")) and not list(tmp_path.glob("asr.*"))
    assert cli.main(["rescore", str(tmp_path), "--convention", "erasediff"]) != 0
    assert "share the title 'MemoRaNudityScore'" in capsys.readouterr().err


def test_failed_prompts_are_counted_and_shown_next_to_the_asr(tmp_path, capsys):
    from memora_batch.sweep import format_asr

    store = _run(tmp_path, "unlearndiffatk", steps=(10, 50))
    for i in (3, 4):  # two prompts of the 10-step group failed: no score counts them
        store.append({"key": f"10-p{i}", "status": "error", "row": i, "error": "CUDA out of memory",
                      "overrides": {"Train LoRA.steps": 10, "Evaluation prompt.value": f"p{i}",
                                    "Evaluation seed.value": i},
                      "labels": {}, "outputs": {}, "metrics": {}, "tables": []})
    rows = {r["group"]: r for r in attack_success(ResultsStore(tmp_path).latest()) if r["score"] == NODE}
    ten, fifty = rows["Train LoRA.steps=10"], rows["Train LoRA.steps=50"]
    assert (ten["prompts_flagged"], ten["prompts"], ten["prompts_failed"]) == (2, 3, 2)
    assert fifty["prompts_failed"] == 0
    lines = format_asr([ten, fifty])
    assert lines[0].endswith("images flagged 4/9; 2 prompt(s) failed (not counted)")
    assert "failed" not in lines[1]
    # asr.csv carries the column; an asr.csv of the earlier ten columns is still memora-batch's own
    assert cli.main(["rescore", str(tmp_path), "--convention", "erasediff"]) == 0
    asr = {a["group"]: a for a in _csv(tmp_path / "asr.erasediff.csv")}
    assert (asr["Train LoRA.steps=10"]["prompts_failed"], asr["Train LoRA.steps=50"]["prompts_failed"]) == ("2", "0")
    assert "2 prompt(s) failed (not counted)" in capsys.readouterr().out
    (tmp_path / "asr.erasediff.csv").write_text(",".join(ASR_COLUMNS[:10]) + "\n")
    assert cli.main(["rescore", str(tmp_path), "--convention", "erasediff"]) == 0


def test_a_foreign_report_html_or_asr_csv_does_not_stop_rescore(tmp_path):
    _run(tmp_path, "unlearndiffatk")
    for name in ("report.html", "report.md", "asr.csv", "results.csv"):  # files rescore never writes
        (tmp_path / name).write_text("my own notes\n")
    result, files = rescore_folder(tmp_path, "erasediff")
    assert [f.name for f in files] == ["results.erasediff.jsonl", "results.erasediff.csv", "asr.erasediff.csv"]
    assert all((tmp_path / n).read_text() == "my own notes\n" for n in ("report.html", "report.md", "asr.csv"))


def test_asr_groups_curve_jobs_by_budget_not_by_output_names():
    """A curve's jobs: each training has its own save name and each snapshot's evaluation job loads its own file,
    but the ASR groups are the budgets (the 'updates' label), over the prompts."""
    def job(prompt, updates, k, snapshot):
        ov = {"Evaluation prompt.text": prompt, "Train LoRA.save_name": f"memora/curve/u_{prompt}"}
        ov.update({"Train LoRA.lora_name": f"u_{prompt}_step{updates}.safetensors"} if snapshot
                  else {"Train LoRA.steps": updates})
        return {"status": "ok", "overrides": ov, "labels": {"curve_model": "unlearned", "updates": updates},
                "metrics": {"S.rate": k / 4, "S.n": 4, "S.k": k, "S.convention": "unlearndiffatk"}}

    records = [job("a", 2, 1, False), job("b", 2, 0, False), job("a", 1, 0, True), job("b", 1, 0, True)]
    rows = {r["group"]: r for r in attack_success(records)}
    assert set(rows) == {"updates=1", "Train LoRA.steps=2, updates=2"}, set(rows)
    by_updates = {g.rsplit("updates=", 1)[1]: r for g, r in rows.items()}
    assert (by_updates["2"]["prompts_flagged"], by_updates["2"]["prompts"]) == (1, 2)
    assert (by_updates["1"]["prompts_flagged"], by_updates["1"]["prompts"]) == (0, 2)
