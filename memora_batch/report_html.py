"""report.html: report.md's tables with the pictures. One self-contained file (images embedded) beside report.md:
the summary table, the recovery curve with its interval bands (curve runs), a bar chart of the concept rate per model
and job with Wilson intervals, then a section per job with its comparison grid (original | unlearned | recovered,
same prompt and seed, drawn from the images the run wrote, by memora.evaluation.grid) and its node tables.

The charts need matplotlib (the ``report`` extra: ``pip install 'comfyui-memora[report]'``); without it report.html
is not written, a message says so, and report.md still is."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import sys
from pathlib import Path
from typing import Optional

from memora.contracts import EVALUATED_MODELS
from memora.evaluation import stats
from memora.fileio import atomic_write

from . import report as _report
from .folder import DERIVED_SIGNATURES

#: report.html begins so (memora_batch.folder recognises its own derived files by their beginning)
SIGNATURE = DERIVED_SIGNATURES["report.html"]
GRID_ROWS = 4
GRID_CELL = 160
MAX_BAR_JOBS = 12
MISSING_MATPLOTLIB = ("memora-batch: report.html not written: its charts need matplotlib, which is not installed "
                      "(pip install 'comfyui-memora[report]', or pip install matplotlib); report.md has the same "
                      "tables")
COLORS = {"original": "#4c72b0", "unlearned": "#c44e52", "recovered": "#55a868"}


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(b64: str, alt: str, caption: str) -> str:
    return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(t: _report.Table) -> str:
    assert len(t.columns) <= _report.MAX_COLUMNS, t.columns
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in t.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>" for r in t.rows)
    title = f"<caption>{html.escape(t.title)}</caption>" if t.title else ""
    note = f'<p class="note">({html.escape(t.note)})</p>' if t.note else ""
    return f"<table>{title}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"


# -- charts ----------------------------------------------------------------------------------------------------------
def rate_bars(jobs: list) -> Optional[str]:
    """Grouped bars: the concept rate of each model per job, Wilson 95 % intervals as error bars."""
    import matplotlib.pyplot as plt
    import numpy as np

    scored = [j for j in jobs if any(j.rates[m] for m in EVALUATED_MODELS)]
    jobs = scored[:MAX_BAR_JOBS]
    if not jobs:
        return None
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(jobs) + 1.5), 3.2))
    x = np.arange(len(jobs))
    width = 0.26
    for i, m in enumerate(EVALUATED_MODELS):
        vals = [j.rates[m]["rate"] if j.rates[m] else np.nan for j in jobs]
        low = [v - j.rates[m]["ci_low"] if j.rates[m] and "ci_low" in j.rates[m] else 0 for v, j in zip(vals, jobs)]
        high = [j.rates[m]["ci_high"] - v if j.rates[m] and "ci_high" in j.rates[m] else 0
                for v, j in zip(vals, jobs)]
        errors = [low, high] if any(low) or any(high) else None
        ax.bar(x + (i - 1) * width, vals, width, yerr=errors, capsize=3, label=m, color=COLORS[m])
    ax.set_xticks(x, [f"{j.key[:8]}\n{_report.job_inputs(j.record, 24)}" for j in jobs], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("concept rate")
    counted = all("n" in j.rates[m] for j in jobs for m in EVALUATED_MODELS if j.rates[m])
    ax.set_title("Concept rate per model" + (" (bars: Wilson 95% interval)" if counted else " (no n: no interval)")
                 + (f"\nthe first {len(jobs)} of {len(scored)} jobs" if len(scored) > len(jobs) else ""))
    ax.legend(fontsize=8)
    return _png(fig)


def _pooled(records: list, model: str, detector: Optional[str]) -> Optional[dict]:
    """The rate of ``model`` pooled over records (sum k / sum n) as a rate record; None without counts;
    ``{"mixed": [conventions]}`` when the records' rates were counted by different conventions (never pooled)."""
    rates = [_report.rate_of(r, model, detector) for r in records]
    rates = [r for r in rates if r is not None]
    if not rates:
        return None
    convs = sorted({str(r.get("convention")) for r in rates})
    if len(convs) > 1:
        return {"mixed": convs}
    if all("n" in r for r in rates):
        convention = rates[0]["convention"]
        return stats.rate_record(sum(r["k"] for r in rates), sum(r["n"] for r in rates), convention)
    return {"rate": sum(r["rate"] for r in rates) / len(rates)}


