"""memora-batch curve's snapshot plan (planned against the stored node definitions, nothing run by ComfyUI): one
training job per model and LoRA seed with the other budgets as snapshot_steps; the evaluation rows built from the
snapshot files a training job reported; bad --steps / --lora-seeds refused before any job; a failed training is
reported and exits 1."""

from __future__ import annotations

from pathlib import Path

import pytest
from batch_kit import Instant

from memora_batch import cli
from memora_batch import curve as C
from memora_batch.backend import RunResult

ROOT = Path(__file__).resolve().parents[2]
SWEEP = str(ROOT / "example_workflows" / "recovery_sweep.json")


def _curve(monkeypatch, backend, out: Path, *extra) -> int:
    monkeypatch.setattr(cli, "_backend", lambda args: backend)
    return cli.main(["curve", SWEEP, "--out", str(out), "--no-progress", *extra])


def test_one_training_job_per_model_and_seed_with_the_other_budgets_as_snapshots(monkeypatch, tmp_path, capsys):
    backend = Instant()
    assert _curve(monkeypatch, backend, tmp_path / "c", "--steps", "100,25,50", "--lora-seeds", "1,2",
                  "--control", "sd-v1-4.ckpt", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "4 job(s)" in out and backend.ran == []
    assert out.count('"Train LoRA.steps": 100, "Train LoRA.snapshot_steps": "25,50"') == 4
    assert out.count('"Unlearned model.ckpt_name": "sd-v1-4.ckpt"') == 2
    assert "then: one evaluation job per snapshot file (2 per training job)" in out


def test_training_rows_and_no_snapshot_rows():
    rows = C.training_rows("Train LoRA", [25, 50], [7], "never_learned", True, True)
    assert rows == [  # with the micro world the workflow's unlearned model is its ESD-x variant, named so
        {"label.curve_model": "esd_x", "label.lora_seed": 7, "Train LoRA.seed": 7, "Train LoRA.steps": 50,
         "label.updates": 50, "Train LoRA.snapshot_steps": "25"},
        {"Unlearned model.variant": "never_learned", "label.curve_model": "never_learned", "label.lora_seed": 7,
         "Train LoRA.seed": 7, "Train LoRA.steps": 50, "label.updates": 50, "Train LoRA.snapshot_steps": "25"}]
    old = C.training_rows("Train LoRA", [25, 50], [None], None, False, False)
    assert [(r["Train LoRA.steps"], r["label.updates"]) for r in old] == [(25, 25), (50, 50)]
    assert all("Train LoRA.snapshot_steps" not in r and "Train LoRA.seed" not in r for r in old)
    assert [r["label.curve_model"] for r in old] == ["unlearned", "unlearned"]


def test_tested_models_each_set_on_the_unlearned_loader_and_the_control_once():
    rows = C.training_rows("Train LoRA", [25, 50], [1, 2], "never_learned", True, True, C.parse_tested("uce,esd_u"))
    got = [(r["label.curve_model"], r["Unlearned model.variant"], r["label.lora_seed"]) for r in rows]
    assert got == [("uce", "uce", 1), ("uce", "uce", 2), ("esd_u", "esd_u", 1), ("esd_u", "esd_u", 2),
                   ("never_learned", "never_learned", 1), ("never_learned", "never_learned", 2)]
    ck = C.training_rows("Train LoRA", [25], [None], None, False, True, ["a.ckpt"])
    assert ck[0]["Unlearned model.ckpt_name"] == "a.ckpt" and ck[0]["label.curve_model"] == "a.ckpt"
    with pytest.raises(ValueError, match="--control 'uce' is also a model under test"):
        C.training_rows("Train LoRA", [25], [1], "uce", True, True, ["uce"])
    with pytest.raises(ValueError, match="expected distinct model names"):
        C.parse_tested("uce,uce")


def test_snapshot_rows_load_each_snapshot_file_of_a_finished_training():
    rec = {"status": "ok", "labels": {"curve_model": "unlearned", "lora_seed": 1, "updates": 50},
           "overrides": {"Train LoRA.steps": 50, "Train LoRA.snapshot_steps": "25", "Evaluation seed.value": 3},
           "outputs": {"loras": ["memora/recovered_step25_00001_.safetensors", "memora/recovered_00001_.safetensors"]}}
    failed = {**rec, "status": "error"}
    assert C.snapshot_rows([rec, failed], "Train LoRA") == [
        {"Evaluation seed.value": 3, "label.curve_model": "unlearned", "label.lora_seed": 1, "label.updates": 25,
         "Train LoRA.lora_name": "memora/recovered_step25_00001_.safetensors"}]


@pytest.mark.parametrize("extra, message", [
    (("--steps", "25,x"), "--steps '25,x': expected positive integers"),
    (("--steps", "0,25"), "expected positive integers"),
    (("--steps", "25", "--lora-seeds", "1,a"), "--lora-seeds '1,a': expected whole numbers"),
    (("--steps", "25", "--lora-seeds", "1,1"), "expected distinct seeds"),
])
def test_bad_curve_options_are_refused_before_any_job(monkeypatch, tmp_path, capsys, extra, message):
    backend = Instant()
    assert _curve(monkeypatch, backend, tmp_path / "c", *extra) == cli.EXIT_BAD_INPUT
    assert message in capsys.readouterr().err and backend.ran == []


class Fails(Instant):
    def run(self, prompt, timeout=None):
        result = super().run(prompt, timeout)
        return RunResult(result.prompt_id, False, {}, {"exception_message": "boom", "node_id": "1"}, "instant")


def test_a_failed_training_is_reported_and_exits_1(monkeypatch, tmp_path, capsys):
    backend = Fails()
    rc = _curve(monkeypatch, backend, tmp_path / "c", "--steps", "1,2", "--detector",
                "Concept score (recovered).flagged_rate")
    assert rc == cli.EXIT_JOB_FAILED and len(backend.ran) == 1  # one training for both budgets
    assert "no finished jobs to judge" in capsys.readouterr().out


def _rec(model, seed, updates, rate, prompt="p1", unlearned=0.0, original=0.75, n=None):
    det = "Concept score (recovered).star.rate"
    metrics = {det: rate, det.replace("recovered", "unlearned"): unlearned,
               det.replace("recovered", "original"): original}
    if n is not None:
        metrics["Concept score (recovered).star.n"] = n
    return {"key": f"{model}-{seed}-{updates}-{prompt}", "status": "ok", "metrics": metrics,
            "labels": {"curve_model": model, "lora_seed": seed, "updates": updates},
            "overrides": {"Evaluation prompt.value": prompt, "Train LoRA.steps": updates}, "tables": []}


def test_curve_data_counts_each_budget_and_the_model_itself_summed_over_prompt_rows():
    recs = [_rec(m, 1, u, r, p, n=8) for m, rates in (("unlearned", (0.5, 0.75)), ("never_learned", (0.0, 0.125)))
            for u, r in zip((25, 50), rates) for p in ("p1", "p2")]
    data = C.curve_data(recs, {}, "Train LoRA", [25, 50], "Concept score (recovered).star.rate", None, "never_learned")
    assert data["updates"] == [0, 25, 50] and data["original"] == [12, 16]
    assert data["models"]["unlearned"]["seeds"] == {"1": [[0, 16], [8, 16], [12, 16]]}
    assert data["models"]["never_learned"]["seeds"] == {"1": [[0, 16], [0, 16], [2, 16]]}


def test_curve_data_with_a_missing_point_gives_the_specific_curve_error():
    from memora.evaluation.recovery import CurveError, analyse

    recs = [_rec("unlearned", 1, 25, 0.5, n=8), _rec("never_learned", 1, 25, 0.0, n=8),
            _rec("never_learned", 1, 50, 0.0, n=8)]  # the unlearned model's 50-update job is missing
    data = C.curve_data(recs, {}, "Train LoRA", [25, 50], "Concept score (recovered).star.rate", None, "never_learned")
    with pytest.raises(CurveError, match=r"model 'unlearned', seed 1: 2 points, but the curve has 3 budgets"):
        analyse(data)


def test_curve_data_without_image_counts_is_refused():
    with pytest.raises(ValueError, match="cannot count the images behind"):
        C.curve_data([_rec("unlearned", 1, 25, 0.5)], {}, "Train LoRA", [25], "Concept score (recovered).star.rate",
                     None, "never_learned")


def test_every_training_job_saves_under_its_own_name(monkeypatch, tmp_path):
    """Machines number their LoRA files on their own: two trainings on two workers must not both write
    memora/recovered_step25_00001_. Each training job of the curve (model x seed, crossed with a sweep file's rows)
    gets its own save_name; the snapshot evaluation jobs load those names."""
    backend = Instant()
    sweep = tmp_path / "rows.csv"
    sweep.write_text("Evaluation seed.value\n3\n4\n")
    _curve(monkeypatch, backend, tmp_path / "c", "--steps", "25,50", "--lora-seeds", "1,2", "--control",
           "sd-v1-4.ckpt", "--sweep", str(sweep))  # the instant backend reports no metrics: only the graphs matter
    trainings = [p for p in backend.ran if any(n.get("class_type") == "MemoRaLoRATrain" for n in p.values())]
    names = [n["inputs"]["save_name"] for p in trainings for n in p.values()
             if n.get("class_type") == "MemoRaLoRATrain"]
    assert len(trainings) == 8 and len(set(names)) == 8, names  # 2 models x 2 seeds x 2 sweep rows
    assert all(n.startswith("memora/curve/") for n in names)
    assert {n.split("/")[-1].rsplit("_", 1)[0] for n in names} == {
        "unlearned_seed1", "unlearned_seed2", "sd-v1-4.ckpt_seed1", "sd-v1-4.ckpt_seed2"}
    rows = C.unique_save_names([{"label.curve_model": "a b/c", "label.lora_seed": 1}], "Train LoRA")
    assert rows[0]["Train LoRA.save_name"].startswith("memora/curve/a-b-c_seed1_")


@pytest.mark.parametrize("extra", [(), ("--ray-shared-output",), ("--base-directory", "/shared/comfy")])
def test_curve_on_ray_with_snapshots_needs_a_shared_lora_folder(tmp_path, capsys, extra):
    out = tmp_path / "c"
    rc = cli.main(["curve", SWEEP, "--out", str(out), "--steps", "25,50", "--ray", "127.0.0.1:1", *extra])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_BAD_INPUT, err
    assert "curve --ray: the snapshot evaluation jobs load each training's snapshot LoRA by name" in err
    assert "--ray-shared-output and one --base-directory" in err and not out.exists()
