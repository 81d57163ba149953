"""Tiny random models of the SD1.x family, made at test time (no download).

The UNet is built with diffusers (same architecture family as SD1.x: two levels, one res block and one transformer
per level, context 64) and written in the ldm key layout a checkpoint uses, so the same weights exist both as a
ComfyUI checkpoint (through ``memora_testkit``'s registration) and as a diffusers ``UNet2DConditionModel``; the CLIP
text model is a 2-layer, 64-wide CLIPTextModel; the VAE has TAESD's structure, which ComfyUI's checkpoint loader
recognises at its natural small size. Import this module only once ComfyUI is importable.

SD2.x-v and SDXL-base stand-ins (``build_tiny_sd2_checkpoint``, ``build_tiny_sdxl_checkpoint``, registered in
``memora_testkit`` as TinySD20 / TinySDXL, subclasses of ComfyUI's SD20 / SDXL): see the section further down. Their
diffusers twins (``arch_diffusers_unet_from_checkpoint('sd2' | 'sdxl', path)``) give ComfyUI's UNet output to 1e-5
(SDXL: ``added_cond_kwargs`` text_embeds / time_ids against ComfyUI's encode_adm)."""

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


# --- SD2.x (768-v family) and SDXL-base stand-ins ------------------------------------------------------------------
# Same two-level, 32/64-channel UNet size as the SD1.x one, with each family's distinguishing structure:
# SD2: linear proj_in/proj_out, head width (num_head_channels) instead of a head count, OpenCLIP-H-style text encoder
#      (``cond_stage_model.model.*``, GELU, penultimate layer, text_projection) whose width is the context (64).
# SDXL: no attention in the first level, two transformer blocks per attention (like SDXL's 2/10), the 'text_time'
#      addition embedding (pooled text projection + six 256-wide size/crop embeddings), two text encoders as an SDXL
#      checkpoint stores them: ``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L style, HF layout) and
#      ``conditioner.embedders.1.model.*`` (OpenCLIP-G style with text_projection); context = 64 + 64 = 128.
TINY_HEAD_CHANNELS = 16  # num_head_channels of the SD2/SDXL stand-ins (SD2/SDXL use 64): 2 heads at 32, 4 at 64

TINY_SD2_UNET_DIFFUSERS = dict(
    TINY_UNET_DIFFUSERS,
    attention_head_dim=(2, 4),  # diffusers' name for the head COUNT per level: channels / TINY_HEAD_CHANNELS
    use_linear_projection=True,
)
TINY_SD2_UNET_COMFY = dict(TINY_UNET_COMFY)

TINY_SDXL_TEXT_WIDTH = 64  # both text encoders; the pooled (projected) output of the G-style one is 64 wide
TINY_SDXL_ADM_CHANNELS = TINY_SDXL_TEXT_WIDTH + 6 * 256  # pooled + (height, width, crop_h, crop_w, target h, w)
TINY_SDXL_UNET_DIFFUSERS = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2),
    cross_attention_dim=2 * TINY_SDXL_TEXT_WIDTH,
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=TINY_SDXL_ADM_CHANNELS,
    norm_num_groups=32,
)
TINY_SDXL_UNET_COMFY = dict(
    num_res_blocks=[1, 1],
    channel_mult=[1, 2],
    transformer_depth=[0, 2],
    transformer_depth_output=[0, 0, 2, 2],
    transformer_depth_middle=2,
)

# ComfyUI's SD2 rule (supported_models.SD20.model_type): v-prediction when the last output block's first transformer
# norm1.bias has std > 0.09. The tiny SD2 config applies the same rule to its own last output block (index 3).
SD2_VPRED_PROBE_LDM = "output_blocks.3.1.transformer_blocks.0.norm1.bias"
SD2_VPRED_PROBE_DIFFUSERS = "up_blocks.1.attentions.1.transformer_blocks.0.norm1.bias"

ARCHITECTURES = {
    "sd15": (TINY_UNET_DIFFUSERS, TINY_UNET_COMFY),
    "sd2": (TINY_SD2_UNET_DIFFUSERS, TINY_SD2_UNET_COMFY),
    "sdxl": (TINY_SDXL_UNET_DIFFUSERS, TINY_SDXL_UNET_COMFY),
}


def _arch(arch: str):
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def make_arch_diffusers_unet(arch: str, seed: int = 0):
    """A seeded random diffusers UNet of one tiny architecture ('sd15', 'sd2', 'sdxl'), randomised like the SD1.x one."""
    from diffusers import UNet2DConditionModel

    config, _ = _arch(arch)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        unet.conv_out.weight.mul_(OUTPUT_SCALE)
        unet.conv_out.bias.mul_(OUTPUT_SCALE)
    return unet.eval()


def arch_ldm_map(arch: str) -> dict[str, str]:
    """diffusers UNet key -> ldm key for one tiny architecture."""
    import comfy.utils

    return comfy.utils.unet_to_diffusers(dict(_arch(arch)[1]))


