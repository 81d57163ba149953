"""The report of a results folder: did the erased concept come back? report.md (and report.html beside it, drawn by
:mod:`memora_batch.report_html`), and the 'where did everything go' lines the demo prints.

report.md opens with one summary table, a row per job: the concept rate under the original, unlearned and recovered
models (each with its n, Wilson 95 % interval and the convention it was counted by), the recovered model's
similarity to the original's images, and the verdict (is the recovered rate above the unlearned one: one-sided
Fisher exact test). A section per job follows with every node's table. No table is wider than
:data:`MAX_COLUMNS` columns (wider ones are split, the first column repeated); long per-image tables are cut at
:data:`MAX_ROWS` rows and say so. Rates and intervals come from memora.evaluation.stats (the score-table contract:
``rate``, ``n``, ``ci_low``, ``ci_high``, ``convention`` where a node reports them; a Wilson interval from the rate
and n where it reports only those)."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from memora.contracts import (EVALUATED_MODELS, TITLE_CONCEPT_SCORE, TITLE_SIMILARITY, concept_score_title,
                              similarity_title)
from memora.evaluation import stats
from memora.fileio import atomic_write

from .results import ResultsStore, _cell

MAX_COLUMNS = 8
MAX_ROWS = 20
#: the p-value below which the report says the concept came back
ALPHA = 0.05
RATE_NAMES = ("rate", "flagged_rate")
N_NAMES = ("n", "images")
K_NAMES = ("k", "flagged")


# -- the document: blocks that report.md and report.html both render ------------------------------------------------
@dataclass
class Table:
    columns: list
    rows: list
    title: str = ""
    note: str = ""


@dataclass
class Section:
    heading: str
    lines: list = field(default_factory=list)  # text lines (markdown list items without the dash)
    tables: list = field(default_factory=list)
    key: str = ""  # the job key (report.html puts the job's comparison grid here)


def split_table(table: Table, max_columns: int = MAX_COLUMNS) -> list[Table]:
    """A table of at most ``max_columns`` columns per part: wider ones split, each part led by the first column."""
    if len(table.columns) <= max_columns:
        return [table]
    rest = list(range(1, len(table.columns)))
    step = max_columns - 1
    total = (len(rest) + step - 1) // step
    parts = []
    for n, start in enumerate(range(0, len(rest), step), start=1):
        idx = [0] + rest[start:start + step]
        rows = [[r[i] if i < len(r) else "" for i in idx] for r in table.rows]
        parts.append(Table([table.columns[i] for i in idx], rows, f"{table.title} (part {n} of {total})", table.note))
    return parts


# -- reading the rates and similarities of a job ---------------------------------------------------------------------
def _num(v: Any) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(float(v)) else None


def _first(values: dict, names: tuple) -> Any:
    return next((values[n] for n in names if n in values), None)


def _node_values(rec: dict, node: str, row_name: Optional[str]) -> dict:
    """{column: value} of the summary row of ``node``'s tables: the row named ``row_name`` (a per-concept table),
    else the table's only row; the first table that has a rate column wins."""
    for t in rec.get("tables") or []:
        if t.get("node") != node:
            continue
        cols, rows = list(t.get("columns") or []), [r for r in t.get("rows") or [] if isinstance(r, list)]
        if not any(c in cols for c in RATE_NAMES + ("mean", "ssim", "psnr", "clip_cosine")):
            continue
        if row_name is not None:
            rows = [r for r in rows if r and r[0] == row_name]
        if len(rows) == 1:
            return dict(zip(cols, rows[0]))
    # a record without the node's tables (written by an older memora-batch): its flattened metric columns
    prefix = f"{node}.{row_name}." if row_name is not None else f"{node}."
    return {k[len(prefix):]: v for k, v in (rec.get("metrics") or {}).items()
            if k.startswith(prefix) and "." not in k[len(prefix):]}


def concept_row(detector: Optional[str]) -> Optional[str]:
    """'Concept score (recovered).star.rate' -> 'star' (the row of a per-concept table); None for '<node>.rate'."""
    prefix = concept_score_title("recovered") + "."
    if not detector or not detector.startswith(prefix):
        return None
    middle = detector[len(prefix):].rsplit(".", 1)
    return middle[0] if len(middle) == 2 and middle[1] in RATE_NAMES else None


