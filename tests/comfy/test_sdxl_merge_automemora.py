"""MemoRa Multi-LoRA Merge and the AutoMemoRa Guider on the tiny SDXL checkpoint (ComfyUI's model detection loads it as
SDXL: pooled text output and size conditioning), with the exactness identities of the SD1.x tests: the concat merge
samples like the LoRAs stacked, AutoMemoRa at w = 1 / 0 samples like the LoRA model / the unlearned model bit for
bit, and w = 2 matches an independent two-model Euler loop."""

from __future__ import annotations

import probes
import pytest
import torch

from graphs import Graph
from random_loras import lora_model_loader_extra, lora_targets, random_kohya_lora, write_lora

PROMPT = "a photo of the parachute"
STEPS = 4
CFG = 5.0


@pytest.fixture(scope="module")
def sdxl(comfy, tiny_sdxl_ckpt):
    """(MODEL, CLIP, VAE) of the tiny SDXL checkpoint through the stock CheckpointLoaderSimple, checked to be SDXL."""
    import comfy.model_base as model_base
    import comfy.supported_models as supported_models
    import nodes

    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(tiny_sdxl_ckpt)[:3]
    assert isinstance(model.model.model_config, supported_models.SDXL)
    assert isinstance(model.model, model_base.SDXL)
    return model, clip, vae


@pytest.fixture(scope="module")
def xl_loras(comfy, comfy_base, sdxl):
    """A: rank 4 over the attention projections. B: rank 8 over those, every conv, and SDXL's size/pooled-text
    embedding (add_embedding.linear_1/2, ldm label_emb.0.0/.2)."""
    model = sdxl[0]
    everything = lora_targets(model, attention_only=False)
    wide = {m: s for m, s in everything.items()
            if len(s) == 4 or m.startswith("add_embedding.") or m in lora_targets(model)}
    assert any(m.startswith("add_embedding.") for m in wide)
    a = random_kohya_lora(lora_targets(model), rank=4, seed=31, alpha=4.0)
    b = random_kohya_lora(wide, rank=8, seed=32, alpha=2.0)
    folder = comfy_base / "models" / "loras"
    return {"a": (write_lora(folder, "sdxl_merge_a.safetensors", a), a),
            "b": (write_lora(folder, "sdxl_merge_b.safetensors", b), b)}


def test_concat_merge_samples_like_stacked_loras_on_sdxl(comfy, tiny_sdxl_ckpt, xl_loras, output_dir):
    """SDXL: sampling with the concat-merged LoRA == the two LoRAs stacked by LoraModelLoader (1e-5 relative); svd
    at automatic rank too; weight 0 leaves a LoRA out."""
    errs = probes.merged_vs_stacked(comfy, tiny_sdxl_ckpt, xl_loras["a"][0], xl_loras["b"][0], output_dir,
                                    "sdxl_merge_test")
    print("SDXL merged vs stacked, max abs diff / max abs value:", errs)
    assert errs["visible"] > 1e-2, "the test LoRAs must change sampling visibly"
    assert errs["concat"] < 1e-5 and errs["svd"] < 1e-5 and errs["zero_b"] < 1e-5


def _merge(**kw):
    import nodes

    args = dict(weight_1=1.0, method="concat", rank=0, density=0.5, seed=0, save_name="")
    args.update(kw)
    with torch.inference_mode():
        return nodes.NODE_CLASS_MAPPINGS["MemoRaMultiLoRAMerge"].execute(**args)


