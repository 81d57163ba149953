"""The flow-matching (rectified-flow) training objective, for Flux and the other flow models ComfyUI runs (torch
only, no ComfyUI).

Coordinates are ComfyUI's and diffusers' for these models: a noisy latent at time t in (0, 1) is

    x_t = (1 - t) x0 + t eps,     eps ~ N(0, I)

and the network predicts the velocity of that straight path, ``v = dx_t / dt = eps - x0``; the loss is the mean
squared error between the prediction and ``eps - x0`` (weight 1 at every t).

Time sampling (the density of t, the same in every update): ``u = sigmoid(n)``, ``n ~ N(logit_mean, logit_std^2)``
(the logit-normal density of Esser et al. 2024, "Scaling Rectified Flow Transformers", sec. 3.1, which diffusers'
``train_dreambooth_lora_flux.py`` offers as ``--weighting_scheme logit_normal`` with mean 0 and std 1), then
``t = shift(u)``: the time shift of the model's own sampling schedule (for Flux dev ComfyUI's
``flux_time_shift(mu=1.15)``: ``t = e^mu / (e^mu + 1/u - 1)``; for discrete-flow models ``time_snr_shift(s, u) =
s u / (1 + (s - 1) u)``; diffusers' script shifts its uniform draws the same way through its scheduler's ``shift``),
so training puts its samples where the model's sampler spends its steps. The host passes ``shift`` (the model's
``sigma(timestep)``); this module never reads a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

FLOW = "flow"
# t is kept inside [T_MIN, 1 - T_MIN]: at t = 0 the velocity cannot be read back from a denoised output (it is
# divided by t), and x_t = eps exactly at t = 1 carries no information about x0.
T_MIN = 1e-4


def flux_time_shift(mu: float, u: torch.Tensor) -> torch.Tensor:
    """ComfyUI's / BFL's Flux shift with sigma 1: ``e^mu / (e^mu + 1/u - 1)`` (u in (0, 1))."""
    import math

    e = math.exp(float(mu))
    return e / (e + (1.0 / u - 1.0))


def snr_time_shift(shift: float, u: torch.Tensor) -> torch.Tensor:
    """SD3's / discrete-flow shift: ``s u / (1 + (s - 1) u)``."""
    s = float(shift)
    return s * u / (1.0 + (s - 1.0) * u)


@dataclass(frozen=True)
class FlowSchedule:
    """The flow-matching objective and its time density (see the module docstring).

    ``shift``: maps u in (0, 1) to the model's time t (its sampler's sigma); None: identity.
    ``logit_mean`` / ``logit_std``: the logit-normal density of u (std 0: u = sigmoid(logit_mean) always)."""

    shift: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    logit_mean: float = 0.0
    logit_std: float = 1.0
    prediction_type: str = FLOW

    def __post_init__(self):
        if not (self.logit_std >= 0.0) or not torch.isfinite(torch.tensor([self.logit_mean, self.logit_std])).all():
            raise ValueError(f"logit_mean must be finite and logit_std finite and >= 0, got {self.logit_mean}, "
                             f"{self.logit_std}")

    def times(self, u: torch.Tensor) -> torch.Tensor:
        """u in (0, 1) -> t (shifted), float32, clamped to [T_MIN, 1 - T_MIN]."""
        u = u.to(torch.float64).clamp(T_MIN, 1.0 - T_MIN)
        t = self.shift(u) if self.shift is not None else u
        return torch.as_tensor(t, dtype=torch.float64).clamp(T_MIN, 1.0 - T_MIN).to(torch.float32)

    def draw_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n training times from the schedule's density (one normal draw each from ``generator``)."""
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        return self.times(torch.sigmoid(self.logit_mean + self.logit_std * z))

    def stratified_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n times, one per equal-probability slice of the density (for a low-variance fixed evaluation)."""
        q = (torch.arange(n, dtype=torch.float64) + torch.rand(n, generator=generator, dtype=torch.float64)) / n
        z = torch.special.ndtri(q.clamp(1e-12, 1 - 1e-12))
        t = self.times(torch.sigmoid(self.logit_mean + self.logit_std * z))
        return t[torch.randperm(n, generator=generator)]

    @staticmethod
    def _coef(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(device=like.device, dtype=torch.float32).view((-1,) + (1,) * (like.dim() - 1))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self._coef(t, x0)
        return (1.0 - s) * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - x0


def make_flow_predict(model_wrap, extra_args: dict, on_call: Optional[Callable[[], None]] = None):
    """``predict(x_t, t, cond)`` for :func:`memora.lora.train.train_lora` from ComfyUI's denoiser of a flow model
    (``denoised = x_t - t * v``; the model's input is x_t unscaled and its sigma is t): ``v = (x_t - denoised) / t``."""

    def predict(x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        sigma = t.to(device=x_t.device, dtype=torch.float32)
        denoised = model_wrap(x_t, sigma, **extra_args).float()
        if on_call is not None:
            on_call()
        return (x_t.float() - denoised) / sigma.view((-1,) + (1,) * (x_t.dim() - 1))

    return predict
