"""AutoMemoRa Guider on the tiny SD1.x model: exactness at w = 0 / 1, a w = 2 cross-check against an independent
two-model computation, one copy of the UNet weights, and refusal when LoRA weight functions do not run."""

from __future__ import annotations

import probes
import pytest
import torch

from graphs import Graph
from random_loras import lora_model_loader_extra, lora_targets, pack_module, random_kohya_lora, write_lora

STEPS = 4
CFG = 5.0
PROMPT = "a photo of the parachute"


@pytest.fixture(scope="module")
def lora_file(comfy, comfy_base, loaded_tiny):
    model = loaded_tiny[0]
    sd = random_kohya_lora(lora_targets(model, with_conv=True), rank=4, seed=11, alpha=2.0)
    return write_lora(comfy_base / "models" / "loras", "automemora_test.safetensors", sd), sd


def _base_graph(tiny_ckpt, lora_name):
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=tiny_ckpt)
    pos = g.node("CLIPTextEncode", text=PROMPT, clip=ck[1])
    neg = g.node("CLIPTextEncode", text="", clip=ck[1])
    lora = g.node("MemoRaLoadLoRA", lora_name=lora_name)
    lat = g.node("EmptyLatentImage", width=64, height=64, batch_size=2)
    noise = g.node("RandomNoise", noise_seed=7)
    sampler = g.node("KSamplerSelect", sampler_name="euler")
    sigmas = g.node("BasicScheduler", model=ck[0], scheduler="normal", steps=STEPS, denoise=1.0)
    return g, dict(ck=ck, pos=pos, neg=neg, lora=lora, lat=lat, noise=noise, sampler=sampler, sigmas=sigmas)


def _sample(g, n, guider):
    out = g.node("SamplerCustomAdvanced", noise=n["noise"][0], guider=guider[0], sampler=n["sampler"][0],
                 sigmas=n["sigmas"][0], latent_image=n["lat"][0])
    return g.node("SaveLatent", samples=out[0], filename_prefix="automemora_test/latent")


def _auto(g, n, w, main):
    return g.node("MemoRaAutoGuider", model=n["ck"][0], lora=n["lora"][0], positive=n["pos"][0],
                  negative=n["neg"][0], cfg=CFG, w=w, main=main)


def _samples(res, output_dir, save_ref):
    """The latent a SaveLatent node wrote in this run, read back from its file."""
    from safetensors.torch import load_file

    info = res.ui_outputs[save_ref.id]["latents"][0]
    return load_file(str(output_dir / info["subfolder"] / info["filename"]))["latent_tensor"]


@pytest.mark.parametrize("main", ["lora", "unlearned"])
def test_w0_and_w1_reproduce_plain_sampling_exactly(comfy, tiny_ckpt, lora_file, output_dir, main):
    """w = 1 gives the main side, w = 0 the bad side, bit for bit; the sides swap with main = 'unlearned'."""
    g, n = _base_graph(tiny_ckpt, lora_file[0])
    with_lora = g.node("LoraModelLoader", model=n["ck"][0], lora=n["lora"][0], strength_model=1.0,
                       **lora_model_loader_extra())
    plain_guider = g.node("CFGGuider", model=n["ck"][0], positive=n["pos"][0], negative=n["neg"][0], cfg=CFG)
    lora_guider = g.node("CFGGuider", model=with_lora[0], positive=n["pos"][0], negative=n["neg"][0], cfg=CFG)
    ref_plain = _sample(g, n, plain_guider)
    ref_lora = _sample(g, n, lora_guider)
    auto_w1 = _sample(g, n, _auto(g, n, 1.0, main))
    auto_w0 = _sample(g, n, _auto(g, n, 0.0, main))
    res = comfy.run(g.prompt)
    assert res.success, res.error
    plain, lora = _samples(res, output_dir, ref_plain), _samples(res, output_dir, ref_lora)
    assert (plain - lora).abs().max() > 1e-2, "the test LoRA must change sampling visibly"
    w1, w0 = _samples(res, output_dir, auto_w1), _samples(res, output_dir, auto_w0)
    if main == "lora":
        assert torch.equal(w1, lora), float((w1 - lora).abs().max())
        assert torch.equal(w0, plain), float((w0 - plain).abs().max())
    else:
        assert torch.equal(w1, plain), float((w1 - plain).abs().max())
        assert torch.equal(w0, lora), float((w0 - lora).abs().max())


