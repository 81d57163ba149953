"""An SDXL-base-architecture checkpoint with random weights, built locally (nothing downloaded).

As ``random_sd15.py``, from ComfyUI's own modules instantiated on the meta device: the UNet with the configuration
ComfyUI's model detection derives for SDXL base (``comfy/model_detection.py``: 2,567 M parameters, 'text_time'
adm of 2816 = pooled 1280 + 6 x 256), the two text encoders as an SDXL checkpoint stores them (CLIP ViT-L/14 from
``sd1_clip_config.json`` under ``conditioner.embedders.0.transformer.text_model.*``, OpenCLIP ViT-bigG/14 from
``clip_config_bigg.json`` in OpenCLIP's layout under ``conditioner.embedders.1.model.*`` with its text_projection)
and the KL autoencoder (SDXL's VAE has the SD VAE's architecture). The stock CheckpointLoaderSimple detects it as
SDXL (model_base.SDXL, EPS) exactly as it does the real file. Weights are drawn like random_sd15's; speed and memory
do not depend on the values. About 6.9 GB in fp16."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

import random_sd15

SDXL_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

_OPEN_CLIP_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}


def open_clip_shapes(hf_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """HF CLIPTextModel key shapes (``text_model.*`` plus ``text_projection.weight``) -> OpenCLIP text-tower keys."""
    out = {}
    for k, shape in hf_shapes.items():
        if k == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = shape
        elif k == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = shape
        elif k.startswith("text_model.final_layer_norm."):
            out["ln_final." + k.rsplit(".", 1)[1]] = shape
        elif k == "text_projection.weight":
            out["text_projection"] = (shape[1], shape[0])
        elif k.startswith("text_model.encoder.layers."):
            rest = k[len("text_model.encoder.layers."):]
            n, name = rest.split(".", 1)
            stem, kind = name.rsplit(".", 1)
            if stem in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                out[f"transformer.resblocks.{n}.attn.in_proj_{kind}"] = (3 * shape[0], *shape[1:])
            else:
                out[f"transformer.resblocks.{n}.{_OPEN_CLIP_BLOCK[stem]}.{kind}"] = shape
    return out


def checkpoint_shapes() -> dict[str, tuple[tuple[int, ...], str]]:
    """{checkpoint key: (shape, kind)} for an SDXL-base checkpoint; kind is 'unet' | 'clip_l' | 'clip_g' | 'vae'."""
    import comfy.ops
    from comfy.clip_model import CLIPTextModel
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    here = Path(comfy.ops.__file__).resolve().parent
    cfg_l = json.loads((here / "sd1_clip_config.json").read_text())
    cfg_g = json.loads((here / "clip_config_bigg.json").read_text())
    ops = comfy.ops.disable_weight_init
    with torch.device("meta"):
        unet = UNetModel(**SDXL_UNET_CONFIG, dtype=torch.float32, device="meta", operations=ops)
        clip_l = CLIPTextModel(cfg_l, torch.float32, "meta", ops)
        clip_g = CLIPTextModel(cfg_g, torch.float32, "meta", ops)
        vae = AutoencoderKL(ddconfig=dict(random_sd15.SD_VAE_DDCONFIG), embed_dim=4)
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for k, v in unet.state_dict().items():
        out["model.diffusion_model." + k] = (tuple(v.shape), "unet")
    for k, v in clip_l.state_dict().items():
        if k.startswith("text_model.") and "position_ids" not in k:  # SDXL files carry no CLIP-L projection
            out["conditioner.embedders.0.transformer." + k] = (tuple(v.shape), "clip_l")
    g_shapes = {k: tuple(v.shape) for k, v in clip_g.state_dict().items() if "position_ids" not in k}
    for k, shape in open_clip_shapes(g_shapes).items():
        out["conditioner.embedders.1.model." + k] = (shape, "clip_g")
    for k, v in vae.state_dict().items():
        out["first_stage_model." + k] = (tuple(v.shape), "vae")
    return out


def random_tensor(key: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if key.endswith("positional_embedding"):
        return torch.randn(shape, generator=generator) * 0.02
    return random_sd15.random_tensor(key, shape, generator)


def parameter_counts(shapes: dict | None = None) -> dict[str, int]:
    shapes = shapes if shapes is not None else checkpoint_shapes()
    out = {"unet": 0, "clip_l": 0, "clip_g": 0, "vae": 0}
    for shape, kind in shapes.values():
        out[kind] += math.prod(shape)
    return out


def write_checkpoint(path: Path, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write the random SDXL checkpoint (safetensors, fp16: about 6.9 GB) unless ``path`` exists already (same name =
    same seed and dtype). Tensors are drawn one at a time; written to a temporary name, then renamed."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(int(seed))
    sd = {k: random_tensor(k, shape, g).to(dtype).contiguous() for k, (shape, _) in sorted(checkpoint_shapes().items())}
    tmp = path.with_name(path.name + ".part")
    save_file(sd, str(tmp), metadata={"memora.benchmark": f"random SDXL-base architecture, seed {seed}"})
    tmp.replace(path)
    return path
