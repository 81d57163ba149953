"""memora-batch's report from a results folder: the summary table that answers 'did it come back?' (rates with n,
Wilson interval and convention, the similarity, the Fisher verdict), no table wider than 8 columns in report.md or
report.html, per-image tables that say when they are cut, report.html's grid drawn from the run's images, and
report.md alone (with a message) when matplotlib is missing. The records have the layout the score nodes publish
(tests/workflows check the same on real runs)."""

from __future__ import annotations

import os
import re
import sys

import numpy as np
import pytest
from PIL import Image
from report_tables import html_tables, markdown_tables, widest
from scipy import stats as sps

from memora.evaluation import nudity, stats
from memora_batch import report, report_html
from memora_batch.results import ResultsStore


def _nudity(node: str, k: int, n: int, per_image: int = 0, convention: str = "unlearndiffatk") -> list[dict]:
    """The nudity node's real tables (memora.evaluation.nudity) for k of n images with an exposed detection scoring
    0.7 (counted by unlearndiffatk and erasediff alike), as memora-batch stores them (the node title added, the score
    record kept)."""
    dets = [[{"class": "FEET_EXPOSED", "score": 0.7, "box": [0, 0, 4, 4]}] if i < k else [] for i in range(n)]
    tables = [{"node": node, **t} for t in nudity.score_convention(dets, convention).tables()]
    return tables if per_image else [t for t in tables if t["title"] != "Nudity per image"]


SSIM = [0.4, 0.6] * 16  # 32 per-image SSIMs, mean 0.5


def _similarity(node: str) -> list[dict]:
    """The similarity node's summary and intervals tables (nodes/evaluation.py's layout; stats.mean_record)."""
    m = stats.mean_record(SSIM)
    return [{"node": node, "title": "Recovery similarity", "columns": ["ssim", "psnr", "images"],
             "rows": [[m["mean"], 14.8, 32]]},
            {"node": node, "title": "Recovery similarity intervals", "columns": ["metric", "mean", "n", "ci_low",
                                                                               "ci_high"],
             "rows": [["ssim", m["mean"], 32, m["ci_low"], m["ci_high"]], ["psnr", 14.8, 32, 14.0, 15.6]]}]


def _record(key: str, counts: dict, files_by_node=None, row=0, wide=0, conventions=None) -> dict:
    tables = []
    for model, (k, n) in counts.items():
        tables += _nudity(f"Concept score ({model})", k, n, per_image=n if model == "recovered" else 0,
                          convention=(conventions or {}).get(model, "unlearndiffatk"))
    tables += _similarity("Similarity to original (recovered)")
    if wide:
        tables.append({"node": "Wide", "title": "wide", "columns": [f"c{i}" for i in range(wide)],
                       "rows": [list(range(wide))]})
    return {"key": key, "status": "ok", "row": row, "overrides": {"Train LoRA.steps": 100 * (row + 1)},
            "labels": {}, "metrics": {"Train LoRA.final_loss": 0.25}, "tables": tables, "seconds": 1.0,
            "server": "embedded", "started": "now", "evaluation": {"prompt": "a photo of a star", "seed": 1},
            "outputs": {"files": [f for fs in (files_by_node or {}).values() for f in fs], "loras": [],
                        "lora_paths": [], "files_by_node": files_by_node or {}}}


def _folder(tmp_path, records):
    store = ResultsStore(tmp_path)
    for r in records:
        store.append(r)
    return tmp_path


def _pngs(folder, name, colors):
    out = []
    for i, c in enumerate(colors):
        p = folder / f"{name}_{i}.png"
        Image.fromarray(np.full((32, 32, 3), c, np.uint8)).save(p)
        out.append(str(p))
    return out


