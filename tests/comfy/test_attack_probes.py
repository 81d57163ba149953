"""The training-free attacks through ComfyUI's executor on the micro world (docs/attack-probes.md): the concept
vector draws the erased concept from a neutral prompt on the ORIGINAL model; the noise-injection probe with eta 0
and nothing injected is the stock KSampler (ddim, ddim_uniform); the inpainting probe keeps the unmasked pixels and
completes a masked star as a star on the original model far more often than on the never-learned one; every node
publishes its cost table; bad inputs get specific errors; the models are left untouched."""

from __future__ import annotations

import pytest
import torch

from graphs import Graph

UNLEARNED = "esd_x"  # the micro world's ESD-x model
STAR = "a photo of a star"
OTHERS = ("circle", "square", "triangle", "cross")
STEPS = 20
N = 16


@pytest.fixture(scope="module")
def size():
    from memora.micro import world

    return int(world.load_manifest()["empty_latent_size"])


def _rate(res, det) -> float:
    return next(r[1] for r in res.ui_outputs[det.id]["memora_scores"][0]["rows"] if r[0] == "star")


def _cost(res, node, title) -> dict:
    table = res.ui_outputs[node.id]["memora_scores"][0]
    assert table["title"] == f"{title}: cost"
    assert table["columns"] == ["attack", "knowledge", "forward_calls", "backward_calls", "concept_images", "seconds"]
    return dict(zip(table["columns"], table["rows"][0]))


def _sampled(g, w, positive, negative, size, seed):
    lat = g.node("EmptyLatentImage", width=size, height=size, batch_size=N)
    ks = g.node("KSampler", model=w[0], positive=positive, negative=negative, latent_image=lat[0], seed=seed,
                steps=STEPS, cfg=7.5, sampler_name="ddim", scheduler="ddim_uniform", denoise=1.0)
    return g.node("VAEDecode", samples=ks[0], vae=w[2])


def _concept_vector(g, w, strength, neutral=None, **extra):
    return g.node("MemoRaConceptVector", clip=w[1], concept_prompts="\n".join([STAR] * len(OTHERS)),
                  neutral_prompts=neutral or "\n".join(f"a photo of a {c}" for c in OTHERS),
                  prompt="a photo of a shape", strength=strength, search_tokens=extra.get("search_tokens", 0),
                  search_generations=extra.get("search_generations", 1), seed=0)


def test_concept_vector_draws_the_concept_on_the_original_model(comfy, size):
    """'a photo of a shape' + the star direction (mean over four star/other-shape pairs, strength 1): measured
    16/16 -> star rate 0.00 without, 0.66 with (32 images, 20 steps); the test asks for +0.3."""
    g = Graph()
    w = g.node("MemoRaLoadMicroWorld", variant="original")
    neg = g.node("CLIPTextEncode", text="", clip=w[1])
    plain = g.node("CLIPTextEncode", text="a photo of a shape", clip=w[1])
    vec = _concept_vector(g, w, 1.0, search_tokens=4, search_generations=5)
    d_plain = g.node("MemoRaMicroDetector", images=_sampled(g, w, plain[0], neg[0], size, 7)[0], concept="star",
                     title="plain")
    d_vec = g.node("MemoRaMicroDetector", images=_sampled(g, w, vec[0], neg[0], size, 7)[0], concept="star",
                   title="vector")
    res = comfy.run(g.prompt)
    assert res.success, res.error_message
    r_plain, r_vec = _rate(res, d_plain), _rate(res, d_vec)
    print(f"concept vector on the original: star rate {r_plain:.3f} -> {r_vec:.3f} (n={N})")
    assert r_vec >= r_plain + 0.3
    cost = _cost(res, vec, "MemoRa Concept Vector")
    assert cost["knowledge"] == "text encoder only" and cost["forward_calls"] == 0 == cost["concept_images"]
    # the conditioning is the prompt's embedding + strength x mean(f(star) - f(other))
    positive, found = comfy.node_outputs(vec.id)
    clip = comfy.node_outputs(w.id)[1]

    def enc(p):
        return clip.encode_from_tokens(clip.tokenize(p)).float()

    want = enc("a photo of a shape") + torch.stack([enc(STAR) - enc(f"a photo of a {c}") for c in OTHERS]).mean(0)
    torch.testing.assert_close(positive[0][0].float(), want, atol=1e-5, rtol=1e-5)
    assert isinstance(found, str) and found.strip() and len(clip.tokenize(found)["l"][0]) == 77


