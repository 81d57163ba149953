"""Spherical linear interpolation of latents, guarded.

The reference neither clamps the cosine nor falls back to linear interpolation when the angle is ~0, so identical
inputs give NaN; BlenderNeko-style slerps in ComfyUI share that. Here: fp32 (or fp64) maths on the flattened item,
the cosine clamped to [-1, 1], a linear fallback whenever sin(omega) is tiny (parallel or opposite vectors, zero
vectors), and the endpoints returned exactly.
"""

from __future__ import annotations

from typing import Sequence

import torch

# Below this, sin(omega) is treated as zero and the pair is interpolated linearly.
SIN_EPSILON = 1e-6


def interpolation_points(intervals: int, include_endpoints: bool = True) -> list[float]:
    """t = i / intervals for i = 0..intervals (or 1..intervals-1 without the endpoints)."""
    if intervals < 1:
        raise ValueError(f"intervals must be >= 1, got {intervals}")
    rng = range(0, intervals + 1) if include_endpoints else range(1, intervals)
    pts = [i / intervals for i in rng]
    if not pts:
        raise ValueError("intervals=1 without endpoints leaves no interpolation points; use intervals >= 2")
    return pts


def slerp(a: torch.Tensor, b: torch.Tensor, ts: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Slerp between matching items of ``a`` and ``b`` ([B, ...] each) at every t in ``ts``.

    Returns [B, T, ...] in the inputs' dtype; item i of ``a`` pairs with item i of ``b`` only. The inputs are not
    modified."""
    if a.shape != b.shape:
        raise ValueError(f"slerp needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() < 1 or a.shape[0] == 0:
        raise ValueError("slerp needs a non-empty batch")
    out_dtype = a.dtype
    work = torch.float64 if a.dtype == torch.float64 else torch.float32
    t = torch.as_tensor(ts, dtype=work, device=a.device).flatten()
    batch = a.shape[0]
    fa = a.detach().reshape(batch, -1).to(work)
    fb = b.detach().reshape(batch, -1).to(work)
    na = fa.norm(dim=1, keepdim=True)
    nb = fb.norm(dim=1, keepdim=True)
    safe_na = torch.where(na > 0, na, torch.ones_like(na))
    safe_nb = torch.where(nb > 0, nb, torch.ones_like(nb))
    cos = ((fa / safe_na) * (fb / safe_nb)).sum(dim=1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)  # [B, 1]
    sin_omega = torch.sin(omega)
    spherical = (sin_omega.abs() > SIN_EPSILON) & (na > 0) & (nb > 0)  # [B, 1]
    safe_sin = torch.where(spherical, sin_omega, torch.ones_like(sin_omega))
    tt = t.view(1, -1, 1)  # [1, T, 1]
    om = omega.unsqueeze(1)  # [B, 1, 1]
    ss = safe_sin.unsqueeze(1)
    w_a = torch.where(spherical.unsqueeze(1), torch.sin((1.0 - tt) * om) / ss, 1.0 - tt)
    w_b = torch.where(spherical.unsqueeze(1), torch.sin(tt * om) / ss, tt)
    out = w_a * fa.unsqueeze(1) + w_b * fb.unsqueeze(1)  # [B, T, N]
    out = out.to(out_dtype)
    # Endpoints exactly, not up to rounding.
    for j, tj in enumerate(t.tolist()):
        if tj == 0.0:
            out[:, j] = a.detach().reshape(batch, -1)
        elif tj == 1.0:
            out[:, j] = b.detach().reshape(batch, -1)
    return out.reshape(batch, t.numel(), *a.shape[1:])


def slerp_pairs(a: torch.Tensor, b: torch.Tensor, intervals: int = 10, include_endpoints: bool = True) -> torch.Tensor:
    """The MemoRa dataset layout: for each pair, the points t = i / intervals, pair-major ([B * T, ...])."""
    pts = interpolation_points(intervals, include_endpoints)
    out = slerp(a, b, pts)
    return out.reshape(a.shape[0] * len(pts), *a.shape[1:])
