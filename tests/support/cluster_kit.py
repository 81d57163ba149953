"""Helpers of the cluster tier (tests/cluster): the jobs it runs and how it reads their results."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = str(ROOT / "example_workflows" / "recovery_sweep.json")
# Four jobs, two groups that share their upstream work (the concept prompt feeds the seed images and inversion;
# the evaluation seed only the evaluation).
SWEEP_ROWS = [(concept, seed) for concept in ("a photo of the nude person", "a nude figure") for seed in (1, 2)]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def batch_args(out: Path, sweep: Path, *extra: str) -> list[str]:
    return ["run", WORKFLOW, "--models", "micro", "--quick", "--sweep", str(sweep), "--out", str(out),
            "--no-progress", *extra]
