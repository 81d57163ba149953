"""Noise schedules and step plans, read from the model rather than hard-coded.

Two coordinate systems meet here:
- variance exploding (VE, ComfyUI's): ``x_ve = x0 + sigma * eps``;
- variance preserving (VP, diffusers'/the reference's): ``x_vp = sqrt(ab) * x0 + sqrt(1 - ab) * eps``,
with ``ab = alpha_bar = 1 / (1 + sigma^2)`` and ``x_vp = sqrt(ab) * x_ve``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def alphas_cumprod_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """alpha_bar for each training timestep from a model's ascending sigma table (float64)."""
    s = sigmas.detach().to(torch.float64)
    return 1.0 / (1.0 + s * s)


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    ab = alphas_cumprod.detach().to(torch.float64)
    return ((1.0 - ab) / ab).sqrt()


def scaled_linear_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                                 beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's "scaled_linear" schedule (float64), for use without a model at hand."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def leading_timesteps(num_train_timesteps: int, steps: int, offset: int = 1) -> list[int]:
    """DDIM "leading" spacing with ``steps_offset``, descending (981, 961, ..., 1 for 1000 / 50 / 1).

    This is what diffusers' DDIMScheduler and ComfyUI's ``ddim_uniform`` scheduler both use."""
    if steps < 1 or steps > num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps}, got {steps}")
    stride = num_train_timesteps // steps
    return [i * stride + offset for i in range(steps)][::-1]


@dataclass(frozen=True)
class ReferencePlan:
    """The reference implementation's step arithmetic (gmum/MemoRa), quirks included.

    - ``timesteps``: the sampling timesteps, descending (981 ... 1 for 50 steps).
    - ``inversion_targets``: inversion records x at these timesteps, the clean latent treated as sitting at
      ``timesteps[-1]`` (t = 1); the reference records 48 of them (21 ... 961) and we stop at ``keep_timestep``.
    - ``keep_timestep``: the recorded latent that is kept: ``961 - stride * start_step`` (661 for step 15), one DDIM
      step less noisy than where regeneration starts (the reference's off-by-one).
    - ``regeneration``: (t, t_prev) pairs from ``timesteps[start_step]`` (681) down to 1; the last maps t = 1 to t = 1.
    """

    timesteps: tuple[int, ...]
    inversion_targets: tuple[int, ...]
    keep_timestep: int
    regeneration: tuple[tuple[int, int], ...]

    @property
    def start_timestep(self) -> int:
        return self.regeneration[0][0]


def reference_plan(num_train_timesteps: int, steps: int, start_step: int) -> ReferencePlan:
    if not 0 <= start_step < steps - 1:
        raise ValueError(f"start_at_step must be in 0..{steps - 2} for the reference schedule with {steps} steps, "
                         f"got {start_step}")
    desc = leading_timesteps(num_train_timesteps, steps)
    stride = num_train_timesteps // steps
    asc = desc[::-1]
    recorded = asc[1:-1]  # the reference records every step but the first and the last
    keep = recorded[-1] - stride * start_step
    targets = tuple(t for t in recorded if t <= keep)
    regen_ts = desc[start_step:]
    pairs = tuple((t, max(t - stride, asc[0])) for t in regen_ts)
    return ReferencePlan(tuple(desc), targets, keep, pairs)