def rate_of(rec: dict, model: str, detector: Optional[str] = None) -> Optional[dict]:
    """The concept rate of ``model`` in one job as a rate record (memora.evaluation.stats), or {'rate': r} alone
    when the node reports no n; None when the job has no concept score for that model."""
    values = _node_values(rec, concept_score_title(model), concept_row(detector))
    rate = _num(_first(values, RATE_NAMES))
    if rate is None:
        return None
    n = _num(_first(values, N_NAMES))
    if not n or n != int(n):
        return {"rate": rate, "convention": values.get("convention")}
    n = int(n)
    k = _num(_first(values, K_NAMES))
    k = int(k) if k is not None and k == int(k) else round(rate * n)
    convention = str(values.get("convention") or "convention not reported")
    out = stats.rate_record(k, n, convention)
    low, high = _num(values.get("ci_low")), _num(values.get("ci_high"))
    if low is not None and high is not None:  # the node's own interval wins (same convention, same maths)
        out.update(ci_low=low, ci_high=high)
    return out


def similarity_of(rec: dict, model: str = "recovered") -> Optional[dict]:
    """{'metric', 'mean', 'n', 'ci_low', 'ci_high'} of the first similarity the node reports (SSIM first)."""
    node = similarity_title(model)
    values = _node_values(rec, node, None)
    for metric in ("ssim", "mean", "clip_cosine", "psnr"):
        mean = _num(values.get(metric))
        if mean is None:
            continue
        values = {**values, **_interval_values(rec, node, metric)}
        low = _num(_first(values, (f"{metric}_ci_low", f"{metric}.ci_low", "ci_low")))
        high = _num(_first(values, (f"{metric}_ci_high", f"{metric}.ci_high", "ci_high")))
        n = _num(_first(values, N_NAMES))
        return {"metric": "SSIM" if metric == "ssim" else metric, "mean": mean, "n": int(n) if n else None,
                "ci_low": low, "ci_high": high}
    return None


def _interval_values(rec: dict, node: str, metric: str) -> dict:
    """{'n', 'ci_low', 'ci_high', ...} of ``metric`` in the node's intervals table (columns metric, mean, n, ci_low,
    ci_high: one row per metric, the similarity node's bootstrap intervals), else from the flattened metric columns
    ``<node>.<metric>.ci_low`` / ``.ci_high`` / ``.n``; {} when the node reports none."""
    for t in rec.get("tables") or []:
        cols = list(t.get("columns") or [])
        if t.get("node") != node or not cols or cols[0] != "metric" or "ci_low" not in cols:
            continue
        rows = [r for r in t.get("rows") or [] if isinstance(r, list) and r and r[0] == metric]
        if len(rows) == 1:
            return {c: v for c, v in zip(cols, rows[0]) if c in ("n", "ci_low", "ci_high")}
    prefix = f"{node}.{metric}."
    return {k[len(prefix):]: v for k, v in (rec.get("metrics") or {}).items()
            if k.startswith(prefix) and k[len(prefix):] in ("n", "ci_low", "ci_high")}


def format_rate_cell(r: Optional[dict]) -> str:
    if r is None:
        return "-"
    if "n" not in r:
        return f"{r['rate']:.3f} (n not reported: no interval)"
    return stats.format_rate(r)


def format_similarity_cell(s: Optional[dict]) -> str:
    if s is None:
        return "-"
    text = f"{s['metric']} {s['mean']:.3f}"
    inner = [f"n={s['n']}"] if s["n"] else []
    if s["ci_low"] is not None and s["ci_high"] is not None:
        inner.append(f"95% CI {s['ci_low']:.3f}-{s['ci_high']:.3f}")
    return text + (f" ({'; '.join(inner)})" if inner else "")


def verdict(rates: dict) -> str:
    """Did the concept come back? The recovered rate against the unlearned one (one-sided Fisher exact test); no
    test between rates of different conventions (the cell says so)."""
    rec, unl, orig = rates.get("recovered"), rates.get("unlearned"), rates.get("original")
    if rec is None or unl is None:
        return "no concept score for the unlearned and recovered models"
    if rec.get("convention") != unl.get("convention"):
        return (f"not compared: the recovered rate is counted by {rec.get('convention') or 'no named convention'} "
                f"and the unlearned one by {unl.get('convention') or 'no named convention'} (rates of different "
                f"conventions are not comparable; memora-batch rescore counts both by one)")
    share = ""
    if orig is not None and orig["rate"] > 0 and orig.get("convention") == rec.get("convention"):
        share = f"; {rec['rate'] / orig['rate']:.0%} of the original's rate"
    if "n" not in rec or "n" not in unl:
        word = "higher" if rec["rate"] > unl["rate"] else "not higher"
        return f"recovered rate {word} than unlearned (untested: no n reported){share}"
    p = stats.fisher_greater(rec["k"], rec["n"], unl["k"], unl["n"])
    if p < ALPHA:
        return f"came back: recovered > unlearned (one-sided Fisher p = {p:.2g}){share}"
    return f"not shown to come back: recovered vs unlearned p = {p:.2g} (one-sided Fisher){share}"


