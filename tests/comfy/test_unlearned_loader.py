"""MemoRa Load Unlearned Model on the tiny SD1.x checkpoint: every zoo format is generated at tiny size from the tiny
checkpoint, loaded through the node in a graph run by ComfyUI's executor, and compared with a reference merge made
independently (the tiny checkpoint's state dict edited directly and loaded by the stock CheckpointLoaderSimple, or
the stock LoraLoader for the LoRA)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from graphs import Graph

UNET = "model.diffusion_model."
TE = "cond_stage_model.transformer."


# -- building the files --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(comfy, tiny_ckpt, tiny_ckpt_path, comfy_base):
    import folder_paths
    import tiny_models

    unlearned = comfy_base / "models" / "unlearned"
    unlearned.mkdir(parents=True, exist_ok=True)
    folder_paths.add_model_folder_path("unlearned", str(unlearned), is_default=True)
    ck = load_file(str(tiny_ckpt_path))
    d2l = tiny_models.diffusers_to_ldm_unet_map()
    return {"ck": ck, "d2l": d2l, "l2d": {v: k for k, v in d2l.items()}, "unlearned": unlearned,
            "ckpts": comfy_base / "models" / "checkpoints", "loras": comfy_base / "models" / "loras",
            "unet_dir": comfy_base / "models" / "diffusion_models", "base": tiny_ckpt}


def _perturb(ck: dict, keys: list[str], seed: int, scale: float = 0.2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (ck[k] + scale * torch.randn(ck[k].shape, generator=g)).contiguous() for k in keys}


def _attn2_kv(ck) -> list[str]:
    """The ESD-x / UCE training target: every cross-attention to_k / to_v (8 tensors on the tiny UNet)."""
    return sorted(k for k in ck if k.startswith(UNET) and (".attn2.to_k." in k or ".attn2.to_v." in k))


def _te_layer0(ck) -> list[str]:
    return sorted(k for k in ck if _hf(k).startswith("text_model.encoder.layers.0.") and k.startswith(TE))


def _hf(k: str) -> str:
    """Checkpoint text-encoder key -> Hugging Face CLIPTextModel key (the tiny checkpoint uses the old SD1 layout,
    cond_stage_model.transformer.<encoder...>, without 'text_model.')."""
    rest = k[len(TE):]
    return rest if rest.startswith("text_model.") else "text_model." + rest


def _diffusers(env, ldm_sd: dict) -> dict:
    return {env["l2d"][k[len(UNET):]]: v for k, v in ldm_sd.items()}


def _reference(env, name: str, edits: dict[str, torch.Tensor]) -> str:
    """Reference merge: the tiny checkpoint with `edits` written into a copy of its state dict, as a new checkpoint."""
    sd = dict(env["ck"])
    assert set(edits) <= set(sd)
    sd.update(edits)
    path = env["ckpts"] / f"ref_{name}.safetensors"
    if not path.exists():
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path.name


def _unet_full(env, seed):
    ck = env["ck"]
    keys = [k for k in ck if k.startswith(UNET)]
    edits = _perturb(ck, _attn2_kv(ck), seed)
    full = {k: edits.get(k, ck[k]) for k in keys}
    return full, edits


def make_format(env, fmt: str):
    """(choice in the node's list, reference checkpoint name, expected format, components expected to change)."""
    ck = env["ck"]
    u = env["unlearned"]
    if fmt == "diffusers_unet_full":  # UnlearnDiffAtk *-UNET-SD.pt, AdvUnlearn zoo: torch pickle, diffusers keys
        full, edits = _unet_full(env, 1)
        torch.save(_diffusers(env, full), u / "esd-nudity-UNET-SD.pt")
        return "unlearned/esd-nudity-UNET-SD.pt", _reference(env, fmt, edits), "diffusers_unet", {"unet"}
    if fmt == "diffusers_unet_partial":  # ESD / UCE 2025: only the trained tensors, safetensors
        edits = _perturb(ck, _attn2_kv(ck), 2)
        save_file(_diffusers(env, edits), str(u / "esd-x-partial.safetensors"))
        return "unlearned/esd-x-partial.safetensors", _reference(env, fmt, edits), "diffusers_unet", {"unet"}
    if fmt == "ldm_checkpoint":  # ESD compvis-*.pt: a LatentDiffusion state dict, wrapped, with schedule buffers
        full, edits = _unet_full(env, 3)
        sd = {**ck, **edits, "betas": torch.linspace(0.00085, 0.012, 1000), "lvlb_weights": torch.ones(1000)}
        torch.save({"state_dict": sd, "global_step": 1000}, u / "compvis-esd.ckpt")
        return "unlearned/compvis-esd.ckpt", _reference(env, fmt, edits), "ldm_checkpoint", {"unet"}
    if fmt == "ldm_unet_in_unet_folder":  # a ComfyUI-style UNet file in models/unet (bare ldm keys)
        full, edits = _unet_full(env, 4)
        env["unet_dir"].mkdir(parents=True, exist_ok=True)
        save_file({k[len(UNET):]: v for k, v in full.items()}, str(env["unet_dir"] / "unlearned_unet.safetensors"))
        return "unet/unlearned_unet.safetensors", _reference(env, fmt, edits), "ldm_unet", {"unet"}
    if fmt == "advunlearn_prefixed":  # AdvUnlearn zoo .pt: text_encoder.text_model.*, full dict, layer 0 trained
        edits = _perturb(ck, _te_layer0(ck), 5)
        te = {"text_encoder." + _hf(k): edits.get(k, v) for k, v in ck.items() if k.startswith(TE)}
        torch.save(te, u / "advunlearn-nudity-TE.pt")
        return "unlearned/advunlearn-nudity-TE.pt", _reference(env, fmt, edits), "text_encoder", {"text_encoder"}
    if fmt == "advunlearn_layer0":  # text_model.* keys (Hugging Face layout), layer 0 only
        edits = _perturb(ck, _te_layer0(ck), 6)
        torch.save({_hf(k): v for k, v in edits.items()}, u / "advunlearn-layer0.bin")
        return "unlearned/advunlearn-layer0.bin", _reference(env, fmt, edits), "text_encoder", {"text_encoder"}
    if fmt == "ac_delta":  # Concept Ablation delta.bin: {"unet": partial diffusers params, "text_encoder": ...}
        edits = _perturb(ck, _attn2_kv(ck), 7)
        te_edits = _perturb(ck, _te_layer0(ck), 8)
        (u / "ac").mkdir(exist_ok=True)
        torch.save({"unet": _diffusers(env, edits), "text_encoder": {_hf(k): v for k, v in te_edits.items()},
                    "modifier_token": {}}, u / "ac" / "delta.bin")
        return "unlearned/ac/delta.bin", _reference(env, fmt, {**edits, **te_edits}), "ac_delta", \
            {"unet", "text_encoder"}
    if fmt == "diffusers_pipeline":  # MACE / FMN: a folder with unet/, text_encoder/, vae/
        full, edits = _unet_full(env, 9)
        te_edits = _perturb(ck, _te_layer0(ck), 10)
        p = u / "mace-pipeline"
        for sub in ("unet", "text_encoder", "vae"):
            (p / sub).mkdir(parents=True, exist_ok=True)
        (p / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
        save_file(_diffusers(env, full), str(p / "unet" / "diffusion_pytorch_model.safetensors"))
        te = {_hf(k): te_edits.get(k, v) for k, v in ck.items() if k.startswith(TE)}
        save_file(te, str(p / "text_encoder" / "model.safetensors"))
        save_file({"decoder.conv_in.weight": torch.zeros(1)}, str(p / "vae" / "diffusion_pytorch_model.safetensors"))
        return "unlearned/mace-pipeline/", _reference(env, fmt, {**edits, **te_edits}), "diffusers_pipeline", \
            {"unet", "text_encoder"}
    raise KeyError(fmt)


FORMATS = ["diffusers_unet_full", "diffusers_unet_partial", "ldm_checkpoint", "ldm_unet_in_unet_folder",
           "advunlearn_prefixed", "advunlearn_layer0", "ac_delta", "diffusers_pipeline"]


# -- reading effective weights ---------------------------------------------------------------------------------------
def _effective(patcher) -> dict[str, torch.Tensor]:
    """The weights a ModelPatcher computes with: loaded through ComfyUI (patches applied), then copied."""
    import comfy.model_management as mm

    mm.load_models_gpu([patcher], force_full_load=True)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in patcher.model.state_dict().items()}


def _run_loader(comfy, base: str, choice: str, strength: float = 1.0):
    g = Graph()
    node = g.node("MemoRaLoadUnlearnedModel", ckpt_name=base, unlearned_weights=choice, lora_strength=strength)
    g.node("PreviewAny", source=node[3])  # an output node, so the executor runs the loader
    res = comfy.run(g.prompt)
    return res, node.id


def _load_reference(name: str):
    import nodes

    return nodes.CheckpointLoaderSimple().load_checkpoint(name)[:3]


def _encode(clip, text="a photo of the nude person"):
    return clip.encode_from_tokens(clip.tokenize(text))


@pytest.mark.parametrize("fmt", FORMATS)
def test_format_loads_to_reference_merge(comfy, env, fmt):
    choice, ref_name, detected, changed = make_format(env, fmt)
    import nodes

    node_cls = nodes.NODE_CLASS_MAPPINGS["MemoRaLoadUnlearnedModel"]
    spec = node_cls.INPUT_TYPES()["required"]["unlearned_weights"]
    options = spec[0] if isinstance(spec[0], list) else spec[1]["options"]
    assert choice in options, f"{choice} not offered by the node: {options}"
    res, nid = _run_loader(comfy, env["base"], choice)
    assert res.success, res.error_message
    model, clip, vae, report = comfy.node_outputs(nid)
    assert f"format detected: {detected}" in report, report
    for comp in ("unet", "text_encoder"):
        assert (f"{comp} CHANGED" in report) == (comp in changed), report
    ref_model, ref_clip, _ = _load_reference(ref_name)
    base_model, base_clip, _ = _load_reference(env["base"])
    with torch.inference_mode():
        got = _effective(model)
        want = _effective(ref_model)
        base = _effective(base_model)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k
        n_diff = sum(not torch.equal(got[k], base[k]) for k in base)
        assert (n_diff > 0) == ("unet" in changed)
        got_c, want_c, base_c = _effective(clip.patcher), _effective(ref_clip.patcher), _effective(base_clip.patcher)
        # Only the text model: text_projection / logit_scale are not in SD1.x checkpoints (left uninitialised).
        want_c = {k: v for k, v in want_c.items() if ".text_model." in k}
        base_c = {k: v for k, v in base_c.items() if ".text_model." in k}
        assert len(want_c) == 36
        for k in want_c:
            assert torch.equal(got_c[k], want_c[k]), k
        assert any(not torch.equal(got_c[k], base_c[k]) for k in base_c) == ("text_encoder" in changed)


def test_advunlearn_prefixed_changes_text_encoder_output(comfy, env):
    """Stock ComfyUI falls back to an empty CLIP for this file; here its outputs change, and match the reference."""
    choice, ref_name, _, _ = make_format(env, "advunlearn_prefixed")
    res, nid = _run_loader(comfy, env["base"], choice)
    assert res.success, res.error_message
    clip = comfy.node_outputs(nid)[1]
    base_clip = _load_reference(env["base"])[1]
    ref_clip = _load_reference(ref_name)[1]
    with torch.inference_mode():
        out, base, ref = _encode(clip), _encode(base_clip), _encode(ref_clip)
    assert (out - base).abs().max() > 1e-3
    assert torch.allclose(out, ref, atol=1e-6)


def test_graph_samples_like_reference(comfy, env):
    """The loaded model samples exactly like the reference merge in a full graph (KSampler -> latent)."""
    choice, ref_name, _, _ = make_format(env, "ac_delta")
    outs = {}
    for label, loader in (("node", ("MemoRaLoadUnlearnedModel", dict(ckpt_name=env["base"], unlearned_weights=choice,
                                                                    lora_strength=1.0))),
                          ("ref", ("CheckpointLoaderSimple", dict(ckpt_name=ref_name)))):
        g = Graph()
        ck = g.node(loader[0], **loader[1])
        pos = g.node("CLIPTextEncode", text="a photo of the parachute", clip=ck[1])
        neg = g.node("CLIPTextEncode", text="", clip=ck[1])
        lat = g.node("EmptyLatentImage", width=64, height=64, batch_size=1)
        ks = g.node("KSampler", model=ck[0], positive=pos[0], negative=neg[0], latent_image=lat[0], seed=3, steps=3,
                    cfg=5.0, sampler_name="ddim", scheduler="ddim_uniform", denoise=1.0)
        g.node("PreviewAny", source=ks[0])
        res = comfy.run(g.prompt)
        assert res.success, res.error_message
        outs[label] = comfy.node_outputs(ks.id)[0]["samples"]
    assert torch.allclose(outs["node"], outs["ref"], atol=1e-5)


def test_spm_kohya_lora_matches_stock_lora_loader(comfy, env):
    """SPM ships a kohya LoRA: applied as a LoRA (here with text-encoder layers too), the result equals the stock
    LoraLoader on the base checkpoint at the same strength."""
    import nodes

    ck = env["ck"]
    g = torch.Generator().manual_seed(11)
    lora = {}
    unet_keys = _attn2_kv(ck) + [k for k in ck if k.startswith(UNET) and ".attn1.to_q.weight" in k]
    te_keys = [k for k in _te_layer0(ck) if k.endswith(("q_proj.weight", "v_proj.weight"))]
    for k in unet_keys + te_keys:
        if k in te_keys:
            name = "lora_te_" + _hf(k)[: -len(".weight")].replace(".", "_")
        else:
            name = "lora_unet_" + env["l2d"][k[len(UNET):]][: -len(".weight")].replace(".", "_")
        out_f, in_f = ck[k].shape[:2]
        lora[f"{name}.lora_down.weight"] = torch.randn(2, in_f, generator=g) * 0.3
        lora[f"{name}.lora_up.weight"] = torch.randn(out_f, 2, generator=g) * 0.3
        lora[f"{name}.alpha"] = torch.tensor(1.0)
    env["loras"].mkdir(parents=True, exist_ok=True)
    save_file(lora, str(env["loras"] / "spm_tiny.safetensors"))
    res, nid = _run_loader(comfy, env["base"], "loras/spm_tiny.safetensors", strength=0.7)
    assert res.success, res.error_message
    model, clip, _, report = comfy.node_outputs(nid)
    n = len(unet_keys)
    assert "format detected: kohya_lora" in report, report
    assert f"unet CHANGED by LoRA: {n} of {n} layers matched, {n} weights patched" in report, report
    assert "text_encoder CHANGED by LoRA: 2 of 2 layers matched" in report, report
    base_model, base_clip, _ = _load_reference(env["base"])
    ref_model, ref_clip = nodes.LoraLoader().load_lora(base_model, base_clip, "spm_tiny.safetensors", 0.7, 0.7)
    with torch.inference_mode():
        got, want, base = _effective(model), _effective(ref_model), _effective(base_model)
        for k in want:
            assert torch.allclose(got[k], want[k], atol=1e-6), k
        assert sum(not torch.equal(got[k], base[k]) for k in base) == n
        assert torch.allclose(_encode(clip), _encode(ref_clip), atol=1e-6)
        assert (_encode(clip) - _encode(base_clip)).abs().max() > 1e-3


def test_memora_reference_diffusers_lora_is_converted_and_applied(comfy, env):
    """The MemoRa reference writes diffusers-format LoRAs (unet.<module>.lora.down/up.weight, no alpha: scale 1),
    whose attention keys the stock loader drops; here it is converted to kohya and applied in full."""
    import nodes

    ck = env["ck"]
    g = torch.Generator().manual_seed(12)
    diff, kohya = {}, {}
    keys = _attn2_kv(ck)
    for k in keys:
        mod = env["l2d"][k[len(UNET):]][: -len(".weight")]
        out_f, in_f = ck[k].shape[:2]
        down, up = torch.randn(4, in_f, generator=g) * 0.3, torch.randn(out_f, 4, generator=g) * 0.3
        diff[f"unet.{mod}.lora.down.weight"], diff[f"unet.{mod}.lora.up.weight"] = down, up
        name = "lora_unet_" + mod.replace(".", "_")
        kohya.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                      f"{name}.alpha": torch.tensor(4.0)})
    env["loras"].mkdir(parents=True, exist_ok=True)
    save_file(diff, str(env["loras"] / "memora_reference_lora.safetensors"))
    save_file(kohya, str(env["loras"] / "memora_reference_lora_kohya.safetensors"))
    res, nid = _run_loader(comfy, env["base"], "loras/memora_reference_lora.safetensors")
    assert res.success, res.error_message
    model, _, _, report = comfy.node_outputs(nid)
    assert "format detected: lora" in report and f"{len(keys)} of {len(keys)} layers matched" in report, report
    base_model, base_clip, _ = _load_reference(env["base"])
    ref_model, _ = nodes.LoraLoader().load_lora(base_model, base_clip, "memora_reference_lora_kohya.safetensors",
                                                1.0, 1.0)
    with torch.inference_mode():
        got, want = _effective(model), _effective(ref_model)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k


