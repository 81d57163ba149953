"""A tiny Flux-family model built in code (random weights, no download) that ComfyUI loads as Flux.

The transformer is ComfyUI's own ``comfy.ldm.flux.model.Flux`` at hidden width 128 (one head of 128 =
sum(axes_dim) = 16 + 56 + 56, as Flux's heads), 2 double and 2 single blocks, 16 latent channels, patch 2; ``dev`` has
the guidance embedder (``guidance_in``: guidance-distilled, what ComfyUI's detection calls ``guidance_embed``),
``schnell`` has none. Both variants come from one seed and share every other weight. Files:

- ``tiny_flux_file(dir, variant)``: the transformer alone in ComfyUI's key layout (what UNETLoader /
  ``comfy.sd.load_diffusion_model`` read, like ``flux1-dev.safetensors``);
- ``tiny_flux_checkpoint(dir, variant)``: an all-in-one checkpoint (``model.diffusion_model.*``,
  ``text_encoders.clip_l.*``, ``text_encoders.t5xxl.*``, ``vae.*``, like Comfy-Org's ``flux1-dev-fp8``) that the stock
  CheckpointLoaderSimple loads as MODEL + CLIP (tiny CLIP-L and T5 behind ComfyUI's FluxTokenizer / FluxClipModel,
  so CLIPTextEncode and FluxGuidance work as on Flux) + VAE (TAESD structure with 16 latent channels, like taef1).

ComfyUI's detection picks ``Flux`` / ``FluxSchnell``; ``memora_testkit.flux`` registers their tiny-width subclasses
(ComfyUI 0.3.64 hard-codes the real widths). ``tiny_flux_conditioning`` builds a CONDITIONING in code (T5-width
context + CLIP-L-width pooled output) for tests that need no text encoder. Import this module only once ComfyUI is
importable (after the ``comfy`` fixture)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

VARIANTS = ("dev", "schnell")
DEPTH, DEPTH_SINGLE = 2, 2
LATENT_CHANNELS = 16
OUTPUT_SCALE = 0.1  # the final projection scaled down: a smooth velocity field, like a trained model's
DIFFUSERS_CONFIG = dict(  # the same transformer in diffusers' FluxTransformer2DModel vocabulary (for LoRA checks)
    patch_size=1, in_channels=64, num_layers=DEPTH, num_single_layers=DEPTH_SINGLE, attention_head_dim=128,
    num_attention_heads=1, joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(16, 56, 56),
)


def diffusers_config(variant: str = "dev") -> dict:
    """FluxTransformer2DModel's config for the tiny model (every diffusers key maps, by comfy.utils.flux_to_diffusers,
    onto a ComfyUI key of the same shape: checked on both ComfyUI versions when this was written)."""
    _check_variant(variant)
    return dict(DIFFUSERS_CONFIG, guidance_embeds=variant == "dev")


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny Flux variant {variant!r}; expected one of {VARIANTS}")


def dit_config(variant: str = "dev") -> dict:
    """The keyword arguments of comfy.ldm.flux.model.Flux for the tiny model."""
    from memora_testkit.flux import TINY_FLUX_DIT

    _check_variant(variant)
    cfg = dict(TINY_FLUX_DIT, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, patch_size=2, mlp_ratio=4.0,
               depth=DEPTH, depth_single_blocks=DEPTH_SINGLE, theta=10000, qkv_bias=True,
               guidance_embed=variant == "dev")
    import inspect

    import comfy.ldm.flux.model as flux_model

    if "txt_ids_dims" in inspect.signature(flux_model.FluxParams).parameters:  # ComfyUI 0.33
        cfg["txt_ids_dims"] = []
    return cfg


def _randomise(module: torch.nn.Module, seed: int, skip: tuple[str, ...] = ()) -> None:
    """Seeded random weights by parameter name (so dev and schnell share every weight they both have)."""
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            g = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, name)) * 31 + len(name))
            if name.endswith("scale") or "norm" in name and p.dim() == 1 and name.endswith("weight"):
                p.copy_(torch.ones(p.shape))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def make_transformer_state_dict(variant: str = "dev", seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny transformer's weights in ComfyUI's (= BFL's original) key layout, no prefix."""
    import comfy.ldm.flux.model as flux_model
    import comfy.ops

    model = flux_model.Flux(operations=comfy.ops.disable_weight_init, dtype=torch.float32, **dit_config(variant))
    _randomise(model, seed)
    with torch.no_grad():
        model.final_layer.linear.weight.mul_(OUTPUT_SCALE)
        model.final_layer.linear.bias.mul_(OUTPUT_SCALE)
    # BFL's layout names the QK-norm gains `*_norm.scale` (ComfyUI 0.3.64's module does; 0.33's module says `weight`
    # and converts the file's `scale` on load): always write the released files' names.
    return {_bfl_key(k): v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _bfl_key(key: str) -> str:
    if key.endswith(("query_norm.weight", "key_norm.weight")):
        return key[: -len("weight")] + "scale"
    return key


def make_text_encoder_state_dict(seed: int = 1) -> dict[str, torch.Tensor]:
    """Tiny CLIP-L + T5 weights in a Flux checkpoint's layout (``clip_l.transformer.*``, ``t5xxl.transformer.*``)."""
    from memora_testkit.flux import TinyFluxClip

    clip = TinyFluxClip(device="cpu", dtype=torch.float32)
    _randomise(clip, seed)
    return {k: v.detach().clone().contiguous() for k, v in clip.state_dict().items() if "position_ids" not in k}


def make_vae_state_dict(seed: int = 2) -> dict[str, torch.Tensor]:
    """A TAESD-structured VAE with 16 latent channels (ComfyUI's VAE loader reads taesd_* keys)."""
    import comfy.taesd.taesd as taesd

    model = taesd.TAESD(latent_channels=LATENT_CHANNELS)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        if k == "vae_scale":
            t = torch.ones(v.shape)
        elif k == "vae_shift":
            t = torch.zeros(v.shape)
        elif v.dim() >= 2:
            t = torch.randn(v.shape, generator=g) * math.sqrt(1.0 / v[0].numel())
        else:
            t = torch.zeros(v.shape)
        sd[k] = t.contiguous()
    return sd


def _save(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float32).contiguous() for k, v in sd.items()}, str(path))
    return path


