"""The micro world's concept detector: a small CNN that names the shape in a 32 x 32 image (torch only).

Six classes: the five concepts and ``none`` (nothing recognisable, or a near-shape). It is trained at build time
(``memora_build.micro_detector``) on fresh procedural images and hard negatives for ``none`` (ellipses, capsules,
beans, shapes with a part cut away), half of them as VAE round trips, under heavy augmentation (any rotation,
elongation / squash, scale and position jitter, blur, noise). An image counts as showing a concept when the concept
is the detector's top class: the *rate* of a concept on a batch is the fraction of images whose top class it is.
``memora.micro.judge`` gives an independent second opinion from the shape's outline.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .data import DETECTOR_CLASSES, IMAGE_SIZE

WIDTH = 16  # base channel count of the shipped detector


class Detector(torch.nn.Module):
    """Four convolution stages (BatchNorm, ReLU; 32 -> 16 -> 8 -> 4 pixels), then global average and max pooling and
    one linear layer: about 0.15 M parameters (0.6 MB) at width 16, ~9 M multiply-adds per 32 x 32 image.

    The global pooling makes the head independent of the input size; ``prepare`` still resizes every image to the
    micro world's 32 x 32, the size it was trained at."""

    def __init__(self, n_classes: int = len(DETECTOR_CLASSES), width: int = WIDTH):
        super().__init__()
        w = int(width)
        if w < 1:
            raise ValueError(f"the detector's width must be a positive whole number, got {width!r}")

        def block(c_in, c_out):
            return [torch.nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c_out),
                    torch.nn.ReLU()]

        self.features = torch.nn.Sequential(
            *block(3, w), torch.nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), torch.nn.MaxPool2d(2),
            *block(2 * w, 4 * w), *block(4 * w, 4 * w), torch.nn.MaxPool2d(2),
            *block(4 * w, 8 * w),
        )
        self.head = torch.nn.Linear(16 * w, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, 32, 32] in -1..1 -> logits [B, n_classes]."""
        f = self.features(x)
        return self.head(torch.cat([f.mean((2, 3)), f.amax((2, 3))], dim=1))


def from_state_dict(state_dict: dict) -> Detector:
    """A detector (in eval mode) holding ``state_dict``; its width and class count are read from the tensors'
    shapes, so a file is self-describing. A state dict of another network is refused, naming what differs."""
    first, head = state_dict.get("features.0.weight"), state_dict.get("head.weight")
    if first is None or head is None or first.dim() != 4 or head.dim() != 2:
        raise ValueError("not a micro-world detector state dict: expected 'features.0.weight' (a convolution) and "
                         f"'head.weight' (a linear layer); got keys {sorted(state_dict)[:6]}...")
    det = Detector(n_classes=int(head.shape[0]), width=int(first.shape[0]))
    missing, unexpected = det.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"the detector state dict does not match the network (width {first.shape[0]}): missing "
                         f"{sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}; it was made by another "
                         "version of memora.micro.detector")
    return det.eval()


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
