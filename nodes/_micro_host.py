"""Building the micro world's MODEL, CLIP and VAE in ComfyUI from the shipped weights and their manifest.

The micro world matches no real checkpoint, and ComfyUI recognises checkpoints by probing
``comfy.supported_models.models``. Nothing is registered there: the model config below is a private subclass of
the stock SD15 config, instantiated explicitly, and the ModelPatcher, comfy.sd.CLIP and comfy.sd.VAE are built the
way ``comfy.sd.load_state_dict_guess_config`` builds them (same dtype and device decisions), with the differences
between ComfyUI 0.3.64 and 0.33 feature-detected.
"""

from __future__ import annotations

import copy
import inspect
import logging
from pathlib import Path
from typing import Optional

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.utils
import folder_paths

from memora.micro import world

_UNET_PREFIX = "model.diffusion_model."


def _clip_classes(clip_config: dict):
    """SD1 CLIP wrapper classes bound to the micro world's text-model configuration."""
    json_config = dict(clip_config)

    class MicroClipModel(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, return_projected_pooled=False, dtype=dtype, model_options=model_options,
                             textmodel_json_config=dict(json_config))

    class MicroClip(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            super().__init__(device=device, dtype=dtype, model_options=model_options, clip_model=MicroClipModel,
                             **kwargs)

    return MicroClip


def model_config(manifest: dict):
    """An SD15 model config for the micro UNet (a private subclass: never added to comfy.supported_models)."""
    unet_config = dict(manifest["unet_config"])
    extra = {k: unet_config.pop(k) for k in ("num_heads", "num_head_channels") if k in unet_config}
    clip_cls = _clip_classes(manifest["clip_config"])

    class MicroWorldSD15(comfy.supported_models.SD15):
        unet_extra_config = extra or dict(comfy.supported_models.SD15.unet_extra_config)

        def clip_target(self, state_dict={}):
            return comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, clip_cls)

    MicroWorldSD15.unet_config = dict(unet_config)
    return MicroWorldSD15(unet_config)


def _load(path: Path) -> dict:
    return comfy.utils.load_torch_file(str(path), safe_load=True)


def build_model(manifest: dict, unet_sd: dict):
    """ModelPatcher for the micro UNet, built like load_state_dict_guess_config builds a checkpoint's model."""
    cfg = model_config(manifest)
    sd = {(_UNET_PREFIX + k if not k.startswith(_UNET_PREFIX) else k): v for k, v in unet_sd.items()}
    load_device = mm.get_torch_device()
    parameters = comfy.utils.calculate_parameters(sd, _UNET_PREFIX)
    # The micro UNet has ~1 M parameters: fp32 everywhere is cheap and avoids any fp16 drift between devices.
    unet_dtype = torch.float32
    manual_cast = mm.unet_manual_cast(unet_dtype, load_device, cfg.supported_inference_dtypes)
    if "device" in inspect.signature(cfg.set_inference_dtype).parameters:
        cfg.set_inference_dtype(unet_dtype, manual_cast, device=load_device)
    else:
        cfg.set_inference_dtype(unet_dtype, manual_cast)
    initial = mm.unet_inital_load_device(parameters, unet_dtype)
    model = cfg.get_model(sd, _UNET_PREFIX, device=initial)
    patcher_cls = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    patcher = patcher_cls(model, load_device=load_device, offload_device=mm.unet_offload_device())
    kwargs = {}
    if "assign" in inspect.signature(model.load_model_weights).parameters and hasattr(patcher, "is_dynamic"):
        kwargs["assign"] = patcher.is_dynamic()
    n_expected = len(model.diffusion_model.state_dict())
    n_given = sum(1 for k in sd if k.startswith(_UNET_PREFIX))
    if n_given != n_expected:
        raise ValueError(f"micro-world UNet weights have {n_given} tensors but the configured UNet has "
                         f"{n_expected}: the weights and manifest do not belong together (rebuild them)")
    model.load_model_weights(sd, _UNET_PREFIX, **kwargs)
    return patcher


def build_clip(manifest: dict, clip_sd: dict):
    cfg = model_config(manifest)
    target = cfg.clip_target()
    sd = cfg.process_clip_state_dict(dict(clip_sd))
    # ComfyUI's embeddings folder, as CheckpointLoaderSimple gives it: `embedding:<name>` works in prompts
    clip = comfy.sd.CLIP(target, embedding_directory=folder_paths.get_folder_paths("embeddings"), tokenizer_data=sd,
                         parameters=comfy.utils.calculate_parameters(sd))
    missing, unexpected = clip.load_sd(sd, full_model=True)
    missing = [k for k in missing if ".logit_scale" not in k and "text_projection" not in k]
    if missing:
        raise ValueError(f"micro-world CLIP weights are missing {len(missing)} tensors (e.g. {missing[:3]}); "
                         f"rebuild the micro world")
    if unexpected:
        logging.debug("micro world: unexpected CLIP keys %s", unexpected[:5])
    return clip


def build_vae(manifest: dict, vae_sd: dict):
    ddconfig = copy.deepcopy(manifest["vae_ddconfig"])
    config = {"params": {"embed_dim": int(manifest["vae_embed_dim"]), "ddconfig": ddconfig}}
    vae = comfy.sd.VAE(sd=dict(vae_sd), config=config)
    ratio = 2 ** (len(ddconfig["ch_mult"]) - 1)
    # comfy.sd.VAE assumes 8x for an explicit config; the micro VAE has len(ch_mult) - 1 downsamplings.
    vae.downscale_ratio = ratio
    vae.upscale_ratio = ratio
    missing = [k for k in vae.first_stage_model.state_dict() if k not in vae_sd]
    if missing:
        raise ValueError(f"micro-world VAE weights are missing {len(missing)} tensors (e.g. {missing[:3]})")
    return vae


def load_world(variant: str, weights_dir: Optional[Path] = None):
    """(MODEL, CLIP, VAE, manifest) of one variant of the shipped micro world."""
    world.check_variant(variant)
    manifest = world.load_manifest(weights_dir)
    unet_sd = _load(world.weight_path(variant, weights_dir, manifest))
    clip_sd = _load(world.weight_path("clip", weights_dir, manifest))
    vae_sd = _load(world.weight_path("vae", weights_dir, manifest))
    return build_model(manifest, unet_sd), build_clip(manifest, clip_sd), build_vae(manifest, vae_sd), manifest
