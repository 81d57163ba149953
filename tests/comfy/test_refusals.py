"""Issue 17: nothing silent. Through ComfyUI's own executor on the tiny SD1.x model:

- a patch reported is a patch applied: a LoRA whose layer names match the model but whose shapes do not is refused
  (layer names and both shapes in the error) by MemoRa Load Unlearned Model and MemoRa Load LoRA with a model; with
  a fitting LoRA the model's output changes exactly when the report counts patched weights;
- the wrong kind of model is refused, not run: DDIM Inversion, Regenerate and LoRA Train refuse every sampling type
  but discrete epsilon / v-prediction (the stock ModelSampling* nodes patch the real ComfyUI classes in);
- Load LoRA gives the pack's own message for a pickle that needs code (nothing runs); a save through a symlinked
  subfolder returns the name LoraLoader lists; SSIM refuses images smaller than its window; Merge LoRA refuses
  ComfyUI-native layers outside the SD1.x/SD2.x and SDXL layouts with a specific message."""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from graphs import Graph
from memora.lora import formats

RANK, ALPHA = 4, 2.0


def _pack(name: str):
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS["MemoRaLoadLoRA"]
    return importlib.import_module(cls.__module__.rsplit(".", 1)[0] + "." + name)


def _attention_lora(model, in_extra: int = 0, seed: int = 7, zero_up: bool = False) -> dict:
    """A kohya LoRA over every attention projection of the tiny model; ``in_extra`` > 0 gives lora_down that many
    extra input features: every name matches a weight, no shape fits."""
    host = _pack("_lora_host")
    shapes = host.diffusers_weight_shapes(model)
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for n in host.attention_module_names(model):
        out_f, in_f = shapes[n]
        down = torch.randn(RANK, in_f + in_extra, generator=g) / math.sqrt(in_f)
        up = torch.zeros(out_f, RANK) if zero_up else torch.randn(out_f, RANK, generator=g) * 0.5
        layers[n] = formats.LoraLayer(down=down, up=up, alpha=ALPHA)
    return formats.layers_to_kohya(layers)


def _write_lora(name: str, sd: dict) -> str:
    """loras/memora_test/refusals/<name>; its list name (relative to the loras folder)."""
    p = _pack("_lora_host").loras_root() / "memora_test" / "refusals" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    if not p.exists():
        save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
    return f"memora_test/refusals/{name}"


@pytest.fixture(scope="module")
def loras(comfy, loaded_tiny):
    model = loaded_tiny[0]
    return {"good": _write_lora("good.safetensors", _attention_lora(model)),
            "misfit": _write_lora("misfit.safetensors", _attention_lora(model, in_extra=8)),
            "zero": _write_lora("zero.safetensors", _attention_lora(model, zero_up=True)),
            "layers": len(_pack("_lora_host").attention_module_names(model))}


