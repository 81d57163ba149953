"""Sampling probes after "When Are Concepts Erased From Diffusion Models?" (Lu et al., NeurIPS 2025): does an erased
concept come back when the sampling trajectory is disturbed (noise injected along DDIM), or when the model is shown
part of a concept image and asked to fill in the rest (inpainting)?

Everything is in ComfyUI's variance-exploding coordinates (``x = x0 + sigma * eps``, see memora/ddim.py), over a
descending sigma ladder ending at 0 (ComfyUI's ddim_uniform sigmas). Nothing here imports ComfyUI.

DDIM with eta (Song et al. 2021, eq. 12) in these coordinates: from sigma_a to sigma_b the fresh noise has standard
deviation ``sigma_up = eta * sigma_b * sqrt(1 - sigma_b^2 / sigma_a^2)`` and the deterministic part lands at
``sigma_down = sqrt(sigma_b^2 - sigma_up^2)``: ``x_b = x0_hat + sigma_down * eps + sigma_up * z`` with
``x0_hat = x_a - sigma_a * eps``. Eta 0 is plain DDIM (an Euler step, what ComfyUI's ddim sampler does); eta 1 is
DDPM's ancestral step. Lu et al. use eta above 1 (1.3-1.9): where ``sigma_up`` then exceeds ``sigma_b`` (DDIM's
formula has no real solution there) the deterministic term is dropped and the latent carries more noise than the
schedule's level, which is the over-noising the probe is after.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from ..ddim import EpsFn, StepCallback, check_descending_ladder

MASK_KINDS = ("centre", "left half", "top half", "random boxes")
NoiseFn = Callable[[torch.Size], torch.Tensor]


class ProbeInputError(ValueError):
    """A probe setting that cannot be used (steps out of range, a mask that masks nothing, ...)."""


def parse_inject_steps(text: str, steps: int) -> tuple[int, ...]:
    """Comma- or space-separated step indices (0-based, each in 0..steps-1), sorted, duplicates removed; '' is none."""
    if not isinstance(text, str):
        raise ProbeInputError(f"inject_steps: expected text such as '5,10', got {type(text).__name__}")
    out = set()
    for part in text.replace(",", " ").split():
        try:
            i = int(part)
        except ValueError:
            raise ProbeInputError(f"inject_steps: {part!r} is not a whole number; expected step indices such as "
                                  f"'5,10' (0-based, each in 0..{steps - 1})") from None
        if not 0 <= i < steps:
            raise ProbeInputError(f"inject_steps: step {i} is out of range: with steps={steps} a step index must be "
                                  f"in 0..{steps - 1} (0 is the first, noisiest step)")
        out.add(i)
    return tuple(sorted(out))


def ancestral_split(sigma_a: float, sigma_b: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of a DDIM step with ``eta`` from sigma_a to sigma_b (module docstring)."""
    if sigma_b <= 0.0 or eta <= 0.0:
        return sigma_b, 0.0
    up = eta * sigma_b * math.sqrt(max(0.0, 1.0 - (sigma_b * sigma_b) / (sigma_a * sigma_a)))
    down = math.sqrt(max(0.0, sigma_b * sigma_b - up * up))
    return down, up


