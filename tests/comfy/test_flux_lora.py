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
    args = dict(steps=6, rank=4, alpha=4.0, learning_rate=2e-3, lr_schedule="constant", batch_size=2,
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
