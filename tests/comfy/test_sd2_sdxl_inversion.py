"""Issue 22: MemoRa DDIM Inversion / Regenerate on SD2.x 768-v (v-prediction, and its zero-terminal-SNR variant) and
SDXL base, on tiny stand-ins that ComfyUI's own model detection loads as those architectures (tests/support).

The nodes work through ComfyUI's model sampling objects (the guider's denoised output, x = x0 + sigma * eps), so
v-prediction and SDXL's pooled / size / crop conditioning need no arithmetic of their own; these tests hold that:
refined inversion reconstructs to <= 1e-5 relative, the stock KSamplerAdvanced continuation equals Regenerate, and
what the reference implementation never supported is refused with nothing modified."""

from __future__ import annotations

import hashlib

import pytest
import torch
from graphs import Graph

# MemoRa's own step plan (50 steps, regeneration from step 15). A v-prediction model's eps depends on x more strongly
# (eps = x sigma / (sigma^2 + 1) + v / sqrt(sigma^2 + 1)), so the fixed-point refinement contracts more slowly at
# coarse ladders: on the SD2-v stand-in refine 4 reaches 5e-7 at 50/15 but 3e-4 at 12/4 (10 iterations: 2e-7).
STEPS, START, CFG, REFINE = 50, 15, 3.0, 4
# sd2v_zsnr_node: the SD2-v checkpoint given zero-terminal SNR by the stock ModelSamplingDiscrete node (v_prediction,
# zsnr), the way ComfyUI users run SD2 zero-terminal-SNR fine-tunes; sd2v_ztsnr: the checkpoint's own ztsnr marker.
ARCHS = {"sd2v": "tiny_sd2v_ckpt", "sd2v_ztsnr": "tiny_sd2v_ztsnr_ckpt", "sd2v_zsnr_node": "tiny_sd2v_ckpt",
         "sdxl": "tiny_sdxl_ckpt"}
ZSNR_NODE = {"sampling": "v_prediction", "zsnr": True}