def recovery_curve(records: list, detector: Optional[str], curve: dict) -> Optional[str]:
    """The recovered model's concept rate (and the similarity) over LoRA training steps, with interval bands: a
    Wilson interval of the counts pooled over the rows of each step count (bootstrap over the rows' similarities)."""
    import matplotlib.pyplot as plt

    steps, node = curve.get("steps") or [], curve.get("train_node")
    ok = [r for r in records if r.get("status") == "ok"]
    if curve.get("label_model"):  # a curve with a control: only the model under test makes the curve
        ok = [r for r in ok if (r.get("labels") or {}).get(curve["label_model"], curve.get("tested")) ==
              curve.get("tested")]
    at = {s: [r for r in ok if _step_of(r, node, curve.get("label_updates")) == s] for s in steps}
    points = [(s, _pooled(at[s], "recovered", detector)) for s in steps if at[s]]
    mixed = [s for s, p in points if p is not None and "mixed" in p]
    points = [(s, p) for s, p in points if p is not None and "mixed" not in p]
    if not points:
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9.5, 3.2))
    fig.subplots_adjust(wspace=0.35)
    xs = [s for s, _ in points]
    ax.plot(xs, [p["rate"] for _, p in points], "o-", color=COLORS["recovered"], label="recovered")
    if all("ci_low" in p for _, p in points):
        ax.fill_between(xs, [p["ci_low"] for _, p in points], [p["ci_high"] for _, p in points],
                        color=COLORS["recovered"], alpha=0.2, label="Wilson 95% interval")
    for m in ("original", "unlearned"):
        ref = _pooled(ok, m, detector)
        if ref is not None and ref.get("convention") == points[0][1].get("convention"):
            ax.axhline(ref["rate"], ls="--", color=COLORS[m], label=f"{m} ({ref['rate']:.2f})")
    ax.set_xlabel("LoRA training steps")
    ax.set_ylabel("concept rate")
    ax.set_ylim(0, 1.05)
    if mixed:
        ax.set_title(f"Recovery curve\nnot drawn at steps {', '.join(map(str, mixed))}: rates of different "
                     f"conventions", fontsize=9)
    else:
        ax.set_title("Recovery curve")
    ax.legend(fontsize=7)
    sims = [(s, [x["mean"] for x in (_report.similarity_of(r) for r in at[s]) if x]) for s in steps if at[s]]
    sims = [(s, v) for s, v in sims if v]
    if sims:
        means = [sum(v) / len(v) for _, v in sims]
        ax2.plot([s for s, _ in sims], means, "o-", color="#8172b2")
        bands = [stats.bootstrap_mean_interval(v) for _, v in sims]
        if all(b[0] is not None for b in bands):
            ax2.fill_between([s for s, _ in sims], [b[0] for b in bands], [b[1] for b in bands], color="#8172b2",
                             alpha=0.2, label="bootstrap 95% interval over rows")
            ax2.legend(fontsize=7)
    ax2.set_xlabel("LoRA training steps")
    ax2.set_ylabel("recovered vs original")
    kinds = {x["metric"] for r in ok for x in [_report.similarity_of(r)] if x}
    ax2.set_title(f"Similarity ({', '.join(sorted(kinds)) or 'none reported'}; mean over each step's rows)")
    return _png(fig)


def _step_of(rec: dict, node: Optional[str], label: Optional[str] = None) -> Optional[int]:
    """The LoRA updates behind a curve job: its label (a snapshot's evaluation job loads the file, no training
    node) or the training node's steps."""
    v = (rec.get("labels") or {}).get(label) if label else None
    v = v if v is not None else (rec.get("overrides") or {}).get(f"{node}.steps")
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


# -- comparison grids ------------------------------------------------------------------------------------------------
#: an image file by its extension, also inside a server's URL (/view?filename=x.png&type=output)
IMAGE_NAME = re.compile(r"\.(png|jpe?g|webp)(?=$|[&#?])", re.IGNORECASE)


def grid_columns(rec: dict) -> list[tuple[str, list[str]]]:
    """[(model, image files)] of the evaluated models whose images the job saved, in the order original, unlearned,
    recovered (the nodes whose title names the model: 'Save recovered images')."""
    by_node = (rec.get("outputs") or {}).get("files_by_node") or {}
    found: dict[str, list[str]] = {}
    for title, files in by_node.items():
        model = _report.model_of_title(title)
        images = [f for f in files if IMAGE_NAME.search(str(f))]
        if model and images and (model not in found or title.lower().startswith("save")):
            found[model] = images
    return [(m, found[m]) for m in EVALUATED_MODELS if m in found]


