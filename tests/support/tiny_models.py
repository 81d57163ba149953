"""Tiny random models of the SD1.x family, made at test time (no download).

The UNet is built with diffusers (same architecture family as SD1.x: two levels, one res block and one transformer
per level, context 64) and written in the ldm key layout a checkpoint uses, so the same weights exist both as a
ComfyUI checkpoint (through ``memora_testkit``'s registration) and as a diffusers ``UNet2DConditionModel``; the CLIP
text model is a 2-layer, 64-wide CLIPTextModel; the VAE has TAESD's structure, which ComfyUI's checkpoint loader
recognises at its natural small size. Import this module only once ComfyUI is importable."""

from __future__ import annotations

import math
from pathlib import Path

import torch

TINY_UNET_DIFFUSERS = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=32,
)

OUTPUT_SCALE = 0.1

# The same network in ComfyUI's unet_config vocabulary (what comfy.utils.unet_to_diffusers needs).
TINY_UNET_COMFY = dict(
    num_res_blocks=[1, 1],
    channel_mult=[1, 2],
    transformer_depth=[1, 1],
    transformer_depth_output=[1, 1, 1, 1],
    transformer_depth_middle=1,
)


def diffusers_to_ldm_unet_map() -> dict[str, str]:
    """diffusers UNet key -> ComfyUI/ldm key, for the tiny configuration."""
    import comfy.utils

    return comfy.utils.unet_to_diffusers(dict(TINY_UNET_COMFY))


def make_diffusers_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET_DIFFUSERS)
    # diffusers zero-initialises conv_out and a few projections; randomise everything so outputs depend on all weights.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        # A random network's eps varies with its input far more roughly than a trained denoiser's; scaling the
        # output layer keeps predictions small (std ~0.05) and the sampling ODE smooth, like a trained model's.
        unet.conv_out.weight.mul_(OUTPUT_SCALE)
        unet.conv_out.bias.mul_(OUTPUT_SCALE)
    return unet.eval()


def unet_to_ldm_state_dict(unet) -> dict[str, torch.Tensor]:
    mapping = diffusers_to_ldm_unet_map()
    sd = unet.state_dict()
    out = {}
    missing = [k for k in sd if k not in mapping]
    if missing:
        raise RuntimeError(f"diffusers keys without an ldm mapping: {missing[:5]}")
    for k, v in sd.items():
        out["model.diffusion_model." + mapping[k]] = v.detach().clone().contiguous()
    return out


def ldm_to_diffusers_unet_state_dict(ldm_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    mapping = diffusers_to_ldm_unet_map()
    inv = {v: k for k, v in mapping.items()}
    out = {}
    for k, v in ldm_sd.items():
        if k.startswith("model.diffusion_model."):
            out[inv[k[len("model.diffusion_model."):]]] = v
    return out


def make_clip_state_dict(seed: int = 1) -> dict[str, torch.Tensor]:
    from transformers import CLIPTextConfig, CLIPTextModel

    import memora_testkit

    cfg = {k: v for k, v in memora_testkit.TINY_CLIP_CONFIG.items() if k not in ("architectures", "torch_dtype")}
    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(**cfg))
    return {"cond_stage_model.transformer." + k: v.detach().clone().contiguous()
            for k, v in model.state_dict().items() if "position_ids" not in k}


def make_taesd_state_dict(seed: int = 2) -> dict[str, torch.Tensor]:
    import comfy.taesd.taesd as taesd

    torch.manual_seed(seed)
    model = taesd.TAESD()
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        if k in ("vae_scale",):
            t = torch.ones(v.shape)
        elif k in ("vae_shift",):
            t = torch.zeros(v.shape)
        elif v.dim() >= 2:
            t = torch.randn(v.shape, generator=g) * math.sqrt(1.0 / v[0].numel())
        else:
            t = torch.zeros(v.shape)
        sd["first_stage_model." + k] = t.contiguous()
    return sd


def build_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write a tiny SD1.x checkpoint (.safetensors) that stock CheckpointLoaderSimple loads (with memora_testkit)."""
    from safetensors.torch import save_file

    sd = {}
    sd.update(unet_to_ldm_state_dict(make_diffusers_unet(seed)))
    sd.update(make_clip_state_dict(seed + 1))
    sd.update(make_taesd_state_dict(seed + 2))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float32) for k, v in sd.items()}, str(path))
    return path


def diffusers_unet_from_checkpoint(path: Path):
    """The UNet of a tiny checkpoint as a diffusers model (same weights)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    unet = UNet2DConditionModel(**TINY_UNET_DIFFUSERS)
    unet.load_state_dict(ldm_to_diffusers_unet_state_dict(load_file(str(path))))
    return unet.eval()
