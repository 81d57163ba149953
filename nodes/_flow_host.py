"""The ComfyUI side of the flow-matching (rectified-flow) nodes: which models are flow models, Flux's conditioning
(T5 context, CLIP-L pooled output, distilled guidance) and CFG rules. The maths is in ``memora.flow``."""

from __future__ import annotations

from typing import Any, Optional

import torch

from . import _host

FLUX_DEV = "flux-dev"  # Flux with the guidance embedder (guidance-distilled: FluxGuidance sets the guidance)
FLUX_SCHNELL = "flux-schnell"  # Flux without it (timestep-distilled; ComfyUI samples it with discrete flow, shift 1)
FLOW = "flow"  # another CONST (rectified-flow) model ComfyUI samples with a flow schedule (SD3, AuraFlow, Chroma, ...)
SUPPORTED_FLOW = ("rectified-flow models ComfyUI samples with CONST prediction on a flow schedule (ModelSamplingFlux "
                  "or ModelSamplingDiscreteFlow): Flux dev / schnell and their fine-tunes, SD3-style discrete flow")


def _is_flow_sampling(ms) -> bool:
    import comfy.model_sampling as ms_mod

    cls = type(ms)
    const_math = all(getattr(cls, f, None) is getattr(ms_mod.CONST, f, None)
                     for f in ("calculate_input", "calculate_denoised", "noise_scaling", "inverse_noise_scaling"))
    schedule = isinstance(ms, (ms_mod.ModelSamplingFlux, ms_mod.ModelSamplingDiscreteFlow))
    return const_math and schedule


def flow_kind(model) -> Optional[str]:
    """FLUX_DEV, FLUX_SCHNELL or FLOW for a flow model the flow nodes implement; None otherwise."""
    if not _is_flow_sampling(_host.model_sampling(model)):
        return None
    unet_config = getattr(getattr(model.model, "model_config", None), "unet_config", {}) or {}
    if unet_config.get("image_model") == "flux":
        return FLUX_DEV if unet_config.get("guidance_embed") else FLUX_SCHNELL
    return FLOW


def check_flow_model(model, what: str) -> str:
    """The model's flow kind, or UnsupportedModelError naming its sampling type and the nodes that fit it."""
    kind = flow_kind(model)
    if kind is not None:
        return kind
    hint = ""
    try:
        _host.check_model_kind(model, what)
        hint = (" It is a DDIM-family (epsilon / v-prediction) model: use MemoRa DDIM Inversion and MemoRa Regenerate "
                "for it.")
    except _host.UnsupportedModelError:
        pass
    raise _host.UnsupportedModelError(
        f"{what} does not support this model: its sampling type is {_host.describe_sampling(model)}. Supported: "
        f"{SUPPORTED_FLOW}.{hint}")


def _unet_config(model) -> dict:
    return getattr(getattr(model.model, "model_config", None), "unet_config", {}) or {}


def check_flux_conditioning(model, kind: str, conditioning: Any, what: str, name: str) -> None:
    """Refuse, before anything runs, CONDITIONING a Flux model cannot read or would silently ignore: text embeddings
    of another width than its T5 context (another family's text encoder), a missing or wrong-width pooled CLIP-L
    output (Flux's `y`), and FluxGuidance's ``guidance`` on schnell, which has no guidance embedder."""
    if kind not in (FLUX_DEV, FLUX_SCHNELL) or not isinstance(conditioning, (list, tuple)):
        return
    cfg = _unet_config(model)
    context, pooled_width = cfg.get("context_in_dim"), cfg.get("vec_in_dim")
    for i, entry in enumerate(conditioning):
        if not isinstance(entry, (list, tuple)) or len(entry) < 2 or not isinstance(entry[1], dict):
            continue
        cond, extras = entry[0], entry[1]
        where = f"{what}: {name} (entry {i})"
        if isinstance(cond, torch.Tensor) and context and cond.shape[-1] != int(context):
            raise ValueError(
                f"{where} has {cond.shape[-1]}-wide text embeddings but this Flux model reads {int(context)}-wide T5 "
                f"embeddings: it was encoded with another model family's text encoder. Encode the prompt with this "
                f"model's Flux text encoders (CLIP-L + T5, e.g. DualCLIPLoader type flux).")
        pooled = extras.get("pooled_output")
        if pooled_width and (not isinstance(pooled, torch.Tensor) or pooled.shape[-1] != int(pooled_width)):
            got = f"a {pooled.shape[-1]}-wide pooled_output" if isinstance(pooled, torch.Tensor) else "no pooled_output"
            raise ValueError(
                f"{where} has {got}; Flux needs the {int(pooled_width)}-wide pooled CLIP-L embedding that CLIPTextEncode "
                f"puts in the conditioning with the Flux text encoders.")
        if kind == FLUX_SCHNELL and extras.get("guidance") is not None:
            raise ValueError(
                f"{where} carries a distilled guidance of {extras['guidance']} (FluxGuidance), but this is a Flux "
                f"schnell model: it has no guidance embedder, so the value would be silently ignored. Remove "
                f"FluxGuidance for schnell (distilled guidance is a Flux dev option).")


def check_cfg(kind: str, cfg: float, true_cfg: bool, negative: Any, what: str) -> None:
    """Flux was distilled to run without a CFG pair (dev: the guidance embedder carries the guidance; schnell: 1-4
    steps at cfg 1): cfg != 1 on Flux is true CFG, which must be asked for explicitly; true CFG needs a negative,
    and at cfg 1 true_cfg, or a connected negative, would do nothing (ComfyUI skips the negative there)."""
    flux = kind in (FLUX_DEV, FLUX_SCHNELL)
    if flux and abs(cfg - 1.0) > 1e-9 and not true_cfg:
        guidance = ("set the guidance with FluxGuidance on the positive conditioning instead (Flux dev's distilled "
                    "guidance, e.g. 3.5)" if kind == FLUX_DEV else "schnell samples at cfg 1")
        raise ValueError(
            f"{what}: cfg {cfg:g} on a {kind} model: Flux is guidance-distilled and is sampled with cfg 1 (no CFG "
            f"pair); {guidance}. For real classifier-free guidance with the negative prompt (two model calls per "
            f"step), turn true_cfg on.")
    if true_cfg and abs(cfg - 1.0) <= 1e-9:
        raise ValueError(f"{what}: true_cfg is on but cfg is 1, where ComfyUI never evaluates the negative: set cfg "
                         f"above 1 for true CFG, or turn true_cfg off.")
    if abs(cfg - 1.0) <= 1e-9 and negative is not None:
        raise ValueError(f"{what}: a negative conditioning is connected but cfg is 1, where ComfyUI never evaluates "
                         f"it (it would be silently ignored): disconnect it, or use true CFG (true_cfg on, cfg > 1).")
    if abs(cfg - 1.0) > 1e-9 and negative is None:
        raise ValueError(f"{what}: cfg {cfg:g} needs the negative conditioning (classifier-free guidance is "
                         f"uncond + cfg (cond - uncond)); connect it, or use cfg 1.")