def _encode(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


@pytest.fixture(scope="module")
def _setups():
    cache: dict = {}
    yield cache
    cache.clear()  # release the ModelPatchers while ComfyUI's modules are still there


def _setup(request, kind):
    """Model, CLIP, conditioning and unit-variance (model-space) clean latents of one architecture, once a module."""
    cache = request.getfixturevalue("_setups")
    if kind not in cache:
        import nodes

        name = request.getfixturevalue(ARCHS[kind])
        model, clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint(name)[:3]
        if kind == "sd2v_zsnr_node":
            model = nodes.NODE_CLASS_MAPPINGS["ModelSamplingDiscrete"]().patch(model, **ZSNR_NODE)[0]
        g = torch.Generator().manual_seed(1234)
        x0 = torch.randn(2, 4, 8, 8, generator=g) / float(model.model.latent_format.scale_factor)
        cache[kind] = dict(kind=kind, ckpt=name, model=model, clip=clip, latent={"samples": x0},
                             pos=_encode(clip, "a photo of the parachute"), neg=_encode(clip, ""))
    return cache[kind]


@pytest.fixture(params=sorted(ARCHS))
def arch(request, comfy):
    return _setup(request, request.param)


@pytest.fixture
def sdxl(request, comfy):
    return _setup(request, "sdxl")


def _node(name):
    import nodes

    return nodes.NODE_CLASS_MAPPINGS[name]


def _invert(a, refine, schedule="exact", pos=None, neg=None, latent=None):
    with torch.inference_mode():
        return _node("MemoRaDDIMInversion").execute(a["model"], pos or a["pos"], neg or a["neg"],
                                                    latent or a["latent"], STEPS, START, CFG, refine, schedule)[0]


def _regen(a, latent, schedule="exact", pos=None, neg=None):
    with torch.inference_mode():
        return _node("MemoRaRegenerate").execute(a["model"], pos or a["pos"], neg or a["neg"], latent, STEPS, START,
                                                 CFG, schedule)[0]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_architecture_is_what_comfyui_detects(arch):
    import comfy.model_base
    import comfy.supported_models

    m = arch["model"].model
    if arch["kind"].startswith("sd2v"):
        assert isinstance(m.model_config, comfy.supported_models.SD20)
        assert m.model_type == comfy.model_base.ModelType.V_PREDICTION
        sampling = arch["model"].get_model_object("model_sampling")  # what the sampler uses (node patches too)
        assert bool(sampling.zsnr) == (arch["kind"] in ("sd2v_ztsnr", "sd2v_zsnr_node"))
        assert float(sampling.sigma_max) > 4000 if sampling.zsnr else float(sampling.sigma_max) < 15
    else:
        assert isinstance(m.model_config, comfy.supported_models.SDXL) and isinstance(m, comfy.model_base.SDXL)
        assert m.model_type == comfy.model_base.ModelType.EPS
        assert arch["pos"][0][1]["pooled_output"].shape == (1, 64)


def _latent_file(comfy_base, name, samples):
    """A .latent file (the format stock SaveLatent writes and LoadLatent reads) in ComfyUI's input folder."""
    from safetensors.torch import save_file

    path = comfy_base / "input" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latent_tensor": samples.contiguous(), "latent_format_version_0": torch.tensor([])}, str(path))
    return name


def test_stock_ksampler_advanced_continuation_equals_regenerate(arch, comfy, comfy_base):
    """Through ComfyUI's executor: clean latents (stock LoadLatent) -> DDIM Inversion; its output continued by the
    stock KSamplerAdvanced (add_noise disable, same steps and start_at_step, ddim / ddim_uniform) equals MemoRa
    Regenerate to 1e-6 of the latent's scale (they could differ only in float rounding: sigma as a float64 vs a
    float32 tensor; measured bit-identical on CPU), and both give back the clean latents to 1e-5 (refine_iterations
    4; measured 2.6e-7 SDXL, 5.0e-7 SD2-v, 1.4e-6 SD2-v zero-terminal SNR, by checkpoint marker or stock node).
    SDXL's positive prompt carries CLIPTextEncodeSDXL's size and crop conditioning, which both read from the
    CONDITIONING. (Latents are unit-variance in model space, as a real VAE's are: the tiny TAESD-structured VAE's are
    ~20x smaller, where a random UNet, GroupNorm after its input, is far more sensitive to x than a trained one.)"""
    lat_name = _latent_file(comfy_base, f"memora_{arch['kind']}_clean.latent", arch["latent"]["samples"])
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=arch["ckpt"])
    model = ck[0]
    if arch["kind"] == "sd2v_zsnr_node":
        model = g.node("ModelSamplingDiscrete", model=ck[0], **ZSNR_NODE)[0]
    text = "a photo of the parachute"
    if arch["kind"] == "sdxl":
        pos = g.node("CLIPTextEncodeSDXL", clip=ck[1], width=1024, height=768, crop_w=64, crop_h=32,
                     target_width=1024, target_height=768, text_g=text, text_l=text)
    else:
        pos = g.node("CLIPTextEncode", clip=ck[1], text=text)
    neg = g.node("CLIPTextEncode", clip=ck[1], text="")
    enc = g.node("LoadLatent", latent=lat_name)
    common = dict(model=model, positive=pos[0], negative=neg[0], steps=STEPS, start_at_step=START, cfg=CFG)
    inv = g.node("MemoRaDDIMInversion", latent=enc[0], refine_iterations=REFINE, schedule="exact", **common)
    reg = g.node("MemoRaRegenerate", latent=inv[0], schedule="exact", **common)
    ksa = g.node("KSamplerAdvanced", model=model, add_noise="disable", noise_seed=0, steps=STEPS, cfg=CFG,
                 sampler_name="ddim", scheduler="ddim_uniform", positive=pos[0], negative=neg[0],
                 latent_image=inv[0], start_at_step=START, end_at_step=10000, return_with_leftover_noise="disable")
    for ref in (reg, ksa):
        g.node("PreviewAny", source=ref[0])
    res = comfy.run(g.prompt)
    assert res.success, res.error
    x0 = comfy.node_outputs(enc.id)[0]["samples"]
    ours = comfy.node_outputs(reg.id)[0]["samples"]
    stock = comfy.node_outputs(ksa.id)[0]["samples"]
    diff = float((ours - stock).abs().max() / x0.abs().max())
    print(f"{arch['kind']}: Regenerate vs KSamplerAdvanced max diff {diff:.1e} (of max |x0|); reconstruction "
          f"{_rel(ours, x0):.1e}")
    assert diff <= 1e-6
    assert _rel(ours, x0) <= 1e-5 and _rel(stock, x0) <= 1e-5