@dataclass
class JobSummary:
    record: dict
    rates: dict  # model -> rate record or None
    similarity: Optional[dict]
    verdict: str

    @property
    def key(self) -> str:
        return self.record["key"]


def summarize(rows: list[dict], detector: Optional[str] = None) -> list[JobSummary]:
    out = []
    for r in rows:
        rates = {m: rate_of(r, m, detector) for m in EVALUATED_MODELS}
        first = ((r.get("error") or "").strip().splitlines() or ["no message"])[0][:200]
        text = verdict(rates) if r.get("status") == "ok" else f"failed: {first}"
        out.append(JobSummary(r, rates, similarity_of(r), text))
    return out


def job_inputs(rec: dict, limit: int = 60) -> str:
    """The job's sweep values, short ('Train LoRA.steps=100'); '-' for none."""
    items = {**{k: v for k, v in (rec.get("labels") or {}).items()}, **(rec.get("overrides") or {})}
    text = ", ".join(f"{k}={v}" for k, v in items.items())
    return (text[:limit - 3] + "...") if len(text) > limit else (text or "-")


# -- the document ----------------------------------------------------------------------------------------------------
def summary_table(jobs: list[JobSummary]) -> Table:
    cols = ["job", "inputs"] + [f"concept rate ({m})" for m in EVALUATED_MODELS] + \
        ["similarity to original (recovered)", "verdict"]
    rows = [[j.key[:10], job_inputs(j.record)] + [format_rate_cell(j.rates[m]) for m in EVALUATED_MODELS]
            + [format_similarity_cell(j.similarity), j.verdict] for j in jobs]
    return Table(cols, rows, "Did it come back?",
                 "Rate: share of images where the detector finds the concept (k/n; Wilson 95% interval; the "
                 "convention it was counted by). Verdict: recovered against unlearned, one-sided Fisher exact test "
                 f"at p < {ALPHA}.")


def node_tables(rec: dict) -> list[Table]:
    out = []
    for t in rec.get("tables") or []:
        rows = [list(r) if isinstance(r, (list, tuple)) else [r] for r in t.get("rows") or []]
        note = f"first {MAX_ROWS} of {len(rows)} rows; all of them in results.jsonl" if len(rows) > MAX_ROWS else ""
        table = Table([str(c) for c in t.get("columns") or []], [[_cell(v) for v in r] for r in rows[:MAX_ROWS]],
                      _table_title(t), note)
        out.extend(split_table(table))
    return out


def _table_title(t: dict) -> str:
    """'<node title>: <table title>', the node title alone where the table repeats it (or the table title where it
    already starts with the node's)."""
    node, title = str(t.get("node") or ""), str(t.get("title") or "")
    if title in ("", node):
        return node
    return title if title.startswith(node + ": ") else f"{node}: {title}"


def job_section(j: JobSummary) -> Section:
    r = j.record
    sec = Section(f"job {r['key']} ({r.get('status')})", key=r["key"])
    if r.get("overrides"):
        sec.lines.append("inputs: " + ", ".join(f"`{k}` = {v!r}" for k, v in r["overrides"].items()))
    if r.get("labels"):
        sec.lines.append("labels: " + ", ".join(f"{k} = {v!r}" for k, v in r["labels"].items()))
    ev = r.get("evaluation") or {}
    if ev:
        sec.lines.append("evaluated with " + ", ".join(f"{k} {v!r}" for k, v in ev.items()))
    sec.lines.append(f"verdict: {j.verdict}")
    for p in r.get("outputs", {}).get("lora_paths", []):
        sec.lines.append(f"LoRA: {p}")
    files = r.get("outputs", {}).get("files", [])
    if files:
        sec.lines.append(f"{len(files)} output file(s) in {os.path.dirname(files[0]) or '.'}")
    if r.get("error"):
        sec.lines.append(f"error: {r['error']}")
    sec.lines.append(f"{r.get('seconds')} s on {r.get('server')}, started {r.get('started')}")
    shown = {f"{t.get('node')}." for t in r.get("tables") or []}
    rest = [[k, _cell(v)] for k, v in (r.get("metrics") or {}).items() if not any(k.startswith(s) for s in shown)]
    if rest:
        sec.tables.append(Table(["metric", "value"], rest, "Other figures"))
    sec.tables.extend(node_tables(r))
    return sec


def build(results_dir: "str | Path", title: str, detector: Optional[str] = None):
    """(intro lines, summary table, job summaries, job sections) of a results folder."""
    rows = ResultsStore(results_dir).latest()
    jobs = summarize(rows, detector)
    intro = [f"{sum(r.get('status') == 'ok' for r in rows)} job(s) ok, {sum(r.get('status') != 'ok' for r in rows)} "
             f"failed. Full records: results.jsonl; table: results.csv; pictures: report.html."]
    return intro, summary_table(jobs), jobs, [job_section(j) for j in jobs]