def _native(layers: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    """A ComfyUI-native LoRA (diffusion_model.<ldm path>, as core TrainLoraNode / SaveLoRA write it), rank 2."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (out, inn) in layers.items():
        sd[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(2, inn, generator=g)
        sd[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(out, 2, generator=g)
        sd[f"diffusion_model.{name}.alpha"] = torch.tensor(2.0)
    return sd


def test_native_sdxl_layers_merge_under_their_diffusers_names(comfy):
    """ComfyUI-native names of the SDXL base UNet (ten transformer blocks, the label_emb size embedding) are read
    with SDXL's layout; the merged LoRA carries their kohya (diffusers) names and exactly their weighted deltas."""
    from memora.lora import formats

    sdxl_layers = {"input_blocks.7.1.transformer_blocks.3.attn1.to_q": (1280, 1280),
                   "output_blocks.0.1.transformer_blocks.9.attn2.to_k": (1280, 2048),
                   "label_emb.0.0": (1280, 2816)}
    sd = _native(sdxl_layers, 5)
    merged, report = _merge(lora_1=sd, weight_1=0.5)[:2]
    layers = formats.kohya_layers(merged)
    expected = {"lora_unet_down_blocks_2_attentions_0_transformer_blocks_3_attn1_to_q":
                "input_blocks.7.1.transformer_blocks.3.attn1.to_q",
                "lora_unet_up_blocks_0_attentions_0_transformer_blocks_9_attn2_to_k":
                "output_blocks.0.1.transformer_blocks.9.attn2.to_k",
                "lora_unet_add_embedding_linear_1": "label_emb.0.0"}
    assert set(layers) == set(expected), sorted(layers)
    for kohya, ldm in expected.items():
        up, down = sd[f"diffusion_model.{ldm}.lora_up.weight"], sd[f"diffusion_model.{ldm}.lora_down.weight"]
        ref = 0.5 * (up @ down)  # alpha 2 / rank 2 = scale 1
        assert float((layers[kohya].delta() - ref).abs().max()) < 1e-5 * float(ref.abs().max())
    assert "comfy format" in report


def test_native_layers_of_no_unet_layout_are_refused(comfy):
    sd = _native({"double_blocks.0.img_attn.qkv": (96, 32)}, 6)  # a Flux name: neither SD1.x/SD2.x nor SDXL
    with pytest.raises(ValueError, match=r"lora_1: a ComfyUI-native LoRA .* exist in neither the SD1.x/SD2.x and "
                                         r"SDXL UNet layouts.*MemoRa Load LoRA with its model connected"):
        _merge(lora_1=sd)


def test_sd1_and_sdxl_loras_are_refused_together_naming_both(comfy, loaded_tiny, xl_loras):
    """An SD1.x LoRA and an SDXL LoRA share layer names with different shapes: the merge is refused and says which
    architecture each input was made for (read from their shapes)."""
    sd1 = random_kohya_lora(lora_targets(loaded_tiny[0]), rank=4, seed=33)
    with pytest.raises(ValueError, match="incompatible weight shapes") as err:
        _merge(lora_1=sd1, lora_2=xl_loras["a"][1], weight_2=1.0)
    msg = str(err.value)
    assert "made for an SD1.x/SD2.x-layout UNet (cross-attention width 64)" in msg, msg
    assert "made for an SDXL-layout UNet (cross-attention width 128)" in msg, msg


# -- AutoMemoRa --------------------------------------------------------------------------------------------------
def test_automemora_w1_and_w0_reproduce_plain_sdxl_sampling_exactly(comfy, tiny_sdxl_ckpt, xl_loras, output_dir):
    """SDXL: w = 1 samples exactly like the model with the LoRA (LoraModelLoader + CFGGuider), w = 0 exactly like the
    unlearned model (bit for bit); the pooled output and size conditioning go through ComfyUI's own CFGGuider."""
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=tiny_sdxl_ckpt)
    pos = g.node("CLIPTextEncode", text=PROMPT, clip=ck[1])
    neg = g.node("CLIPTextEncode", text="", clip=ck[1])
    lora = g.node("MemoRaLoadLoRA", lora_name=xl_loras["b"][0])
    lat = g.node("EmptyLatentImage", width=64, height=64, batch_size=2)
    noise = g.node("RandomNoise", noise_seed=7)
    sampler = g.node("KSamplerSelect", sampler_name="euler")
    sigmas = g.node("BasicScheduler", model=ck[0], scheduler="normal", steps=STEPS, denoise=1.0)

    def sample(guider, tag):
        out = g.node("SamplerCustomAdvanced", noise=noise[0], guider=guider[0], sampler=sampler[0], sigmas=sigmas[0],
                     latent_image=lat[0])
        return g.node("SaveLatent", samples=out[0], filename_prefix=f"sdxl_automemora_test/{tag}")

    def auto(w):
        return g.node("MemoRaAutoGuider", model=ck[0], lora=lora[0], positive=pos[0], negative=neg[0], cfg=CFG, w=w,
                      main="lora")

    with_lora = g.node("LoraModelLoader", model=ck[0], lora=lora[0], strength_model=1.0, **lora_model_loader_extra())
    refs = {"plain": sample(g.node("CFGGuider", model=ck[0], positive=pos[0], negative=neg[0], cfg=CFG), "plain"),
            "lora": sample(g.node("CFGGuider", model=with_lora[0], positive=pos[0], negative=neg[0], cfg=CFG), "lora"),
            "w1": sample(auto(1.0), "w1"), "w0": sample(auto(0.0), "w0")}
    res = comfy.run(g.prompt)
    assert res.success, res.error
    x = {k: probes.saved_latent(res, output_dir, v) for k, v in refs.items()}
    assert float((x["plain"] - x["lora"]).abs().max()) > 1e-2, "the test LoRA must change sampling visibly"
    assert torch.equal(x["w1"], x["lora"]), float((x["w1"] - x["lora"]).abs().max())
    assert torch.equal(x["w0"], x["plain"]), float((x["w0"] - x["plain"]).abs().max())


