"""Build-only: training and scoring the micro world's concept detector (scripts/build_micro_world.py is the only
user). The network, its input preparation and its rates are runtime code: ``memora.micro.detector``."""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from memora.micro.data import DETECTOR_CLASSES
from memora.micro.detector import Detector, probabilities


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur (5x5 separable kernel) with standard deviation ``sigma`` [B] (0 = none)."""
    r = torch.arange(-2, 3, dtype=x.dtype)
    s = sigma.clamp(min=1e-3).view(-1, 1)
    k = torch.exp(-(r.view(1, -1) ** 2) / (2 * s * s))
    k = k / k.sum(dim=1, keepdim=True)  # [B, 5]
    b, c, h, w = x.shape
    xp = F.pad(x.reshape(1, b * c, h, w), (2, 2, 2, 2), mode="replicate")
    kx = k.repeat_interleave(c, 0).view(b * c, 1, 1, 5)
    ky = k.repeat_interleave(c, 0).view(b * c, 1, 5, 1)
    y = F.conv2d(F.conv2d(xp, kx, groups=b * c), ky, groups=b * c)
    return y.view(b, c, h, w)


def augment(x: torch.Tensor, g: torch.Generator, max_blur: float = 1.2, noise: float = 0.06) -> torch.Tensor:
    """Flips, quarter turns, a random blur and Gaussian pixel noise (x in -1..1)."""
    b = x.shape[0]
    k = int(torch.randint(0, 4, (1,), generator=g))
    x = torch.rot90(x, k, dims=(2, 3))
    flip = torch.rand(b, generator=g) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    sigma = torch.rand(b, generator=g) * max_blur
    x = torch.where((sigma > 0.3).view(-1, 1, 1, 1), _blur(x, sigma), x)
    x = x + torch.randn(x.shape, generator=g) * noise * torch.rand(b, 1, 1, 1, generator=g)
    return x.clamp(-1, 1)


def train_detector(x: torch.Tensor, y: torch.Tensor, *, steps: int, batch: int, lr: float, seed: int,
                   width: int = 16, progress: Optional[Callable[[int, int, float], None]] = None
                   ) -> tuple[Detector, dict]:
    """Train a detector on inputs x ([N, 3, 32, 32] in -1..1) with labels y ([N] indices into DETECTOR_CLASSES)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    det = Detector(width=width)
    opt = torch.optim.AdamW(det.parameters(), lr=lr, weight_decay=1e-4)
    start = time.perf_counter()
    losses = []
    det.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        xb = augment(x[idx], g)
        loss = F.cross_entropy(det(xb), y[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            losses.append([step, round(float(loss), 4)])
            if progress is not None:
                progress(step, steps, float(loss))
    det.eval()
    return det, {"losses": losses, "seconds": round(time.perf_counter() - start, 1)}


def accuracy(detector: Detector, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((probabilities(detector, x).argmax(-1) == y).float().mean())


def confusion(detector: Detector, x: torch.Tensor, y: torch.Tensor, n: int = len(DETECTOR_CLASSES)) -> list:
    pred = probabilities(detector, x).argmax(-1)
    m = torch.zeros(n, n, dtype=torch.long)
    for a, b in zip(y.tolist(), pred.tolist()):
        m[a, b] += 1
    return m.tolist()
