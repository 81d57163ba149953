"""The micro world's fixed facts: architectures, file names, prompts, and reading the shipped manifest.

The build script (``scripts/build_micro_world.py``) writes ``weights/manifest.json`` with these configurations and
everything it measured, and per file its sha256, what built it and the seeds; loaders read the configurations back
from the manifest (so weights and configuration always travel together) and refuse a file whose hash differs.

The models: ``original`` (all five concepts), ``never_learned`` (trained without stars), and variants of the
original that each store only the tensors their erasure method changed: ``esd_x``, ``esd_x_long``, ``esd_u``,
``uce``, ``esd_u_deep`` (star erased) and ``esd_x_star_cross`` (star and cross erased). docs/micro-world.md says what each
method does.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional

from .data import CONCEPTS, caption

MANIFEST = "manifest.json"
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
    "num_res_blocks": [1, 1, 1],
    "transformer_depth": [1, 1, 1],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1],
    "channel_mult": [1, 2, 2],
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

# every model of the world: its UNet file ("unet_<name>.safetensors"), what it erased, and for a variant of the
# original its base: a variant file stores only the tensors its method changed, applied over the original's UNet
VARIANTS: tuple[str, ...] = ("original", "never_learned", "esd_x", "esd_x_long", "esd_u", "uce", "esd_u_deep",
                              "esd_x_star_cross")
DEFAULT_VARIANT = "esd_x"
BASES = {"original": None, "never_learned": None, "esd_x": "original", "esd_x_long": "original", "esd_u": "original",
         "uce": "original", "esd_u_deep": "original", "esd_x_star_cross": "original"}
ERASED = {"original": (), "never_learned": ("star",), "esd_x": ("star",), "esd_x_long": ("star",), "esd_u": ("star",),
          "uce": ("star",), "esd_u_deep": ("star",), "esd_x_star_cross": ("star", "cross")}

FILES = {"clip": "clip.safetensors", "vae": "vae.safetensors", "detector": "detector.safetensors",
         **{name: f"unet_{name}.safetensors" for name in VARIANTS}}


def weights_dir() -> Path:
    """The folder the loaders read: ``$MEMORA_MICRO_WEIGHTS`` when set (another build, see
    scripts/build_micro_world.py --out), else the shipped ``memora/micro/weights``; read at every call."""
    return Path(os.environ.get("MEMORA_MICRO_WEIGHTS") or _SHIPPED)


_SHIPPED = Path(__file__).resolve().parent / "weights"
WEIGHTS_DIR = weights_dir()  # where the build writes by default (the loaders call weights_dir())


def erased_concepts(variant: str, manifest: Optional[dict] = None) -> tuple[str, ...]:
    """The concepts ``variant`` had erased (the never-learned model: the one left out of its data; the original:
    none)."""
    check_variant(variant)
    info = ((manifest or {}).get("variants") or {}).get(variant)
    return tuple(info["erased"]) if info else ERASED[variant]


def erased_prompt(manifest: Optional[dict] = None, variant: Optional[str] = None) -> str:
    """The prompt of the world's erased concept (the star), which every single-concept variant erased; for the
    two-concept model its first erased concept, the one it shares with the others (all of them: erased_prompts)."""
    names = erased_concepts(variant, manifest) if variant else ()
    concept = names[0] if names else (manifest or {}).get("erased_concept", ERASED_CONCEPT)
    return caption(concept)


def erased_prompts(variant: str, manifest: Optional[dict] = None) -> str:
    """Every erased concept's prompt, one per line (one MemoRa recovery per line, as Multi-MemoRa does); the
    original (nothing erased) gives the world's erased concept's prompt, so a workflow can compare it."""
    names = erased_concepts(variant, manifest) or ((manifest or {}).get("erased_concept", ERASED_CONCEPT),)
    return "\n".join(caption(c) for c in names)


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        hint = " (the micro world's ESD-x model is now 'esd_x')" if variant == "unlearned" else ""
        raise ValueError(f"unknown micro-world variant {variant!r}{hint}; expected one of {list(VARIANTS)}")
    return variant


def load_manifest(weights_dir_: Optional[Path] = None) -> dict:
    """The build manifest; a clear error when the weights have not been built (or were not checked out)."""
    d = Path(weights_dir_) if weights_dir_ is not None else weights_dir()
    path = d / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"micro-world weights not found: {path} is missing. Build them with "
                                f"'python scripts/build_micro_world.py' (see docs/micro-world.md)")
    manifest = json.loads(path.read_text())
    for key in ("unet_config", "vae_ddconfig", "vae_embed_dim", "clip_config", "files", "concepts", "variants"):
        if key not in manifest:
            raise ValueError(f"{path}: the manifest has no {key!r}; rebuild the micro world")
    bad = [k for k, v in manifest["files"].items() if not isinstance(v, dict) or "sha256" not in v]
    if bad:
        raise ValueError(f"{path}: files {bad} have no sha256 record (a manifest of the first micro world?); "
                         f"rebuild the micro world")
    return manifest


#: the size scale a build of the micro-v3 branch (December 2026) drew with: its manifest records the near-shapes
#: (``args.unconditional_extras``) but not the scale, which that branch hard-coded (docs/micro-world.md, "A world
#: whose original draws every concept at cfg 7.5")
V3_BRANCH_SIZE_SCALE = {"circle": 0.85, "triangle": 1.25}


def size_scale(manifest: dict) -> dict:
    """The per-concept radius factors a world's data was drawn with (memora.micro.data.SIZE_SCALE): the manifest's
    ``size_scale``; for a manifest that predates it, {} (the shipped world) or, for a build of the micro-v3 branch,
    V3_BRANCH_SIZE_SCALE."""
    if "size_scale" in manifest:
        return dict(manifest["size_scale"])
    if "unconditional_extras" in manifest.get("args", {}):
        return dict(V3_BRANCH_SIZE_SCALE)
    return {}


_VERIFIED: dict = {}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, want: str):
    """Refuse a file whose sha256 is not the manifest's (checked once per file version)."""
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if _VERIFIED.get(key) == want:
        return
    got = sha256_file(path)
    if got != want:
        raise ValueError(f"micro-world weight file {path} does not match its manifest: sha256 {got}, the manifest "
                         f"records {want}. It was changed or damaged after the build; restore it (git checkout) or "
                         f"rebuild the micro world")
    _VERIFIED[key] = want


