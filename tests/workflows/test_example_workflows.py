"""Every workflow shipped in example_workflows/ runs: UI format -> API format through /object_info data (computed
in-process, as the server's GET /object_info computes it), models swapped for the tiny ones, step counts lowered,
executed by ComfyUI's executor. A change to a node that breaks a shipped workflow fails here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from memora_batch.workflow import Workflow, object_info_in_process, quick_settings, title_of

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "example_workflows").glob("*.json"))
TEST_LORA = "memora_example_test_lora.safetensors"
#: the tiny checkpoint fixture each workflow runs on (the default: tiny_ckpt, SD1.x)
TINY_MODEL = {"memora_recovery_sdxl": "tiny_sdxl_ckpt", "memora_recovery_flux": "tiny_flux_ckpt"}
#: (workflow, tiny checkpoint fixture): every example on its model, and memora_recovery also on SD2.x-v, as
#: docs/workflows.md tells SD2.x users to run it
RUNS = [(p, TINY_MODEL.get(p.stem, "tiny_ckpt")) for p in EXAMPLES] + \
    [(p, "tiny_sd2v_ckpt") for p in EXAMPLES if p.stem == "memora_recovery"]
#: fixture -> (ComfyUI model class, model type) that its checkpoint must load as (checked before the run)
ARCHITECTURE = {"tiny_sdxl_ckpt": ("SDXL", "EPS"), "tiny_sd2v_ckpt": ("SD20", "V_PREDICTION"),
                "tiny_flux_ckpt": ("Flux", "FLUX")}


@pytest.fixture(scope="module")
def tiny_flux_ckpt(comfy, comfy_base) -> str:
    """File name (in models/checkpoints) of the tiny Flux dev all-in-one checkpoint (tests/support/tiny_flux.py)."""
    import tiny_flux

    return tiny_flux.install_tiny_flux(comfy_base, "dev")["checkpoint"]


def _loads_as(ckpt: str, fixture: str):
    """The checkpoint is what the run claims to test: ComfyUI's model detection loads it as that architecture."""
    import comfy.model_base
    import comfy.supported_models
    import nodes

    if fixture not in ARCHITECTURE:
        return
    config_class, model_type = ARCHITECTURE[fixture]
    model = nodes.CheckpointLoaderSimple().load_checkpoint(ckpt)[0]
    assert isinstance(model.model.model_config, getattr(comfy.supported_models, config_class)), \
        type(model.model.model_config)
    assert model.model.model_type == getattr(comfy.model_base.ModelType, model_type), model.model.model_type


def test_there_are_example_workflows():
    names = {p.stem for p in EXAMPLES}
    assert {"memora_recovery", "memora_recovery_sdxl", "memora_recovery_micro", "memora_from_images",
            "recovery_sweep"} <= names, names


@pytest.fixture(scope="module")
def info(comfy):
    return object_info_in_process()


@pytest.fixture(scope="module")
def test_lora(loaded_tiny, comfy_base):
    import random_loras

    sd = random_loras.random_kohya_lora(random_loras.lora_targets(loaded_tiny[0]), rank=2, seed=3)
    return random_loras.write_lora(comfy_base / "models" / "loras", TEST_LORA, sd)


def _input_images(api: dict, input_dir: Path):
    """Write a small distinct PNG for every file a LoadImage node names."""
    import numpy as np
    from PIL import Image

    for k, node in enumerate(v for v in api.values() if v["class_type"] in ("LoadImage", "LoadImageMask")):
        name = node["inputs"]["image"]
        path = input_dir / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng(k)
            arr = (rng.random((48, 40, 3)) * 255).astype("uint8")
            arr[8:30, 10:28] = [200, 40 * (k % 6), 90]
            Image.fromarray(arr).save(path)


