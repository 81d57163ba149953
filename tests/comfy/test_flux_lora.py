"""MemoRa on Flux LoRAs, on the tiny Flux-family model (tests/support/tiny_flux.py) through ComfyUI's own loaders,
LoRA machinery and executor: flow-matching training (base untouched, output changed, loss down), the file loading
with every key in LoraLoader and in diffusers' Flux LoRA loader, the sd-scripts (kohya) Flux names, MemoRa Load
Unlearned Model with EraseAnything-style LoRAs and UCE-Flux-style projection weights, AutoMemoRa and Multi-LoRA
Merge identities, and the refusals (an SD LoRA on Flux, a Flux LoRA on SD, mixed merges)."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from graphs import Graph
from memora.lora import flow as F
from memora.lora import flux as FX
from memora.lora import formats

# 2 double blocks x 8 attention projections + 2 single blocks x 3 (q, k, v)
TINY_ATTENTION_LAYERS = 22
# the ComfyUI weights they live in: img/txt qkv + img/txt proj per double block, linear1 per single block
TINY_ATTENTION_WEIGHTS = 10


def _pack(name: str, package: str = "nodes"):
    import nodes

    root = nodes.NODE_CLASS_MAPPINGS["MemoRaLoRATrain"].__module__.rsplit(".", 2)[0]
    return importlib.import_module(f"{root}.{package}.{name}")


def _node(name: str):
    import nodes

    return nodes.NODE_CLASS_MAPPINGS[name]


def _train_inputs(**kw):
    args = dict(steps=8, rank=4, alpha=4.0, learning_rate=5e-3, lr_schedule="constant", batch_size=2,
                gradient_accumulation=1, targets="attention", random_flip=True, precision="auto",
                gradient_checkpointing=False, seed=2024, save_name="memora_test/flux")
    args.update(kw)
    return args


def _velocity(model, x, sigma: float, cond) -> torch.Tensor:
    """The MODEL's velocity at x (ComfyUI's own model call: apply_model with the conditioning's extra conds)."""
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(cond, cond)
    guider.set_cfg(1.0)
    out = {}

    class _Probe(comfy.samplers.Sampler):
        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                   disable_pbar=False):
            s = torch.full((x.shape[0],), sigma)
            out["v"] = (x - model_wrap(x, s, **extra_args)) / sigma
            return torch.zeros_like(x)

    with torch.inference_mode():
        guider.sample(torch.zeros_like(x), x, _Probe(), torch.tensor([sigma, 0.0]), seed=0, disable_pbar=True)
    return out["v"]


@pytest.fixture(scope="module")
def flux(comfy, comfy_base):
    import tiny_flux

    files = {v: tiny_flux.install_tiny_flux(comfy_base, v) for v in tiny_flux.VARIANTS}
    model = tiny_flux.load_tiny_flux("dev")
    cond = tiny_flux.tiny_flux_conditioning(guidance=3.5)
    latents = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(6))
    return {"files": files, "model": model, "cond": cond, "latents": latents, "x": x}


@pytest.fixture(scope="module")
def trained(flux):
    model, cond = flux["model"], flux["cond"]
    before_weights = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    before_v = _velocity(model, flux["x"], 0.6, cond)
    with torch.inference_mode():
        out = _node("MemoRaLoRATrain").execute(model, {"samples": flux["latents"]}, cond, **_train_inputs())
    return {"out": out.result if hasattr(out, "result") else out, "before_weights": before_weights,
            "before_v": before_v}


def test_training_leaves_the_base_untouched_and_changes_the_output(flux, trained):
    model = flux["model"]
    after = model.model.diffusion_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in trained["before_weights"].items())
    assert not model.patches and not model.weight_wrapper_patches
    assert torch.equal(_velocity(model, flux["x"], 0.6, flux["cond"]), trained["before_v"])
    out_model, lora_sd, loss, filename = trained["out"][:4]
    assert len(lora_sd) == 2 * TINY_ATTENTION_LAYERS
    assert set(FX.flux_layers(lora_sd)) == {m for m in FX.block_module_shapes(128, 2, 2) if FX.is_target(m, "attention")}
    assert len(out_model.patches) == TINY_ATTENTION_WEIGHTS
    v = _velocity(out_model, flux["x"], 0.6, flux["cond"])
    assert (v - trained["before_v"]).abs().max() > 1e-4


def test_flow_schedule_uses_the_models_own_shift_and_the_velocity_target(flux):
    """t = the model's sampler sigma at a logit-normal u; x_t = (1 - t) x0 + t eps; target eps - x0; the predict
    adapter returns ComfyUI's own velocity (x_t - denoised) / t."""
    tm = _pack("_train_model")
    model = flux["model"]
    sched = tm.diffusion_schedule(model)
    assert isinstance(sched, F.FlowSchedule) and tm.prediction_type(model) == F.FLOW
    ms = model.get_model_object("model_sampling")
    u = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    assert torch.allclose(sched.times(u).double(), ms.sigma(u).double(), atol=1e-6)
    assert torch.allclose(sched.times(u).double(), F.flux_time_shift(1.15, u), atol=1e-6)
    t = sched.draw_timesteps(20000, torch.Generator().manual_seed(0)).double()
    # logit-normal(0, 1) pushed through flux_time_shift(1.15): median = shift(0.5)
    assert abs(float(t.median()) - float(F.flux_time_shift(1.15, torch.tensor(0.5)))) < 0.01
    x0, eps = flux["latents"][:2], torch.randn(2, 16, 8, 8)
    tt = torch.tensor([0.25, 0.75])
    assert torch.allclose(sched.add_noise(x0, eps, tt)[1], 0.25 * x0[1] + 0.75 * eps[1])
    assert torch.equal(sched.target(x0, eps, tt), eps - x0)