def tiny_flux_file(directory: Path, variant: str = "dev", seed: int = 0) -> Path:
    """Write (once) ``memora_tiny_flux_<variant>.safetensors``: the transformer alone (UNETLoader's input)."""
    _check_variant(variant)
    path = Path(directory) / f"memora_tiny_flux_{variant}_s{seed}.safetensors"
    if not path.exists():
        _save(path, make_transformer_state_dict(variant, seed))
    return path


def tiny_flux_checkpoint(directory: Path, variant: str = "dev", seed: int = 0) -> Path:
    """Write (once) an all-in-one checkpoint: transformer, tiny CLIP-L + T5, 16-channel TAESD VAE."""
    _check_variant(variant)
    path = Path(directory) / f"memora_tiny_flux_{variant}_ckpt_s{seed}.safetensors"
    if not path.exists():
        sd = {"model.diffusion_model." + k: v for k, v in make_transformer_state_dict(variant, seed).items()}
        sd.update({"text_encoders." + k: v for k, v in make_text_encoder_state_dict(seed + 1).items()})
        sd.update({"vae." + k: v for k, v in make_vae_state_dict(seed + 2).items()})
        _save(path, sd)
    return path


def load_tiny_flux(variant: str = "dev", directory: Path | None = None, seed: int = 0):
    """The tiny transformer as ComfyUI loads it (``comfy.sd.load_diffusion_model``): a ModelPatcher, fp32."""
    import tempfile

    import comfy.sd

    directory = Path(directory) if directory is not None else Path(tempfile.gettempdir()) / "memora_tiny_flux"
    return comfy.sd.load_diffusion_model(str(tiny_flux_file(directory, variant, seed)),
                                         model_options={"dtype": torch.float32})


def tiny_flux_conditioning(batch: int = 1, tokens: int = 8, seed: int = 3, guidance: float | None = None):
    """A CONDITIONING built in code: T5-width context [batch, tokens, 64] and a CLIP-L-width pooled output [batch, 64];
    ``guidance`` adds FluxGuidance's key (Flux dev's distilled guidance)."""
    from memora_testkit.flux import TINY_CONTEXT, TINY_POOLED

    g = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": torch.randn((batch, TINY_POOLED), generator=g)}
    if guidance is not None:
        extra["guidance"] = float(guidance)
    return [[torch.randn((batch, tokens, TINY_CONTEXT), generator=g), extra]]


def install_tiny_flux(comfy_base: Path, variant: str = "dev", seed: int = 0) -> dict[str, str]:
    """Write the tiny Flux files where a booted ComfyUI looks for them (``comfy_base``'s models folders) and return
    their file names: ``{"checkpoint": ... (models/checkpoints), "diffusion_model": ... (models/diffusion_models)}``."""
    models = Path(comfy_base) / "models"
    return {"checkpoint": tiny_flux_checkpoint(models / "checkpoints", variant, seed).name,
            "diffusion_model": tiny_flux_file(models / "diffusion_models", variant, seed).name}
