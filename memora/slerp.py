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


def _unit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x / |x| per row (zero rows stay zero) and whether the row is non-zero. Each row is first scaled by a power of
    two (exact) that brings its largest entry near 1, so the norm neither overflows (entries near the dtype's
    maximum: the unscaled norm is inf and the angle NaN) nor underflows (tiny entries: the norm would be 0)."""
    amax = x.abs().amax(dim=1, keepdim=True)
    nonzero = amax > 0
    _, exp = torch.frexp(torch.where(nonzero, amax, torch.ones_like(amax)))
    xs = torch.ldexp(x, -exp.to(x.dtype))
    n = xs.norm(dim=1, keepdim=True)
    return xs / torch.where(nonzero, n, torch.ones_like(n)), nonzero


def _angles(fa: torch.Tensor, fb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The angle omega [B, 1] between matching rows and whether the spherical formula applies there.

    omega = arccos of the clamped cosine, except near parallel or opposite vectors (|cos| >= 0.9), where arccos is
    ill-conditioned and omega = 2 atan2(|ua - ub|, |ua + ub|) is used instead (accurate to rounding there)."""
    ua, nza = _unit(fa)
    ub, nzb = _unit(fb)
    cos = (ua * ub).sum(dim=1, keepdim=True).clamp(-1.0, 1.0)
    chord = 2.0 * torch.atan2((ua - ub).norm(dim=1, keepdim=True), (ua + ub).norm(dim=1, keepdim=True))
    omega = torch.where(cos.abs() < 0.9, torch.arccos(cos), chord)
    spherical = (torch.sin(omega).abs() > SIN_EPSILON) & nza & nzb
    return omega, spherical


def _check_finite(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    if bool(torch.isfinite(out).all()):
        return
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        raise ValueError("slerp inputs hold NaN or infinite values; the latents to interpolate must be finite")
    raise ValueError(f"slerp result exceeds the range of {out.dtype} (largest input magnitude "
                     f"{max(float(a.abs().max()), float(b.abs().max())):g}); interpolate these latents in float32")


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
    omega, spherical = _angles(fa, fb)
    sin_omega = torch.sin(omega)
    safe_sin = torch.where(spherical, sin_omega, torch.ones_like(sin_omega))
    tt = t.view(1, -1, 1)  # [1, T, 1]
    om = omega.unsqueeze(1)  # [B, 1, 1]
    ss = safe_sin.unsqueeze(1)
    w_a = torch.where(spherical.unsqueeze(1), torch.sin((1.0 - tt) * om) / ss, 1.0 - tt)
    w_b = torch.where(spherical.unsqueeze(1), torch.sin(tt * om) / ss, tt)
    out = w_a * fa.unsqueeze(1) + w_b * fb.unsqueeze(1)  # [B, T, N]
    out = out.to(out_dtype)
    _check_finite(a, b, out)
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
