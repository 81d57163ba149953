"""``memora-batch curve``: a recovery curve over LoRA training steps, and the short-term / long-term verdict.

Each step count is one job per sweep row (the row's evaluation prompt, seed, guidance); the detector score and the
similarity to the original model are averaged over the rows of each step count, and the curve goes to
``memora.evaluation.forgetting`` for the verdict (its rule and thresholds are printed with it)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from memora.fileio import atomic_write

from .results import ResultsStore


def curve_rows(train_node: str, steps: list[int]) -> list[dict]:
    return [{f"{train_node}.steps": s} for s in steps]


def pick_metric(columns: list[str], wanted: Optional[str], hints: tuple[str, ...], avoid: tuple[str, ...] = ()) -> Optional[str]:
    if wanted:
        if wanted in columns:
            return wanted
        raise ValueError(f"metric {wanted!r} not in the results; metrics: {', '.join(columns) or '(none)'}")
    for hint in hints:
        for c in columns:
            low = c.lower()
            if all(h in low for h in hint.split("+")) and not any(a in low for a in avoid):
                return c
    return None


def check_metric_names(plan, given: dict) -> None:
    """ValueError before any job runs when a metric named on the command line (``{option: name}``) cannot be a
    column of this workflow's results: a column is ``<node title>.<name>``, so the name must begin with one of the
    workflow's node titles (or ids) followed by a dot and the score's name."""
    job = plan.jobs[0] if plan.jobs else None
    if job is None:
        return
    titles = sorted({str(job.titles.get(str(nid), nid)) for nid in job.api})
    for option, name in given.items():
        if name is None:
            continue
        if not any(name.startswith(t + ".") and len(name) > len(t) + 1 for t in titles):
            raise ValueError(f"{option} {name!r}: expected '<node title>.<score>' naming a node of this workflow "
                             f"(e.g. 'Concept score (recovered).rate'); node titles: {', '.join(titles)}")


DETECTOR_HINTS = ("recovered+rate", "recovered+score", "recovered+detect", "rate")
SIMILARITY_HINTS = ("recovered+ssim", "ssim", "similarity", "psnr")


def aggregate(records: list[dict], train_node: str, steps: list[int], metric: Optional[str]) -> list[Optional[float]]:
    """Mean of ``metric`` over the ok jobs of each step count (None where there is none)."""
    out = []
    for s in steps:
        vals = []
        for r in records:
            if r.get("status") != "ok" or metric is None:
                continue
            if int(r.get("overrides", {}).get(f"{train_node}.steps", -1)) != s:
                continue
            v = r.get("metrics", {}).get(metric)
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                vals.append(float(v))
        out.append(sum(vals) / len(vals) if vals else None)
    return out


def print_verdict(results_dir: "str | Path", train_node: str, steps: list[int], detector: Optional[str],
                  similarity: Optional[str]) -> int:
    """Aggregate the curve from the results, print it with the verdict, write curve.json. Returns the exit status."""
    records = [r for r in ResultsStore(results_dir).latest() if r.get("status") == "ok"]
    if not records:
        print("\nrecovery curve: no finished jobs to judge (every job failed or none ran); see results.csv")
        return 0
    columns = list(dict.fromkeys(k for r in records for k in r.get("metrics", {})))
    det = pick_metric(columns, detector, DETECTOR_HINTS, avoid=("original", "unlearned"))
    sim = pick_metric(columns, similarity, SIMILARITY_HINTS, avoid=("unlearned",))
    det_curve = aggregate(records, train_node, steps, det)
    sim_curve = aggregate(records, train_node, steps, sim)
    # The original and unlearned models' scores (same prompts and seeds) anchor the recovery scale when present.
    ref = _mean_over(records, _sibling(det, columns, "original"))
    base = _mean_over(records, _sibling(det, columns, "unlearned"))
    metric = _similarity_kind(sim)
    print("")
    print(f"recovery curve over {len(records)} finished job(s); detector: {det or '(none found)'}; "
          f"similarity: {sim or '(none found)'}")
    try:
        from memora.evaluation.forgetting import verdict
    except ImportError:  # pragma: no cover - the pack ships it
        verdict = None
    result = None
    if det is None:
        print("  no detector metric in the results: give --detector <metric column> (see results.csv)")
    elif verdict is not None:
        kwargs = {"similarity_metric": metric}
        if ref is not None and base is not None and ref > base:
            kwargs.update(reference_score=ref, baseline_score=base)
        elif base is not None and base < 1.0:
            kwargs.update(baseline_score=base)
        result = verdict({"steps": steps, "score": det_curve, "similarity": sim_curve}, **kwargs)
        print(result["text"])
    payload = {"steps": steps, "detector_metric": det, "similarity_metric": sim, "detector": det_curve,
               "similarity": sim_curve, "reference_score": ref, "baseline_score": base, "verdict": result}
    out = Path(results_dir) / "curve.json"
    atomic_write(out, json.dumps(payload, indent=2, default=str) + "\n", replace=True)
    print(f"\n  curve and verdict: {out}")
    return 0


def _sibling(metric: Optional[str], columns: list[str], which: str) -> Optional[str]:
    """'Concept score (recovered).rate' -> 'Concept score (original).rate' when that column exists."""
    if not metric or "recovered" not in metric:
        return None
    cand = metric.replace("recovered", which)
    return cand if cand in columns else None


def _mean_over(records: list[dict], metric: Optional[str]) -> Optional[float]:
    if metric is None:
        return None
    vals = [float(r["metrics"][metric]) for r in records if isinstance(r.get("metrics", {}).get(metric), (int, float))]
    vals = [v for v in vals if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def _similarity_kind(column: Optional[str]) -> str:
    low = (column or "").lower()
    for kind in ("clip_cosine", "psnr", "ssim"):
        if kind in low:
            return kind
    return "ssim"

