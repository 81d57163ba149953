"""The micro world's concept detector: a small CNN that names the shape in a 32 x 32 image (torch only).

Six classes: the five concepts and ``none`` (nothing recognisable). It is trained by the build script on fresh
procedural images, with flips and quarter turns (the classes are rotation invariant), a random blur and pixel noise
(generated images are softer than drawn ones), and VAE round-trips of drawn images (what a decoded latent looks
like). An image counts as showing a concept when the concept is the detector's top class: the *rate* of a concept
on a batch is the fraction of images whose top class it is.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .data import DETECTOR_CLASSES, IMAGE_SIZE


class Detector(torch.nn.Module):
    def __init__(self, n_classes: int = len(DETECTOR_CLASSES), width: int = 16):
        super().__init__()
        w = width
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, w, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(w, w, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(w, 2 * w, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(2 * w, 2 * w, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(2 * w, 4 * w, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        )
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * w * 16, 128), torch.nn.ReLU(),
                                        torch.nn.Linear(128, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, 32, 32] in -1..1 -> logits [B, n_classes]."""
        return self.head(self.features(x))


def prepare(images: torch.Tensor) -> torch.Tensor:
    """A ComfyUI IMAGE batch ([B, H, W, 3] floats in 0..1) -> the detector's input [B, 3, 32, 32] in -1..1.

    Other sizes are resized with area averaging (downscaling) or bilinear interpolation (upscaling); an alpha
    channel is dropped; a single grey channel is repeated."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected an IMAGE batch of shape [batch, height, width, channels], got {shape}")
    if images.shape[0] == 0:
        raise ValueError("the IMAGE batch is empty")
    c = images.shape[-1]
    if c == 4:
        images = images[..., :3]
    elif c == 1:
        images = images.expand(*images.shape[:-1], 3)
    elif c != 3:
        raise ValueError(f"expected 1, 3 or 4 colour channels in the last dimension, got {c}")
    x = images.detach().float().permute(0, 3, 1, 2)
    if not torch.isfinite(x).all():
        raise ValueError("the IMAGE batch contains non-finite values (NaN or inf)")
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        if x.shape[-1] >= IMAGE_SIZE and x.shape[-2] >= IMAGE_SIZE:
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
        else:
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.clamp(0, 1) * 2 - 1


@torch.no_grad()
def probabilities(detector: Detector, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Class probabilities [B, 6] for detector inputs x ([B, 3, 32, 32] in -1..1)."""
    detector.eval()
    out = [torch.softmax(detector(x[i:i + batch].float()), dim=-1) for i in range(0, x.shape[0], batch)]
    return torch.cat(out)


def rates(probs: torch.Tensor, classes: Sequence[str] = DETECTOR_CLASSES) -> dict[str, float]:
    """Fraction of images whose top class is each class."""
    top = probs.argmax(dim=-1)
    return {c: float((top == i).float().mean()) for i, c in enumerate(classes)}


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
