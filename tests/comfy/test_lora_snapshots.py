"""MemoRa LoRA Train's snapshots (``snapshot_steps``), through ComfyUI's own executor on the tiny SD1.x model.

What is shown: one training with snapshots at 2 and 4 of 6 updates saves three files, listed in the node's LoRA list
in update order; the snapshot at N updates is bit for bit the file of a separate N-update run with the same seed and
``schedule_steps`` = 6 (tensors and the recipe metadata), while a separate run on its own shorter schedule differs
(the schedule is what makes them equal); every bad ``snapshot_steps`` / ``schedule_steps`` is refused before any
work with nothing written."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from graphs import Graph
from memora import contracts
from memora.lora import recipe as R

PROMPT = "a photo of the parachute"
TOTAL = 6


def _pack(name: str):
    import nodes

    root = nodes.NODE_CLASS_MAPPINGS["MemoRaLoRATrain"].__module__.rsplit(".", 2)[0]
    return importlib.import_module(f"{root}.nodes.{name}")


def _inputs(**kw):
    args = dict(steps=TOTAL, rank=4, alpha=4.0, learning_rate=3e-3, lr_schedule="cosine", batch_size=2,
                gradient_accumulation=1, targets="attention", random_flip=True, precision="auto",
                gradient_checkpointing=False, seed=7, save_name="memora_snap/curve")
    args.update(kw)
    return args


def _files(root: Path) -> set:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def snapshot_runs(comfy, tiny_ckpt):
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=tiny_ckpt)
    pos = g.node("CLIPTextEncode", text=PROMPT, clip=ck[1])
    lat = g.node("EmptyLatentImage", width=64, height=64, batch_size=3)
    ks = g.node("KSampler", model=ck[0], positive=pos[0], negative=pos[0], latent_image=lat[0], seed=3, steps=3,
                cfg=2.0, sampler_name="ddim", scheduler="ddim_uniform", denoise=1.0)
    common = dict(model=ck[0], latents=ks[0], positive=pos[0])
    g.node("MemoRaLoRATrain", node_id="long", **common, **_inputs(snapshot_steps=" 4, 2"))
    for n in (2, 4):
        g.node("MemoRaLoRATrain", node_id=f"sep{n}", **common,
               **_inputs(steps=n, schedule_steps=TOTAL, save_name=f"memora_snap/separate{n}"))
    g.node("MemoRaLoRATrain", node_id="own2", **common, **_inputs(steps=2, save_name="memora_snap/own_schedule2"))
    res = comfy.run(g.prompt)
    assert res.success, res.error_message
    root = _pack("_lora_host").loras_root()
    return {nid: [root / f for f in res.ui_outputs[nid][contracts.UI_LORA]]
            for nid in ("long", "sep2", "sep4", "own2")}


def _meta(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def test_snapshots_are_saved_next_to_the_final_file_and_listed_in_update_order(snapshot_runs):
    files = snapshot_runs["long"]
    assert [R.snapshot_step_of(f.name) for f in files] == [2, 4, None]
    assert files[0].name.startswith("curve_step2_") and files[1].name.startswith("curve_step4_")
    assert files[2].name.startswith("curve_0") and len({f.parent for f in files}) == 1
    assert all(f.is_file() for f in files)
    recipes = [json.loads(_meta(f)["memora.recipe"]) for f in files]
    assert [(r["steps"], r["schedule_steps"]) for r in recipes] == [(2, TOTAL), (4, TOTAL), (TOTAL, 0)]


@pytest.mark.parametrize("n", [2, 4])
def test_snapshot_is_bit_for_bit_the_separate_run_on_the_same_schedule(snapshot_runs, n):
    snap = snapshot_runs["long"][[2, 4].index(n)]
    (sep,) = snapshot_runs[f"sep{n}"]
    a, b = load_file(str(snap)), load_file(str(sep))
    assert sorted(a) == sorted(b) and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = _meta(snap), _meta(sep)
    for key in ("memora.recipe", "memora.steps", "memora.final_loss", "memora.micro_steps",
                "memora.training_latents", "memora.base_model_hash"):
        assert ma[key] == mb[key], key
    final = load_file(str(snapshot_runs["long"][2]))
    assert any(not torch.equal(a[k], final[k]) for k in a if k.endswith("lora_up.weight"))


def test_a_short_run_on_its_own_schedule_differs(snapshot_runs):
    """The control: without schedule_steps the 2-update run decays its learning rate over 2 updates, not 6."""
    a = load_file(str(snapshot_runs["long"][0]))
    b = load_file(str(snapshot_runs["own2"][0]))
    ups = [k for k in a if k.endswith("lora_up.weight")]
    assert ups and any(not torch.equal(a[k], b[k]) for k in ups)


@pytest.mark.parametrize("kw, message", [
    ({"snapshot_steps": "2,x"}, "'x' is not a whole number"),
    ({"snapshot_steps": "2.5"}, "not a whole number"),
    ({"snapshot_steps": "0,2"}, "0 is not a number of updates"),
    ({"snapshot_steps": "2,7"}, r"7 is beyond the training length \(steps = 6\)"),
    ({"snapshot_steps": "2,4,2"}, "2 appears more than once"),
    ({"snapshot_steps": "2,,4"}, "entry 2 is empty"),
    ({"snapshot_steps": "2", "save_name": ""}, "needs a save_name"),
    ({"schedule_steps": 3}, r"schedule_steps must be 0 .* or at least steps \(6\), got 3"),
])
def test_bad_snapshot_inputs_are_refused_before_any_work(loaded_tiny, kw, message):
    import comfy.utils

    model, clip, _ = loaded_tiny
    with torch.inference_mode():
        pos = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
    root = _pack("_lora_host").loras_root()
    root.mkdir(parents=True, exist_ok=True)
    before = _files(root)
    calls = []
    comfy.utils.set_progress_bar_global_hook(lambda *a, **k: calls.append(a))
    try:
        with pytest.raises(ValueError, match=message), torch.inference_mode():
            _pack("train").MemoRaLoRATrain.execute(model, {"samples": torch.zeros(2, 4, 8, 8)}, pos, **_inputs(**kw))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert not calls, "training started before the input was checked"
    assert _files(root) == before
