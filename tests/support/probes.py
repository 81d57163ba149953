"""What several ComfyUI-tier tests measure a model with, written once: a short sampling whose bit-identity proves an
identical model, the UNet's weights, a saved latent read back, one guided x0 prediction through a stock CFGGuider, the
two-model Euler loop AutoMemoRa must reproduce, and the published UNet configurations the layer counts come from.
Import only once ComfyUI is importable (except REAL_UNET_CONFIGS, plain data)."""

from __future__ import annotations

import torch

# The published diffusers UNet configurations (the model repositories' config.json), reduced to what fixes the layer
# names and shapes: built on the meta device they give the real layer lists and parameter counts.
REAL_UNET_CONFIGS = {
    "sd15": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2),
    "sd2": dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, use_linear_projection=True),
    "sdxl": dict(sample_size=128, cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 block_out_channels=(320, 640, 1280), layers_per_block=2, use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
}


def sample_model(model, pos, seed: int = 7) -> torch.Tensor:
    """A short DDIM sampling with the model (3 steps, 8x8 latent): bit-identical results mean an identical model."""
    import nodes

    with torch.inference_mode():
        return nodes.common_ksampler(model, seed, 3, 2.0, "ddim", "ddim_uniform", pos, pos,
                                     {"samples": torch.zeros(1, 4, 8, 8)})[0]["samples"].clone()


def unet_weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}


def saved_latent(res, output_dir, save_node) -> torch.Tensor:
    """The latent a SaveLatent node wrote in the run ``res``, read back from its file."""
    from safetensors.torch import load_file

    info = res.ui_outputs[save_node.id]["latents"][0]
    return load_file(str(output_dir / info["subfolder"] / info["filename"]))["latent_tensor"]


def cfg_x0(model, pos, neg, x, sigma, sigma_next, cfg: float) -> torch.Tensor:
    """The CFG x0 prediction of MODEL at (x, sigma), x in model space, through a stock CFGGuider (which loads MODEL
    and prepares the conditioning, SDXL's pooled output and size conditioning included)."""
    import comfy.samplers

    class OneEval(comfy.samplers.Sampler):
        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                   disable_pbar=False):
            s = torch.full((x.shape[0],), float(sigma), device=latent_image.device)
            self.x0 = model_wrap(x.to(latent_image.device), s, **extra_args).detach().clone()
            return latent_image

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(pos, neg)
    guider.set_cfg(cfg)
    one = OneEval()
    guider.sample(torch.zeros_like(x), torch.zeros_like(x), one, torch.tensor([float(sigma), float(sigma_next)]),
                  seed=0, disable_pbar=True)
    return one.x0.cpu()


def two_model_euler(model, with_lora, pos, neg, start, sigmas, w: float, cfg: float):
    """AutoMemoRa by hand: Euler steps on x0 = bad + w (main - bad), bad from the unlearned MODEL and main from the
    LoRA-patched model, each a stock CFGGuider prediction. Returns (final x in model space, the largest |main - bad|
    seen: the two sides must differ for a comparison to mean anything)."""
    x = model.model.process_latent_in(start)
    gap = 0.0
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        bad = cfg_x0(model, pos, neg, x, s, s_next, cfg)
        main = cfg_x0(with_lora, pos, neg, x, s, s_next, cfg)
        gap = max(gap, float((main - bad).abs().max()))
        x = x + (x - (bad + w * (main - bad))) / s * (s_next - s)
    return x, gap


def merged_vs_stacked(comfy, ckpt: str, lora_a: str, lora_b: str, output_dir, tag: str, wa=0.8, wb=-0.6) -> dict:
    """One graph on checkpoint ``ckpt``: sampling with the two LoRA files stacked by LoraModelLoader at weights
    (wa, wb), with only the first, and with MemoRa Multi-LoRA Merge's concat, svd (automatic rank) and weight-0
    merges applied at strength 1. Returns {what: max abs difference / max abs value} for concat vs stacked, svd vs
    stacked, zero_b vs only_a, and 'visible': how much the LoRAs change sampling at all (stacked vs plain)."""
    from random_loras import lora_model_loader_extra

    from graphs import Graph

    extra = lora_model_loader_extra()
    g = Graph()
    ck = g.node("CheckpointLoaderSimple", ckpt_name=ckpt)
    pos = g.node("CLIPTextEncode", text="a photo of the parachute", clip=ck[1])
    neg = g.node("CLIPTextEncode", text="", clip=ck[1])
    lat = g.node("EmptyLatentImage", width=64, height=64, batch_size=2)
    la = g.node("MemoRaLoadLoRA", lora_name=lora_a)
    lb = g.node("MemoRaLoadLoRA", lora_name=lora_b)

    def merge(w_b, method):
        return g.node("MemoRaMultiLoRAMerge", lora_1=la[0], weight_1=wa, lora_2=lb[0], weight_2=w_b, method=method,
                      rank=0, density=0.5, seed=0, save_name="", weight_3=1.0, weight_4=1.0)

    def sample(model, name):
        ks = g.node("KSampler", model=model, positive=pos[0], negative=neg[0], latent_image=lat[0], seed=3, steps=4,
                    cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0)
        return g.node("SaveLatent", samples=ks[0], filename_prefix=f"{tag}/{name}")

    stacked = g.node("LoraModelLoader", model=ck[0], lora=la[0], strength_model=wa, **extra)
    stacked = g.node("LoraModelLoader", model=stacked[0], lora=lb[0], strength_model=wb, **extra)
    only_a = g.node("LoraModelLoader", model=ck[0], lora=la[0], strength_model=wa, **extra)
    outs = {"plain": sample(ck[0], "plain"), "stacked": sample(stacked[0], "stacked"),
            "only_a": sample(only_a[0], "only_a")}
    for name, m in (("concat", merge(wb, "concat")), ("svd", merge(wb, "svd")), ("zero_b", merge(0.0, "concat"))):
        applied = g.node("LoraModelLoader", model=ck[0], lora=m[0], strength_model=1.0, **extra)
        outs[name] = sample(applied[0], name)
    res = comfy.run(g.prompt)
    assert res.success, res.error
    x = {k: saved_latent(res, output_dir, v) for k, v in outs.items()}
    # relative to the largest value: tiny random models' latents reach ~200 (unscaled), where float32 rounding alone
    # is ~1e-5 absolute; merged and stacked deltas differ only in summation order
    errs = {k: float((x[k] - x[ref]).abs().max() / x[ref].abs().max()) for k, ref in
            (("concat", "stacked"), ("svd", "stacked"), ("zero_b", "only_a"))}
    errs["visible"] = float((x["stacked"] - x["plain"]).abs().max())
    return errs
