"""LoRA files across ComfyUI and diffusers on the tiny SD1.x model: a kohya file written by memora.lora.save loads in
stock LoraLoader with every layer patched and no warning, gives the same UNet output in diffusers, and MemoRa Load
LoRA reads the same LoRA from kohya, diffusers-old, PEFT and ComfyUI-native files to identical deltas."""

from __future__ import annotations

import importlib
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from graphs import Graph
from memora.lora import formats
from memora.lora.save import save_safetensors_atomic

RANK, ALPHA = 4, 2.0  # alpha != rank so a lost alpha shows up as a factor-2 error


def _host():
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS["MemoRaLoadLoRA"]
    return importlib.import_module(cls.__module__.rsplit(".", 1)[0] + "._lora_host")


@pytest.fixture(scope="module")
def attn_lora(loaded_tiny):
    """A random rank-4 kohya LoRA over every attention projection of the tiny model, and the module names."""
    model = loaded_tiny[0]
    host = _host()
    names = host.attention_module_names(model)
    shapes = host.diffusers_weight_shapes(model)
    g = torch.Generator().manual_seed(7)
    layers = {}
    for n in names:
        out_f, in_f = shapes[n]
        down = torch.randn(RANK, in_f, generator=g) / math.sqrt(in_f)
        up = torch.randn(out_f, RANK, generator=g) * 0.5
        layers[n] = formats.LoraLayer(down=down, up=up, alpha=ALPHA)
    return formats.layers_to_kohya(layers), names, shapes


@pytest.fixture(scope="module")
def lora_file(comfy, attn_lora):
    host = _host()
    path = save_safetensors_atomic(attn_lora[0], host.loras_root(), "memora_test/attn",
                                   {"memora_format": "kohya"})
    return host.relative_to_loras(path), path


def _write_test_lora(name: str, sd: dict) -> str:
    """Write a fixture LoRA file (plain safetensors, as other tools would) under loras/memora_test/; its list name."""
    p = _host().loras_root() / "memora_test" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    if not p.exists():
        save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
    return f"memora_test/{name}"


def test_tiny_attention_lora_counts(attn_lora):
    sd, names, shapes = attn_lora
    summary = formats.summarize(sd)
    formula = sum(RANK * (shapes[n][0] + shapes[n][1]) for n in names)
    print(f"\ntiny model attention-only rank-{RANK} LoRA: {summary['layers']} layers, {summary['params']:,} parameters")
    assert len(names) == 56 and summary["layers"] == 56
    assert summary["params"] == formula


def test_saved_file_is_kohya_and_named_with_counter(lora_file, attn_lora):
    name, path = lora_file
    assert name.startswith("memora_test/attn_") and name.endswith("_.safetensors")
    back = load_file(str(path))
    assert formats.detect_format(back) == formats.KOHYA
    assert set(back) == set(attn_lora[0])
    for k, v in attn_lora[0].items():
        assert torch.equal(back[k], v), k


