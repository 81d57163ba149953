"""Deterministic DDIM (eta 0) inversion and regeneration over an abstract denoiser.

A denoiser is ``eps_fn(x, sigma) -> eps``: ``x`` a batch in VE coordinates at noise level ``sigma`` (a Python
float), classifier-free guidance already applied. In VE coordinates a DDIM step with eta 0 is exactly an Euler step:
``x_next = x + (sigma_next - sigma) * eps(x, sigma)``, which is why ComfyUI's "ddim" sampler is its Euler sampler.

Two schedules:
- ``exact``: sampling runs over a descending sigma ladder ending at 0 (e.g. ComfyUI's ddim_uniform sigmas from
  ``start_at_step``); inversion walks the same ladder upwards and solves each step's implicit equation
  ``x_b = x_a + (sigma_b - sigma_a) * eps(x_b, sigma_b)`` by fixed-point iteration (``refine_iterations`` extra
  evaluations per step), so regeneration over the same ladder returns the input.
- ``reference``: the arithmetic of the reference implementation (VP coordinates, docs/method.md steps 3-6).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .schedule import ReferencePlan

EpsFn = Callable[[torch.Tensor, float], torch.Tensor]
StepCallback = Optional[Callable[[int, int, torch.Tensor], None]]


def _as_floats(sigmas) -> list[float]:
    if isinstance(sigmas, torch.Tensor):
        return [float(s) for s in sigmas.detach().cpu().to(torch.float64)]
    return [float(s) for s in sigmas]


def check_descending_ladder(sigmas: Sequence[float]) -> list[float]:
    s = _as_floats(sigmas)
    if len(s) < 2:
        raise ValueError("a sigma ladder needs at least two entries (start and end)")
    if any(b >= a for a, b in zip(s, s[1:])):
        raise ValueError(f"sigma ladder must be strictly descending, got {s}")
    if s[-1] < 0:
        raise ValueError("sigmas must be >= 0")
    return s


def invert(eps_fn: EpsFn, x0: torch.Tensor, sigmas: Sequence[float], refine_iterations: int = 0,
           callback: StepCallback = None) -> torch.Tensor:
    """Exact DDIM inversion: the clean batch ``x0`` -> the batch at ``sigmas[0]``.

    ``sigmas`` is the descending sampling ladder that regeneration will use (its last entry is usually 0, where
    ``x0`` sits). Returns x at ``sigmas[0]`` such that ``regenerate(eps_fn, x, sigmas)`` gives back ``x0``: exactly in
    the limit of refinement, to first order without it."""
    if refine_iterations < 0:
        raise ValueError(f"refine_iterations must be >= 0, got {refine_iterations}")
    ladder = check_descending_ladder(sigmas)[::-1]
    x = x0
    total = len(ladder) - 1
    for i, (sa, sb) in enumerate(zip(ladder, ladder[1:])):
        guess = x
        for _ in range(refine_iterations + 1):
            guess = x + (sb - sa) * eps_fn(guess, sb)
        x = guess
        if callback is not None:
            callback(i + 1, total, x)
    return x


def regenerate(eps_fn: EpsFn, x: torch.Tensor, sigmas: Sequence[float],
               callback: StepCallback = None) -> torch.Tensor:
    """Deterministic DDIM sampling (Euler in VE coordinates) from ``sigmas[0]`` down the ladder."""
    ladder = check_descending_ladder(sigmas)
    total = len(ladder) - 1
    for i, (sa, sb) in enumerate(zip(ladder, ladder[1:])):
        x = x + (sb - sa) * eps_fn(x, sa)
        if callback is not None:
            callback(i + 1, total, x)
    return x


def _vp_eps(eps_fn: EpsFn, alphas_cumprod: torch.Tensor):
    """eps prediction for a VP latent at integer timestep t (the model sees x_ve = x_vp / sqrt(ab_t))."""
    ab = alphas_cumprod.to(torch.float64)

    def eps_vp(x_vp: torch.Tensor, t: int) -> torch.Tensor:
        a = float(ab[t])
        sigma = ((1.0 - a) / a) ** 0.5
        return eps_fn(x_vp / a ** 0.5, sigma)

    return eps_vp


def reference_invert(eps_fn: EpsFn, x0: torch.Tensor, alphas_cumprod: torch.Tensor, plan: ReferencePlan,
                     callback: StepCallback = None) -> torch.Tensor:
    """The reference implementation's inversion, in VP coordinates; returns the VP latent at ``plan.keep_timestep``.

    Update from t_cur to t: ``x <- (x - sqrt(1-ab[t_cur]) eps) sqrt(ab[t]) / sqrt(ab[t_cur]) + sqrt(1-ab[t]) eps``
    with eps predicted at the TARGET t from the current x, the clean latent treated as sitting at t = 1."""
    ab = alphas_cumprod.to(torch.float64)
    eps_vp = _vp_eps(eps_fn, ab)
    x = x0
    t_cur = plan.timesteps[-1]
    total = len(plan.inversion_targets)
    for i, t in enumerate(plan.inversion_targets):
        eps = eps_vp(x, t)
        a_cur, a_t = float(ab[t_cur]), float(ab[t])
        x = (x - (1.0 - a_cur) ** 0.5 * eps) * (a_t ** 0.5 / a_cur ** 0.5) + (1.0 - a_t) ** 0.5 * eps
        t_cur = t
        if callback is not None:
            callback(i + 1, total, x)
    return x


def reference_regenerate(eps_fn: EpsFn, x_vp: torch.Tensor, alphas_cumprod: torch.Tensor, plan: ReferencePlan,
                         callback: StepCallback = None) -> torch.Tensor:
    """The reference implementation's regeneration (DDIM, eta 0, VP coordinates) from ``plan.start_timestep``.

    The last step maps t = 1 to t = 1, so the result keeps a residual ``sqrt(1 - ab[1])`` of noise, as the
    reference's does; it is returned as the "clean" latent."""
    ab = alphas_cumprod.to(torch.float64)
    eps_vp = _vp_eps(eps_fn, ab)
    x = x_vp
    total = len(plan.regeneration)
    for i, (t, t_prev) in enumerate(plan.regeneration):
        eps = eps_vp(x, t)
        a_t, a_p = float(ab[t]), float(ab[t_prev])
        x0 = (x - (1.0 - a_t) ** 0.5 * eps) / a_t ** 0.5
        x = a_p ** 0.5 * x0 + (1.0 - a_p) ** 0.5 * eps
        if callback is not None:
            callback(i + 1, total, x)
    return x