def test_automemora_w2_matches_two_model_loop_on_sdxl(comfy, sdxl, xl_loras):
    """SDXL, w = 2: the guider's Euler sampling == a hand-written Euler loop over the unlearned model and the stock
    LoRA-patched model (each a stock CFGGuider prediction), within 1e-5."""
    import comfy.samplers
    import comfy.sd
    import nodes

    model, clip, _ = sdxl
    lora_sd, w = xl_loras["b"][1], 2.0
    with torch.inference_mode():
        pos = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        assert pos[0][1].get("pooled_output") is not None, "SDXL conditioning carries the pooled text embedding"
        guider = nodes.NODE_CLASS_MAPPINGS["MemoRaAutoGuider"].execute(model, lora_sd, pos, neg, CFG, w, "lora")[0]
        with_lora = comfy.sd.load_lora_for_models(model, None, lora_sd, 1.0, 0)[0]
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS).cpu()
        start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)) / 0.13025
        out = guider.sample(torch.zeros_like(start), start, comfy.samplers.sampler_object("euler"), sigmas,
                            seed=0, disable_pbar=True).cpu()
        assert guider.forwards["lora_on"] == STEPS and guider.forwards["lora_off"] == STEPS
        x, gap = probes.two_model_euler(model, with_lora, pos, neg, start, sigmas, w, CFG)
    out = model.model.process_latent_in(out)
    err = float((out - x).abs().max())
    print(f"SDXL AutoMemoRa w=2 vs two-model loop: max abs diff {err:.3g} (max |value| {float(x.abs().max()):.3g})")
    assert err < 1e-5
    assert gap > 1e-2, "the two sides must differ for the check to mean anything"


def test_automemora_refuses_an_sd1_lora_on_sdxl_naming_both_architectures(comfy, sdxl, loaded_tiny):
    import nodes

    model, clip, _ = sdxl
    sd1 = random_kohya_lora(lora_targets(loaded_tiny[0]), rank=4, seed=34)
    with torch.inference_mode():
        pos = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
        with pytest.raises(ValueError) as err:
            nodes.NODE_CLASS_MAPPINGS["MemoRaAutoGuider"].execute(model, sd1, pos, pos, CFG, 1.0, "lora")
    msg = str(err.value)
    assert "It was made for an SD1.x/SD2.x-layout UNet (cross-attention width 64); the base checkpoint is SDXL " \
           "(cross-attention width 128)." in msg, msg
    assert msg.count("It was made for") == 1 and ".." not in msg.replace("...", ""), msg  # said once, one stop