def _state_hash(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if v.dtype != torch.bool
                 else v.cpu().numpy().tobytes())
    return h.hexdigest()


def _refused(arch, call, match):
    model = arch["model"]
    before = (_state_hash(model), dict(model.patches), dict(model.object_patches), model.patches_uuid,
              arch["latent"]["samples"].clone())
    with pytest.raises(ValueError, match=match) as err:
        call()
    after = (_state_hash(model), dict(model.patches), dict(model.object_patches), model.patches_uuid)
    assert after == before[:4]
    assert torch.equal(arch["latent"]["samples"], before[4])
    return str(err.value)


def test_reference_schedule_refused(arch):
    calls = []
    m = arch["model"].clone()
    m.set_model_unet_function_wrapper(lambda f, a: calls.append(1) or f(a["input"], a["timestep"], **a["c"]))
    a = {**arch, "model": m}
    why = {"sd2v": "v-prediction", "sd2v_ztsnr": "zero-terminal-SNR", "sd2v_zsnr_node": "zero-terminal-SNR",
           "sdxl": "SDXL model"}[arch["kind"]]
    for node in ("inversion", "regenerate"):
        call = (lambda: _invert(a, 0, "reference")) if node == "inversion" else \
            (lambda: _regen(a, a["latent"], "reference"))
        msg = _refused(a, call, "schedule 'reference' refuses this model")
        assert why in msg and "SD1.x" in msg and "'exact'" in msg, msg
    assert calls == []  # refused before any model call


def test_sdxl_conditioning_without_pooled_output_refused(sdxl):
    bare = [[c[0], {k: v for k, v in c[1].items() if k != "pooled_output"}] for c in sdxl["pos"]]
    for call in (lambda: _invert(sdxl, 0, pos=bare), lambda: _regen(sdxl, sdxl["latent"], neg=bare)):
        msg = _refused(sdxl, call, "has no pooled_output")
        assert "SDXL" in msg and "CLIPTextEncode" in msg, msg
    assert "negative (entry 0)" in _refused(sdxl, lambda: _regen(sdxl, sdxl["latent"], neg=bare), "pooled_output")


def test_sdxl_given_another_family_s_conditioning_is_refused(sdxl, loaded_tiny):
    """SD1.x conditioning (its CLIP's 64-wide embeddings; ComfyUI's SD1 encoder adds a pooled_output too) on SDXL:
    the width is named, nothing runs; a pooled_output of the wrong width is refused as well."""
    sd1 = _encode(loaded_tiny[1], "a photo of the parachute")
    msg = _refused(sdxl, lambda: _invert(sdxl, 0, pos=sd1), "64-wide text embeddings")
    assert "reads 128-wide" in msg and "SDXL" in msg
    wrong = [[c[0], {**c[1], "pooled_output": c[1]["pooled_output"][:, :32]}] for c in sdxl["pos"]]
    assert "1600 = pooled + 6 x 256" in _refused(sdxl, lambda: _regen(sdxl, sdxl["latent"], pos=wrong), "32-wide")


def test_size_and_crop_conditioning_reach_regenerate(sdxl):
    """The size/crop entries CLIPTextEncodeSDXL puts in the CONDITIONING change Regenerate's result."""
    cropped = [[c[0], {**c[1], "width": 1024, "height": 1024, "crop_w": 256, "crop_h": 0, "target_width": 1024,
                       "target_height": 1024}] for c in sdxl["pos"]]
    x = {"samples": sdxl["latent"]["samples"] * 3}
    plain, crop = _regen(sdxl, x)["samples"], _regen(sdxl, x, pos=cropped)["samples"]
    assert torch.isfinite(crop).all() and _rel(crop, plain) > 1e-4