def _sample_and_preview(g, model, pos, lat, vae):
    """One sampling step and a preview: an output node so ComfyUI runs the loaders feeding it."""
    ks = g.node("KSampler", model=model, positive=pos[0], negative=pos[0], latent_image=lat[0], seed=1, steps=1,
                cfg=1.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    dec = g.node("VAEDecode", samples=ks[0], vae=vae)
    g.node("PreviewImage", images=dec[0])


def _unet_eps(diffusion_model, x, t, ctx):
    with torch.no_grad():
        return diffusion_model(x, timesteps=t, context=ctx)


def test_stock_loraloader_loads_every_layer_and_diffusers_agrees(comfy, tiny_ckpt, tiny_ckpt_path, lora_file,
                                                                 attn_lora, caplog):
    import comfy.model_management as mm
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    name, path = lora_file
    sd, names, _ = attn_lora
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=tiny_ckpt)
    lo = g.node("LoraLoader", model=ck[0], clip=ck[1], lora_name=name, strength_model=1.0, strength_clip=1.0)
    pos = g.node("CLIPTextEncode", text="a photo of the parachute", clip=lo[1])
    lat = g.node("EmptyLatentImage", width=64, height=64, batch_size=1)
    _sample_and_preview(g, lo[0], pos, lat, ck[2])
    with caplog.at_level(logging.WARNING):
        res = comfy.run(g.prompt)
    assert res.success, res.error
    bad = [r.getMessage() for r in caplog.records
           if "lora key not loaded" in r.getMessage() or "NOT LOADED" in r.getMessage()]
    assert bad == []
    patched = comfy.node_outputs(lo.id)[0]
    host = _host()
    ldm_of = {d: ldm for ldm, d in host.ldm_to_diffusers_map(patched).items()}
    want = {f"diffusion_model.{ldm_of[n]}.weight" for n in names}
    assert want <= set(patched.patches), sorted(want - set(patched.patches))[:3]
    assert len(want) == 56

    # Same weights in diffusers, loaded the way StableDiffusionPipeline.load_lora_weights does it (kohya file ->
    # lora_state_dict -> load_lora_into_unet), and our own kohya_to_diffusers via load_lora_adapter.
    g2 = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g2)
    t = torch.tensor([500.0, 120.0])
    ctx = torch.randn(2, 7, 64, generator=g2)
    base_unet = __import__("tiny_models").diffusers_unet_from_checkpoint(tiny_ckpt_path)
    with torch.no_grad():
        base_out = base_unet(x, t, encoder_hidden_states=ctx).sample
    unet_a = __import__("tiny_models").diffusers_unet_from_checkpoint(tiny_ckpt_path)
    state, alphas, meta = StableDiffusionLoraLoaderMixin.lora_state_dict(load_file(str(path)),
                                                                          return_lora_metadata=True)
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, unet_a, metadata=meta)
    unet_b = __import__("tiny_models").diffusers_unet_from_checkpoint(tiny_ckpt_path)
    unet_b.load_lora_adapter(formats.kohya_to_diffusers(sd), prefix="unet")
    with torch.no_grad():
        out_a = unet_a(x, t, encoder_hidden_states=ctx).sample
        out_b = unet_b(x, t, encoder_hidden_states=ctx).sample
    try:
        mm.load_models_gpu([patched])
        comfy_out = _unet_eps(patched.model.diffusion_model, x, t, ctx)
    finally:
        mm.unload_all_models()
    effect = (comfy_out - base_out).abs().max().item()
    err_a = (comfy_out - out_a).abs().max().item()
    err_b = (comfy_out - out_b).abs().max().item()
    print(f"\nLoRA effect on UNet output {effect:.3e}; ComfyUI vs diffusers load_lora_into_unet {err_a:.2e}, "
          f"vs load_lora_adapter(kohya_to_diffusers) {err_b:.2e}")
    assert effect > 1e-2
    assert err_a < 1e-4 and err_b < 1e-4


