"""The README's main job (scripts/demo.py): memora_recovery on the shipped micro world, end to end in a child process,
printing the erased concept's detector rate under the original, unlearned and recovered models, the similarity to
the original's images, and where the files went (all checked on disk). Run with --quick (fewer steps) here."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path


def test_demo_script_runs_memora_recovery_on_the_micro_world(tmp_path, repo_root, comfy_path):
    from memora.micro import world

    concept = world.load_manifest()["erased_concept"]
    out = tmp_path / "demo"
    env = dict(os.environ, COMFYUI_PATH=str(comfy_path), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(repo_root / "scripts" / "demo.py"), "--out", str(out), "--quick",
                           "--cpu"],
                          cwd=str(repo_root), env=env, capture_output=True, timeout=1500)
    # bytes as the terminal gets them: a progress bar redraws its line with '\r', only '\n' starts a new one
    text, err = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, text[-3000:] + err[-3000:]
    # a quiet console, progress bar included: one bar for the job (redrawn in place), a line per stage, the
    # answer; ComfyUI's own output (its per-sampling bars, its log) in the log file the demo names
    console = text.split("\n") + err.split("\n")
    assert len(console) < 60, text + err
    assert "it/s]" not in err and "Requested to load" not in err + text
    assert re.search(r"job 1/1 [0-9a-f]{8}: 100%", err), err[-2000:]
    assert re.search(r"MemoRaLoRATrain: Train LoRA  \([0-9.]+ s\)", err), err[-2000:]
    log = Path(re.search(r"ComfyUI's own output:\s+(\S+)", text).group(1))
    assert log.is_file() and "it/s]" in log.read_text() and "Requested to load" in log.read_text()
    assert "micro world" in text
    for model in ("original", "unlearned", "recovered"):
        m = re.search(rf"Concept score \({model}\)\.{concept}\.rate\s+([0-9.]+)", text)
        assert m, (model, text[-2000:])
        assert 0.0 <= float(m.group(1)) <= 1.0
    assert re.search(r"Similarity to original \(recovered\)\.ssim\s+[0-9.]+", text)
    lora = Path(re.search(r"LoRA:\s+(\S+)", text).group(1))
    assert lora.is_file() and lora.suffix == ".safetensors" and str(lora).startswith(str(out))
    rows = list(csv.DictReader(open(out / "results" / "results.csv")))
    assert len(rows) == 1 and rows[0].get("status", "ok") in ("ok", "done", "success"), rows
    assert list((out / "output").rglob("*.png")), "the demo must write images"
