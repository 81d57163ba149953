"""ComfyUI side of the LoRA formats: module-name maps of a MODEL, applying a kohya LORA_MODEL with ComfyUI's own
LoRA machinery (comfy.lora key map + load_lora + add_patches, as LoraModelLoader does) and the loras folder.

Unlike ComfyUI's loaders, which only log "lora key not loaded" and carry on, :func:`apply_lora` raises a
LoraKeyError naming the layers that match nothing in the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from memora.lora import formats

_LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".lora_mid.weight", ".alpha", ".dora_scale", ".diff",
                  ".diff_b", ".set_weight", ".reshape_weight", ".w_norm", ".b_norm")


class LoraKeyError(ValueError):
    """LoRA layers that match no weight of the model they are applied to."""


def _unet_config(model) -> dict:
    base = getattr(model, "model", model)
    return dict(base.model_config.unet_config)


def ldm_to_diffusers_map(model) -> dict[str, str]:
    """ldm (ComfyUI) module path -> diffusers module path for the MODEL's UNet, e.g.
    'input_blocks.1.1.transformer_blocks.0.attn1.to_q' -> 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q'
    (from comfy.utils.unet_to_diffusers on its unet_config; empty for models that are not UNets)."""
    return _ldm_map_from_unet_config(_unet_config(model))


def _ldm_map_from_unet_config(unet_config: dict) -> dict[str, str]:
    import comfy.utils

    out: dict[str, str] = {}
    for diff_key, ldm_key in comfy.utils.unet_to_diffusers(dict(unet_config)).items():
        for suffix in (".weight", ".bias"):
            if diff_key.endswith(suffix) and ldm_key.endswith(suffix):
                out[ldm_key[: -len(suffix)]] = diff_key[: -len(suffix)]
                break
    return out


def diffusers_module_names(model) -> list[str]:
    """The diffusers module paths of the MODEL's UNet layers that have a weight (what kohya names refer to)."""
    import comfy.utils

    return sorted({k[: -len(".weight")] for k in comfy.utils.unet_to_diffusers(_unet_config(model))
                   if k.endswith(".weight")})


def diffusers_weight_shapes(model) -> dict[str, tuple]:
    """diffusers module path -> weight shape of the MODEL's UNet (to un-flatten ComfyUI-native conv LoRAs)."""
    sd_keys = model.model.diffusion_model.state_dict()
    shapes = {}
    for ldm, diff in ldm_to_diffusers_map(model).items():
        w = sd_keys.get(f"{ldm}.weight")
        if w is not None:
            shapes[diff] = tuple(w.shape)
    return shapes


def attention_module_names(model) -> list[str]:
    """diffusers paths of every to_q, to_k, to_v and to_out.0 projection of the MODEL's UNet (the MemoRa targets)."""
    return [m for m in diffusers_module_names(model)
            if m.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]


def to_kohya_for_model(sd: dict, model=None, fmt: str | None = None, alpha=None) -> dict[str, torch.Tensor]:
    """formats.to_kohya with the model's ldm map and weight shapes (SD1.x's standard map when no model is given)."""
    if model is not None:
        return formats.to_kohya(sd, ldm_to_diffusers_map(model), fmt=fmt, alpha=alpha,
                                weight_shapes=diffusers_weight_shapes(model))
    return formats.to_kohya(sd, sd15_ldm_to_diffusers_map(), fmt=fmt, alpha=alpha)


# The standard SD1.x UNet in unet_to_diffusers' vocabulary (ComfyUI's own SD1.x detection yields these values).
SD15_UNET_LAYOUT = dict(num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1)


def sd15_ldm_to_diffusers_map() -> dict[str, str]:
    """The ldm -> diffusers module map of the standard SD1.x UNet (for files read without a model)."""
    return _ldm_map_from_unet_config(SD15_UNET_LAYOUT)


@dataclass
class ApplyReport:
    """What apply_lora did: the model weights patched, the LoRA layers used, and those left out."""

    patched: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    text_encoder_layers: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        s = f"{len(self.layers)} LoRA layers -> {len(self.patched)} UNet weights patched"
        if self.text_encoder_layers:
            s += f"; {len(self.text_encoder_layers)} text-encoder layers not applied (MODEL only)"
        return s


def _layer_names(lora_sd) -> list[str]:
    names = set()
    for k in lora_sd:
        for suffix in _LORA_SUFFIXES:
            if k.endswith(suffix):
                names.add(k[: -len(suffix)])
                break
        else:
            names.add(k)
    return sorted(names)


def match_layers(model, lora_sd: dict[str, torch.Tensor]):
    """(ComfyUI-converted lora dict, {unet layer name: model weight key}, [text-encoder layer names]) for a LoRA on
    MODEL; LoraKeyError naming the format and the first layers when any UNet layer matches no weight."""
    import comfy.lora
    import comfy.lora_convert

    if not isinstance(lora_sd, dict) or not lora_sd:
        raise LoraKeyError("the LORA_MODEL is empty or not a dict of tensors")
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    lora = comfy.lora_convert.convert_lora(lora_sd)
    names = _layer_names(lora)
    te = [n for n in names if n.startswith(("lora_te", "text_encoder"))]
    unmatched = [n for n in names if n not in key_map and n not in te]
    if unmatched:
        fmt = _format_or_unknown(lora_sd)
        raise LoraKeyError(
            f"{len(unmatched)} of {len(names)} LoRA layers (format {fmt}) match no weight of this model: "
            f"{unmatched[:5]}{' ...' if len(unmatched) > 5 else ''}. Is the LoRA made for another architecture?")
    return lora, {n: key_map[n] for n in names if n not in te}, te


def apply_lora(model, lora_sd: dict[str, torch.Tensor], strength: float = 1.0):
    """A CLONE of MODEL with the kohya LoRA applied through ComfyUI's own LoRA patches; returns (clone, ApplyReport).

    Raises LoraKeyError (before touching anything) when UNet layers of the LoRA match no weight of the model;
    text-encoder layers (lora_te*) are reported, not applied (a MODEL has no text encoder). The input MODEL is not
    modified (patches live on the clone)."""
    import comfy.lora

    lora, to_load, te = match_layers(model, lora_sd)
    patches = comfy.lora.load_lora(lora, to_load, log_missing=False)
    missing = [n for n, w in to_load.items() if w not in patches and f"{w[:-len('.weight')]}.bias" not in patches]
    if missing:
        raise LoraKeyError(f"ComfyUI built no patch for LoRA layers {missing[:5]} (keys not understood)")
    clone = model.clone()
    done = set(clone.add_patches(patches, strength))
    not_done = sorted(set(patches) - done)
    if not_done:
        raise LoraKeyError(f"the model refused patches for {not_done[:5]}")
    return clone, ApplyReport(patched=sorted(done), layers=sorted(to_load), text_encoder_layers=te)


def _format_or_unknown(sd) -> str:
    try:
        return formats.detect_format(sd)
    except ValueError:
        return "unknown"


def loras_root() -> Path:
    """The first (default) folder of ComfyUI's 'loras' search path: where the pack saves LoRA files."""
    import folder_paths

    paths = folder_paths.get_folder_paths("loras")
    if not paths:
        raise RuntimeError("ComfyUI has no 'loras' model folder configured")
    return Path(paths[0])


def relative_to_loras(path: Path) -> str:
    """A saved file's name as LoraLoader lists it (relative to its loras folder, '/' separated)."""
    import folder_paths

    path = Path(path).resolve()
    for root in folder_paths.get_folder_paths("loras"):
        try:
            return path.relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            continue
    return path.name