def _md_cell(v: Any) -> str:
    return str(v).replace("|", "/").replace("\n", " ")


def markdown_table(t: Table) -> list[str]:
    assert len(t.columns) <= MAX_COLUMNS, t.columns
    lines = [f"**{t.title}**", ""] if t.title else []
    lines.append("| " + " | ".join(_md_cell(c) for c in t.columns) + " |")
    lines.append("|" + "---|" * len(t.columns))
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    if t.note:
        lines += ["", f"({t.note})"]
    return lines + [""]


def write_report(results_dir: "str | Path", title: str, detector: Optional[str] = None) -> Path:
    intro, summary, _, sections = build(results_dir, title, detector)
    lines = [f"# memora-batch: {title}", "", *intro, ""] + markdown_table(summary)
    for sec in sections:
        lines += [f"## {sec.heading}", ""] + [f"- {x}" for x in sec.lines] + [""]
        for t in sec.tables:
            lines += markdown_table(t)
    path = Path(results_dir) / "report.md"
    atomic_write(path, "\n".join(lines) + "\n", replace=True)
    return path


def write_reports(results_dir: "str | Path", title: str, detector: Optional[str] = None,
                  curve: Optional[dict] = None) -> list[Path]:
    """report.md, then report.html (None in the list, with a message on stderr, when matplotlib is missing)."""
    from .report_html import write_html_report

    md = write_report(results_dir, title, detector)
    return [md, write_html_report(results_dir, title, detector, curve)]


# -- the demo's closing lines ----------------------------------------------------------------------------------------
def print_where(results_dir: "str | Path", backend, headline=None, keys=None) -> None:
    """The demo's closing lines: the headline numbers (``headline(metric)`` chooses them; default all) and where the
    LoRA, the images and the report are. ``keys``: only the jobs with these keys (this run's; the results folder
    also holds earlier runs' jobs, e.g. a demo run before with other settings)."""
    rows = ResultsStore(results_dir).latest()
    if keys is not None:
        wanted = set(keys)
        rows = [r for r in rows if r.get("key") in wanted]
    print("")
    for r in rows:
        shown = {k: v for k, v in r.get("metrics", {}).items() if headline is None or headline(k)}
        shown = _rates_on_one_line(shown, r.get("metrics", {}))
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
    if (Path(results_dir) / "report.html").is_file():
        print(f"  html:    {Path(results_dir) / 'report.html'}")
    print(f"  table:   {Path(results_dir) / 'results.csv'}")


def _rates_on_one_line(shown: dict, metrics: dict) -> dict:
    """``<score>.rate`` with its ``.n`` / ``.ci_low`` / ``.ci_high`` / ``.convention`` (and ``.k``) as one value,
    '0.250 (8/32; 95% CI 0.133-0.421; micro-top1)', the other four lines dropped."""
    out = dict(shown)
    for key in [k for k in shown if k.endswith(".rate")]:
        base = key[:-len(".rate")]
        parts = {c: metrics.get(f"{base}.{c}") for c in ("n", "ci_low", "ci_high", "convention", "k")}
        rate, n = metrics.get(key), parts["n"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (rate, n, parts["ci_low"],
                                                                                     parts["ci_high"])) \
                or not isinstance(parts["convention"], str) or n < 1:
            continue
        k = parts["k"] if isinstance(parts["k"], (int, float)) else round(rate * n)
        out[key] = stats.format_rate({"rate": rate, "k": int(k), "n": int(n), "ci_low": parts["ci_low"],
                                      "ci_high": parts["ci_high"], "confidence": stats.CONFIDENCE,
                                      "convention": parts["convention"]})
        for c in ("n", "ci_low", "ci_high", "convention", "k"):
            out.pop(f"{base}.{c}", None)
    return out


def _metric_rank(metric: str) -> tuple:
    """Scores first, then similarities, then the rest; within each, original, unlearned, recovered."""
    group = 0 if metric.startswith(TITLE_CONCEPT_SCORE) else 1 if metric.startswith(TITLE_SIMILARITY) else 2
    model = next((i for i, m in enumerate(EVALUATED_MODELS) if f"({m})" in metric), 3)
    return (group, model, metric)


def model_of_title(title: str) -> Optional[str]:
    """The evaluated model a node title names ('Save recovered images' -> 'recovered')."""
    return next((m for m in EVALUATED_MODELS if re.search(rf"\b{m}\b", title)), None)