def comparison_grid(rec: dict) -> Optional[tuple[Optional[str], str]]:
    """(base64 PNG, caption) of the job's grid; None when it saved fewer than two models' images. The grid is drawn
    from the files on this machine only: a server backend's files may be elsewhere (relative paths, /view URLs), and
    an unreadable file is no reason to fail the report: then (None, a caption saying why no grid was drawn)."""
    from memora.evaluation.grid import comparison_grid as draw

    saved = grid_columns(rec)
    if len(saved) < 2:
        return None
    cols = [(m, [f for f in files if _local_file(f)]) for m, files in saved]
    cols = [(m, files) for m, files in cols if files]
    if len(cols) < 2:
        return None, (f"no grid: the images of {', '.join(m for m, _ in saved)} are on the server, not on this "
                      f"machine ({saved[0][1][0]}, ...)")
    ev = rec.get("evaluation") or {}
    counts = sorted({len(files) for _, files in cols})
    caption = (f"same prompt and seed in every column; the first {min(GRID_ROWS, counts[0])} of "
               f"{'/'.join(map(str, counts))} images")
    if ev:
        caption = f"prompt {ev.get('prompt', '?')!r}, seed {ev.get('seed', '?')}; " + caption
    try:
        columns = [(model, _read_images(files[:GRID_ROWS])) for model, files in cols]
        picture = draw(columns, caption=caption, rows=GRID_ROWS, cell=GRID_CELL)
    except (OSError, ValueError) as e:
        return None, f"no grid: an image could not be read or drawn ({type(e).__name__}: {e})"
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii"), caption


def _local_file(name: str) -> bool:
    """Whether ``name`` is a file on this machine (not a server's /view URL or a path relative to its folders)."""
    try:
        return "://" not in name and not name.startswith("/view") and Path(name).is_file()
    except (OSError, ValueError):
        return False


def _read_images(files: list) -> list:
    from PIL import Image

    images = []
    for f in files:
        with Image.open(f) as im:
            images.append(im.convert("RGB"))
    return images


STYLE = """body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #bbb;padding:3px 8px;font-size:13px;text-align:left;vertical-align:top}
caption{text-align:left;font-weight:bold;padding:4px 0}.note{font-size:12px;color:#555}
figure{margin:1em 0}figcaption{font-size:12px;color:#333}img{max-width:100%}"""


def write_html_report(results_dir: "str | Path", title: str, detector: Optional[str] = None,
                      curve: Optional[dict] = None) -> Optional[Path]:
    """Write report.html; None (and the message on stderr) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
    except ImportError:
        print(MISSING_MATPLOTLIB, file=sys.stderr, flush=True)
        return None
    intro, summary, jobs, sections = _report.build(results_dir, title, detector)
    parts = [SIGNATURE, f"<html><head><meta charset='utf-8'><title>memora-batch: {html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>memora-batch: {html.escape(title)}</h1>"]
    parts += [f"<p>{html.escape(x)}</p>" for x in intro]
    parts.append(_table(summary))
    if curve:
        verdict = _curve_verdict(Path(results_dir) / "curve.json")
        b64 = recovery_curve([j.record for j in jobs], detector, curve)
        if b64:
            parts.append("<h2>Recovery curve</h2>" + _img(b64, "recovery curve", verdict or "recovery curve"))
    from .scoreboard import html_section

    board = html_section(results_dir)  # memora-batch scoreboard's chart and table
    if board:
        parts.append(board)
    bars = rate_bars(jobs)
    if bars:
        counted = all("n" in r for j in jobs for r in j.rates.values() if r)
        parts.append("<h2>Concept rate per model</h2>" + _img(bars, "concept rate per model", "Concept rate of the "
                     "original, unlearned and recovered models per job; " + (
                         "error bars: Wilson 95% interval." if counted else "no interval: the detector reports "
                         "no n.")))
    for sec in sections:
        parts.append(f'<h2 id="job-{html.escape(sec.key)}">{html.escape(sec.heading)}</h2>')
        parts.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in sec.lines) + "</ul>")
        job = next(j for j in jobs if j.key == sec.key)
        grid = comparison_grid(job.record)
        if grid and grid[0]:
            parts.append(_img(grid[0], f"comparison grid {sec.key}", "original | unlearned | recovered: " + grid[1]))
        elif grid:
            parts.append(f'<p class="note">{html.escape(grid[1])}</p>')
        parts += [_table(t) for t in sec.tables]
    parts.append("</body></html>")
    path = Path(results_dir) / "report.html"
    atomic_write(path, "\n".join(parts) + "\n", replace=True)
    return path


def _curve_verdict(path: Path) -> Optional[str]:
    """The verdict text memora-batch curve wrote into curve.json (None when absent or unreadable)."""
    try:
        v = json.loads(path.read_text(encoding="utf-8")).get("verdict")
    except (OSError, ValueError, AttributeError):
        return None
    return v.get("text") if isinstance(v, dict) else None