def test_summary_table_answers_with_rates_intervals_and_verdict(tmp_path):
    counts = {"original": (28, 32), "unlearned": (0, 32), "recovered": (12, 32)}
    folder = _folder(tmp_path, [_record("a" * 16, counts), _record("b" * 16, {**counts, "recovered": (1, 32)}, row=1)])
    text = report.write_report(folder, "memora_recovery").read_text()
    summary = markdown_tables(text)[0]
    assert len(summary) == 3 and len(summary[0]) <= 8
    assert summary[0][2:5] == [f"concept rate ({m})" for m in ("original", "unlearned", "recovered")]
    first, second = summary[1], summary[2]
    # 12/32: Wilson 95% interval 0.229-0.547 (Newcombe 1998's method 3 gives the same bounds)
    assert first[4].startswith("0.375 (12/32; 95% CI 0.229-0.547;")
    assert first[3].startswith("0.000 (0/32; 95% CI 0.000-0.107;")
    m = stats.mean_record(SSIM)
    assert "; unlearndiffatk)" in first[4] and first[5] == f"SSIM 0.500 (n=32; 95% CI {m['ci_low']:.3f}-{m['ci_high']:.3f})"
    assert m["ci_low"] < 0.5 < m["ci_high"]
    p = sps.fisher_exact([[12, 20], [0, 32]], alternative="greater").pvalue
    assert first[6].startswith(f"came back: recovered > unlearned (one-sided Fisher p = {p:.2g})") and p < 0.05
    assert "43% of the original's rate" in first[6]
    p2 = sps.fisher_exact([[1, 31], [0, 32]], alternative="greater").pvalue
    assert second[6].startswith(f"not shown to come back: recovered vs unlearned p = {p2:.2g}")
    # a section per job after the summary, in job order
    assert text.index("## job " + "a" * 16) < text.index("## job " + "b" * 16)
    assert text.index("**Did it come back?**") < text.index("## job ")


def test_rates_of_different_conventions_are_not_compared_or_pooled(tmp_path):
    counts = {"original": (28, 32), "unlearned": (0, 32), "recovered": (12, 32)}
    mixed = _record("m" * 16, counts, conventions={"recovered": "erasediff"})
    folder = _folder(tmp_path, [mixed, _record("n" * 16, counts, row=1)])
    summary = markdown_tables(report.write_report(folder, "mixed").read_text())[0]
    assert summary[1][6] == ("not compared: the recovered rate is counted by erasediff and the unlearned one by "
                             "unlearndiffatk (rates of different conventions are not comparable; memora-batch "
                             "rescore counts both by one)")
    assert summary[1][4].endswith("; erasediff)") and "p = " not in summary[1][6]
    assert summary[2][6].startswith("came back: recovered > unlearned")  # one convention: tested
    same_step = [mixed, _record("o" * 16, counts)]  # both at 100 steps, the recovered rates by two conventions
    assert report_html._pooled(same_step, "recovered", None) == {"mixed": ["erasediff", "unlearndiffatk"]}
    assert report_html._pooled(same_step, "unlearned", None) == stats.rate_record(0, 64, "unlearndiffatk")
    assert report_html.recovery_curve(same_step, None, {"steps": [100], "train_node": "Train LoRA"}) is None


def test_the_nodes_own_interval_and_convention_are_used_when_reported(tmp_path):
    rec = _record("c" * 16, {"unlearned": (0, 10), "recovered": (3, 10)})
    rec["tables"][1] = {"node": "Concept score (recovered)", "title": "micro", "columns":
                        ["concept", "rate", "n", "ci_low", "ci_high", "convention"],
                        "rows": [["circle", 0.0, 10, 0.0, 0.28, "micro-top1"], ["star", 0.3, 10, 0.11, 0.6, "micro-top1"]]}
    r = report.rate_of(rec, "recovered", "Concept score (recovered).star.rate")
    assert (r["k"], r["n"], r["ci_low"], r["ci_high"], r["convention"]) == (3, 10, 0.11, 0.6, "micro-top1")
    # without the node's interval: Wilson from the rate and n, by memora.evaluation.stats
    del rec["tables"][1]["columns"][3:5]
    rec["tables"][1]["rows"] = [[c, rate, n, conv] for c, rate, n, _, _, conv in rec["tables"][1]["rows"]]
    r = report.rate_of(rec, "recovered", "Concept score (recovered).star.rate")
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(stats.wilson_interval(3, 10))
    # a node that reports no n: the rate alone, said so
    rec["tables"][1] = {"node": "Concept score (recovered)", "title": "x", "columns": ["concept", "rate"],
                        "rows": [["star", 0.3], ["circle", 0.1]]}
    r = report.rate_of(rec, "recovered", "Concept score (recovered).star.rate")
    assert report.format_rate_cell(r) == "0.300 (n not reported: no interval)"