def test_stock_loraloader_drops_peft_attention_keys(comfy, tiny_ckpt, attn_lora, caplog):
    """Why files are written in kohya format: stock LoraLoader drops every attention key of the PEFT spelling (and
    the warning capture above does see those warnings)."""
    name = _write_test_lora("peft_for_stock.safetensors", formats.kohya_to_diffusers(attn_lora[0]))
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=tiny_ckpt)
    lo = g.node("LoraLoader", model=ck[0], clip=ck[1], lora_name=name,
                strength_model=1.0, strength_clip=1.0)
    g.node("PreviewAny", source=lo[0])
    with caplog.at_level(logging.WARNING):
        res = comfy.run(g.prompt)
    assert res.success, res.error
    dropped = [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(dropped) == 112, len(dropped)


def _variants(sd, ldm_map):
    """The same LoRA in the other formats (alphas folded where the format has none)."""
    peft = formats.kohya_to_diffusers(sd)
    old = {k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight"): v
           for k, v in peft.items()}
    peft_wrapped = {"base_model.model." + k[len("unet."):]: v for k, v in peft.items()}
    ldm_of = {d: ldm for ldm, d in ldm_map.items()}
    native = {}
    for name, layer in formats.kohya_layers(sd).items():
        ldm = ldm_of[formats.kohya_to_module(name)]
        native[f"diffusion_model.{ldm}.lora_up.weight"] = layer.up
        native[f"diffusion_model.{ldm}.lora_down.weight"] = layer.down
        native[f"diffusion_model.{ldm}.alpha"] = torch.tensor(layer.alpha)
    return {"diffusers-old": old, "peft": peft, "peft-wrapped": peft_wrapped, "comfy": native}


def test_load_node_reads_every_format_to_identical_deltas(comfy, tiny_ckpt, lora_file, attn_lora, loaded_tiny):
    host = _host()
    sd = attn_lora[0]
    files = {"kohya": lora_file[0]}
    for fmt, variant in _variants(sd, host.ldm_to_diffusers_map(loaded_tiny[0])).items():
        files[fmt] = _write_test_lora(f"variant_{fmt}.safetensors", variant)
    ref = {n: layer.delta() for n, layer in formats.kohya_layers(sd).items()}
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=tiny_ckpt)
    refs = {}
    for fmt, name in files.items():
        # comfy-native needs the model's module map: give the model to that one, and to one other for the check
        kw = {"model": ck[0]} if fmt in ("comfy", "peft") else {}
        refs[fmt] = g.node("MemoRaLoadLoRA", lora_name=name, **kw)
        g.node("PreviewAny", source=refs[fmt][1])
    # the normalised ComfyUI-native file goes on through core LoraModelLoader into sampling
    lm = g.node("LoraModelLoader", model=ck[0], lora=refs["comfy"][0], strength_model=1.0)
    pos = g.node("CLIPTextEncode", text="x", clip=ck[1])
    lat = g.node("EmptyLatentImage", width=64, height=64, batch_size=1)
    _sample_and_preview(g, lm[0], pos, lat, ck[2])
    res = comfy.run(g.prompt)
    assert res.success, res.error
    expected_fmt = {"kohya": "kohya", "diffusers-old": "diffusers-old", "peft": "peft", "peft-wrapped": "peft",
                    "comfy": "comfy"}
    for fmt, ref_node in refs.items():
        lora, report = comfy.node_outputs(ref_node.id)
        assert formats.detect_format(lora) == formats.KOHYA
        assert f"format {expected_fmt[fmt]} ->" in report and "56 layers" in report, report
        layers = formats.kohya_layers(lora)
        assert set(layers) == set(ref), fmt
        worst = max((layers[n].delta() - ref[n]).abs().max().item() for n in ref)
        assert worst < 1e-6, (fmt, worst)


def test_load_node_unknown_format_names_known_formats(comfy):
    import nodes

    name = _write_test_lora("not_a_lora.safetensors", {"foo.bar.weight": torch.zeros(2, 2)})
    node = nodes.NODE_CLASS_MAPPINGS["MemoRaLoadLoRA"]
    with pytest.raises(ValueError) as e:
        node.execute(name)
    msg = str(e.value)
    assert "unknown LoRA format" in msg and "kohya" in msg and "peft" in msg and "foo.bar.weight" in msg


def test_load_node_refuses_lora_for_another_model(comfy, loaded_tiny):
    import nodes

    host = _host()
    # A LoRA on real SD1.x's deepest attention (the tiny UNet has no up_blocks.3 attention).
    sd = formats.layers_to_kohya({"up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_q":
                                  formats.LoraLayer(torch.zeros(4, 320), torch.zeros(320, 4), 4.0)})
    name = _write_test_lora("sd15_only.safetensors", sd)
    node = nodes.NODE_CLASS_MAPPINGS["MemoRaLoadLoRA"]
    with pytest.raises(host.LoraKeyError) as e:
        node.execute(name, loaded_tiny[0])
    assert "format kohya" in str(e.value) and "up_blocks_3" in str(e.value)