def _sample(g: Graph, model, clip, seed: int = 3):
    """One KSampler step from a fixed latent: its output is the model's prediction."""
    pos = g.node("CLIPTextEncode", text="a photo of the parachute", clip=clip)
    lat = g.node("EmptyLatentImage", width=64, height=64, batch_size=1)
    ks = g.node("KSampler", model=model, positive=pos[0], negative=pos[0], latent_image=lat[0], seed=seed, steps=1,
                cfg=1.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    g.node("PreviewAny", source=ks[0])  # an output node, so the executor runs the sampler
    return ks


def _samples(comfy, ref) -> torch.Tensor:
    return comfy.node_outputs(ref.id)[0]["samples"].clone()


# -- 1. a patch reported is a patch applied ---------------------------------------------------------------------------
def test_load_unlearned_refuses_a_lora_whose_shapes_do_not_fit(comfy, tiny_ckpt, loras):
    g = Graph()
    node = g.node("MemoRaLoadUnlearnedModel", ckpt_name=tiny_ckpt, unlearned_weights=f"loras/{loras['misfit']}",
                  lora_strength=1.0)
    g.node("PreviewAny", source=node[3])
    res = comfy.run(g.prompt)
    assert not res.success, "a LoRA whose shapes fit no weight was reported as applied"
    msg = res.error_message
    n = loras["layers"]
    assert f"{n} of {n} LoRA patches do not fit the shape of the model weight" in msg, msg
    # the layer, the weight it names, and both shapes (down has 8 more inputs than the weight)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k -> " in msg, msg
    assert "the LoRA delta is [32, 40]" in msg and "but the weight is [32, 32]" in msg, msg


def test_load_lora_with_model_refuses_misfit_and_reports_the_check(comfy, tiny_ckpt, loras):
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=tiny_ckpt)
    bad = g.node("MemoRaLoadLoRA", lora_name=loras["misfit"], model=ck[0])
    g.node("PreviewAny", source=bad[1])
    res = comfy.run(g.prompt)
    assert not res.success and "do not fit the shape of the model weight" in res.error_message, res.error_message
    assert "but the weight is [32, 32]" in res.error_message

    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=tiny_ckpt)
    good = g.node("MemoRaLoadLoRA", lora_name=loras["good"], model=ck[0])
    g.node("PreviewAny", source=good[1])
    res = comfy.run(g.prompt)
    assert res.success, res.error_message
    report = comfy.node_outputs(good.id)[1]
    assert f"checked against the model: {loras['layers']} UNet layers fit its weights" in report, report


@pytest.mark.parametrize("lora,strength,patched", [("good", 1.0, True), ("good", 0.0, False), ("zero", 1.0, False)])
def test_output_changes_exactly_when_the_report_says_patched(comfy, tiny_ckpt, loras, lora, strength, patched):
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=tiny_ckpt)
    node = g.node("MemoRaLoadUnlearnedModel", ckpt_name=tiny_ckpt, unlearned_weights=f"loras/{loras[lora]}",
                  lora_strength=strength)
    base = _sample(g, ck[0], ck[1])
    got = _sample(g, node[0], node[1])
    g.node("PreviewAny", source=node[3])
    res = comfy.run(g.prompt)
    assert res.success, res.error_message
    report = comfy.node_outputs(node.id)[3]
    n = loras["layers"]
    changed = not torch.equal(_samples(comfy, base), _samples(comfy, got))
    assert changed == patched, report
    if patched:
        assert f"unet CHANGED by LoRA: {n} of {n} layers matched, {n} weights patched" in report, report
    else:
        assert f"unet UNCHANGED: {n} of {n} layers matched, 0 weights patched" in report, report
        assert f"{n} patches change nothing" in report, report


def test_dora_and_full_diff_patches_are_checked_too(loaded_tiny):
    """Patches other than plain LoRA factors (DoRA: computed on a zero weight, catching what ComfyUI only logs;
    full-weight diffs: by shape) are checked the same way; fitting ones apply and are counted."""
    host = _pack("_lora_host")
    model = loaded_tiny[0]
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    g = torch.Generator().manual_seed(1)

    def dora(in_f):
        return {f"{name}.lora_down.weight": torch.randn(RANK, in_f, generator=g),
                f"{name}.lora_up.weight": torch.randn(32, RANK, generator=g),
                f"{name}.alpha": torch.tensor(ALPHA), f"{name}.dora_scale": torch.rand(32, 1, generator=g) + 0.5}

    clone, report = host.apply_lora(model, dora(32), 1.0)
    assert len(report.patched) == 1 and len(clone.patches) >= 1
    with pytest.raises(host.LoraShapeError, match=r"attn1_to_q -> .*the lora patch does not apply.*\[32, 32\]"):
        host.apply_lora(model, dora(48), 1.0)
    with pytest.raises(host.LoraShapeError, match=r"the diff tensor is \[32, 31\], but the weight is \[32, 32\]"):
        host.apply_lora(model, {f"{name}.diff": torch.randn(32, 31, generator=g)}, 1.0)
    clone, report = host.apply_lora(model, {f"{name}.diff": torch.zeros(32, 32)}, 1.0)
    assert report.patched == [] and len(report.inert) == 1  # a zero diff changes nothing, and says so


