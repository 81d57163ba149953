"""memora-batch planning without ComfyUI: the shipped example workflows (UI format, converted by comfy-cli's
converter) planned against stored node definitions (tests/unit/batch_object_info.json, which
tests/workflows/test_batch_contracts.py checks against the installed nodes). Every title, input and value that
--models / --original / --set / the sweep addresses must match, or planning stops with the full list."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from memora import contracts as K
from memora_batch import cli
from memora_batch.profiles import ModelProfile, micro_world_profile, model_profile, swap_nodes
from memora_batch.runner import PlanError, plan_jobs
from memora_batch.workflow import AddressError, MissingNodeTypes, Workflow, title_of

from batch_kit import DEFINITIONS, StoredDefinitions

ROOT = Path(__file__).resolve().parents[2]


def _workflow(name: str) -> Workflow:
    return Workflow.load(ROOT / "example_workflows" / f"{name}.json")


def _inputs(plan, title: str) -> dict:
    (job,) = plan.jobs
    (node,) = [n for nid, n in job.api.items() if title_of(job.api, nid) == title]
    return node["inputs"]


@pytest.fixture(scope="module")
def micro():
    return micro_world_profile()  # the weights are shipped in the repository: a missing file is a failure


def test_micro_profile_sets_every_title_of_memora_recovery(micro):
    plan = plan_jobs(_workflow("memora_recovery"), StoredDefinitions(), profile=micro)
    assert _inputs(plan, K.TITLE_TRAIN_LORA)["steps"] == 50
    assert _inputs(plan, K.TITLE_TRAIN_LORA)["learning_rate"] == pytest.approx(3e-3)
    # the workflows' unlearned model is the micro world's ESD-x variant
    assert _inputs(plan, K.TITLE_ORIGINAL_MODEL) == {"variant": "original"}
    assert _inputs(plan, K.TITLE_UNLEARNED_MODEL) == {"variant": "esd_x"}
    for model in K.EVALUATED_MODELS:
        det = _inputs(plan, K.concept_score_title(model))
        assert det["title"] == K.concept_score_title(model) and det["concept"] == "star"
        assert _inputs(plan, K.evaluate_title(model))["sampler_name"] == "ddim"
    assert _inputs(plan, K.TITLE_EVALUATION_IMAGE_SIZE)["batch_size"] == 32
    # every setting is listed for --dry-run; the one title no shipped workflow has is listed as not set
    by_address = {s.address: s for s in plan.settings}
    assert by_address[f"{K.TITLE_TRAIN_LORA}.steps"].value == 50
    assert by_address[K.TITLE_NEVER_LEARNED_MODEL].value is None
    assert all(s.source == "--models micro" for s in plan.settings)
    assert len(plan.settings) == len(micro.swaps) + len(micro.defaults) + len(micro.texts)


def test_misspelt_title_in_the_micro_profile_stops_before_any_job(micro, tmp_path, capsys):
    bad = dataclasses.replace(micro, defaults={("Train LoRa" + k[len(K.TITLE_TRAIN_LORA):]
                                                if k.startswith(K.TITLE_TRAIN_LORA + ".") else k): v
                                               for k, v in micro.defaults.items()})
    bad.swaps = {**micro.swaps, "Unlearned modle": micro.swaps[K.TITLE_UNLEARNED_MODEL]}
    with pytest.raises(PlanError) as e:
        plan_jobs(_workflow("memora_recovery"), StoredDefinitions(), profile=bad)
    text = str(e.value)
    assert text.startswith("nothing was run: 3 setting(s) do not match the workflow")
    assert "'Train LoRa.steps' matches no node input" in text and "Train LoRA.steps" in text  # with a candidate
    assert "'Train LoRa.learning_rate'" in text
    assert "no node titled 'Unlearned modle'" in text
    assert e.value.problems and len(e.value.problems) == 3


def test_renamed_node_in_the_workflow_stops_the_micro_demo(micro, tmp_path):
    ui = json.loads((ROOT / "example_workflows" / "memora_recovery.json").read_text())
    for n in ui["nodes"]:
        if n.get("title") == K.TITLE_TRAIN_LORA:
            n["title"] = "Train the LoRA"
    with pytest.raises(PlanError) as e:
        plan_jobs(Workflow.load(ui), StoredDefinitions(), profile=micro)
    assert [p.split(":")[0] for p in e.value.problems] == ["--models micro"] * 2
    assert "'Train LoRA.steps'" in str(e.value) and "Train the LoRA.steps" in str(e.value)


def test_optional_titles_may_be_absent_but_others_not(micro):
    # memora_from_images has no original model: its loader, seed images and evaluation are not set (nor the attack
    # workflows' kept-concept images)
    from memora_batch.attacks import TITLE_KEPT_SIZE

    plan = plan_jobs(_workflow("memora_from_images"), StoredDefinitions(), profile=micro)
    unset = {s.address for s in plan.settings if s.value is None}
    assert unset == {K.TITLE_ORIGINAL_MODEL, K.TITLE_NEVER_LEARNED_MODEL, f"{K.TITLE_SEED_IMAGE_SIZE}.width",
                     f"{K.TITLE_SEED_IMAGE_SIZE}.height", f"{K.evaluate_title('original')}.sampler_name",
                     f"{K.evaluate_title('original')}.scheduler", f"{TITLE_KEPT_SIZE}.width",
                     f"{TITLE_KEPT_SIZE}.height"}
    assert _inputs(plan, K.TITLE_TRAIN_LORA)["steps"] == 50
    # a loader named on the command line must exist
    with pytest.raises(PlanError, match="no node titled 'Original model'"):
        plan_jobs(_workflow("memora_from_images"), StoredDefinitions(),
                  profile=model_profile(None, "sd-v1-4.ckpt", "unlearned-model.safetensors"))


def test_values_must_fit_type_range_and_options():
    prof = model_profile(None, original="no-such-model.ckpt")
    with pytest.raises(PlanError) as e:
        plan_jobs(_workflow("memora_recovery"), StoredDefinitions(), profile=prof,
                  overrides={"Train LoRA.steps": 0, "Train LoRA.lr_schedule": "linear", "Train LoRA.rank": "four"})
    text = str(e.value)
    assert "'no-such-model.ckpt' is not one of the input's options ('sd-v1-4.ckpt'" in text
    assert "Train LoRA.steps: 0 is outside the input's range 1..100000" in text
    assert "Train LoRA.lr_schedule: 'linear' is not one of the input's options ('cosine', 'constant')" in text
    assert "Train LoRA.rank: 'four' is not a valid INT" in text
    assert len(e.value.problems) == 4


def test_sweep_and_set_problems_are_listed_together():
    rows = [{"Train LoRA.steps": 10, "Evaluation seed.valu": 3}, {"Train LoRA.steps": -1}]
    with pytest.raises(PlanError) as e:
        plan_jobs(_workflow("memora_recovery"), StoredDefinitions(), rows, overrides={"Train LoRA.stepz": 5})
    text = str(e.value)
    assert "--set: 'Train LoRA.stepz' matches no node input" in text and "Train LoRA.steps" in text
    assert "'Evaluation seed.valu'" in text and "Evaluation seed.value" in text


def test_sweep_rows_become_typed_jobs_with_distinct_keys():
    rows = [{"Train LoRA.steps": "10", "label.tag": "a"}, {"Train LoRA.steps": "50", "label.tag": "b"},
            {"Train LoRA.steps": 10.0, "label.tag": "c"}]
    plan = plan_jobs(_workflow("recovery_sweep"), StoredDefinitions(), rows, overrides={"Evaluation seed.value": 7},
                     texts={K.TITLE_CONCEPT_PROMPT: "a photo of a cat"})
    assert [j.overrides for j in plan.jobs] == [
        {"Concept prompt.value": "a photo of a cat", "Evaluation seed.value": 7, "Train LoRA.steps": s}
        for s in (10, 50, 10)]
    assert [j.labels for j in plan.jobs] == [{"tag": "a"}, {"tag": "b"}, {"tag": "c"}]
    assert plan.jobs[0].key == plan.jobs[2].key != plan.jobs[1].key  # same graph, same key
    assert [(s.address, s.source) for s in plan.settings] == [("Concept prompt.value", "--concept / --eval-prompt"),
                                                              ("Evaluation seed.value", "--set")]


def test_quick_settings_are_listed():
    plan = plan_jobs(_workflow("memora_recovery"), StoredDefinitions(), quick=True)
    quick = {s.address: s.value for s in plan.settings if s.source == "--quick"}
    assert quick[f"{K.TITLE_TRAIN_LORA}.steps"] == 2 and quick[f"{K.TITLE_EVALUATION_IMAGE_SIZE}.width"] == 64
    assert _inputs(plan, K.TITLE_TRAIN_LORA)["steps"] == 2


def test_swap_needs_an_installed_type_and_real_inputs():
    api = _workflow("memora_recovery").to_api(StoredDefinitions().object_info(DEFINITIONS))
    with pytest.raises(AddressError, match="MemoRaLoadMicroWorld has no input 'ckpt_name'"):
        swap_nodes(api, {K.TITLE_ORIGINAL_MODEL: (K.NODE_MICRO_WORLD, {"ckpt_name": "x"})}, DEFINITIONS)
    with pytest.raises(MissingNodeTypes, match="SomeLoader"):
        plan_jobs(_workflow("memora_recovery"), StoredDefinitions(),
                  profile=ModelProfile(swaps={K.TITLE_ORIGINAL_MODEL: ("SomeLoader", {})}))


def test_dry_run_prints_every_setting_and_job(micro, capsys):
    plan = plan_jobs(_workflow("memora_recovery"), StoredDefinitions(), [{"Evaluation seed.value": 3}],
                     profile=micro)
    cli.print_dry_run(plan, StoredDefinitions())
    out = capsys.readouterr().out
    assert out.startswith("1 job(s) for memora_recovery on the stored node definitions")
    assert "Train LoRA.steps" in out and "= 50  [--models micro]" in out
    assert "Original model" in out and "replaced by MemoRaLoadMicroWorld(variant='original')" in out
    assert "Never-learned model" in out and "(not in this workflow: nothing set)" in out
    for s in plan.settings:
        assert s.address in out
    assert f"{plan.jobs[0].key}  {{\"Evaluation seed.value\": 3}}" in out


def test_front_end_primitive_node_is_addressed_by_its_title():
    """A legacy PrimitiveNode vanishes in the API graph; its title still addresses every input it feeds."""
    from memora_build.uigraph import UIGraph

    g = UIGraph(DEFINITIONS)
    ck = g.add("CheckpointLoaderSimple", K.TITLE_UNLEARNED_MODEL, ckpt_name="sd-v1-4.ckpt")
    pos = g.wire(g.add("CLIPTextEncode", K.TITLE_CONCEPT_PROMPT, text="a photo of a cat"), clip=ck[1])
    lat = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    ks = g.wire(g.add("KSampler", "Sampler", seed=0, steps=1, cfg=2.0, sampler_name="ddim", scheduler="ddim_uniform"),
                model=ck[0], positive=pos[0], negative=pos[0], latent_image=lat[0])
    g.primitive(1, "Seed", (ks, "seed"))
    g.wire(g.add("SaveImage", filename_prefix="t"), images=g.wire(g.add("VAEDecode"), samples=ks[0], vae=ck[2])[0])
    plan = plan_jobs(Workflow.load(g.to_json()), StoredDefinitions(), [{"Seed.value": 5}, {"Seed.value": "6"}],
                     texts={K.TITLE_CONCEPT_PROMPT: "a photo of a dog"})
    assert [j.overrides for j in plan.jobs] == [{"Concept prompt.text": "a photo of a dog", "Seed.value": s}
                                                for s in (5, 6)]
    assert [_seed(j) for j in plan.jobs] == [5, 6]
    with pytest.raises(PlanError, match="Seed.value: -1 is outside the input's range 0.."):
        plan_jobs(Workflow.load(g.to_json()), StoredDefinitions(), [{"Seed.value": -1}])


def _seed(job) -> int:
    (node,) = [n for n in job.api.values() if n["class_type"] == "KSampler"]
    return node["inputs"]["seed"]



def test_micro_profile_draws_the_resurgence_kept_images_at_the_worlds_size(micro):
    """The attack workflow draws its kept-concept images at SD's 512 px; on the micro world they are at the world's
    size like every other image it draws (at 512 px a DDIM step took ~17 s on a CPU and the LoRA trained on
    8x-size latents). Workflows without that node are planned as before."""
    from memora.micro import world
    from memora_batch import attacks as A

    plan = plan_jobs(_workflow("attack_resurgence"), StoredDefinitions(), profile=micro)
    size = int(world.load_manifest()["empty_latent_size"])
    assert _inputs(plan, A.TITLE_KEPT_SIZE)["width"] == _inputs(plan, A.TITLE_KEPT_SIZE)["height"] == size == 64
    by_address = {s.address: s for s in plan.settings}
    assert by_address[f"{A.TITLE_KEPT_SIZE}.width"].source == "--models micro"