def test_noise_probe_without_noise_is_the_stock_sampler(comfy, size):
    from safetensors.torch import load_file

    from memora.micro import world

    g = Graph()
    w = g.node("MemoRaLoadMicroWorld", variant=UNLEARNED)
    pos = g.node("CLIPTextEncode", text=STAR, clip=w[1])
    neg = g.node("CLIPTextEncode", text="", clip=w[1])
    lat = g.node("EmptyLatentImage", width=size, height=size, batch_size=4)
    common = dict(model=w[0], positive=pos[0], negative=neg[0], latent_image=lat[0], seed=5, steps=STEPS, cfg=7.5)
    ks = g.node("KSampler", sampler_name="ddim", scheduler="ddim_uniform", denoise=1.0, **common)
    same = g.node("MemoRaNoiseInjectionProbe", eta=0.0, inject_steps="", inject_scale=0.0, **common)
    eta = g.node("MemoRaNoiseInjectionProbe", eta=1.5, inject_steps="", inject_scale=0.0, **common)
    hit = g.node("MemoRaNoiseInjectionProbe", eta=0.0, inject_steps="3", inject_scale=1.0, **common)
    outs = [g.node("VAEDecode", samples=n[0], vae=w[2]) for n in (ks, same, eta, hit)]
    g.node("MemoRaMicroDetector", images=g.node("ImageBatch", image1=outs[0][0], image2=outs[1][0])[0],
           concept="star", title="a")
    g.node("MemoRaMicroDetector", images=g.node("ImageBatch", image1=outs[2][0], image2=outs[3][0])[0],
           concept="star", title="b")
    res = comfy.run(g.prompt)
    assert res.success, res.error_message
    stock = comfy.node_outputs(ks.id)[0]["samples"]
    got = comfy.node_outputs(same.id)[0]["samples"]
    err = float((got - stock).abs().max() / stock.abs().max())
    print(f"noise probe (eta 0) vs KSampler ddim/ddim_uniform: max relative difference {err:.2e}")
    assert err <= 1e-5
    for node in (eta, hit):
        other = comfy.node_outputs(node.id)[0]["samples"]
        assert torch.isfinite(other).all() and float((other - stock).abs().max()) > 1e-2
    cost = _cost(res, same, "MemoRa Noise-Injection Probe")
    assert cost["knowledge"] == "prompts only" and cost["concept_images"] == 0 == cost["backward_calls"]
    # cond and uncond go through the UNet in one batched call per step on this machine
    assert STEPS <= cost["forward_calls"] <= 2 * STEPS and cost["seconds"] > 0
    # the model is untouched: its weights are the shipped file's and no counting wrapper stayed on it
    model = comfy.node_outputs(w.id)[0]
    assert "model_function_wrapper" not in model.model_options
    shipped = world.unet_state_dict(UNLEARNED, lambda path: load_file(str(path)))  # the variant over the original
    current = model.model.diffusion_model.state_dict()
    assert len(current) == len(shipped)
    assert all(torch.equal(current[k.removeprefix("model.diffusion_model.")].cpu(), v) for k, v in shipped.items())


