"""The cluster tier: memora-batch on a real Ray cluster (two `ray start` nodes on this machine) and on submitit's
local executor, checked against the embedded run of the same jobs. Slow to start (Ray nodes, one ComfyUI per
worker): run once, with the first ComfyUI checkout (tests/run_matrix.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cluster_kit import SWEEP_ROWS, batch_args, jsonl


@pytest.fixture(scope="session")
def sweep_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cluster-sweep") / "sweep.csv"
    path.write_text("Concept prompt.value,Evaluation seed.value\n"
                    + "".join(f"{c},{s}\n" for c, s in SWEEP_ROWS))
    return path


@pytest.fixture(scope="session")
def embedded_reference(comfy, sweep_csv, tmp_path_factory) -> dict:
    """{job key: metrics} of the four jobs run by the embedded backend in this process."""
    from memora_batch import cli

    out = tmp_path_factory.mktemp("cluster-embedded") / "results"
    assert cli.main(batch_args(out, sweep_csv)) == 0
    records = jsonl(out / "results.jsonl")
    assert len(records) == 4 and all(r["status"] == "ok" for r in records)
    return {r["key"]: r["metrics"] for r in records}
