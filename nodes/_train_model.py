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


# SDXL's adm vector: the pooled text embedding, then six 256-wide size/crop embeddings (ComfyUI's SDXL.encode_adm)
_SDXL_SIZE_EMBEDDING = 6 * 256


def check_model_conditioning(model, positive) -> None:
    """ValueError, before any work, when the CONDITIONING cannot condition this model the way ComfyUI's sampler
    does: text embeddings of another width than the model's cross-attention (a prompt encoded with another
    architecture's CLIP), or, for SDXL-family models, no ``pooled_output`` (or one of the wrong width) for the
    size/crop conditioning vector (ComfyUI itself would stop with a bare KeyError mid-graph)."""
    arch = _lora_host.base_architecture(model)
    width = dict(model.model.model_config.unet_config).get("context_dim")
    for i, c in enumerate(positive):
        got = int(c[0].shape[-1]) if isinstance(c[0], torch.Tensor) and c[0].dim() >= 1 else None
        if width is not None and got is not None and got != int(width):
            raise ValueError(f"positive: entry {i} holds text embeddings {got} wide, but this model ({arch}) takes "
                             f"{width}-wide ones: encode the prompt with the CLIP of the same checkpoint")
    if not _lora_host.is_sdxl(model):
        return
    pooled_width = int(getattr(model.model, "adm_channels", 0) or 0) - _SDXL_SIZE_EMBEDDING
    for i, c in enumerate(positive):
        pooled = c[1].get("pooled_output")
        if not isinstance(pooled, torch.Tensor):
            raise ValueError(f"positive: entry {i} has no pooled_output, which an {arch} model needs (with the "
                             f"image size and crop, it makes the model's conditioning vector): encode the prompt "
                             f"with CLIPTextEncode (or CLIPTextEncodeSDXL) and the SDXL checkpoint's CLIP")
        if pooled_width > 0 and int(pooled.shape[-1]) != pooled_width:
            raise ValueError(f"positive: entry {i} has a pooled_output {int(pooled.shape[-1])} wide; this {arch} "
                             f"model takes {pooled_width}-wide pooled text embeddings")