def test_no_table_is_wider_than_8_columns_and_cut_tables_say_so(tmp_path):
    counts = {"original": (28, 32), "unlearned": (0, 32), "recovered": (12, 32)}
    folder = _folder(tmp_path, [_record("d" * 16, counts, wide=19)])
    text = report.write_report(folder, "wide").read_text()
    tables = markdown_tables(text)
    assert widest(tables) <= 8
    wide_parts = [t for t in tables if t[0][0] == "c0"]
    assert len(wide_parts) == 3  # 19 columns: c0 + 18 others in parts of 7
    assert [c for t in wide_parts for c in t[0][1:]] == [f"c{i}" for i in range(1, 19)]
    assert "Wide: wide (part 1 of 3)" in text
    assert "(first 20 of 32 rows; all of them in results.jsonl)" in text
    per_image = next(t for t in tables if t[0][:2] == ["image", "flagged"])
    assert len(per_image) == 1 + report.MAX_ROWS
    path = report_html.write_html_report(folder, "wide")
    html_text = path.read_text()
    assert html_text.startswith(report_html.SIGNATURE)
    assert widest(html_tables(html_text)) <= 8
    assert len(html_tables(html_text)) == len(tables)  # the same tables in both


def test_html_has_bar_chart_and_grid_of_the_runs_images(tmp_path):
    imgs = tmp_path / "images"
    imgs.mkdir()
    files = {"Save original images": _pngs(imgs, "o", [(255, 0, 0)] * 5),
             "Save unlearned images": _pngs(imgs, "u", [(0, 255, 0)] * 5),
             "Save recovered images": _pngs(imgs, "r", [(0, 0, 255)] * 5),
             "Save seed images": _pngs(imgs, "s", [(9, 9, 9)] * 2)}
    counts = {"original": (28, 32), "unlearned": (0, 32), "recovered": (12, 32)}
    folder = _folder(tmp_path / "res", [_record("e" * 16, counts, files)])
    rec = ResultsStore(folder).latest()[0]
    assert [m for m, _ in report_html.grid_columns(rec)] == ["original", "unlearned", "recovered"]
    b64, caption = report_html.comparison_grid(rec)
    assert "'a photo of a star', seed 1" in caption and "first 4 of 5 images" in caption
    import base64
    import io

    grid = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))
    # every column's tiles in their colour: red, green, blue from left to right
    reds, greens, blues = (np.argwhere(np.all(grid == c, axis=-1))[:, 1] for c in
                           ((255, 0, 0), (0, 255, 0), (0, 0, 255)))
    assert len(reds) and len(greens) and len(blues)
    assert reds.max() < greens.min() and greens.max() < blues.min()
    html_text = report_html.write_html_report(folder, "grid").read_text()
    assert html_text.count("data:image/png;base64,") == 2  # the rate bars and the grid
    assert 'alt="concept rate per model"' in html_text and f'alt="comparison grid {"e" * 16}"' in html_text


