"""MemoRa Load Unlearned Model on the tiny SD2-v and SDXL checkpoints: the public SD2/SDXL erasure formats (full and
partial diffusers UNets, ESD-XL / UCE style partial safetensors, an SDXL kohya-LoRA eraser) are generated at tiny size
from each checkpoint, loaded through the node in a graph run by ComfyUI's executor, and compared with an independent
reference (the checkpoint's state dict edited directly and loaded by the stock CheckpointLoaderSimple, or the stock
LoraLoader). A file made for another architecture is refused with the architecture named."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from graphs import Graph
from random_loras import lora_targets, random_kohya_lora

UNET = "model.diffusion_model."
ARCH = {"sd2": "tiny_sd2v_ckpt", "sdxl": "tiny_sdxl_ckpt", "sd15": "tiny_ckpt"}


@pytest.fixture(scope="module")
def env(comfy, comfy_base, tiny_ckpt, tiny_sd2v_ckpt, tiny_sdxl_ckpt):
    import folder_paths
    import tiny_models

    unlearned = comfy_base / "models" / "unlearned"
    unlearned.mkdir(parents=True, exist_ok=True)
    folder_paths.add_model_folder_path("unlearned", str(unlearned), is_default=True)
    ckpts = comfy_base / "models" / "checkpoints"
    names = {"sd2": tiny_sd2v_ckpt, "sdxl": tiny_sdxl_ckpt, "sd15": tiny_ckpt}
    out = {"unlearned": unlearned, "ckpts": ckpts, "names": names, "loras": comfy_base / "models" / "loras"}
    for arch, name in names.items():
        l2d = {v: k for k, v in tiny_models.arch_ldm_map(arch).items()}
        out[arch] = {"ck": load_file(str(ckpts / name)), "l2d": l2d}
    return out


def _perturb(ck: dict, keys: list[str], seed: int, scale: float = 0.2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (ck[k] + scale * torch.randn(ck[k].shape, generator=g)).contiguous() for k in keys}


def _attn2(ck: dict, parts=("to_k", "to_v")) -> list[str]:
    return sorted(k for k in ck if k.startswith(UNET) and any(f".attn2.{p}." in k for p in parts))


def _diffusers(a: dict, ldm_sd: dict) -> dict:
    return {a["l2d"][k[len(UNET):]]: v for k, v in ldm_sd.items()}


def _reference(env, arch: str, tag: str, edits: dict) -> str:
    sd = dict(env[arch]["ck"])
    assert set(edits) <= set(sd)
    sd.update(edits)
    path = env["ckpts"] / f"ref_{arch}_{tag}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path.name


def make_file(env, arch: str, kind: str):
    """(choice in the node's list, reference checkpoint name, edits) for one public erasure format."""
    a = env[arch]
    ck = a["ck"]
    u = env["unlearned"]
    if kind == "uce":  # UCE (uce_sd_erase.py, also for SDXL): cross-attention to_k / to_v weights, safetensors
        edits = _perturb(ck, _attn2(ck), 11)
        name = f"uce-{arch}.safetensors"
        save_file(_diffusers(a, edits), str(u / name))
    elif kind == "esd-x":  # ESD-XL (esd_sdxl.py esd-x): every attn2 Linear weight and bias, safetensors
        edits = _perturb(ck, _attn2(ck, ("to_q", "to_k", "to_v", "to_out.0")), 12)
        assert any(k.endswith(".bias") for k in edits)
        name = f"esd-{arch}-esdx.safetensors"
        save_file(_diffusers(a, edits), str(u / name))
    elif kind == "full":  # a full diffusers UNet state dict (torch pickle, *-UNET.pt)
        edits = _perturb(ck, _attn2(ck), 13)
        full = {k: edits.get(k, v) for k, v in ck.items() if k.startswith(UNET)}
        name = f"erased-{arch}-UNET.pt"
        torch.save(_diffusers(a, full), u / name)
    else:
        raise KeyError(kind)
    return f"unlearned/{name}", _reference(env, arch, kind, edits), edits


def _run_loader(comfy, base: str, choice: str, strength: float = 1.0):
    g = Graph()
    node = g.node("MemoRaLoadUnlearnedModel", ckpt_name=base, unlearned_weights=choice, lora_strength=strength)
    g.node("PreviewAny", source=node[3])
    return comfy.run(g.prompt), node.id


def _effective(patcher) -> dict[str, torch.Tensor]:
    import comfy.model_management as mm

    mm.load_models_gpu([patcher], force_full_load=True)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in patcher.model.state_dict().items()
            if k.startswith("diffusion_model.")}


