"""The micro world's fixed facts: architectures, file names, prompts, and reading the shipped manifest.

The build script (``scripts/build_micro_world.py``) writes ``weights/manifest.json`` with these configurations and
everything it measured; loaders read the configurations back from the manifest, so weights and configuration
always travel together.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from .data import CONCEPTS, caption

# the shipped weights; MEMORA_MICRO_WEIGHTS points the loaders at another build (scripts/build_micro_world.py --out)
WEIGHTS_DIR = Path(os.environ.get("MEMORA_MICRO_WEIGHTS") or Path(__file__).resolve().parent / "weights")
MANIFEST = "manifest.json"
VARIANTS: tuple[str, ...] = ("original", "unlearned", "never_learned")
ERASED_CONCEPT = "star"

# ldm UNetModel arguments (ComfyUI's unet_config vocabulary): the SD1.x UNet (spatial transformers with self- and
# cross-attention, GEGLU feed-forward, conv proj_in/proj_out) at model_channels 32, two levels.
UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 8,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "channel_mult": [1, 2],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 64,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
    "num_heads": -1,
    "num_head_channels": 16,
}

# ldm AutoencoderKL ddconfig: ch 64, three levels -> 4x downsampling like SD's x4-upscaler VAE (32 px images <-> 8 x
# 8 x 4 latents), no res blocks in the encoder's levels and one per decoder level (num_res_blocks 0), the usual mid
# block (two res blocks and self-attention) on both sides. Why not SD's 8x: 4 x 4 latents were measured to lose the
# shapes (the UNet learned blobs); why width 64: the decoder's GroupNorm(32) at width 32 is one channel per group and
# normalises every per-image colour away.
VAE_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 32,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 64,
    "ch_mult": [1, 1, 1],
    "num_res_blocks": 0,
    "attn_resolutions": [],
    "dropout": 0.0,
}
VAE_EMBED_DIM = 4
VAE_DOWNSCALE = 2 ** (len(VAE_DDCONFIG["ch_mult"]) - 1)
from .data import IMAGE_SIZE  # noqa: E402  (32 px)
LATENT_SIZE = IMAGE_SIZE // VAE_DOWNSCALE
# ComfyUI's Empty Latent Image divides its width and height by 8 (SD's VAE): this size gives the micro world's 8 x 8
# latents, which its 4x VAE decodes to 32 x 32 images.
EMPTY_LATENT_SIZE = LATENT_SIZE * 8

FILES = {
    "clip": "clip.safetensors",
    "vae": "vae.safetensors",
    "detector": "detector.safetensors",
    "original": "unet_original.safetensors",
    "unlearned": "unet_unlearned.safetensors",
    "never_learned": "unet_never_learned.safetensors",
}


def erased_prompt(manifest: Optional[dict] = None) -> str:
    concept = (manifest or {}).get("erased_concept", ERASED_CONCEPT)
    return caption(concept)


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown micro-world variant {variant!r}; expected one of {list(VARIANTS)}")
    return variant


def load_manifest(weights_dir: Optional[Path] = None) -> dict:
    """The build manifest; a clear error when the weights have not been built (or were not checked out)."""
    d = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    path = d / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"micro-world weights not found: {path} is missing. Build them with "
                                f"'python scripts/build_micro_world.py' (about 10 minutes on a 2-core CPU)")
    manifest = json.loads(path.read_text())
    for key in ("unet_config", "vae_ddconfig", "vae_embed_dim", "clip_config", "files", "concepts"):
        if key not in manifest:
            raise ValueError(f"{path}: the manifest has no {key!r}; rebuild the micro world")
    return manifest


def weight_path(name: str, weights_dir: Optional[Path] = None, manifest: Optional[dict] = None) -> Path:
    d = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    files = (manifest or {}).get("files", FILES)
    if name not in files:
        raise ValueError(f"no micro-world file for {name!r}; known: {sorted(files)}")
    path = d / files[name]
    if not path.is_file():
        raise FileNotFoundError(f"micro-world weight file missing: {path}")
    return path


__all__ = ["CONCEPTS", "VARIANTS", "ERASED_CONCEPT", "UNET_CONFIG", "VAE_DDCONFIG", "VAE_EMBED_DIM", "FILES",
           "erased_prompt", "check_variant", "load_manifest", "weight_path", "WEIGHTS_DIR", "IMAGE_SIZE", "LATENT_SIZE", "EMPTY_LATENT_SIZE"]
