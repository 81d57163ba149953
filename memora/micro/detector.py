"""The micro world's concept detector: a small CNN that names the shape in a 32 x 32 image (torch only).

Six classes: the five concepts and ``none`` (nothing recognisable). It is trained at build time
(``memora_build.micro_detector``) on fresh procedural images, with flips and quarter turns (the classes are rotation
invariant), a random blur and pixel noise (generated images are softer than drawn ones), and VAE round-trips of drawn
images (what a decoded latent looks like). An image counts as showing a concept when the concept is the detector's top class: the *rate* of a concept
on a batch is the fraction of images whose top class it is.
"""

from __future__ import annotations

from typing import Sequence

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