# -- 2. the wrong kind of model is refused, not run -------------------------------------------------------------------
KINDS = [
    ("ModelSamplingFlux", dict(max_shift=1.15, base_shift=0.5, width=64, height=64), "ModelSamplingFlux + CONST"),
    ("ModelSamplingSD3", dict(shift=3.0), "ModelSamplingDiscreteFlow + CONST"),
    ("ModelSamplingDiscrete", dict(sampling="x0", zsnr=False), "X0"),
    ("ModelSamplingDiscrete", dict(sampling="lcm", zsnr=False), "LCM"),
    ("ModelSamplingContinuousEDM", dict(sampling="edm", sigma_max=120.0, sigma_min=0.002), "EDM"),
]


def _kind_graph(tiny_ckpt, node: str, inputs: dict):
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=tiny_ckpt)
    patched = g.node(node, model=ck[0], **inputs)
    pos = g.node("CLIPTextEncode", text="a photo of the parachute", clip=ck[1])
    neg = g.node("CLIPTextEncode", text="", clip=ck[1])
    lat = g.node("EmptyLatentImage", width=64, height=64, batch_size=1)
    return g, patched, pos, neg, lat


@pytest.mark.parametrize("node,inputs,kind", KINDS, ids=[k[2].split(" ")[0] + "-" + k[0] for k in KINDS])
@pytest.mark.parametrize("target", ["MemoRaDDIMInversion", "MemoRaRegenerate", "MemoRaLoRATrain"])
def test_unsupported_model_kind_is_refused(comfy, tiny_ckpt, node, inputs, kind, target):
    g, model, pos, neg, lat = _kind_graph(tiny_ckpt, node, inputs)
    common = dict(model=model[0], positive=pos[0])
    if target == "MemoRaLoRATrain":
        out = g.node(target, latents=lat[0], steps=2, rank=2, alpha=2.0, learning_rate=1e-3, lr_schedule="constant",
                     batch_size=1, gradient_accumulation=1, targets="attention", random_flip=False, precision="auto",
                     gradient_checkpointing=False, seed=0, save_name="memora_test/refused_kind", **common)
        g.node("PreviewAny", source=out[3])
        what = "MemoRa LoRA training"
    else:
        extra = dict(refine_iterations=0) if target == "MemoRaDDIMInversion" else {}
        out = g.node(target, negative=neg[0], latent=lat[0], steps=10, start_at_step=4, cfg=2.0, schedule="exact",
                     **extra, **common)
        g.node("PreviewAny", source=out[0])
        what = "MemoRa DDIM Inversion" if target == "MemoRaDDIMInversion" else "MemoRa Regenerate"
    res = comfy.run(g.prompt)
    assert not res.success, f"{target} ran on a {kind} model"
    msg = res.error_message
    assert f"{what} does not support this model: its sampling type is" in msg, msg
    assert kind in msg and "Supported: discrete-timestep epsilon- or v-prediction models" in msg, msg


def test_v_prediction_model_is_accepted(comfy, tiny_ckpt):
    """The check refuses what the math does not implement, not every patched model: v-prediction runs."""
    g, model, pos, neg, lat = _kind_graph(tiny_ckpt, "ModelSamplingDiscrete", dict(sampling="v_prediction",
                                                                                     zsnr=False))
    inv = g.node("MemoRaDDIMInversion", model=model[0], positive=pos[0], negative=neg[0], latent=lat[0], steps=4,
                 start_at_step=1, cfg=2.0, refine_iterations=0, schedule="exact")
    g.node("PreviewAny", source=inv[0])
    res = comfy.run(g.prompt)
    assert res.success, res.error_message
    out = comfy.node_outputs(inv.id)[0]["samples"]
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all() and out.abs().max() > 0