def test_inpainting_probe_completes_a_masked_star_on_the_original_model(comfy, size):
    """The original draws 16 stars (seed images, as MemoRa's first stage); the centre (6 x 6 of 8 x 8 latent cells)
    is masked and filled with 'a photo of a star'. Measured: original 0.875, never-learned 0.000; the test asks for
    a difference of 0.4."""
    g = Graph()
    wo = g.node("MemoRaLoadMicroWorld", variant="original")
    neg = g.node("CLIPTextEncode", text="", clip=wo[1])
    seeds = _sampled(g, wo, g.node("CLIPTextEncode", text=STAR, clip=wo[1])[0], neg[0], size, 11)
    probes, dets = {}, {}
    for variant in ("original", "never_learned"):
        w = g.node("MemoRaLoadMicroWorld", variant=variant)
        pos = g.node("CLIPTextEncode", text=STAR, clip=w[1])
        probes[variant] = g.node("MemoRaInpaintingProbe", model=w[0], vae=w[2], positive=pos[0], negative=neg[0],
                                 pixels=seeds[0], mask_kind="centre", mask_fraction=0.5, steps=STEPS, cfg=7.5,
                                 denoise=1.0, seed=3)
        dets[variant] = g.node("MemoRaMicroDetector", images=probes[variant][0], concept="star", title=variant)
    res = comfy.run(g.prompt)
    assert res.success, res.error_message
    rates = {v: _rate(res, d) for v, d in dets.items()}
    print(f"inpainting probe (centre 0.5): star rate {rates} (n={N})")
    assert rates["original"] >= rates["never_learned"] + 0.4
    pixels = comfy.node_outputs(seeds.id)[0]
    for variant, node in probes.items():
        image, mask = comfy.node_outputs(node.id)
        assert image.shape == pixels.shape and mask.shape == pixels.shape[:3]
        assert float(mask[0].mean()) == pytest.approx(36 / 64)
        keep = (mask == 0).unsqueeze(-1).expand_as(pixels)
        assert torch.equal(image[keep], pixels[keep].float())
        assert float((image - pixels).abs()[~keep].mean()) > 1e-3
        cost = _cost(res, node, "MemoRa Inpainting Probe")
        assert cost["knowledge"] == "concept images" and cost["concept_images"] == N
        assert STEPS <= cost["forward_calls"] <= 2 * STEPS


def _error(comfy, g) -> str:
    res = comfy.run(g.prompt)
    assert not res.success
    return str(res.error_message)


def test_bad_inputs_get_specific_errors(comfy, size):
    g = Graph()
    w = g.node("MemoRaLoadMicroWorld", variant="original")
    neg = g.node("CLIPTextEncode", text="", clip=w[1])
    vec = _concept_vector(g, w, 1.0, neutral="a photo of a circle")
    lat = g.node("EmptyLatentImage", width=size, height=size, batch_size=1)
    ks = g.node("KSampler", model=w[0], positive=vec[0], negative=neg[0], latent_image=lat[0], seed=1, steps=1,
                cfg=1.0, sampler_name="ddim", scheduler="ddim_uniform", denoise=1.0)
    g.node("MemoRaMicroDetector", images=g.node("VAEDecode", samples=ks[0], vae=w[2])[0], concept="star", title="x")
    assert "concept_prompts has 4 prompts but neutral_prompts has 1" in _error(comfy, g)

    g = Graph()
    w = g.node("MemoRaLoadMicroWorld", variant="original")
    pos = g.node("CLIPTextEncode", text=STAR, clip=w[1])
    lat = g.node("EmptyLatentImage", width=size, height=size, batch_size=1)
    probe = g.node("MemoRaNoiseInjectionProbe", model=w[0], positive=pos[0], negative=pos[0], latent_image=lat[0],
                   seed=1, steps=10, cfg=1.0, eta=0.0, inject_steps="4,10", inject_scale=1.0)
    g.node("MemoRaMicroDetector", images=g.node("VAEDecode", samples=probe[0], vae=w[2])[0], concept="star",
           title="x")
    assert "step 10 is out of range: with steps=10 a step index must be in 0..9" in _error(comfy, g)

    g = Graph()
    w = g.node("MemoRaLoadMicroWorld", variant="original")
    pos = g.node("CLIPTextEncode", text=STAR, clip=w[1])
    lat = g.node("EmptyLatentImage", width=size, height=size, batch_size=1)
    ks = g.node("KSampler", model=w[0], positive=pos[0], negative=pos[0], latent_image=lat[0], seed=1, steps=1,
                cfg=1.0, sampler_name="ddim", scheduler="ddim_uniform", denoise=1.0)
    crop = g.node("ImageCrop", image=g.node("VAEDecode", samples=ks[0], vae=w[2])[0], width=30, height=30, x=0, y=0)
    probe = g.node("MemoRaInpaintingProbe", model=w[0], vae=w[2], positive=pos[0], negative=pos[0], pixels=crop[0],
                   mask_kind="centre", mask_fraction=0.5, steps=2, cfg=1.0, denoise=1.0, seed=0)
    g.node("MemoRaMicroDetector", images=probe[0], concept="star", title="x")
    msg = _error(comfy, g)
    assert "the images are 30 x 30 pixels but this VAE encodes images whose width and height are multiples of 4" in msg