def noisy_ddim(eps_fn: EpsFn, x: torch.Tensor, sigmas: Sequence[float], eta: float = 0.0,
               inject_steps: Sequence[int] = (), inject_scale: float = 0.0, noise_fn: Optional[NoiseFn] = None,
               callback: StepCallback = None) -> torch.Tensor:
    """DDIM from ``sigmas[0]`` down the ladder with ``eta`` and extra noise: before the model call of each step
    ``i`` in ``inject_steps`` the latent gets ``inject_scale * sigmas[i] * z`` added (z standard normal), i.e. noise
    scaled to the current noise level. ``noise_fn(shape)`` draws z (required when eta > 0 or anything is injected).
    With eta 0 and nothing injected this is exactly ``memora.ddim.regenerate``."""
    ladder = check_descending_ladder(sigmas)
    total = len(ladder) - 1
    inject = set(int(i) for i in inject_steps) if inject_scale > 0 else set()
    if any(not 0 <= i < total for i in inject):
        raise ProbeInputError(f"inject steps {sorted(inject)} out of range 0..{total - 1}")
    if (eta > 0 or inject) and noise_fn is None:
        raise ProbeInputError("noise_fn is required when eta > 0 or noise is injected")
    for i, (sa, sb) in enumerate(zip(ladder, ladder[1:])):
        if i in inject:
            x = x + (inject_scale * sa) * noise_fn(x.shape).to(x)
        eps = eps_fn(x, sa)
        if eta > 0 and sb > 0:
            down, up = ancestral_split(sa, sb, eta)
            x = (x - sa * eps) + down * eps + up * noise_fn(x.shape).to(x)
        else:
            x = x + (sb - sa) * eps
        if callback is not None:
            callback(i + 1, total, x)
    return x


def _cells(fraction: float, n: int) -> int:
    return min(n, max(1, round(fraction * n)))


def _box_mask(kind: str, fraction: float, rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    m = torch.zeros(rows, cols)
    if kind == "centre":
        side = math.sqrt(fraction)
        h, w = _cells(side, rows), _cells(side, cols)
        top, left = (rows - h) // 2, (cols - w) // 2
        m[top:top + h, left:left + w] = 1
    elif kind == "left half":
        m[:, :_cells(fraction, cols)] = 1
    elif kind == "top half":
        m[:_cells(fraction, rows), :] = 1
    else:  # random boxes, each a quarter of the image's side, until the masked share reaches the fraction
        bh, bw = max(1, rows // 4), max(1, cols // 4)
        target = max(1, round(fraction * rows * cols))
        while int(m.sum()) < target:
            t = int(torch.randint(0, rows - bh + 1, (1,), generator=gen))
            left = int(torch.randint(0, cols - bw + 1, (1,), generator=gen))
            m[t:t + bh, left:left + bw] = 1
    return m


def make_mask(kind: str, fraction: float, batch: int, height: int, width: int, cell: int = 1,
              seed: int = 0) -> torch.Tensor:
    """A {0, 1} mask [batch, height, width], 1 where the model fills in, drawn on a grid of ``cell`` x ``cell``
    pixel blocks (the VAE's downscale factor, so the mask is exact in latent space too). ``fraction`` is the share
    of the image masked (rounded to whole cells): 'centre' a centred rectangle, 'left half' / 'top half' the
    leftmost columns / top rows (the names give the default fraction 0.5), 'random boxes' boxes a quarter of the
    image's side at random places (per image, from ``seed``) until the share is reached."""
    if kind not in MASK_KINDS:
        raise ProbeInputError(f"mask_kind must be one of {list(MASK_KINDS)}, got {kind!r}")
    if not 0.0 < fraction < 1.0:
        raise ProbeInputError(f"mask_fraction must be between 0 and 1 (exclusive: the model needs something to fill "
                              f"and something to see), got {fraction}")
    if height % cell or width % cell:
        raise ProbeInputError(f"image size {width} x {height} is not a multiple of the mask grid {cell}")
    rows, cols = height // cell, width // cell
    gen = torch.Generator().manual_seed(int(seed))
    masks = [_box_mask(kind, fraction, rows, cols, gen) for _ in range(batch)]
    m = torch.stack(masks)
    if bool((m.flatten(1).sum(1) >= rows * cols).any()):
        raise ProbeInputError(f"mask_fraction {fraction} masks the whole image on a {cols} x {rows} grid: nothing is "
                              f"left for the model to see; use a smaller fraction")
    return m.repeat_interleave(cell, 1).repeat_interleave(cell, 2)


def composite(original: torch.Tensor, filled: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The original image where the mask is 0, the filled one where it is 1 (images [B, H, W, C], mask [B, H, W])."""
    m = mask.to(original).unsqueeze(-1)
    return original * (1 - m) + filled.to(original) * m