def test_w2_matches_independent_two_model_computation(comfy, loaded_tiny, lora_file):
    """Euler with AutoMemoRa (w = 2) through SamplerCustomAdvanced's machinery == a hand-written Euler loop over two
    separately patched models (the stock LoRA patching and stock CFGGuider), within 1e-5."""
    import comfy.samplers
    import comfy.sd
    import nodes

    model, clip, _ = loaded_tiny
    lora_sd = lora_file[1]
    w = 2.0
    with torch.inference_mode():
        pos = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        guider = nodes.NODE_CLASS_MAPPINGS["MemoRaAutoGuider"].execute(model, lora_sd, pos, neg, CFG, w, "lora")[0]
        with_lora = comfy.sd.load_lora_for_models(model, None, lora_sd, 1.0, 0)[0]   # what LoraModelLoader does
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS).cpu()
        # A unit-variance latent in model space (ComfyUI's unscaled VAE space divides it by 0.18215).
        start = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)) / 0.18215
        # No added noise: the sampler starts from process_latent_in(start) itself.
        out = guider.sample(torch.zeros_like(start), start, comfy.samplers.sampler_object("euler"), sigmas,
                            seed=0, disable_pbar=True).cpu()
        assert guider.forwards["lora_on"] == STEPS and guider.forwards["lora_off"] == STEPS

        x, gap = probes.two_model_euler(model, with_lora, pos, neg, start, sigmas, w, CFG)
    out = model.model.process_latent_in(out)   # compare in model space, where the sampler works
    ref = x
    err = float((out - ref).abs().max())
    scale = float(ref.abs().max())
    print(f"AutoMemoRa w=2 vs two-model loop: max abs diff {err:.3g} (max |value| {scale:.3g})")
    assert err < 1e-5
    assert gap > 1e-2, "the two sides must differ for the check to mean anything"


def test_one_copy_of_unet_weights_during_sampling(comfy, loaded_tiny, lora_file):
    """While the guider samples, exactly one UNet is loaded and its parameters are the unlearned model's own
    tensors (same storage); the weights are unchanged afterwards (the LoRA is never written into them)."""
    import comfy.model_management as mm
    import comfy.samplers
    import nodes

    model, clip, _ = loaded_tiny
    # Start from nothing resident: earlier tests leave other models (and LoRA-patched weights) loaded.
    mm.unload_all_models()
    unet = model.model.diffusion_model
    ptrs = {n: p.data_ptr() for n, p in unet.named_parameters()}
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    seen = []

    def probe(args):
        loaded = [lm for lm in mm.current_loaded_models if getattr(lm.model, "model", None) is not None]
        unets = [lm.model.model.diffusion_model for lm in loaded
                 if hasattr(lm.model.model, "diffusion_model")]
        storages = {p.untyped_storage().data_ptr() for u in unets for p in u.parameters()}
        seen.append((len(unets), all(u is unet for u in unets), len(storages),
                     {n: p.data_ptr() for n, p in unet.named_parameters()} == ptrs))
        return args["denoised"]

    probed = model.clone()
    probed.set_model_sampler_post_cfg_function(probe)
    with torch.inference_mode():
        pos = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        guider = nodes.NODE_CLASS_MAPPINGS["MemoRaAutoGuider"].execute(probed, lora_file[1], pos, neg, CFG, 1.5,
                                                                       "lora")[0]
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 3).cpu()
        latent = torch.zeros(1, 4, 8, 8)
        noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0, disable_pbar=True)
    assert len(seen) == 6   # 3 steps x (bad, main)
    n_params = sum(1 for _ in unet.parameters())
    for n_unets, same, n_storages, same_ptrs in seen:
        assert n_unets == 1 and same and same_ptrs
        assert n_storages <= n_params
    for n, p in unet.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


def test_refuses_when_weight_functions_do_not_run(comfy, loaded_tiny, lora_file):
    """If ComfyUI skips some LoRA weight functions (as 0.33's dynamic VRAM mode does on small layers), sampling
    stops with a clear error instead of returning a silently wrong guidance."""
    import comfy.samplers
    import nodes

    model, clip, _ = loaded_tiny
    mod = pack_module("nodes.automemora")
    with torch.inference_mode():
        pos = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
        guider = nodes.NODE_CLASS_MAPPINGS["MemoRaAutoGuider"].execute(model, lora_file[1], pos, pos, CFG, 2.0,
                                                                       "lora")[0]
        # Simulate a loader that skips one layer's weight function.
        key = sorted(guider.model_patcher.weight_wrapper_patches)[0]
        del guider.model_patcher.weight_wrapper_patches[key]
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 2).cpu()
        with pytest.raises(mod.lora_apply.LoraNotAppliedError, match="not applied to 1 of"):
            guider.sample(torch.randn(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), comfy.samplers.sampler_object("euler"),
                          sigmas, seed=0, disable_pbar=True)


def test_bad_lora_is_refused_naming_the_layer(comfy, loaded_tiny, lora_file):
    import nodes

    model, clip, _ = loaded_tiny
    sd = dict(lora_file[1])
    name = sorted(k for k in sd if k.endswith(".lora_down.weight"))[0]
    layer = name[: -len(".lora_down.weight")]
    sd[name] = torch.randn(4, sd[name].shape[1] + 3)
    with torch.inference_mode():
        pos = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
        with pytest.raises(ValueError, match=layer):
            nodes.NODE_CLASS_MAPPINGS["MemoRaAutoGuider"].execute(model, sd, pos, pos, CFG, 1.0, "lora")
        with pytest.raises(ValueError, match="main must be one of"):
            nodes.NODE_CLASS_MAPPINGS["MemoRaAutoGuider"].execute(model, lora_file[1], pos, pos, CFG, 1.0, "both")
