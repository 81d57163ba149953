"""The README's main job: `memora-batch demo` runs example_workflows/memora_recovery.json on the built-in micro world
(its loaders and concept scores swapped for the micro world's models and detector) and says where everything went.
Run here with --quick (few steps); the full run is the same command without it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from memora_batch import cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def micro_manifest():
    from memora.micro import world

    return world.load_manifest()  # the weights are shipped: a missing file is a failure, not a skip


def test_demo_runs_memora_recovery_on_the_micro_world(comfy, micro_manifest, tmp_path, capsys):
    from memora.micro import world

    concept = micro_manifest.get("erased_concept", world.ERASED_CONCEPT)
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--quick", "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    (rec,) = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert rec["status"] == "ok", rec["error"]
    m = rec["metrics"]
    for model in ("original", "unlearned", "recovered"):
        key = f"Concept score ({model}).{concept}.rate"
        assert key in m and 0.0 <= m[key] <= 1.0, sorted(m)
    assert "Similarity to original (recovered).ssim" in m
    # where everything went, printed and real
    lora = re.search(r"LoRA:\s+(\S+)", text).group(1)
    assert Path(lora).is_file() and lora.endswith(".safetensors")
    images = re.search(r"images:\s+(\S+)/ \((\d+) files\)", text)
    assert Path(images.group(1)).is_dir() and int(images.group(2)) > 0
    report = re.search(r"report:\s+(\S+)", text).group(1)
    assert Path(report).is_file() and concept in Path(report).read_text()
    assert f"Concept score (recovered).{concept}.rate" in text
    _check_report(out, rec, concept)
    # ComfyUI's own output went to the log the run names, not to the console
    log = Path(re.search(r"ComfyUI's own output:\s+(\S+)", text).group(1))
    assert log == out / "comfyui.log" and "Requested to load" in log.read_text()


def _check_report(out: Path, rec: dict, concept: str) -> None:
    """report.md opens with the one-row summary (rates of the three models, similarity, verdict), each detector's
    table under its own node's title, nothing wider than 8 columns; report.html has the same tables, the rate bars
    and the comparison grid drawn from the run's images."""
    from report_tables import html_tables, markdown_tables, widest

    md = (out / "report.md").read_text()
    tables = markdown_tables(md)
    summary = tables[0]
    assert len(summary) == 2 and widest(tables) <= 8, [len(t[0]) for t in tables]
    cells = dict(zip(summary[0], summary[1]))
    for model in ("original", "unlearned", "recovered"):
        rate = rec["metrics"][f"Concept score ({model}).{concept}.rate"]
        assert cells[f"concept rate ({model})"].startswith(f"{rate:.3f} ("), cells
        # each detector's table under its own title (split in parts where it is wider than 8 columns)
        assert len(re.findall(rf"\*\*Concept score \({model}\)(?: \(part 1 of \d+\))?\*\*", md)) == 1, model
    assert cells["similarity to original (recovered)"].startswith(
        f"SSIM {rec['metrics']['Similarity to original (recovered).ssim']:.3f}")
    assert cells["verdict"] and md.index("**Did it come back?**") < md.index(f"## job {rec['key']}")
    assert "(first 20 of 32 rows; all of them in results.jsonl)" in md  # the per-image similarity tables
    html = (out / "report.html").read_text()
    assert widest(html_tables(html)) <= 8 and len(html_tables(html)) == len(tables)
    assert f'alt="comparison grid {rec["key"]}"' in html and 'alt="concept rate per model"' in html
    assert set(rec["outputs"]["files_by_node"]) >= {f"Save {m} images" for m in ("original", "unlearned",
                                                                                   "recovered")}


def test_demo_with_own_models_needs_both_checkpoints(comfy, tmp_path, capsys):
    rc = cli.main(["demo", "--original", "a.safetensors", "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "both --original and --unlearned" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
