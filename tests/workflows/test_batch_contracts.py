"""The contracts memora-batch and the front end rely on, checked against the real nodes: the static node
definitions the unit tests plan with are what the installed nodes define, and a real run of the shipped recovery
workflow (tiny models, --quick) returns every UI key and sends every event named in memora/contracts.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from memora import contracts as K
from memora_batch.backend import EmbeddedBackend
from memora_batch.profiles import model_profile
from memora_batch.runner import plan_jobs
from memora_batch.workflow import Workflow, object_info_in_process

ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT = ROOT / "tests" / "unit" / "batch_object_info.json"
#: combo inputs whose options are the files of a folder: fixed in the snapshot (the example workflows' names)
FILE_INPUTS = {"ckpt_name": ["sd-v1-4.ckpt", "unlearned-model.safetensors"],
               "image": [f"memora_concept_{i}{s}.png" for i in (1, 2, 3) for s in "ab"],
               "unlearned_weights": ["unlearned/UCE-Nudity-Diffusers-UNet.pt", "unlearned/unlearned-model.safetensors",
                                     "unlearned/unlearned-sdxl.safetensors"]}


#: what planning reads of a node definition (tooltips and labels, which differ between ComfyUI versions, are not)
KEPT = ("input", "input_order", "output", "output_is_list", "output_name", "name", "output_node")


def static_definitions(info: dict) -> dict:
    """/object_info as the unit tests store it: what planning reads, tooltips dropped, folder-listing combos
    replaced by fixed file names."""
    out = {t: {k: v for k, v in node.items() if k in KEPT} for t, node in json.loads(json.dumps(info)).items()}
    for node in out.values():
        for section in (node.get("input") or {}).values():
            for name, spec in section.items():
                if isinstance(spec, list) and len(spec) > 1 and isinstance(spec[1], dict):
                    spec[1].pop("tooltip", None)
                if name in FILE_INPUTS and isinstance(spec, list) and spec:
                    if isinstance(spec[0], list):
                        spec[0] = list(FILE_INPUTS[name])
                    elif len(spec) > 1 and isinstance(spec[1], dict) and "options" in spec[1]:
                        spec[1]["options"] = list(FILE_INPUTS[name])
    return out


def test_static_node_definitions_match_the_installed_nodes(comfy):
    """tests/unit/batch_object_info.json is what these nodes define (MEMORA_UPDATE_SNAPSHOT=1 rewrites it)."""
    stored = json.loads(SNAPSHOT.read_text())
    live = static_definitions(object_info_in_process(sorted(stored)))
    if os.environ.get("MEMORA_UPDATE_SNAPSHOT") == "1":
        SNAPSHOT.write_text(json.dumps(live, indent=1, sort_keys=True) + "\n")
        stored = json.loads(SNAPSHOT.read_text())
    assert set(live) == set(stored), "a node type of the snapshot is not installed"
    hint = f"rerun with MEMORA_UPDATE_SNAPSHOT=1 (default ComfyUI) to update {SNAPSHOT.name}"
    for node_type in sorted(stored):
        assert live[node_type]["input_order"] == stored[node_type]["input_order"], f"{node_type}: {hint}"
        for section, inputs in stored[node_type]["input"].items():
            for name, spec in inputs.items():
                now = live[node_type]["input"][section][name]
                assert _essentials(now) == _essentials(spec), f"{node_type}.{name} changed: {hint}"
                # combo options may grow between ComfyUI versions (samplers); the stored ones must all exist
                assert set(map(str, _options(spec))) <= set(map(str, _options(now))), f"{node_type}.{name}: {hint}"


def _options(spec: list) -> list:
    if isinstance(spec[0], list):
        return spec[0]
    return (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}).get("options") or []


def _essentials(spec: list) -> tuple:
    """What planning checks a value against: the type, default, range, and whether a seed companion follows."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    kind = "COMBO" if isinstance(spec[0], list) else spec[0]
    return (kind, opts.get("default"), opts.get("min"), opts.get("max"), "control_after_generate" in opts)


@pytest.mark.slow
def test_the_recovery_workflow_emits_every_contract_key_and_event(comfy, tiny_ckpt, events):
    """What the runner (results.py) and web/memora.js read: the UI keys of the nodes' outputs and the memora.*
    events, from a real run of example_workflows/memora_recovery.json on the tiny model."""
    backend = EmbeddedBackend(comfy)
    wf = Workflow.load(ROOT / "example_workflows" / "memora_recovery.json")
    plan = plan_jobs(wf, backend, profile=model_profile(None, tiny_ckpt, tiny_ckpt), quick=True)
    (job,) = plan.jobs
    # a prompt no other test uses: every node runs here (cached outputs from earlier tests send no events)
    (prompt_id,) = [nid for nid, title in job.titles.items() if title == K.TITLE_CONCEPT_PROMPT]
    text_input = next(k for k, v in job.api[prompt_id]["inputs"].items() if isinstance(v, str))
    job.api[prompt_id]["inputs"][text_input] = f"a photo of a star ({os.getpid()}, contract test)"
    result = backend.run(job.api)
    assert result.success, result.error_message
    ui_keys = {k for ui in result.ui_outputs.values() for k in ui}
    assert {K.UI_SCORES, K.UI_LORA, K.UI_LOSS} <= ui_keys, sorted(ui_keys)
    sent = {e for e, _ in events.sent}
    contract_events = set(K.frontend_contract()["events"].values())
    assert contract_events <= sent, sorted(contract_events - sent)
    # the metrics the demo reports come from the titled nodes
    titles = {job.titles[nid] for nid, ui in result.ui_outputs.items() if K.UI_SCORES in ui}
    assert {K.concept_score_title(m) for m in K.EVALUATED_MODELS} <= titles, titles


def test_every_node_id_in_the_contracts_is_a_registered_memora_node(comfy):
    """The node ids memora-batch and the front end name (memora/contracts.py) are node types the pack registers."""
    import nodes

    named = {v for k, v in vars(K).items() if k.startswith("NODE_") and k != "NODE_PREFIX"}
    assert named and named <= set(nodes.NODE_CLASS_MAPPINGS), sorted(named - set(nodes.NODE_CLASS_MAPPINGS))
    assert all(n.startswith(K.NODE_PREFIX) for n in named)