def _load(name: str):
    import nodes

    return nodes.CheckpointLoaderSimple().load_checkpoint(name)[:3]


CASES = [("sdxl", "uce"), ("sdxl", "esd-x"), ("sdxl", "full"), ("sd2", "uce"), ("sd2", "full")]


@pytest.mark.parametrize("arch, kind", CASES)
def test_sd2_and_sdxl_erasures_load_to_the_reference_merge(comfy, env, arch, kind):
    import comfy.model_base as model_base
    import comfy.supported_models as supported_models

    choice, ref_name, edits = make_file(env, arch, kind)
    res, nid = _run_loader(comfy, env["names"][arch], choice)
    assert res.success, res.error_message
    model, _clip, _vae, report = comfy.node_outputs(nid)
    expected_cls = supported_models.SDXL if arch == "sdxl" else supported_models.SD20
    assert isinstance(model.model.model_config, expected_cls)
    if arch == "sd2":
        assert model.model.model_type == model_base.ModelType.V_PREDICTION
    assert "format detected: diffusers_unet" in report, report
    assert ("(full: replaces the base UNet)" in report) == (kind == "full"), report
    assert f"unet CHANGED: {len(edits)} of" in report, report
    with torch.inference_mode():
        got, want = _effective(model), _effective(_load(ref_name)[0])
        base = _effective(_load(env["names"][arch])[0])
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert sum(not torch.equal(got[k], base[k]) for k in base) == len(edits)


def test_sdxl_lora_eraser_loads_like_the_stock_lora_loader(comfy, env):
    """An SDXL LoRA-shaped eraser (kohya keys, as Concept Sliders / SPM-style erasers are written) on the SDXL base ==
    the stock LoraLoader's result at the same strength."""
    import nodes

    base_model = _load(env["names"]["sdxl"])[0]
    sd = random_kohya_lora(lora_targets(base_model), rank=4, seed=41, alpha=2.0)
    save_file(sd, str(env["loras"] / "sdxl-eraser-lora.safetensors"))
    res, nid = _run_loader(comfy, env["names"]["sdxl"], "loras/sdxl-eraser-lora.safetensors", 0.7)
    assert res.success, res.error_message
    model, _clip, _vae, report = comfy.node_outputs(nid)
    assert "format detected: kohya_lora" in report and "unet CHANGED by LoRA" in report, report
    ref = nodes.LoraLoaderModelOnly().load_lora_model_only(base_model, "sdxl-eraser-lora.safetensors", 0.7)[0]
    with torch.inference_mode():
        got, want, base = _effective(model), _effective(ref), _effective(base_model)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert sum(not torch.equal(got[k], base[k]) for k in base) == len(lora_targets(base_model))


@pytest.mark.parametrize("made, base, kind, made_text, base_text", [
    ("sd15", "sdxl", "uce", "an SD1.x/SD2.x-layout UNet (cross-attention width 64)", "SDXL (cross-attention width 128)"),
    ("sdxl", "sd2", "esd-x", "an SDXL-layout UNet (cross-attention width 128)", "SD2.x (cross-attention width 64)"),
    ("sd15", "sd2", "full", "an SD1.x-layout UNet (cross-attention width 64)", "SD2.x (cross-attention width 64)"),
    ("sd2", "sdxl", "full", "an SD2.x-layout UNet (cross-attention width 64)", "SDXL (cross-attention width 128)"),
])
def test_file_for_another_architecture_is_refused_naming_it(comfy, env, made, base, kind, made_text, base_text):
    choice, _ref, _ = make_file(env, made, kind)
    res, _ = _run_loader(comfy, env["names"][base], choice)
    assert not res.success
    msg = res.error_message
    assert "other shapes than the base model" in msg or "matches" in msg, msg
    assert f"It was made for {made_text}; the base checkpoint is {base_text}." in msg, msg


def test_sd1_lora_on_sdxl_base_is_refused_naming_both(comfy, env, loaded_tiny):
    sd = random_kohya_lora(lora_targets(loaded_tiny[0]), rank=4, seed=42)
    save_file(sd, str(env["loras"] / "sd1-eraser-lora.safetensors"))
    res, _ = _run_loader(comfy, env["names"]["sdxl"], "loras/sd1-eraser-lora.safetensors")
    assert not res.success
    msg = res.error_message
    assert "unet LoRA layers do not fit the base model" in msg, msg
    assert "It was made for an SD1.x/SD2.x-layout UNet (cross-attention width 64); the base checkpoint is SDXL " \
           "(cross-attention width 128)." in msg, msg
    assert msg.count("It was made for") == 1 and ".." not in msg.replace("...", ""), msg  # said once, one stop
