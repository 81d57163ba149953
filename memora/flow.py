"""Inversion and regeneration for rectified-flow (flow-matching) models: Flux dev / schnell, SD3-style discrete flow.

A rectified-flow model sees ``x_t = (1 - t) x0 + t eps`` at time ``t`` in [0, 1] (ComfyUI calls t sigma; its CONST
prediction) and predicts the velocity ``v = dx_t/dt = eps - x0``. ComfyUI's sampler calls the model for
``denoised = x - t v`` and its Euler sampler steps ``x <- x + (t_next - t) (x - denoised) / t``: ``(x - denoised) / t``
IS the velocity, so a flow Euler step has exactly the form of the VE-DDIM step in ``memora.ddim`` with ``eps``
replaced by ``v``. Here that step is written for a velocity field ``velocity_fn(x, t) -> v``:

- ``regenerate``: explicit Euler down a descending ladder ``t_0 > t_1 > ... > t_n`` (ComfyUI's sample_euler):
  ``x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i)``;
- ``invert``: the same ladder walked upwards, each step the implicit (backward) Euler equation that the forward step
  undoes exactly, ``x_a = x_b + (t_a - t_b) v(x_b, t_b)``, i.e. ``x_b = x_a + (t_b - t_a) v(x_b, t_b)``, solved by
  fixed-point iteration from ``x_b = x_a + (t_b - t_a) v(x_a, t_b)`` (``refine_iterations`` extra evaluations); it
  converges while ``|t_b - t_a| * Lip(v) < 1`` and makes ``regenerate(invert(x0)) == x0`` up to the residual.

The time shift: Flux and SD3 sample on shifted times. ComfyUI's ModelSamplingFlux uses ``t' = e^mu / (e^mu + 1/t -
1)`` (mu = ``shift``, 1.15 for Flux dev at 1024 px, set from the resolution by the ModelSamplingFlux node);
ModelSamplingDiscreteFlow (schnell: shift 1, SD3: 3) uses ``t' = s t / (1 + (s - 1) t)``. Both are the same map
(s = e^mu). The nodes take the sigma ladder from ComfyUI's own scheduler with the model's sampling object, so the
shift is whatever the model (or a ModelSampling* node) set.

The LATENT convention: ComfyUI's samplers start a flow model at ``(1 - t_0) * latent + t_0 * noise`` (CONST
noise_scaling) and return ``x / (1 - t_n)``. A LATENT that the stock sampler, with its noise disabled, continues
from ``t_0`` must therefore hold ``x_{t_0} / (1 - t_0)``: ``to_latent`` / ``from_latent``. At ``t_0 = 1`` (the first
step of a full schedule) the latent would carry nothing, which is why ``check_start`` refuses it.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from . import ddim

VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]
StepCallback = Optional[Callable[[int, int, torch.Tensor], None]]


def check_flow_ladder(sigmas: Sequence[float]) -> list[float]:
    """A descending ladder of flow times in [0, 1] (ComfyUI's sigmas for a flow model)."""
    s = ddim.check_descending_ladder(sigmas)
    if s[0] > 1.0 + 1e-6:
        raise ValueError(f"flow times must lie in [0, 1], got a ladder starting at {s[0]} (is this a flow model?)")
    return s


def check_start(t0: float, start_at_step: int) -> None:
    """Refuse a start at t = 1: the stock samplers read the LATENT as (1 - t) * latent there, i.e. not at all."""
    if not 1.0 - float(t0) > 1e-6:
        raise ValueError(
            f"start_at_step {start_at_step} starts at flow time t = {float(t0):.6g}, pure noise: ComfyUI's samplers "
            f"start a flow model from (1 - t) * latent + t * noise, so a LATENT cannot carry an inverted latent "
            f"there. Start at least one step later (start_at_step >= 1).")


def to_latent(x: torch.Tensor, t: float) -> torch.Tensor:
    """The LATENT that ComfyUI's samplers (noise disabled) turn back into the state ``x`` at flow time ``t``."""
    return x / (1.0 - float(t))


def from_latent(latent: torch.Tensor, t: float) -> torch.Tensor:
    """The sampler state at flow time ``t`` that a LATENT stands for (ComfyUI's CONST noise_scaling, zero noise)."""
    return latent * (1.0 - float(t))


def invert(velocity_fn: VelocityFn, x0: torch.Tensor, sigmas: Sequence[float], refine_iterations: int = 0,
           callback: StepCallback = None) -> torch.Tensor:
    """Clean state ``x0`` (at t = sigmas[-1], usually 0) -> the state at ``sigmas[0]`` that ``regenerate`` maps back
    to ``x0``: backward Euler per step, fixed-point refined (see the module docstring)."""
    check_flow_ladder(sigmas)
    return ddim.invert(velocity_fn, x0, sigmas, refine_iterations, callback)


def regenerate(velocity_fn: VelocityFn, x: torch.Tensor, sigmas: Sequence[float],
               callback: StepCallback = None) -> torch.Tensor:
    """Explicit Euler on the velocity ODE from ``sigmas[0]`` down the ladder (ComfyUI's euler sampler, no noise)."""
    check_flow_ladder(sigmas)
    return ddim.regenerate(velocity_fn, x, sigmas, callback)


def velocity_from_denoised(x: torch.Tensor, denoised: torch.Tensor, t: float) -> torch.Tensor:
    """v = (x - denoised) / t: ComfyUI's CONST prediction returns denoised = x - t v."""
    return (x - denoised) / float(t)


def flux_shift(t: float, mu: float) -> float:
    """ComfyUI's ModelSamplingFlux time shift (flux_time_shift with exponent 1): e^mu / (e^mu + 1/t - 1)."""
    if t <= 0.0:
        return 0.0
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))


def discrete_flow_shift(t: float, shift: float) -> float:
    """ComfyUI's ModelSamplingDiscreteFlow time shift (time_snr_shift): s t / (1 + (s - 1) t)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def simple_ladder(table: Sequence[float], steps: int) -> list[float]:
    """ComfyUI's ``simple`` scheduler on an ascending table of sigmas (the model's ``sigmas`` buffer): ``steps``
    entries taken from the top at a stride of len(table) / steps, then 0."""
    n = len(table)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    stride = n / steps
    return [float(table[-(1 + int(i * stride))]) for i in range(steps)] + [0.0]


def reconstruction_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error ||x - ref|| / ||ref|| in float64."""
    x64, r64 = x.detach().to(torch.float64), ref.detach().to(torch.float64)
    return float((x64 - r64).norm() / r64.norm().clamp_min(1e-30))


def pack(latent: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), C p p]: the token layout Flux's transformer (and diffusers' pipelines) use."""
    b, c, h, w = latent.shape
    if h % patch or w % patch:
        raise ValueError(f"latent height and width must be multiples of {patch}, got {h} x {w}")
    x = latent.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack(tokens: torch.Tensor, height: int, width: int, patch: int = 2) -> torch.Tensor:
    """The inverse of ``pack`` for a latent of ``height`` x ``width``."""
    b, n, d = tokens.shape
    c = d // (patch * patch)
    if n != (height // patch) * (width // patch) or c * patch * patch != d:
        raise ValueError(f"{tuple(tokens.shape)} tokens do not pack a {height} x {width} latent with patch {patch}")
    x = tokens.reshape(b, height // patch, width // patch, c, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)
