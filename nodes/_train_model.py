"""What a ComfyUI MODEL is, for LoRA training: its prediction type and noise schedule, the dtype it runs in, the
layers the recipe targets, and a fingerprint of its weights."""

from __future__ import annotations

import torch

import comfy.model_management

from memora.lora import denoiser as _denoiser
from memora.lora import fingerprint as _fingerprint
from memora.lora import train as _train
from . import _host, _lora_host


def prediction_type(model) -> str:
    """"epsilon" or "v_prediction" for discrete-timestep models (SD1.x, SD2.x, SDXL ...); the pack's one model-kind
    check (``_host.check_model_kind``) refuses every other sampling type, naming it."""
    kind = _host.check_model_kind(model, "MemoRa LoRA training")
    return {_host.EPSILON: _train.EPSILON, _host.V_PREDICTION: _train.V_PREDICTION}[kind]


def diffusion_schedule(model) -> _train.DiffusionSchedule:
    """alpha_bar per training timestep from the model's own sigma table, and its prediction type."""
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
    """{'diffusion_model.<ldm path>': weight shape} of the UNet layers that get a LoRA; ValueError when none do."""
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