def tiny_version(api: dict, info: dict, tiny_ckpt: str, lora: str) -> dict:
    """The same graph on the tiny models: checkpoints -> the tiny checkpoint, LoRA files -> a random tiny LoRA,
    MemoRa Load Unlearned Model -> the tiny checkpoint as its base and as its unlearned weights (a full checkpoint
    from models/checkpoints, which the loader reads as an ldm checkpoint), few steps, 64 px."""
    out = json.loads(json.dumps(api))
    for node in out.values():
        inputs = node["inputs"]
        if "ckpt_name" in inputs and not isinstance(inputs["ckpt_name"], list):
            inputs["ckpt_name"] = tiny_ckpt
        if "lora_name" in inputs and not isinstance(inputs["lora_name"], list):
            inputs["lora_name"] = lora
        if node["class_type"] == "MemoRaLoadUnlearnedModel":
            inputs["unlearned_weights"] = f"checkpoints/{tiny_ckpt}"
    return quick_settings(out, info)


@pytest.mark.slow
@pytest.mark.parametrize("path,model", RUNS, ids=[p.stem if m == TINY_MODEL.get(p.stem, "tiny_ckpt")
                                                   else f"{p.stem}-{m.split('_')[1]}" for p, m in RUNS])
def test_example_workflow_runs_on_the_tiny_model(path, model, comfy, info, test_lora, comfy_base, request):
    import folder_paths

    tiny_ckpt = request.getfixturevalue(model)
    _loads_as(tiny_ckpt, model)
    thumb = path.with_suffix(".jpg")
    assert thumb.is_file() and thumb.read_bytes()[:3] == b"\xff\xd8\xff", f"{thumb.name}: JPEG thumbnail missing"
    wf = Workflow.load(path)
    assert wf.ui is not None, f"{path.name} must be in the editor's UI format (nodes/links), as templates are"
    assert any(n.get("type") in ("Note", "MarkdownNote") for n in wf.ui["nodes"]), f"{path.name}: no Note inside"
    wf.check_installed(info.keys(), "the test ComfyUI")
    api = tiny_version(wf.to_api(info), info, tiny_ckpt, test_lora)
    _input_images(api, Path(folder_paths.get_input_directory()))
    res = comfy.run(api)
    assert res.success, f"{path.name}: {res.error_message}\n{(res.error or {}).get('traceback', '')}"
    # Every save node wrote its files; every training node that saves reported an existing LoRA file.
    out_dir = Path(folder_paths.get_output_directory())
    for nid, node in api.items():
        ui = res.ui_outputs.get(nid) or {}
        if node["class_type"] == "SaveImage":
            files = ui.get("images") or []
            assert files, f"{path.name}: node {nid} ({title_of(api, nid)}) saved nothing"
            for f in files:
                assert (out_dir / f["subfolder"] / f["filename"]).is_file()
        if node["class_type"] == "MemoRaLoRATrain" and node["inputs"].get("save_name"):
            (name,) = ui.get("memora_lora") or [None]
            assert name and folder_paths.get_full_path("loras", name), f"{path.name}: LoRA not saved ({ui})"
        if node["class_type"].startswith("MemoRa") and "Score" in node["class_type"]:
            assert ui.get("memora_scores"), f"{path.name}: {title_of(api, nid)} reported no scores"


def _saved_values(ui: dict) -> dict:
    """What a saved workflow says each node computes: type, title, mode, widget values, what feeds each input, links
    (not layout or the output lists, which the editor rebuilds from the node definitions: 0.33's SaveImage, say,
    gained an output)."""
    return {
        "nodes": [(n["id"], n["type"], n.get("title"), n.get("mode", 0), n.get("widgets_values"),
                   [(i.get("name"), i.get("link"), (i.get("widget") or {}).get("name")) for i in n.get("inputs", [])])
                  for n in ui["nodes"]],
        "links": [tuple(link) for link in ui["links"]],
    }


