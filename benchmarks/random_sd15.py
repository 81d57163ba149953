"""A Stable Diffusion 1.5-architecture checkpoint with random weights, built locally (nothing downloaded).

The key layout and shapes come from ComfyUI's own modules, instantiated on the meta device (no memory, no
compute): the UNet with the configuration ComfyUI's model detection derives for SD1.x (859.52 M parameters), the
CLIP ViT-L/14 text model from ComfyUI's ``sd1_clip_config.json`` (123.06 M) and the KL autoencoder with the
configuration ComfyUI uses for SD VAEs (83.65 M). Every tensor is then drawn from a seeded generator (ComfyUI's
layers are created uninitialised, so nothing is left to chance) and the file is written in the original
checkpoint layout (``model.diffusion_model.*``, ``cond_stage_model.transformer.text_model.*``,
``first_stage_model.*``), so the stock CheckpointLoaderSimple loads it exactly as it loads a real SD1.5 file:
same detection, same dtype choices, same model classes.

Weights: matrices and convolutions ~ N(0, 1 / fan_in), token/position embeddings ~ N(0, 0.02^2), norm scales 1,
biases 0, and the UNet's output convolution scaled by 0.1 (a random network's noise prediction is otherwise far
rougher than a trained one's, which makes 50-step sampling drift). Speed and memory do not depend on the values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

# What ComfyUI's model detection produces for an SD1.x UNet (comfy/model_detection.py lists the same numbers).
SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

SD_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                   "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}

UNET_PARAMS = 859_520_964
CLIP_TEXT_PARAMS = 123_060_480
VAE_PARAMS = 83_653_863


def checkpoint_shapes() -> dict[str, tuple[tuple[int, ...], str]]:
    """{checkpoint key: (shape, kind)} for an SD1.5 checkpoint; kind is 'unet' | 'clip' | 'vae'. Needs ComfyUI
    importable (its modules define the architecture)."""
    import comfy.ops
    from comfy.clip_model import CLIPTextModel
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    clip_cfg_path = Path(comfy.ops.__file__).resolve().parent / "sd1_clip_config.json"
    clip_cfg = json.loads(clip_cfg_path.read_text())
    ops = comfy.ops.disable_weight_init
    with torch.device("meta"):
        unet = UNetModel(**SD15_UNET_CONFIG, dtype=torch.float32, device="meta", operations=ops)
        clip = CLIPTextModel(clip_cfg, torch.float32, "meta", ops)
        vae = AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=4)
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for k, v in unet.state_dict().items():
        out["model.diffusion_model." + k] = (tuple(v.shape), "unet")
    for k, v in clip.state_dict().items():
        if k.startswith("text_model.") and "position_ids" not in k:  # SD1.x files carry no text_projection
            out["cond_stage_model.transformer." + k] = (tuple(v.shape), "clip")
    for k, v in vae.state_dict().items():
        out["first_stage_model." + k] = (tuple(v.shape), "vae")
    return out


def random_tensor(key: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if key.endswith("embedding.weight"):
        return torch.randn(shape, generator=generator) * 0.02
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        t = torch.randn(shape, generator=generator) * (1.0 / math.sqrt(fan_in))
        if key == "model.diffusion_model.out.2.weight":
            t *= 0.1
        return t
    if key.endswith("bias"):
        return torch.zeros(shape)
    return torch.ones(shape)  # norm scales (and the VAE's few 1-d weights)


def random_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(int(seed))
    return {k: random_tensor(k, shape, g).to(dtype).contiguous()
            for k, (shape, _kind) in sorted(checkpoint_shapes().items())}


def parameter_counts(shapes: dict | None = None) -> dict[str, int]:
    shapes = shapes if shapes is not None else checkpoint_shapes()
    out = {"unet": 0, "clip": 0, "vae": 0}
    for shape, kind in shapes.values():
        out[kind] += math.prod(shape)
    return out


def write_checkpoint(path: Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write the random SD1.5 checkpoint (safetensors, fp16 by default: 2.1 GB) unless ``path`` exists already
    (same name = same seed and dtype: the name should say so). Written to a temporary name, then renamed."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = random_state_dict(seed, dtype)
    tmp = path.with_name(path.name + ".part")
    save_file(sd, str(tmp), metadata={"memora.benchmark": f"random SD1.5 architecture, seed {seed}"})
    tmp.replace(path)
    return path