def arch_unet_to_ldm_state_dict(arch: str, unet) -> dict[str, torch.Tensor]:
    mapping = arch_ldm_map(arch)
    sd = unet.state_dict()
    missing = [k for k in sd if k not in mapping]
    if missing:
        raise RuntimeError(f"{arch}: diffusers keys without an ldm mapping: {missing[:5]}")
    return {"model.diffusion_model." + mapping[k]: v.detach().clone().contiguous() for k, v in sd.items()}


def arch_diffusers_unet_from_checkpoint(arch: str, path: Path):
    """The UNet of a tiny SD2/SDXL/SD1 checkpoint as a diffusers model (same weights; strict load)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    unet = UNet2DConditionModel(**_arch(arch)[0])
    mapping = arch_ldm_map(arch)
    inv = {mapping[k]: k for k in unet.state_dict()}  # the model's own keys: label_emb is add_embedding for SDXL
    prefix = "model.diffusion_model."
    sd = {inv[k[len(prefix):]]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    unet.load_state_dict(sd)
    return unet.eval()


def _hf_clip_state_dict(config: dict, seed: int) -> dict[str, torch.Tensor]:
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")}
    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(**cfg))
    # transformers 5 names CLIPTextModel's keys without the "text_model." level that checkpoints (and 4.x) have.
    return {(k if k.startswith("text_model.") else "text_model." + k): v.detach().clone().contiguous()
            for k, v in model.state_dict().items() if "position_ids" not in k}


def hf_clip_to_open_clip(hf: dict[str, torch.Tensor], text_projection: torch.Tensor) -> dict[str, torch.Tensor]:
    """An HF CLIPTextModel state dict in OpenCLIP's text-tower layout (what SD2 and SDXL checkpoints store);
    ``text_projection`` is OpenCLIP's [width, projection] matrix (applied as ``x @ text_projection``)."""
    out = {
        "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": hf["text_model.final_layer_norm.weight"],
        "ln_final.bias": hf["text_model.final_layer_norm.bias"],
        "text_projection": text_projection.contiguous(),
    }
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    n = 0
    while f"text_model.encoder.layers.{n}.layer_norm1.weight" in hf:
        src, dst = f"text_model.encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for a, b in names.items():
            for y in ("weight", "bias"):
                out[f"{dst}{b}.{y}"] = hf[f"{src}{a}.{y}"]
        for y in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{y}"] = torch.cat(
                [hf[f"{src}self_attn.{p}_proj.{y}"] for p in ("q", "k", "v")]).contiguous()
        n += 1
    return out


def _open_clip_state_dict(config: dict, seed: int) -> dict[str, torch.Tensor]:
    width = config["hidden_size"]
    g = torch.Generator().manual_seed(seed + 1000)
    projection = torch.randn((width, config["projection_dim"]), generator=g) / math.sqrt(width)
    return hf_clip_to_open_clip(_hf_clip_state_dict(config, seed), projection)


def _save_checkpoint(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float32).contiguous() for k, v in sd.items()}, str(path))
    return path


def build_tiny_sd2_checkpoint(path: Path, seed: int = 0, *, v_prediction: bool = True, ztsnr: bool = False) -> Path:
    """A tiny SD2.x checkpoint: v-prediction by ComfyUI's own SD2 rule (see SD2_VPRED_PROBE_LDM) unless
    ``v_prediction=False``; ``ztsnr=True`` adds the ``ztsnr`` marker key (as zero-terminal-SNR SDXL checkpoints carry
    it), which the tiny SD2 config reads as ComfyUI's SDXL config does (sampling_settings zsnr)."""
    import memora_testkit

    unet = make_arch_diffusers_unet("sd2", seed)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        bias = dict(unet.named_parameters())[SD2_VPRED_PROBE_DIFFUSERS]
        bias.copy_(torch.randn(bias.shape, generator=g) * (0.2 if v_prediction else 0.02))
    sd = arch_unet_to_ldm_state_dict("sd2", unet)
    sd.update({"cond_stage_model.model." + k: v
               for k, v in _open_clip_state_dict(memora_testkit.TINY_CLIP_H_CONFIG, seed + 1).items()})
    sd.update(make_taesd_state_dict(seed + 2))
    if ztsnr:
        if not v_prediction:
            raise ValueError("a zero-terminal-SNR tiny SD2 checkpoint must be v-prediction")
        sd["ztsnr"] = torch.zeros(1)
    return _save_checkpoint(path, sd)


def build_tiny_sdxl_checkpoint(path: Path, seed: int = 0) -> Path:
    """A tiny SDXL-base checkpoint (eps prediction, like SDXL base 1.0), in an SDXL checkpoint's key layout."""
    import memora_testkit

    sd = arch_unet_to_ldm_state_dict("sdxl", make_arch_diffusers_unet("sdxl", seed))
    sd.update({"conditioner.embedders.0.transformer." + k: v
               for k, v in _hf_clip_state_dict(memora_testkit.TINY_CLIP_L_CONFIG, seed + 1).items()})
    sd.update({"conditioner.embedders.1.model." + k: v
               for k, v in _open_clip_state_dict(memora_testkit.TINY_CLIP_G_CONFIG, seed + 3).items()})
    sd.update(make_taesd_state_dict(seed + 2))
    return _save_checkpoint(path, sd)
