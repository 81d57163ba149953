"""The tiny Flux stand-in (tests/support/tiny_flux.py) is what ComfyUI's own detection, loaders, text encoders and
sampling objects treat as Flux dev (guidance-distilled, ModelSamplingFlux) and Flux schnell (discrete flow)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def flux_files(comfy, comfy_base):
    import tiny_flux

    return {v: tiny_flux.install_tiny_flux(comfy_base, v) for v in tiny_flux.VARIANTS}


def test_detection_reads_the_files_as_flux(comfy, flux_files, comfy_base):
    import comfy.model_detection
    import comfy.utils

    for variant, guidance in (("dev", True), ("schnell", False)):
        sd = comfy.utils.load_torch_file(str(comfy_base / "models" / "diffusion_models" / flux_files[variant]["diffusion_model"]))
        cfg = comfy.model_detection.detect_unet_config(sd, "")
        assert cfg["image_model"] == "flux" and cfg["guidance_embed"] is guidance
        assert cfg["depth"] == 2 and cfg["depth_single_blocks"] == 2 and cfg["in_channels"] == 16


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_stock_loaders_give_flux(comfy, flux_files, variant):
    import comfy.model_base
    import comfy.model_sampling
    import comfy.supported_models
    import nodes

    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(flux_files[variant]["checkpoint"])[:3]
    (unet,) = nodes.UNETLoader().load_unet(flux_files[variant]["diffusion_model"], "default")
    for m in (model, unet):
        assert isinstance(m.model, comfy.model_base.Flux)
        expected = comfy.supported_models.Flux if variant == "dev" else comfy.supported_models.FluxSchnell
        assert isinstance(m.model.model_config, expected)
        ms = m.get_model_object("model_sampling")
        assert isinstance(ms, comfy.model_sampling.CONST)
        if variant == "dev":
            assert m.model.model_type == comfy.model_base.ModelType.FLUX
            assert isinstance(ms, comfy.model_sampling.ModelSamplingFlux) and ms.shift == pytest.approx(1.15)
        else:
            assert m.model.model_type == comfy.model_base.ModelType.FLOW
            assert isinstance(ms, comfy.model_sampling.ModelSamplingDiscreteFlow) and ms.shift == 1.0
    sd_ckpt = model.model.diffusion_model.state_dict()
    sd_unet = unet.model.diffusion_model.state_dict()
    assert sd_ckpt.keys() == sd_unet.keys() and all(torch.equal(sd_ckpt[k], sd_unet[k]) for k in sd_ckpt)
    assert ("guidance_in.in_layer.weight" in sd_ckpt) is (variant == "dev")

    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat"))
    assert cond[0][0].shape[0] == 1 and cond[0][0].shape[2] == 64  # T5 hidden states (>= 256 tokens)
    assert cond[0][1]["pooled_output"].shape == (1, 64)  # CLIP-L pooled
    image = vae.decode(torch.randn(1, 16, 8, 8))
    assert image.shape[-1] == 3 and image.shape[1] == 64
    assert vae.encode(image).shape == (1, 16, 8, 8)


def test_load_tiny_flux_gives_the_same_flux_models(comfy, tmp_path):
    """load_tiny_flux (what other tests use without the executor) is ComfyUI's load_diffusion_model of the file."""
    import comfy.model_base
    import tiny_flux

    dev, schnell = (tiny_flux.load_tiny_flux(v, tmp_path) for v in ("dev", "schnell"))
    assert dev.model.model_type == comfy.model_base.ModelType.FLUX
    assert schnell.model.model_type == comfy.model_base.ModelType.FLOW
    assert next(dev.model.diffusion_model.parameters()).dtype == torch.float32
    a, b = dev.model.diffusion_model.state_dict(), schnell.model.diffusion_model.state_dict()
    assert set(a) - set(b) == {k for k in a if k.startswith("guidance_in.")} != set()
    assert all(torch.equal(a[k], b[k]) for k in b)  # one seed: dev and schnell differ only by the guidance embedder
    assert tiny_flux.diffusers_config("dev")["guidance_embeds"] and not tiny_flux.diffusers_config("schnell")[
        "guidance_embeds"]
