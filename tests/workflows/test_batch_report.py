"""The report of a real `memora-batch curve` run (recovery_sweep.json on the tiny checkpoint, NudeNet as the
detector, which reports its counts): report.md's summary has a row per job with each model's rate as k/n with its
Wilson interval (memora.evaluation.stats) and the Fisher verdict; report.html has the same tables (none wider than
8 columns), the recovery curve with its interval band and the bar chart."""

from __future__ import annotations

import json
from pathlib import Path

from report_tables import html_tables, markdown_tables, widest

from memora.evaluation import stats
from memora_batch import cli

ROOT = Path(__file__).resolve().parents[2]


def test_curve_report_has_counts_intervals_and_the_curve(comfy, tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "curve"
    rc = cli.main(["curve", str(ROOT / "example_workflows" / "recovery_sweep.json"), "--steps", "1,2",
                   "--original", tiny_ckpt, "--unlearned", tiny_ckpt, "--quick", "--out", str(out),
                   "--no-progress"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert f"report:  {out / 'report.md'} and {out / 'report.html'}" in printed.out
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["status"] == "ok" for r in records)
    assert sorted(r["labels"]["updates"] for r in records) == [1, 2]
    md = (out / "report.md").read_text()
    tables = markdown_tables(md)
    assert widest(tables) <= 8
    header, *rows = tables[0]
    assert len(rows) == 2
    for rec in records:
        row = dict(zip(header, next(r for r in rows if r[0] == rec["key"][:10])))
        # one training to 2 updates (snapshot at 1), then the snapshot's evaluation job: each row names its budget
        assert f"updates={rec['labels']['updates']}" in row["inputs"]
        for model in ("original", "unlearned", "recovered"):
            (summary,) = [t for t in rec["tables"] if t["node"] == f"Concept score ({model})"
                          and t["title"] == "Nudity (NudeNet)"]
            cell = dict(zip(summary["columns"], summary["rows"][0]))
            expected = {**stats.rate_record(cell["k"], cell["n"], cell["convention"]),
                        "ci_low": cell["ci_low"], "ci_high": cell["ci_high"]}
            assert cell["convention"] == "unlearndiffatk"
            assert row[f"concept rate ({model})"] == stats.format_rate(expected)
        unl, reco = (dict(zip(t["columns"], t["rows"][0])) for m in ("unlearned", "recovered")
                     for t in rec["tables"] if t["node"] == f"Concept score ({m})" and t["title"] == "Nudity (NudeNet)")
        p = stats.fisher_greater(reco["k"], reco["n"], unl["k"], unl["n"])
        assert f"p = {p:.2g}" in row["verdict"]
    html = (out / "report.html").read_text()
    assert widest(html_tables(html)) <= 8 and len(html_tables(html)) == len(tables)
    assert 'alt="recovery curve"' in html and 'alt="concept rate per model"' in html
    verdict = json.loads((out / "curve.json").read_text())["verdict"]["text"]
    assert verdict.splitlines()[0] in html  # the curve's caption is the verdict curve.json holds
