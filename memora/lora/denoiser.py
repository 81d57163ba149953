"""A denoiser (ComfyUI's model call: ``denoised = model(x_ve, sigma)``) as the ``predict(x_t, t, cond)`` of
``memora.lora.train``, and the training precisions (torch only)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .train import V_PREDICTION, DiffusionSchedule

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return precision


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def make_predict(model_wrap, extra_args: dict, schedule: DiffusionSchedule, sigmas: torch.Tensor,
                 on_call: Optional[Callable[[], None]] = None):
    """``predict(x_vp, t, cond)`` for memora's loop: variance-preserving noisy latents at integer timesteps ->
    the model's prediction (epsilon or velocity), computed from ComfyUI's denoised output:
    x_ve = x_vp / sqrt(ab), x0 = model(x_ve, sigma_t), eps = (x_ve - x0) / sigma_t, v = sqrt(ab) eps - sqrt(1-ab) x0."""
    ab_table = schedule.alphas_cumprod

    def predict(x_vp: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        shape = (-1,) + (1,) * (x_vp.dim() - 1)
        ab = ab_table[t.cpu()]
        sqrt_ab = ab.sqrt().to(device=x_vp.device, dtype=torch.float32).view(shape)
        sqrt_1m = (1.0 - ab).sqrt().to(device=x_vp.device, dtype=torch.float32).view(shape)
        sigma = sigmas[t.cpu()].to(device=x_vp.device, dtype=torch.float32)
        x_ve = x_vp / sqrt_ab
        denoised = model_wrap(x_ve, sigma, **extra_args).float()
        if on_call is not None:
            on_call()
        eps = (x_ve - denoised) / sigma.view(shape)
        if schedule.prediction_type == V_PREDICTION:
            return sqrt_ab * eps - sqrt_1m * denoised
        return eps

    return predict
