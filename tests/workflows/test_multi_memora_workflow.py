"""example_workflows/multi_memora.json and automemora.json run on the tiny model (UI format converted to API
format with the pack's converter, checkpoints swapped for the tiny one, steps lowered), and what they produce is
what they claim: two trained LoRAs, their exact (concat) merge saved with its sources, images sampled with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from memora_batch.workflow import Workflow, object_info_in_process, quick_settings, title_of

ROOT = Path(__file__).resolve().parents[2]
MULTI = ROOT / "example_workflows" / "multi_memora.json"
AUTO = ROOT / "example_workflows" / "automemora.json"


@pytest.fixture(scope="module")
def info(comfy):
    return object_info_in_process()


def _tiny(api: dict, info: dict, tiny_ckpt: str, lora: str | None = None) -> dict:
    for node in api.values():
        inputs = node["inputs"]
        if node["class_type"] in ("CheckpointLoaderSimple", "MemoRaLoadUnlearnedModel"):
            inputs["ckpt_name"] = tiny_ckpt
        if node["class_type"] == "MemoRaLoadUnlearnedModel":  # the template's base + unlearned file: a full checkpoint
            inputs["unlearned_weights"] = f"checkpoints/{tiny_ckpt}"
        if lora is not None and "lora_name" in inputs and not isinstance(inputs["lora_name"], list):
            inputs["lora_name"] = lora
    return quick_settings(api, info)


def _by_title(api: dict, title: str) -> str:
    (nid,) = [n for n in api if title_of(api, n) == title]
    return nid


def _layers(sd):
    from memora.lora import formats

    return formats.kohya_layers(sd)


def test_multi_memora_workflow_runs_and_merges_exactly(comfy, info, tiny_ckpt):
    import folder_paths
    from safetensors import safe_open
    from safetensors.torch import load_file

    from memora.lora import merge

    wf = Workflow.load(MULTI)
    assert wf.ui is not None and any(n["type"] == "Note" for n in wf.ui["nodes"])
    titles = {n.get("title") for n in wf.ui["nodes"]}
    assert {"Unlearned model", "Original model", "Concept A prompt", "Concept B prompt", "Merge LoRAs",
            "Train LoRA (concept A)", "Train LoRA (concept B)"} <= titles
    api = _tiny(wf.to_api(info), info, tiny_ckpt)
    res = comfy.run(api)
    assert res.success, f"{res.error_message}\n{(res.error or {}).get('traceback', '')}"

    def saved(title):
        (name,) = res.ui_outputs[_by_title(api, title)]["memora_lora"]
        return Path(folder_paths.get_full_path("loras", name))

    a, b, merged_path = saved("Train LoRA (concept A)"), saved("Train LoRA (concept B)"), saved("Merge LoRAs")
    sd_a, sd_b, merged = load_file(str(a)), load_file(str(b)), load_file(str(merged_path))
    # the merge is the exact concat of the two trained LoRAs (weights 1, 1)
    ref = merge.merge_loras([sd_a, sd_b], [1.0, 1.0], "concat").state_dict
    assert merged.keys() == ref.keys()
    assert all(torch.equal(merged[k], ref[k]) for k in ref)
    la, lb, lm = _layers(sd_a), _layers(sd_b), _layers(merged)
    for name, layer in lm.items():
        assert layer.rank == la[name].rank + lb[name].rank
        assert torch.allclose(layer.delta(), la[name].delta() + lb[name].delta(), atol=1e-6)
    with safe_open(str(merged_path), framework="pt") as f:
        meta = f.metadata()
    assert meta["memora.merge_method"] == "concat"
    assert [s["slot"] for s in json.loads(meta["memora.merge_sources"])] == [1, 2]
    # one sampler with the merged LoRA saved its images
    out_dir = Path(folder_paths.get_output_directory())
    images = res.ui_outputs[_by_title(api, "Save recovered images")]["images"]
    assert images and all((out_dir / i["subfolder"] / i["filename"]).is_file() for i in images)


def test_automemora_workflow_runs(comfy, info, tiny_ckpt, loaded_tiny, comfy_base):
    import folder_paths
    from random_loras import lora_targets, random_kohya_lora, write_lora

    lora = write_lora(comfy_base / "models" / "loras", "automemora_workflow_test.safetensors",
                      random_kohya_lora(lora_targets(loaded_tiny[0]), rank=4, seed=5))
    wf = Workflow.load(AUTO)
    api = _tiny(wf.to_api(info), info, tiny_ckpt, lora)
    assert api[_by_title(api, "AutoMemoRa Guider")]["class_type"] == "MemoRaAutoGuider"
    res = comfy.run(api)
    assert res.success, f"{res.error_message}\n{(res.error or {}).get('traceback', '')}"
    out_dir = Path(folder_paths.get_output_directory())
    for title in ("Save automemora images", "Save unlearned images"):
        images = res.ui_outputs[_by_title(api, title)]["images"]
        assert images and all((out_dir / i["subfolder"] / i["filename"]).is_file() for i in images)