# -- refusals ------------------------------------------------------------------------------------------------------
def test_unrelated_state_dict_is_refused(comfy, env):
    save_file({"encoder.layer.0.weight": torch.ones(4, 4), "classifier.bias": torch.zeros(4)},
              str(env["unlearned"] / "bert-like.safetensors"))
    res, _ = _run_loader(comfy, env["base"], "unlearned/bert-like.safetensors")
    assert not res.success
    msg = res.error_message
    assert "no tensor in this file is a UNet, text-encoder or LoRA weight" in msg, msg
    assert "diffusers_unet" in msg and "kohya_lora" in msg and "ac_delta" in msg  # the known formats are listed


def test_file_matching_almost_nothing_is_refused(comfy, env):
    """diffusers-looking keys that exist in no SD1.x UNet: the stock loaders would drop them and return the base."""
    ck = env["ck"]
    real = _diffusers(env, {k: ck[k] for k in _attn2_kv(ck)[:1]})
    bogus = {f"down_blocks.7.attentions.{i}.proj.weight": torch.ones(2, 2) for i in range(5)}
    save_file({**real, **bogus}, str(env["unlearned"] / "other-arch.safetensors"))
    res, _ = _run_loader(comfy, env["base"], "unlearned/other-arch.safetensors")
    assert not res.success
    assert "matches almost nothing of the base model" in res.error_message, res.error_message
    assert "unet: 1 of 6 file tensors matched" in res.error_message


