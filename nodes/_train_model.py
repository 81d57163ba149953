"""What a ComfyUI MODEL is, for LoRA training: its prediction type and noise schedule, the dtype it runs in, the
layers the recipe targets, and a fingerprint of its weights."""

from __future__ import annotations

import torch

import comfy.model_management

from memora.lora import denoiser as _denoiser
from memora.lora import fingerprint as _fingerprint
from memora.lora import flow as _flow
from memora.lora import flux as _flux
from memora.lora import train as _train
from . import _host, _lora_host


def is_flow(model) -> bool:
    """Whether the MODEL samples as a rectified flow ComfyUI's way: CONST prediction (velocity; ``x_t = (1 - t) x0
    + t eps``) with a ModelSamplingFlux or ModelSamplingDiscreteFlow schedule (Flux dev, schnell, SD3 ...)."""
    import comfy.model_sampling as ms_mod

    ms = _host.model_sampling(model)
    flows = tuple(getattr(ms_mod, n) for n in ("ModelSamplingFlux", "ModelSamplingDiscreteFlow") if hasattr(ms_mod, n))
    return isinstance(ms, ms_mod.CONST) and isinstance(ms, flows)


def prediction_type(model) -> str:
    """"flow" for ComfyUI's Flux-family flow models (velocity, :mod:`memora.lora.flow`); "epsilon" or
    "v_prediction" for discrete-timestep models (SD1.x, SD2.x, SDXL ...); the pack's one model-kind check
    (``_host.check_model_kind``) refuses every other sampling type, naming it. Flow models other than Flux (SD3,
    ...) are refused: their layers are not the ones this pack knows how to name in a file."""
    if is_flow(model) and _lora_host.is_flux(model):
        return _flow.FLOW
    try:
        kind = _host.check_model_kind(model, "MemoRa LoRA training")
    except _host.UnsupportedModelError as e:
        if not is_flow(model):
            raise
        raise _host.UnsupportedModelError(
            f"{e} Flow-matching training is implemented for Flux-family models only (comfy.model_base.Flux: Flux "
            f"dev, schnell); this model is {type(model.model).__name__}, whose layers the pack cannot name in a Flux "
            f"LoRA file.") from e
    return {_host.EPSILON: _train.EPSILON, _host.V_PREDICTION: _train.V_PREDICTION}[kind]


def flow_shift(model):
    """The MODEL's own time shift u -> sigma (its sampler's ``sigma(timestep)`` at timestep u x its multiplier: Flux
    dev's ``flux_time_shift(1.15, u)``, schnell's discrete-flow shift), as a torch function."""
    ms = _host.model_sampling(model)
    multiplier = float(ms.timestep(torch.tensor(1.0)))

    def shift(u: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(ms.sigma(u * multiplier), dtype=torch.float64)

    return shift


def diffusion_schedule(model):
    """Flow models: the flow-matching objective with the model's own time shift (``memora.lora.flow``); otherwise
    alpha_bar per training timestep from the model's own sigma table, and its prediction type."""
    if prediction_type(model) == _flow.FLOW:
        return _flow.FlowSchedule(shift=flow_shift(model))
    sigmas = _host.model_sampling(model).sigmas.detach().to("cpu", torch.float64)
    return _train.DiffusionSchedule(1.0 / (1.0 + sigmas * sigmas), prediction_type(model))


def compute_dtype(model) -> torch.dtype:
    """The dtype ComfyUI runs this model's UNet in (its manual-cast dtype when it has one)."""
    base = model.model
    if hasattr(base, "get_dtype_inference"):
        return base.get_dtype_inference()
    mc = getattr(base, "manual_cast_dtype", None)
    return mc if mc is not None else base.get_dtype()


def training_dtype(model, precision: str) -> torch.dtype:
    """auto: the dtype ComfyUI already runs the model in (fp32 on the CPU; usually fp16 or bf16 on a GPU)."""
    if _denoiser.check_precision(precision) == "auto":
        return compute_dtype(model)
    return _denoiser.DTYPES[precision]


def target_layers(model, targets: str) -> dict[str, tuple[int, ...]]:
    """{'diffusion_model.<ldm path>': weight shape} of the UNet layers that get a LoRA; ValueError when none do.
    Flux: {diffusers module path: weight shape} (``memora.lora.flux``; fused ComfyUI weights give one entry per
    part, e.g. to_q / to_k / to_v of one qkv)."""
    if _lora_host.is_flux(model):
        slots = _lora_host.flux_slots(model)
        found = {m: s.shape for m, s in sorted(slots.items()) if _flux.is_target(m, targets)}
        if not found:
            raise ValueError(f"this Flux model ({_lora_host.base_architecture(model)}) has no layers matching targets "
                             f"{targets!r}")
        return found
    found = _train.find_target_layers(model.model.diffusion_model, targets, prefix="diffusion_model.")
    if not found:
        raise ValueError(f"this model ({_lora_host.base_architecture(model)}) has no layers matching targets "
                         f"{targets!r} (MemoRa LoRA training needs a UNet with attention layers named to_q / to_k / "
                         f"to_v / to_out.0: SD1.x, SD2.x, SDXL)")
    return found


def base_model_hash(model) -> str:
    """A cheap deterministic fingerprint of the MODEL as given: the stored UNet weights (a strided sample of at most
    1024 values per tensor, with names, shapes and dtypes; weights a loaded clone has patched in place are read from
    its backup) and the model's weight patches (keys, strengths and sampled patch tensors). "sha256:<hex>"."""
    base = model.model
    backups = {}
    for lm in list(comfy.model_management.current_loaded_models):
        p = lm.model
        if p is not None and getattr(p, "model", None) is base:
            for k, v in getattr(p, "backup", {}).items():
                backups[k] = getattr(v, "weight", v)
    tensors = ((f"diffusion_model.{name}", backups.get(f"diffusion_model.{name}", t))
               for name, t in sorted(base.diffusion_model.state_dict().items()))
    return _fingerprint.weights_hash(tensors, getattr(model, "patches", {}) or {})


def check_model_conditioning(model, positive) -> None:
    """ValueError, before any work, when the CONDITIONING cannot condition this model the way ComfyUI's sampler
    does (``_host.check_conditioning``: another architecture's text embeddings, an SDXL prompt without
    ``pooled_output``, on which ComfyUI itself would stop with a bare KeyError mid-graph)."""
    _host.check_conditioning(model, positive, "MemoRa LoRA Train", "positive")