def weight_path(name: str, weights_dir_: Optional[Path] = None, manifest: Optional[dict] = None) -> Path:
    """The path of one of the world's files ('clip', 'vae', 'detector', or a variant's UNet), checked against the
    manifest's sha256 (a mismatch is refused, naming the file)."""
    d = Path(weights_dir_) if weights_dir_ is not None else weights_dir()
    manifest = manifest if manifest is not None else load_manifest(d)
    files = manifest["files"]
    if name not in files:
        raise ValueError(f"no micro-world file for {name!r} in {d / MANIFEST}; known: {sorted(files)}")
    path = d / files[name]["file"]
    if not path.is_file():
        raise FileNotFoundError(f"micro-world weight file missing: {path}")
    verify(path, files[name]["sha256"])
    return path


def unet_state_dict(variant: str, load: Callable[[Path], dict], weights_dir_: Optional[Path] = None,
                    manifest: Optional[dict] = None) -> dict:
    """A variant's full UNet state dict: its own file, or for a variant of the original the original's tensors with
    the variant's (only the changed ones) put over them. ``load`` reads a safetensors file into a dict."""
    check_variant(variant)
    d = Path(weights_dir_) if weights_dir_ is not None else weights_dir()
    manifest = manifest if manifest is not None else load_manifest(d)
    own = load(weight_path(variant, d, manifest))
    base = manifest["variants"][variant].get("base")
    if not base:
        return own
    sd = dict(load(weight_path(base, d, manifest)))
    unknown = sorted(set(own) - set(sd))
    if unknown:
        raise ValueError(f"micro-world variant {variant!r}: its file has {len(unknown)} tensors the {base!r} UNet "
                         f"lacks (e.g. {unknown[:3]}); the files do not belong together (rebuild them)")
    for k, v in own.items():
        if tuple(v.shape) != tuple(sd[k].shape):
            raise ValueError(f"micro-world variant {variant!r}: tensor {k} has shape {tuple(v.shape)}, the {base!r} "
                             f"UNet's has {tuple(sd[k].shape)}; rebuild the micro world")
        sd[k] = v
    return sd


__all__ = ["CONCEPTS", "VARIANTS", "DEFAULT_VARIANT", "ERASED_CONCEPT", "UNET_CONFIG", "VAE_DDCONFIG",
           "VAE_EMBED_DIM", "FILES", "erased_concepts", "erased_prompt", "erased_prompts", "check_variant",
           "load_manifest", "weight_path", "weights_dir", "unet_state_dict", "sha256_file", "WEIGHTS_DIR",
           "IMAGE_SIZE", "LATENT_SIZE", "EMPTY_LATENT_SIZE"]