def test_wrong_architecture_shapes_are_refused(comfy, env):
    ck = env["ck"]
    k = _attn2_kv(ck)[0]
    bad = _diffusers(env, {k: torch.zeros(ck[k].shape[0], ck[k].shape[1] * 2)})
    save_file(bad, str(env["unlearned"] / "sd2-like.safetensors"))
    res, _ = _run_loader(comfy, env["base"], "unlearned/sd2-like.safetensors")
    assert not res.success and "other shapes than the base model" in res.error_message, res.error_message


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_without_running_it(comfy, env, tmp_path):
    marker = tmp_path / "code_ran"
    path = env["unlearned"] / "malicious-UNET.pt"
    with open(path, "wb") as f:  # a state-dict-looking pickle whose loading would call os.system
        pickle.dump({"conv_in.weight": _RunsCode(str(marker))}, f, protocol=2)
    res, _ = _run_loader(comfy, env["base"], "unlearned/malicious-UNET.pt")
    assert not res.success
    assert "refused: this pickle needs Python code to load" in res.error_message, res.error_message
    assert "system" in res.error_message
    assert not marker.exists()


def test_choice_outside_the_folders_is_refused(comfy, env):
    import sys

    mod = sys.modules[comfy.node_class("MemoRaLoadUnlearnedModel").__module__]
    (env["unlearned"] / "plain.safetensors").write_bytes(b"")
    assert mod.resolve_choice("unlearned/plain.safetensors") == (env["unlearned"] / "plain.safetensors").resolve() \
        or mod.resolve_choice("unlearned/plain.safetensors").samefile(env["unlearned"] / "plain.safetensors")
    for bad in ("unlearned/../checkpoints/" + env["base"], "nowhere/x.pt", "plainname.pt", "unlearned/missing.pt",
                "unlearned/no-such-pipeline/"):
        with pytest.raises(ValueError):
            mod.resolve_choice(bad)