def test_training_lowers_the_flow_matching_loss(flux, trained):
    th = _pack("_train_host")
    before = th.recipe_loss(flux["model"], flux["cond"], flux["latents"], repeats=4)
    after = th.recipe_loss(trained["out"][0], flux["cond"], flux["latents"], repeats=4)
    assert after < before * 0.995, (before, after)  # random latents: most of the loss is irreducible


def _lora_name(trained) -> str:
    return trained["out"][3]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _load_in_lora_loader(comfy, flux, lora_name: str):
    """UNETLoader (the tiny Flux dev file) -> stock LoraLoaderModelOnly through the executor; (model, log lines)."""
    g = Graph()
    un = g.node("UNETLoader", unet_name=flux["files"]["dev"]["diffusion_model"], weight_dtype="default")
    lo = g.node("LoraLoaderModelOnly", model=un[0], lora_name=lora_name, strength_model=1.0)
    ck = g.node("CheckpointLoaderSimple", ckpt_name=flux["files"]["dev"]["checkpoint"])
    pos = g.node("FluxGuidance", conditioning=g.node("CLIPTextEncode", text="a photo", clip=ck[1])[0], guidance=3.5)
    lat = g.node("EmptySD3LatentImage", width=64, height=64, batch_size=1)
    ks = g.node("KSampler", model=lo[0], positive=pos[0], negative=pos[0], latent_image=lat[0], seed=1, steps=2,
                cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
    g.node("PreviewImage", images=g.node("VAEDecode", samples=ks[0], vae=ck[2])[0])
    handler = _Records()
    logging.getLogger().addHandler(handler)
    try:
        res = comfy.run(g.prompt)
    finally:
        logging.getLogger().removeHandler(handler)
    assert res.success, res.error_message
    return comfy.node_outputs(lo.id)[0], handler.messages


def _patch_count(model) -> int:
    return sum(len(p) for p in model.patches.values())


def test_saved_file_loads_every_key_in_stock_lora_loader(comfy, flux, trained):
    name = _lora_name(trained)
    file_sd = load_file(str(_pack("_lora_host").loras_root() / name))
    assert set(file_sd) == set(trained["out"][1])
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in file_sd)
    loaded, messages = _load_in_lora_loader(comfy, flux, name)
    assert not [m for m in messages if "lora key not loaded" in m or "shape mismatch" in m], messages
    assert len(loaded.patches) == TINY_ATTENTION_WEIGHTS and _patch_count(loaded) == TINY_ATTENTION_LAYERS
    a = _velocity(loaded, flux["x"], 0.6, flux["cond"])
    b = _velocity(trained["out"][0], flux["x"], 0.6, flux["cond"])
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def test_sd_scripts_flux_names_load_every_key_and_patch_the_same_weights(comfy, flux, trained):
    """The same LoRA written with kohya sd-scripts' Flux names (fused qkv / linear1 layers) patches every weight it
    names and gives the same model."""
    lh = _pack("_lora_host")
    layers = FX.flux_layers(trained["out"][1])
    kohya = FX.to_kohya_bfl(layers, hidden_size=128)
    assert {k.split(".")[0] for k in kohya} == {f"lora_unet_double_blocks_{i}_{m}" for i in range(2) for m in (
        "img_attn_qkv", "img_attn_proj", "txt_attn_qkv", "txt_attn_proj")} | {
        f"lora_unet_single_blocks_{i}_linear1" for i in range(2)}
    model, report = lh.apply_lora(flux["model"], kohya)
    assert len(report.patched) == TINY_ATTENTION_WEIGHTS and not report.unmatched
    a = _velocity(model, flux["x"], 0.6, flux["cond"])
    b = _velocity(trained["out"][0], flux["x"], 0.6, flux["cond"])
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def test_saved_file_loads_every_key_in_diffusers(flux, trained):
    """diffusers' Flux LoRA reader (FluxPipeline.lora_state_dict) and loader (load_lora_into_transformer) on a tiny
    FluxTransformer2DModel: every LoRA layer lands on its module, and fusing adds exactly the LoRA's delta."""
    import tiny_flux
    from diffusers import FluxPipeline, FluxTransformer2DModel

    path = _pack("_lora_host").loras_root() / _lora_name(trained)
    layers = FX.flux_layers(trained["out"][1])
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**tiny_flux.DIFFUSERS_CONFIG)
    before = {m: transformer.get_submodule(m).weight.detach().clone() for m in layers}
    sd, alphas = FluxPipeline.lora_state_dict(str(path), return_alphas=True)
    FluxPipeline.load_lora_into_transformer(sd, network_alphas=alphas, transformer=transformer, adapter_name="memora")
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    adapted = {n for n, m in transformer.named_modules() if isinstance(m, PeftLoraLayer)}
    assert adapted == set(layers)
    transformer.fuse_lora(adapter_names=["memora"])
    for m, layer in layers.items():
        delta = transformer.get_submodule(m).base_layer.weight.detach() - before[m] if hasattr(
            transformer.get_submodule(m), "base_layer") else transformer.get_submodule(m).weight.detach() - before[m]
        assert torch.allclose(delta, layer.delta(), atol=1e-6), m
