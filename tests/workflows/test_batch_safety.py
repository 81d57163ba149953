"""memora-batch end to end on ComfyUI's own executor (issue 17, items 3, 5 and 6): bad values, broken graphs and save
prefixes outside the output folder stop the run before the first job (nothing computed, nothing saved); a results
folder held by another run, or holding files memora-batch did not write, is refused; convert never overwrites.
The graph: Empty Image -> Upscale Image By -> Save Image (stock nodes, milliseconds per job)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memora_batch import cli

ROOT = Path(__file__).resolve().parents[2]


def _graph(prefix: str = "safety") -> dict:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0},
              "_meta": {"title": "Canvas"}},
        "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0], "upscale_method": "nearest-exact",
                                                       "scale_by": 2.0}, "_meta": {"title": "Scale"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix},
              "_meta": {"title": "Save"}},
    }


@pytest.fixture()
def files(comfy, comfy_base, tmp_path):
    wf = tmp_path / "safety_wf.json"
    wf.write_text(json.dumps(_graph()))
    return {"workflow": wf, "output": Path(comfy_base) / "output", "out": tmp_path / "results"}


def _saved(output: Path) -> set:
    return {p for p in output.rglob("*.png")}


def _run(files, *extra) -> int:
    return cli.main(["run", str(files["workflow"]), "--out", str(files["out"]), "--no-progress", *extra])


def test_nan_for_a_float_input_stops_before_the_first_job(files, capsys):
    before = _saved(files["output"])
    assert _run(files, "--set", "Scale.scale_by=nan") == cli.EXIT_BAD_INPUT
    assert "Scale.scale_by: 'nan' is not a valid FLOAT (expected a finite number)" in capsys.readouterr().err
    assert _saved(files["output"]) == before and not files["out"].exists()


@pytest.mark.parametrize("breakage, message", [
    (lambda g: g["3"]["inputs"].update(images=["99", 0]), "input 'images' is linked to node 99, which is not in"),
    (lambda g: g["3"]["inputs"].update(images=["1", 3]), "input 'images' is linked to output 3 of node 1"),
    (lambda g: g["2"]["inputs"].pop("upscale_method"), "required input 'upscale_method' is missing"),
    (lambda g: g["1"]["inputs"].update(width=0), "input 'width': 0 is outside the input's range 1.."),
    # only ComfyUI's own validation sees this one (an IMAGE input fed by a node whose output is a LATENT)
    (lambda g: g.update({"4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64,
                                                                           "batch_size": 1}}})
     or g["3"]["inputs"].update(images=["4", 0]), "Return type mismatch"),
])
def test_broken_workflow_stops_before_the_first_job(files, capsys, breakage, message):
    graph = _graph()
    breakage(graph)
    files["workflow"].write_text(json.dumps(graph))
    before = _saved(files["output"])
    assert _run(files) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert message in err and "nothing was run" in err, err
    assert _saved(files["output"]) == before and not files["out"].exists()


def test_save_prefix_outside_the_output_folder_stops_before_the_first_job(files, capsys):
    before = _saved(files["output"])
    assert _run(files, "--output-prefix", "../../escaped") == cli.EXIT_BAD_INPUT
    assert "saves outside ComfyUI's output folder" in capsys.readouterr().err
    files["workflow"].write_text(json.dumps(_graph("../outside")))
    assert _run(files, "--output-prefix", "") == cli.EXIT_BAD_INPUT
    assert "'../outside' (from the workflow)" in capsys.readouterr().err
    assert _saved(files["output"]) == before and not files["out"].exists()


def test_a_folder_another_run_holds_is_refused_naming_it(files, capsys):
    files["out"].mkdir()
    code = ("import sys, time; from memora_batch.folder import ResultsFolder\n"
            "with ResultsFolder(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n")
    other = subprocess.Popen([sys.executable, "-c", code, str(files["out"])], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert other.stdout.readline().strip() == "held"
        before = _saved(files["output"])
        assert _run(files) == cli.EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert f"in use by another memora-batch run: PID {other.pid}" in err and "started " in err
        assert _saved(files["output"]) == before and not (files["out"] / "results.jsonl").exists()
    finally:
        other.kill()
        other.wait()
    assert _run(files) == 0  # the killed run left no stale lock


def test_foreign_report_needs_force_and_resume_does_not(files, capsys):
    files["out"].mkdir()
    (files["out"] / "report.md").write_text("my own notes\n")
    assert _run(files) == cli.EXIT_BAD_INPUT
    assert "report.md not written by memora-batch" in capsys.readouterr().err
    assert (files["out"] / "report.md").read_text() == "my own notes\n"
    assert _run(files, "--force") == 0
    assert (files["out"] / "report.md").read_text().startswith("# memora-batch: safety_wf")
    capsys.readouterr()
    assert _run(files) == 0  # resuming memora-batch's own folder needs no --force
    assert "0 ok, 0 failed, 1 already done" in capsys.readouterr().out


def test_convert_replaces_an_existing_file_only_with_force(files, capsys):
    api = files["workflow"].parent / "api.json"
    api.write_text("{}")
    assert cli.main(["convert", str(files["workflow"]), "-o", str(api)]) == cli.EXIT_BAD_INPUT
    assert api.read_text() == "{}"
    assert cli.main(["convert", str(files["workflow"]), "-o", str(api), "--force"]) == 0
    assert json.loads(api.read_text())["3"]["class_type"] == "SaveImage"
    assert cli.main(["convert", str(files["workflow"]), "-o", str(files["workflow"]), "--force"]) == cli.EXIT_BAD_INPUT