def test_apply_lora_patches_a_clone_and_reports(loaded_tiny, attn_lora):
    host = _host()
    model = loaded_tiny[0]
    before = dict(model.patches)
    clone, report = host.apply_lora(model, attn_lora[0], 1.0)
    assert len(report.layers) == 56 and len(report.patched) == 56
    assert dict(model.patches) == before and len(clone.patches) >= 56
    bad = dict(attn_lora[0])
    bad["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 32)
    bad["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = torch.zeros(32, 4)
    with pytest.raises(host.LoraKeyError) as e:
        host.apply_lora(model, bad, 1.0)
    assert "1 of 57" in str(e.value) and "down_blocks_9" in str(e.value)


def test_save_node_writes_a_new_file_each_time(comfy, lora_file, attn_lora):
    import nodes

    host = _host()
    node = nodes.NODE_CLASS_MAPPINGS["MemoRaSaveLoRA"]
    out1 = node.execute(attn_lora[0], "memora_test/resaved")
    out2 = node.execute(attn_lora[0], "memora_test/resaved")
    f1, f2 = out1.args[0], out2.args[0]
    assert f1 != f2 and f1.startswith("memora_test/resaved_") and f2.startswith("memora_test/resaved_")
    assert out1.ui == {"memora_lora": [f1]}
    back = load_file(str(host.loras_root() / f2))
    assert all(torch.equal(back[k], v) for k, v in attn_lora[0].items())
    with pytest.raises(ValueError):
        node.execute(attn_lora[0], "../escape")
    assert not (host.loras_root().parent / "escape_00001_.safetensors").exists()
    assert Path(host.loras_root() / f1).is_file()


def test_comfy_native_file_for_a_non_sd1x_unet_needs_the_model(comfy, loaded_tiny, attn_lora):
    """The tiny UNet's ldm names differ from SD1.x's: without the model the node says to connect it."""
    import nodes

    host = _host()
    native = _variants(attn_lora[0], host.ldm_to_diffusers_map(loaded_tiny[0]))["comfy"]
    name = _write_test_lora("native_tiny.safetensors", native)
    node = nodes.NODE_CLASS_MAPPINGS["MemoRaLoadLoRA"]
    with pytest.raises(ValueError, match="comfy format.*Connect the model input"):  # the pack loads its own copy of memora
        node.execute(name)
    lora, report = node.execute(name, loaded_tiny[0]).args
    assert "format comfy -> kohya; 56 layers" in report


def test_peft_file_saved_by_diffusers_keeps_its_lora_alpha(comfy, attn_lora):
    """diffusers' own save_lora_weights with lora_alpha != r: the alpha lives in the file's metadata only."""
    import nodes
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    host = _host()
    sd = attn_lora[0]
    layers = formats.kohya_layers(sd)
    unet_layers = {}
    for name, layer in layers.items():
        mod = formats.kohya_to_module(name)
        unet_layers[f"{mod}.lora_A.weight"] = layer.down
        unet_layers[f"{mod}.lora_B.weight"] = layer.up
    folder = host.loras_root() / "memora_test"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "diffusers_saved.safetensors").exists():
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            str(folder), unet_lora_layers=unet_layers, weight_name="diffusers_saved.safetensors",
            unet_lora_adapter_metadata={"r": RANK, "lora_alpha": ALPHA})
    node = nodes.NODE_CLASS_MAPPINGS["MemoRaLoadLoRA"]
    lora, report = node.execute("memora_test/diffusers_saved.safetensors").args
    assert "format peft" in report and f"alpha {ALPHA:g}" in report, report
    back = formats.kohya_layers(lora)
    worst = max((back[n].delta() - layers[n].delta()).abs().max().item() for n in layers)
    assert worst < 1e-6