def test_committed_workflows_match_their_generator(info):
    """scripts/make_workflows.py writes widget values by the current node definitions: a node whose inputs changed
    would shift saved values silently; this fails until the JSON is regenerated (python scripts/make_workflows.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_workflows", ROOT / "scripts" / "make_workflows.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name, (build, _title) in mod.WORKFLOWS.items():
        ui = build(info).to_json(workflow_id=mod.workflow_uuid(name))
        committed = json.loads((ROOT / "example_workflows" / f"{name}.json").read_text())
        assert _saved_values(ui) == _saved_values(committed), \
            f"example_workflows/{name}.json is out of date: run python scripts/make_workflows.py"
        assert not mod.check_layout(committed), f"{name}: overlapping nodes"


def test_the_sdxl_workflow_is_memora_recovery_on_sdxl_checkpoints_at_1024_px(info):
    """memora_recovery_sdxl is the graph of memora_recovery (every node, link, setting and title memora-batch
    addresses), with SDXL checkpoint names in its loaders and 1024 px images; its prompts are stock CLIPTextEncode
    (SDXL's pooled output and size conditioning come from ComfyUI: see scripts/make_workflows.py)."""
    from memora import contracts as K

    sd1 = Workflow.load(ROOT / "example_workflows" / "memora_recovery.json").to_api(info)
    xl = Workflow.load(ROOT / "example_workflows" / "memora_recovery_sdxl.json").to_api(info)
    assert sorted(sd1) == sorted(xl)
    diffs = {}
    for nid, a in sd1.items():
        b = xl[nid]
        assert (a["class_type"], title_of(sd1, nid)) == (b["class_type"], title_of(xl, nid)), nid
        for name in set(a["inputs"]) | set(b["inputs"]):
            if a["inputs"].get(name) != b["inputs"].get(name):
                diffs[(title_of(xl, nid), name)] = (a["inputs"].get(name), b["inputs"].get(name))
    sizes = {(t, side): (512, 1024) for t in (K.TITLE_SEED_IMAGE_SIZE, K.TITLE_EVALUATION_IMAGE_SIZE)
             for side in ("width", "height")}
    assert diffs == {(K.TITLE_ORIGINAL_MODEL, "ckpt_name"): ("sd-v1-4.ckpt", "sd_xl_base_1.0.safetensors"),
                     (K.TITLE_UNLEARNED_MODEL, "ckpt_name"): ("sd-v1-4.ckpt", "sd_xl_base_1.0.safetensors"),
                     (K.TITLE_UNLEARNED_MODEL, "unlearned_weights"): ("unlearned/UCE-Nudity-Diffusers-UNet.pt",
                                                                      "unlearned/unlearned-sdxl.safetensors"),
                     **sizes}
    titles = {title_of(xl, nid) for nid in xl}
    assert not [t for t in K.RECOVERY_WORKFLOW_TITLES if t not in titles]
    assert {n["class_type"] for n in xl.values() if n["class_type"].startswith("CLIPTextEncode")} == {"CLIPTextEncode"}
    ui = json.loads((ROOT / "example_workflows" / "memora_recovery_sdxl.json").read_text())
    notes = " ".join(n["widgets_values"][0] for n in ui["nodes"] if n["type"] in ("Note", "MarkdownNote"))
    for what in ("sd_xl_base_1.0.safetensors", "MemoRa Load Unlearned Model", "not the refiner", "1024 x 1024"):
        assert what in notes, what


def test_memora_batch_takes_sdxl_checkpoints_for_the_sdxl_workflow(comfy, tiny_sdxl_ckpt, tmp_path, capsys):
    """docs/batch.md: --original / --unlearned with SDXL checkpoints on memora_recovery_sdxl; every setting checked
    (and each job graph validated by ComfyUI) before anything runs; --dry-run runs nothing."""
    from memora_batch import cli

    out = tmp_path / "results"
    rc = cli.main(["run", str(ROOT / "example_workflows" / "memora_recovery_sdxl.json"), "--original",
                   tiny_sdxl_ckpt, "--unlearned", tiny_sdxl_ckpt, "--concept", "a photo of a star", "--dry-run",
                   "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for title in ("Original model", "Unlearned model"):
        assert re.search(rf"^  {title} .*ckpt_name='{re.escape(tiny_sdxl_ckpt)}'.*\[--original / --unlearned\]$",
                         captured.out, re.M), captured.out
    assert not out.exists()
