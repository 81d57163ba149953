"""memora_recovery_flux (scripts/make_flux_workflows.py) is what its generator writes, and is MemoRa on Flux as
docs/flux.md describes it. (It runs on the tiny Flux dev in test_example_workflows.py, like every example.)"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from memora_batch.workflow import Workflow, object_info_in_process, title_of

ROOT = Path(__file__).resolve().parents[2]
PATH = ROOT / "example_workflows" / "memora_recovery_flux.json"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _generator():
    return _load("make_flux_workflows", ROOT / "scripts" / "make_flux_workflows.py")


@pytest.fixture(scope="module")
def info(comfy):
    return object_info_in_process()


def test_committed_flux_workflow_matches_its_generator(info):
    _saved_values = _load("memora_test_example_workflows", Path(__file__).with_name("test_example_workflows.py"))._saved_values
    mod = _generator()
    for name, (build, _title) in mod.WORKFLOWS.items():
        ui = build(info).to_json(workflow_id=mod.mw.workflow_uuid(name))
        committed = json.loads((ROOT / "example_workflows" / f"{name}.json").read_text())
        assert _saved_values(ui) == _saved_values(committed), \
            f"example_workflows/{name}.json is out of date: run python scripts/make_flux_workflows.py"
        assert not mod.mw.check_layout(committed), f"{name}: overlapping nodes"


def test_flux_workflow_is_memora_on_flux_dev(info):
    """Seed images with cfg 1 + FluxGuidance (euler / simple), the flow nodes on the unlearned model with the same
    ladder (28 steps from 8, simple) and distilled guidance only, slerp between them."""
    api = Workflow.load(PATH).to_api(info)
    by_title = {title_of(api, nid): node for nid, node in api.items()}
    for i in (1, 2, 3):
        for side in "ab":
            ks = by_title[f"Seed image {i}{side}"]["inputs"]
            assert (ks["sampler_name"], ks["scheduler"], ks["cfg"], ks["steps"]) == ("euler", "simple", 1.0, 28)
    flow_nodes = [by_title[t] for t in ("Invert A", "Invert B", "Regenerate")]
    for node in flow_nodes:
        x = node["inputs"]
        assert (x["steps"], x["start_at_step"], x["scheduler"], x["cfg"], x["true_cfg"]) == (28, 8, "simple", 1.0,
                                                                                          False)
        assert "negative" not in x
        guidance = api[x["positive"][0]]
        assert guidance["class_type"] == "FluxGuidance" and guidance["inputs"]["guidance"] == 3.5
        assert title_of(api, x["model"][0]) == "Unlearned model"
    assert by_title["Invert A"]["class_type"] == "MemoRaFlowInversion"
    assert by_title["Regenerate"]["class_type"] == "MemoRaFlowRegenerate"
    assert api[by_title["Regenerate"]["inputs"]["latent"][0]]["class_type"] == "MemoRaSlerpLatents"
    assert by_title["Original model"]["inputs"]["ckpt_name"] == "flux1-dev-fp8.safetensors"