# -- 7. the rest ------------------------------------------------------------------------------------------------------
class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_load_lora_refuses_a_pickle_with_code_in_its_own_words(comfy, tmp_path):
    marker = tmp_path / "ran"
    p = _pack("_lora_host").loras_root() / "memora_test" / "refusals" / "evil_lora.pt"
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"lora_unet_x.lora_down.weight": torch.ones(2, 2), "evil": _RunsCode(str(marker))}, p)
    g = Graph()
    node = g.node("MemoRaLoadLoRA", lora_name="memora_test/refusals/evil_lora.pt")
    g.node("PreviewAny", source=node[1])
    res = comfy.run(g.prompt)
    assert not res.success
    msg = res.error_message
    assert "LoRA file evil_lora.pt: refused: this pickle needs Python code to load" in msg, msg
    assert "never runs code from a file" in msg and "convert it to .safetensors" in msg, msg
    assert "weights_only=False" not in msg, msg  # advice that would run the payload
    assert not marker.exists()


def test_save_through_a_symlinked_subfolder_returns_the_listed_name(comfy, tiny_ckpt, loras, tmp_path_factory):
    import folder_paths

    root = _pack("_lora_host").loras_root()
    link = root / "memora_test_link"
    if not link.exists():
        link.symlink_to(tmp_path_factory.mktemp("lora_link_target"), target_is_directory=True)
    g = Graph()
    lo = g.node("MemoRaLoadLoRA", lora_name=loras["good"])
    save = g.node("MemoRaSaveLoRA", lora=lo[0], save_name="memora_test_link/x")
    res = comfy.run(g.prompt)
    assert res.success, res.error_message
    name = comfy.node_outputs(save.id)[0]
    assert name.startswith("memora_test_link/x_") and name.endswith("_.safetensors"), name
    assert name in folder_paths.get_filename_list("loras")
    assert (link / name.split("/", 1)[1]).resolve().is_file()
    # and the stock loader finds it by that name
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=tiny_ckpt)
    stock = g.node("LoraLoader", model=ck[0], clip=ck[1], lora_name=name, strength_model=1.0, strength_clip=1.0)
    _sample(g, stock[0], stock[1])
    res = comfy.run(g.prompt)
    assert res.success, res.error_message


def test_ssim_refuses_images_smaller_than_its_window(comfy):
    g = Graph()
    a = g.node("EmptyImage", width=8, height=10, batch_size=1, color=0)
    b = g.node("EmptyImage", width=8, height=10, batch_size=1, color=255)
    node = g.node("MemoRaSimilarityScore", original=a[0], recovered=b[0])
    g.node("PreviewAny", source=node[3])
    res = comfy.run(g.prompt)
    assert not res.success
    assert "images of 10x8 pixels (height x width) are smaller than SSIM's 11x11 Gaussian window" in \
        res.error_message, res.error_message


def test_merge_refuses_native_layers_outside_the_sd_layouts(comfy):
    import nodes

    g = torch.Generator().manual_seed(0)
    # a Flux name: in neither the SD1.x/SD2.x nor the SDXL UNet layout the merge can map
    body = "diffusion_model.double_blocks.0.img_attn.qkv"
    sd = {f"{body}.lora_down.weight": torch.randn(2, 8, generator=g),
          f"{body}.lora_up.weight": torch.randn(8, 2, generator=g), f"{body}.alpha": torch.tensor(2.0)}
    cls = nodes.NODE_CLASS_MAPPINGS["MemoRaMultiLoRAMerge"]
    with pytest.raises(ValueError, match=r"lora_1: a ComfyUI-native LoRA .* exist in neither the SD1.x/SD2.x and "
                                         r"SDXL UNet layouts.*MemoRa Load LoRA with its model connected"):
        cls.execute(sd, 1.0, "concat", 0, 0.5, 0, "")
