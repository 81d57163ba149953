"""The README's main job (scripts/demo.py) runs end to end and writes what it says it writes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys


def test_demo_script_runs_memora_recovery_and_reports_outputs(tmp_path, repo_root, comfy_path):
    out = tmp_path / "demo"
    env = dict(os.environ, COMFYUI_PATH=str(comfy_path), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(repo_root / "scripts" / "demo.py"), "--out", str(out), "--no-progress"],
                          cwd=str(repo_root), env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RANDOM weights" in proc.stdout
    loras = list((out / "models" / "loras" / "memora").glob("recovered_*.safetensors"))
    assert len(loras) == 1
    rows = list(csv.DictReader(open(out / "results" / "results.csv")))
    assert len(rows) == 1 and rows[0].get("status", "ok") in ("ok", "done", "success"), rows
    assert list((out / "output").rglob("*.png")), "the demo must write images"
    assert str(out / "results") in proc.stdout
