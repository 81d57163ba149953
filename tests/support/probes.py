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
