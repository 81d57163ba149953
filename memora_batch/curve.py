"""``memora-batch curve``: a recovery curve over LoRA training steps, and the short-term / long-term verdict.

Each step count is one job per sweep row (the row's evaluation prompt, seed, guidance); the detector score and the
similarity to the original model are averaged over the rows of each step count, and the curve goes to
``memora.evaluation.forgetting`` for the verdict (its rule and thresholds are printed with it)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from .results import ResultsStore, _atomic_write


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
    records = [r for r in ResultsStore(results_dir).latest() if r.get("status") == "ok"]
    columns = list(dict.fromkeys(k for r in records for k in r.get("metrics", {})))
    det = pick_metric(columns, detector, DETECTOR_HINTS, avoid=("original", "unlearned"))
    sim = pick_metric(columns, similarity, SIMILARITY_HINTS, avoid=("unlearned",))
    det_curve = aggregate(records, train_node, steps, det)
    sim_curve = aggregate(records, train_node, steps, sim)
    print("")
    print(f"recovery curve ({len(records)} ok job(s)); detector: {det or '(none found)'}; "
          f"similarity: {sim or '(none found)'}")
    print(f"  {'steps':>6}  {'detector':>9}  {'similarity':>10}")
    for s, d, m in zip(steps, det_curve, sim_curve):
        print(f"  {s:>6}  {_fmt(d):>9}  {_fmt(m):>10}")
    verdict = _verdict(steps, det_curve, sim_curve)
    payload = {"steps": steps, "detector_metric": det, "similarity_metric": sim, "detector": det_curve,
               "similarity": sim_curve, "verdict": verdict}
    _atomic_write(Path(results_dir) / "curve.json", json.dumps(payload, indent=2, default=str) + "\n")
    if verdict is None:
        print("  verdict: not available (memora.evaluation.forgetting is not installed)")
        return 0
    print("")
    print(verdict.get("text") or json.dumps(verdict, indent=2, default=str))
    print(f"\n  curve and verdict: {Path(results_dir) / 'curve.json'}")
    return 0


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.4g}"


def _verdict(steps, det_curve, sim_curve) -> Optional[dict]:
    try:
        from memora.evaluation import forgetting  # noqa: F401
    except ImportError:
        return None
    return None
