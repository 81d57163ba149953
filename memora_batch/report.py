"""A human-readable summary of a results folder (report.md), and the 'where did everything go' lines."""

from __future__ import annotations

import os
from pathlib import Path

from memora.contracts import EVALUATED_MODELS, TITLE_CONCEPT_SCORE, TITLE_SIMILARITY
from memora.fileio import atomic_write

from .results import ResultsStore, _cell


def write_report(results_dir: "str | Path", title: str) -> Path:
    store = ResultsStore(results_dir)
    rows = store.latest()
    lines = [f"# memora-batch: {title}", "",
             f"{sum(r.get('status') == 'ok' for r in rows)} job(s) ok, "
             f"{sum(r.get('status') != 'ok' for r in rows)} failed. Full records: results.jsonl; table: results.csv.",
             ""]
    metric_cols = list(dict.fromkeys(k for r in rows for k in r.get("metrics", {})))
    override_cols = list(dict.fromkeys(k for r in rows for k in r.get("overrides", {})))
    if rows:
        header = ["job", "status"] + override_cols + metric_cols
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for r in rows:
            cells = [r["key"][:10], r.get("status", "")]
            cells += [str(_cell(r.get("overrides", {}).get(k)))[:40] for k in override_cols]
            cells += [str(_cell(r.get("metrics", {}).get(k))) for k in metric_cols]
            lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
        lines.append("")
    for r in rows:
        lines.append(f"## job {r['key']} ({r.get('status')})")
        if r.get("overrides"):
            lines.append("- inputs: " + ", ".join(f"`{k}` = {v!r}" for k, v in r["overrides"].items()))
        if r.get("labels"):
            lines.append("- labels: " + ", ".join(f"{k} = {v!r}" for k, v in r["labels"].items()))
        for p in r.get("outputs", {}).get("lora_paths", []):
            lines.append(f"- LoRA: {p}")
        files = r.get("outputs", {}).get("files", [])
        if files:
            lines.append(f"- {len(files)} output file(s) in {os.path.dirname(files[0]) or '.'}")
        for t in r.get("tables", []):
            lines.append(f"- {t.get('node')}: {t.get('title', '')}")
            cols = t.get("columns") or []
            lines.append("")
            lines.append("  | " + " | ".join(str(c) for c in cols) + " |")
            lines.append("  |" + "---|" * len(cols))
            for row in (t.get("rows") or [])[:20]:
                lines.append("  | " + " | ".join(str(_cell(v)) for v in row) + " |")
            lines.append("")
        if r.get("error"):
            lines.append(f"- error: {r['error']}")
        lines.append(f"- {r.get('seconds')} s on {r.get('server')}, started {r.get('started')}")
        lines.append("")
    path = Path(results_dir) / "report.md"
    atomic_write(path, "\n".join(lines) + "\n", replace=True)
    return path


def print_where(results_dir: "str | Path", backend, headline=None) -> None:
    """The demo's closing lines: the headline numbers (``headline(metric)`` chooses them; default all) and where the
    LoRA, the images and the report are."""
    rows = ResultsStore(results_dir).latest()
    print("")
    for r in rows:
        shown = {k: v for k, v in r.get("metrics", {}).items() if headline is None or headline(k)}
        shown = dict(sorted(shown.items(), key=lambda kv: _metric_rank(kv[0])))
        if shown:
            width = max(len(k) for k in shown)
            for k, v in shown.items():
                print(f"  {k:<{width}}  {_cell(v)}")
        if r.get("error"):
            first = r["error"].splitlines()[:2]
            print(f"  error:   {' / '.join(first)[:400]} (full text in results.jsonl)")
        outs = r.get("outputs", {})
        for p in outs.get("lora_paths", []):
            print(f"  LoRA:    {p}")
        folders = sorted({os.path.dirname(f) for f in outs.get("files", [])})
        for folder in folders:
            n = sum(os.path.dirname(f) == folder for f in outs.get("files", []))
            print(f"  images:  {folder}/ ({n} files)")
    print(f"  report:  {Path(results_dir) / 'report.md'}")
    print(f"  table:   {Path(results_dir) / 'results.csv'}")


def _metric_rank(metric: str) -> tuple:
    """Scores first, then similarities, then the rest; within each, original, unlearned, recovered."""
    group = 0 if metric.startswith(TITLE_CONCEPT_SCORE) else 1 if metric.startswith(TITLE_SIMILARITY) else 2
    model = next((i for i, m in enumerate(EVALUATED_MODELS) if f"({m})" in metric), 3)
    return (group, model, metric)
