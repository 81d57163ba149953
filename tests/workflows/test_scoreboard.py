"""`memora-batch scoreboard` on the micro world through ComfyUI's executor, with tiny settings (--quick: 2 sampling
steps, 2 LoRA updates; 8 evaluation images): every attack whose nodes this pack has gets its row, each rate's k, n
and Wilson interval agree with a recount, the Fisher p-value against the no-attack baseline is scipy's, the cost
columns are non-zero where an attack ran the UNet, the report shows the chart, and the unlearned model that every job
shared through ComfyUI's cache still holds the weights of its file."""

from __future__ import annotations

import csv
import importlib
import json

from pathlib import Path

import pytest
import torch
from scipy import stats as sps

from memora.evaluation import stats
from memora_batch import attacks as A
from memora_batch import cli

ROOT = Path(__file__).resolve().parents[2]
UNLEARNED = "esd_x"  # the micro world's ESD-x model (the workflows' "Unlearned model" under --models micro)
CONTROL = "never_learned"
IMAGES = 8
#: the attacks of this test: the pack's own, and those of the attack nodes when they are installed
OWN = ["memora", "direct-relearning", "concept-resurgence"]
BY_NODE = {"MemoRaConceptVector": "concept-vector", "MemoRaNoiseInjectionProbe": "noise-injection-probe",
           "MemoRaInpaintingProbe": "inpainting-probe", "MemoRaTextualInversion": "textual-inversion",
           "MemoRaAdversarialPrompt": "adversarial-prompt"}
#: attacks that train a LoRA (forward and backward UNet calls) and the concept images each holds
LORA_ATTACKS = {"MemoRa": 6, "direct relearning": 6, "concept resurgence": 0}


def _installed() -> list[str]:
    import nodes

    return [name for node, name in BY_NODE.items() if node in nodes.NODE_CLASS_MAPPINGS]


@pytest.fixture(scope="module")
def board(comfy, tmp_path_factory):
    out = tmp_path_factory.mktemp("scoreboard") / "board"
    chosen = OWN + _installed()
    argv = ["scoreboard", "--models", "micro", "--control", CONTROL, "--quick", "--eval-images", str(IMAGES),
            "--attacks", ",".join(chosen), "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    return out, chosen


def _rows(out):
    return json.loads((out / "scoreboard.json").read_text())["rows"]


def test_every_chosen_attack_has_its_row_and_the_files_agree(board):
    out, chosen = board
    rows = _rows(out)
    got = {(r["attack"], r["model"]) for r in rows}
    names = [A.BY_NAME[A.ALIASES[c]].name for c in chosen]
    want = {(A.BASELINE, "unlearned")} | {(n, "unlearned") for n in names} | {("direct relearning", CONTROL)}
    assert got == want
    with open(out / "scoreboard.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["attack"], r["model"]) for r in table] == [(r["attack"], r["model"]) for r in rows]
    md = (out / "scoreboard.md").read_text()
    assert all(f"| {r['attack']} | {r['model']} |" in md for r in rows)
    html = (out / "report.html").read_text()
    assert 'alt="scoreboard chart"' in html and "Recovery attacks (scoreboard)" in html


def test_rates_intervals_and_the_fisher_test_recount(board):
    rows = _rows(board[0])
    base = next(r for r in rows if r["attack"] == A.BASELINE)
    assert base["fisher_p"] is None
    for r in rows:
        n = 6 if r["attack"] == "inpainting probe" else IMAGES  # the probe inpaints the six concept images
        assert r["n"] == n and 0 <= r["k"] <= n and r["rate"] == pytest.approx(r["k"] / n)
        low, high = stats.wilson_interval(r["k"], r["n"])
        assert (r["ci_low"], r["ci_high"]) == pytest.approx((low, high), abs=1e-6)
        assert r["convention"] == "micro-top1"
        assert r["similarity"] == "SSIM" and -1 <= r["similarity_mean"] <= 1
        assert r["similarity_ci_low"] <= r["similarity_mean"] <= r["similarity_ci_high"]
        if r is not base:
            p = sps.fisher_exact([[r["k"], n - r["k"]], [base["k"], base["n"] - base["k"]]],
                                 alternative="greater").pvalue
            assert r["fisher_p"] == pytest.approx(p)


def test_cost_columns_where_the_attack_ran_the_unet(board):
    rows = _rows(board[0])
    for r in rows:
        assert r["knowledge"] in A.TIERS
        if r["attack"] in LORA_ATTACKS:  # LoRA training: forward and backward calls, the attack's own seconds
            assert r["forward_calls"] > 0 and r["backward_calls"] > 0 and r["seconds"] > 0, r
            assert r["concept_images"] == LORA_ATTACKS[r["attack"]]
            assert r["seconds_of"].startswith("attack nodes")
        elif r["attack"] in ("textual inversion", "adversarial prompt"):  # optimised through the frozen UNet
            assert r["forward_calls"] > 0 and r["backward_calls"] > 0 and r["concept_images"] == 6, r
        elif r["attack"] in ("noise-injection probe", "inpainting probe"):
            assert r["forward_calls"] > 0 and r["backward_calls"] == 0, r
        elif r["attack"] == A.BASELINE:
            assert (r["forward_calls"], r["backward_calls"], r["concept_images"]) == (0, 0, 0)
            assert r["knowledge"] == A.PROMPTS
    memora = next(r for r in rows if r["attack"] == "MemoRa")
    direct = next(r for r in rows if r["attack"] == "direct relearning")
    # MemoRa inverts and regenerates before the same training: more forward calls than relearning directly
    assert memora["forward_calls"] > direct["forward_calls"]


def test_the_unlearned_model_is_left_untouched(board, comfy):
    """Every job shared one 'Unlearned model' (ComfyUI's cache keeps the loader's output between jobs); after all
    the attacks its UNet weights equal those of its file."""
    import comfy.model_management as mm
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS["MemoRaLoadMicroWorld"]
    host = importlib.import_module(cls.__module__.rsplit(".", 2)[0] + ".nodes._micro_host")
    mm.unload_all_models()  # ComfyUI un-patches weights it patched in place for sampling
    out = board[0]
    last = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()][-1]
    assert last["status"] == "ok"
    ui = json.loads((ROOT / "example_workflows" / f"{last['workflow']}.json").read_text())
    (nid,) = [str(n["id"]) for n in ui["nodes"] if n.get("title") == "Unlearned model"]
    used = comfy.node_outputs(nid)[0]  # the MODEL the last job's attack and evaluations used
    ref = host.load_world(UNLEARNED)[0].model.diffusion_model.state_dict()
    got = used.model.diffusion_model.state_dict()
    assert set(got) == set(ref)
    assert all(torch.equal(got[k].float(), ref[k].float()) for k in ref)


def test_dry_run_lists_every_job_and_runs_nothing(comfy, tmp_path, capsys):
    out = tmp_path / "dry"
    argv = ["scoreboard", "--models", "micro", "--control", CONTROL, "--dry-run", "--out", str(out)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    for attack in A.ATTACKS:
        ran = f"for {attack.workflow} on" in text
        skipped = f"skipped {attack.name!r}:" in text
        assert ran != skipped, attack.name  # each attack either listed with its jobs or skipped with a reason
    assert "Unlearned model.variant\": \"never_learned\"" in text  # direct relearning on the control
    assert not (out / "results.jsonl").exists()
