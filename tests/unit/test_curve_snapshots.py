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
    assert rows == [
        {"label.curve_model": "unlearned", "label.lora_seed": 7, "Train LoRA.seed": 7, "Train LoRA.steps": 50,
         "label.updates": 50, "Train LoRA.snapshot_steps": "25"},
        {"Unlearned model.variant": "never_learned", "label.curve_model": "never_learned", "label.lora_seed": 7,
         "Train LoRA.seed": 7, "Train LoRA.steps": 50, "label.updates": 50, "Train LoRA.snapshot_steps": "25"}]
    old = C.training_rows("Train LoRA", [25, 50], [None], None, False, False)
    assert [(r["Train LoRA.steps"], r["label.updates"]) for r in old] == [(25, 25), (50, 50)]
    assert all("Train LoRA.snapshot_steps" not in r and "Train LoRA.seed" not in r for r in old)


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
