"""The tiny SD2-v and SDXL stand-ins (tests/support/tiny_models.py + memora_testkit) are what ComfyUI's own model
detection, text encoders and sampler treat as SD2.x v-prediction and SDXL base: every issue-22 test relies on it."""

from __future__ import annotations

import pytest
import torch
from graphs import Graph


def _load(name):
    import nodes

    return nodes.CheckpointLoaderSimple().load_checkpoint(name)[:3]


def test_sd2v_checkpoint_is_sd20_v_prediction(comfy, tiny_sd2v_ckpt, tiny_sd2v_ztsnr_ckpt):
    import comfy.model_base
    import comfy.supported_models

    model, clip, _ = _load(tiny_sd2v_ckpt)
    assert isinstance(model.model.model_config, comfy.supported_models.SD20)
    assert type(model.model.model_config).__name__ == "TinySD20"
    assert model.model.model_type == comfy.model_base.ModelType.V_PREDICTION
    assert not model.model.model_sampling.zsnr
    assert float(model.model.model_sampling.sigma_max) == pytest.approx(14.6146, abs=1e-3)
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat"))
    assert cond[0][0].shape == (1, 77, 64)

    ztsnr, _, _ = _load(tiny_sd2v_ztsnr_ckpt)
    assert ztsnr.model.model_type == comfy.model_base.ModelType.V_PREDICTION
    assert ztsnr.model.model_sampling.zsnr
    assert float(ztsnr.model.model_sampling.sigmas[-1]) > 4000  # 1/sqrt(alphas_cumprod[-1]) with its ~4.9e-8


def test_sd2_eps_rule_is_comfyuis(comfy, comfy_base):
    """The same architecture with a small probe bias loads as EPS: the v/eps decision is ComfyUI's SD2 rule."""
    import comfy.model_base
    import tiny_models

    name = "memora_tiny_sd2eps.safetensors"
    tiny_models.build_tiny_sd2_checkpoint(comfy_base / "models" / "checkpoints" / name, seed=0, v_prediction=False)
    model, _, _ = _load(name)
    assert model.model.model_type == comfy.model_base.ModelType.EPS


def test_sdxl_checkpoint_is_sdxl_eps_with_pooled_output(comfy, tiny_sdxl_ckpt):
    import comfy.model_base
    import comfy.supported_models

    model, clip, _ = _load(tiny_sdxl_ckpt)
    assert isinstance(model.model.model_config, comfy.supported_models.SDXL)
    assert isinstance(model.model, comfy.model_base.SDXL)
    assert model.model.model_type == comfy.model_base.ModelType.EPS
    assert model.model.adm_channels == 64 + 6 * 256
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat"))
    assert cond[0][0].shape == (1, 77, 128)  # [clip_l | clip_g] penultimate hidden states
    assert cond[0][1]["pooled_output"].shape == (1, 64)
    y = model.model.encode_adm(pooled_output=cond[0][1]["pooled_output"], width=512, height=512)
    assert y.shape == (1, 1600) and torch.equal(y[:, :64], cond[0][1]["pooled_output"])


@pytest.mark.parametrize("arch,fixture", [("sd2", "tiny_sd2v_ckpt"), ("sdxl", "tiny_sdxl_ckpt")])
def test_diffusers_twin_matches_comfyui_unet(comfy, comfy_base, request, arch, fixture):
    """Every UNet weight is where ComfyUI reads it: the diffusers model built from the same file gives ComfyUI's
    output (SDXL: text_embeds/time_ids against ComfyUI's encode_adm)."""
    import tiny_models

    name = request.getfixturevalue(fixture)
    model, _, _ = _load(name)
    twin = tiny_models.arch_diffusers_unet_from_checkpoint(arch, comfy_base / "models" / "checkpoints" / name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, 4, 8, 8), generator=g)
    t = torch.tensor([900.0, 30.0])
    ctx = torch.randn((2, 77, 64 if arch == "sd2" else 128), generator=g)
    kw, dkw = {}, {}
    if arch == "sdxl":
        pooled = torch.randn((2, 64), generator=g)
        kw["y"] = model.model.encode_adm(pooled_output=pooled, width=640, height=512, crop_w=16, crop_h=8,
                                         target_width=1024, target_height=768)
        dkw["added_cond_kwargs"] = {"text_embeds": pooled,
                                    "time_ids": torch.tensor([[512.0, 640.0, 8.0, 16.0, 768.0, 1024.0]] * 2)}
    with torch.no_grad():
        a = model.model.diffusion_model(x, t, context=ctx, **kw)
        b = twin(x, t, encoder_hidden_states=ctx, **dkw).sample
    assert a.std() > 0.01
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def _sdxl_graph(ckpt, encode_node: str, **encode_inputs):
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=ckpt)
    pos = g.node(encode_node, clip=ck[1], **encode_inputs)
    neg = g.node("CLIPTextEncode", clip=ck[1], text="")
    lat = g.node("EmptyLatentImage", width=64, height=64, batch_size=1)
    ks = g.node("KSampler", model=ck[0], positive=pos[0], negative=neg[0], latent_image=lat[0], seed=3, steps=3,
                cfg=4.0, sampler_name="ddim", scheduler="ddim_uniform", denoise=1.0)
    g.node("PreviewImage", images=g.node("VAEDecode", samples=ks[0], vae=ck[2])[0])
    return g, ks


def test_sdxl_size_and_crop_conditioning_reach_the_sampler(comfy, tiny_sdxl_ckpt):
    """Stock CLIPTextEncodeSDXL's size/crop conditioning drives the KSampler: at the sampler's defaults for a plain
    CLIPTextEncode (size = the latent's size in pixels, no crop) it equals it bit for bit; a crop changes the result."""
    text = "a photo of a cat"
    outs = {}
    for key, node, inputs in [
        ("plain", "CLIPTextEncode", dict(text=text)),
        ("sdxl_default", "CLIPTextEncodeSDXL", dict(width=64, height=64, crop_w=0, crop_h=0, target_width=64,
                                                    target_height=64, text_g=text, text_l=text)),
        ("sdxl_crop", "CLIPTextEncodeSDXL", dict(width=64, height=64, crop_w=256, crop_h=128, target_width=64,
                                                 target_height=64, text_g=text, text_l=text)),
    ]:
        g, ks = _sdxl_graph(tiny_sdxl_ckpt, node, **inputs)
        res = comfy.run(g.prompt)
        assert res.success, res.error
        outs[key] = comfy.node_outputs(ks.id)[0]["samples"].clone()
    assert torch.isfinite(outs["plain"]).all()
    assert torch.equal(outs["plain"], outs["sdxl_default"])
    assert (outs["plain"] - outs["sdxl_crop"]).abs().max() > 1e-3