def test_a_server_runs_images_elsewhere_or_unreadable_give_a_note_not_a_failure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths resolve against an empty folder, as on a machine beside the server
    counts = {"original": (28, 32), "unlearned": (0, 32), "recovered": (12, 32)}
    remote = {"Save original images": ["memora/o_00001_.png", "memora/o_00002_.png"],
              "Save unlearned images": ["/view?filename=u_00001_.png&type=output"],
              "Save recovered images": ["http://127.0.0.1:8188/view?filename=r_00001_.png&type=output"]}
    folder = _folder(tmp_path / "res", [_record("g" * 16, counts, remote)])
    rec = ResultsStore(folder).latest()[0]
    b64, caption = report_html.comparison_grid(rec)
    assert b64 is None and "are on the server, not on this machine (memora/o_00001_.png" in caption
    html_text = report_html.write_html_report(folder, "server").read_text()
    assert "are on the server, not on this machine" in html_text and "comparison grid" not in html_text
    # local files, one of them not an image: the grid is skipped with the reason, the report still written
    imgs = tmp_path / "images"
    imgs.mkdir()
    broken = imgs / "u_0.png"
    broken.write_bytes(b"not a png")
    local = {"Save original images": _pngs(imgs, "o", [(255, 0, 0)] * 2), "Save unlearned images": [str(broken)]}
    folder2 = _folder(tmp_path / "res2", [_record("h" * 16, counts, local)])
    b64, caption = report_html.comparison_grid(ResultsStore(folder2).latest()[0])
    assert b64 is None and caption.startswith("no grid: an image could not be read or drawn (UnidentifiedImageError")
    assert "no grid: an image could not be read" in report_html.write_html_report(folder2, "broken").read_text()


def test_without_matplotlib_report_md_is_written_and_a_message_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError, as when absent
    folder = _folder(tmp_path, [_record("f" * 16, {"unlearned": (0, 8), "recovered": (2, 8)})])
    md, html_path = report.write_reports(folder, "no matplotlib")
    assert html_path is None and not (folder / "report.html").exists()
    assert md.is_file() and "**Did it come back?**" in md.read_text()
    err = capsys.readouterr().err
    assert "report.html not written" in err and "pip install 'comfyui-memora[report]'" in err


def test_split_table_keeps_every_column_once_and_the_key_in_each_part():
    t = report.Table([f"h{i}" for i in range(15)], [list(range(15)), list(range(100, 115))], "t")
    parts = report.split_table(t)
    assert [len(p.columns) for p in parts] == [8, 8]
    assert all(p.columns[0] == "h0" and [r[0] for r in p.rows] == [0, 100] for p in parts)
    assert sum((p.columns[1:] for p in parts), []) == t.columns[1:]
    assert re.fullmatch(r"t \(part 2 of 2\)", parts[1].title)


def test_a_foreign_report_html_needs_force_and_ours_is_rewritten(tmp_path):
    from memora_batch.folder import FolderNotOurs, ResultsFolder

    (tmp_path / "report.html").write_text("<!DOCTYPE html>\n<p>my notes</p>\n")
    with pytest.raises(FolderNotOurs, match="report.html not written by memora-batch.*--force"):
        with ResultsFolder(tmp_path):
            pass
    assert (tmp_path / "report.html").read_text() == "<!DOCTYPE html>\n<p>my notes</p>\n"
    _folder(tmp_path, [_record("g" * 16, {"unlearned": (0, 8), "recovered": (2, 8)})])
    with ResultsFolder(tmp_path, force=True):
        report_html.write_html_report(tmp_path, "w")
    with ResultsFolder(tmp_path):  # memora-batch's own report.html: resuming needs no --force
        old = os.umask(0o002)
        try:
            path = report_html.write_html_report(tmp_path, "w")
        finally:
            os.umask(old)
    assert path.read_text().startswith(report_html.SIGNATURE) and path.stat().st_mode & 0o777 == 0o664


def test_the_demo_prints_only_this_runs_jobs(tmp_path, capsys):
    """A results folder keeps earlier runs' jobs (a demo run before, with other settings or weights): the closing
    lines print the rows of the jobs given, not every row of the folder."""
    store = ResultsStore(tmp_path)
    for key, rate in (("earlier", 0.0), ("this-run", 0.781)):
        store.append({"key": key, "status": "ok", "row": 0, "overrides": {},
                      "metrics": {"Concept score (recovered).star.rate": rate}, "outputs": {}})
    report.print_where(tmp_path, None, keys=["this-run"])
    out = capsys.readouterr().out
    assert "0.781" in out and "0.0" not in out.replace("0.781", "")
    report.print_where(tmp_path, None)  # without keys: every job, as before
    out = capsys.readouterr().out
    assert "0.781" in out and out.count("Concept score (recovered).star.rate") == 2
