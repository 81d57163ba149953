"""memora-batch --unlearned: which loader takes the file, planned against the stored node definitions (a server's
view: the folder the file is listed in decides; embedded runs also read the file, tests/workflows/test_unlearned_demo.py)."""

from __future__ import annotations

import pytest
from batch_kit import DEFINITIONS, StoredDefinitions, example_workflow

from memora import contracts as K
from memora_batch.profiles import model_profile
from memora_batch.runner import plan_jobs


def _unlearned_node(plan) -> dict:
    (job,) = plan.jobs
    (node,) = [n for n in job.api.values() if n.get("_meta", {}).get("title") == K.TITLE_UNLEARNED_MODEL]
    return node


def test_a_listed_unlearned_file_goes_to_the_unlearned_loader_on_the_original_checkpoint():
    prof = model_profile(None, "sd-v1-4.ckpt", "UCE-Nudity-Diffusers-UNet.pt", StoredDefinitions())
    plan = plan_jobs(example_workflow("memora_recovery"), StoredDefinitions(), profile=prof)
    node = _unlearned_node(plan)
    assert node["class_type"] == "MemoRaLoadUnlearnedModel"
    assert node["inputs"]["ckpt_name"] == "sd-v1-4.ckpt"
    assert node["inputs"]["unlearned_weights"] == "unlearned/UCE-Nudity-Diffusers-UNet.pt"
    # its outputs stay wired: MODEL, CLIP and VAE feed the same nodes as before
    (job,) = plan.jobs
    (nid,) = [i for i, n in job.api.items() if n is node]
    used = {v[1] for n in job.api.values() for v in n["inputs"].values() if isinstance(v, list) and v[:1] == [nid]}
    assert used == {0, 1, 2}


def test_a_checkpoint_goes_to_the_checkpoint_loader():
    prof = model_profile(None, "sd-v1-4.ckpt", "unlearned-model.safetensors", StoredDefinitions())
    plan = plan_jobs(example_workflow("memora_recovery"), StoredDefinitions(), profile=prof)
    node = _unlearned_node(plan)
    assert node["class_type"] == "CheckpointLoaderSimple"
    assert node["inputs"]["ckpt_name"] == "unlearned-model.safetensors"
    assert "unlearned_weights" not in node["inputs"]


def test_an_unlisted_file_is_refused_naming_the_folders():
    assert "MemoRaLoadUnlearnedModel" in DEFINITIONS
    with pytest.raises(ValueError, match=r"--unlearned 'esd.pt': no such checkpoint or unlearned-weights file .*"
                                         r"models/unlearned"):
        model_profile(None, "sd-v1-4.ckpt", "esd.pt", StoredDefinitions())
