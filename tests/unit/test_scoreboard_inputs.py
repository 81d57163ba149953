"""memora-batch scoreboard's bad inputs: each stops before anything runs (exit status 2) with a message that says
what was wrong and what was expected. No ComfyUI is needed: the checks come before the backend."""

from __future__ import annotations

import pytest

from memora_batch import attacks as A
from memora_batch import cli


def _run(capsys, *argv) -> tuple[int, str]:
    rc = cli.main(["scoreboard", *argv])
    return rc, capsys.readouterr().err


def test_an_unknown_attack_is_named_with_the_nearest_choice(capsys, tmp_path):
    rc, err = _run(capsys, "--models", "micro", "--attacks", "memora,direct-relarning", "--out", str(tmp_path / "x"))
    assert rc == cli.EXIT_BAD_INPUT
    assert "unknown attack 'direct-relarning' (did you mean 'direct-relearning'?)" in err
    assert "concept-resurgence" in err  # the choices are listed
    assert not (tmp_path / "x").exists()


def test_without_the_original_model_there_are_no_concept_images(capsys):
    rc, err = _run(capsys, "--unlearned", "esd-nudity.safetensors", "--concept", "a photo of the nude person")
    assert rc == cli.EXIT_BAD_INPUT
    assert "images of the concept" in err and "--original CKPT" in err


def test_a_variant_needs_the_micro_world_and_must_exist(capsys):
    rc, err = _run(capsys, "--original", "sd-v1-4.ckpt", "--unlearned", "u.safetensors", "--variant", "esd_u")
    assert rc == cli.EXIT_BAD_INPUT and "--variant 'esd_u'" in err and "--models micro" in err
    rc, err = _run(capsys, "--models", "micro", "--variant", "no_such_model")
    assert rc == cli.EXIT_BAD_INPUT and "no_such_model" in err


def test_a_control_needs_an_attack_that_runs_on_it(capsys):
    rc, err = _run(capsys, "--models", "micro", "--attacks", "memora", "--control", "never_learned")
    assert rc == cli.EXIT_BAD_INPUT and "none of the chosen attacks runs on the control" in err


def test_attack_names_resolve_and_the_baseline_always_runs():
    assert [a.name for a in A.resolve("memora, Direct relearning")] == [A.BASELINE, "MemoRa", "direct relearning"]
    assert [a.name for a in A.resolve("automemora")] == [A.BASELINE, "AutoMemoRa (w=2)"]
    assert A.resolve("all") == list(A.ATTACKS)
    with pytest.raises(ValueError, match="none given"):
        A.resolve(" , ")

