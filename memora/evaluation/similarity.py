"""How closely recovered images match the original model's images (same prompts and seeds): SSIM, PSNR, cosine.

SSIM is the standard one (Wang, Bovik, Sheikh, Simoncelli 2004) as kornia computes it (``kornia.metrics.ssim``,
kornia being a ComfyUI requirement): an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, data range L = 1
(images in 0..1), computed per colour channel over the 'valid' region (every position where the whole window fits,
as the reference MATLAB code and scikit-image do) and averaged over channels and positions, in float64. Images smaller
than the window (11 px in height or width) are refused: a smaller window is another measure, not comparable with
published SSIM values. PSNR = 10 log10(L^2 / MSE) per image (``kornia.metrics.psnr``), infinite for identical
images. Cosine similarity compares embeddings (the node feeds it CLIP-vision image embeddings). The pack's earlier
hand-written SSIM agreed with kornia's to 1.3e-11 on 40x48 and 512x512 noise pairs; kornia's was 3.5x faster.

Tensors are [B, C, H, W] here (``from_comfy`` converts ComfyUI's [B, H, W, C]). Comparisons pair image i with image
i; a batch of 1 on either side is compared with every image of the other."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

WINDOW = 11


def from_comfy(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, C] -> [B, C, H, W] float64 (alpha dropped)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError("expected an IMAGE batch [batch, height, width, channels], got "
                         + (f"shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__))
    x = images.detach().to("cpu", torch.float64)
    if x.shape[-1] == 4:
        x = x[..., :3]
    return x.permute(0, 3, 1, 2).contiguous()


def pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check two [B, C, H, W] batches can be compared item by item; broadcast a batch of 1."""
    if a.dim() != 4 or b.dim() != 4:
        raise ValueError(f"expected [batch, channels, height, width] tensors, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"images differ in size or channels: {tuple(a.shape[1:])} vs {tuple(b.shape[1:])} "
                         f"(compare images rendered at the same resolution)")
    if a.shape[0] == 0 or b.shape[0] == 0:
        raise ValueError("an image batch is empty")
    if a.shape[0] != b.shape[0]:
        if a.shape[0] == 1:
            a = a.expand_as(b)
        elif b.shape[0] == 1:
            b = b.expand_as(a)
        else:
            raise ValueError(f"batch sizes differ ({a.shape[0]} vs {b.shape[0]}): image i is compared with image i, "
                             f"so give equal batches (or a single image on one side)")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("the images contain NaN or infinite values")
    return a, b


def check_ssim_size(height: int, width: int, window_size: int = WINDOW) -> None:
    """ValueError unless an image of height x width holds the whole SSIM window at least once."""
    if window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"SSIM window size must be a positive odd number, got {window_size}")
    if height < window_size or width < window_size:
        raise ValueError(f"images of {height}x{width} pixels (height x width) are smaller than SSIM's "
                         f"{window_size}x{window_size} Gaussian window: SSIM is not defined for them (a smaller window "
                         f"would give a number not comparable with standard SSIM). Compare images of at least "
                         f"{window_size}x{window_size} pixels (PSNR has no minimum size).")


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window_size: int = WINDOW) -> torch.Tensor:
    """Per-image SSIM [B] of two [B, C, H, W] batches: kornia.metrics.ssim over the valid region, averaged."""
    import kornia

    a, b = pair(a, b)
    check_ssim_size(a.shape[-2], a.shape[-1], window_size)
    a = a.to(torch.float64).contiguous()
    b = b.to(torch.float64).contiguous()
    # eps 0: the constants C1, C2 already keep the denominator positive (kornia's default 1e-12 moves results by ~1e-9)
    return kornia.metrics.ssim(a, b, window_size, max_val=float(data_range), eps=0.0,
                               padding="valid").mean(dim=(1, 2, 3))


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR [B] in dB (kornia.metrics.psnr per image); +inf where the images are identical."""
    import kornia

    a, b = pair(a, b)
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    return torch.stack([kornia.metrics.psnr(x, y, float(data_range)) for x, y in zip(a, b)])


def cosine(e1: torch.Tensor, e2: torch.Tensor) -> torch.Tensor:
    """Per-item cosine similarity [B] of two embedding batches [B, D] (a batch of 1 broadcasts)."""
    e1 = e1.detach().to("cpu", torch.float64).reshape(e1.shape[0], -1)
    e2 = e2.detach().to("cpu", torch.float64).reshape(e2.shape[0], -1)
    if e1.shape[1] != e2.shape[1]:
        raise ValueError(f"embedding sizes differ: {e1.shape[1]} vs {e2.shape[1]}")
    if e1.shape[0] != e2.shape[0] and 1 not in (e1.shape[0], e2.shape[0]):
        raise ValueError(f"embedding batch sizes differ ({e1.shape[0]} vs {e2.shape[0]})")
    return F.cosine_similarity(e1, e2, dim=1, eps=1e-12)


def mean(values: torch.Tensor) -> float:
    """Mean of per-image scores (inf if any is inf, as for PSNR of an identical pair)."""
    return float(values.to(torch.float64).mean())


def fmt(v: float, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if math.isinf(v):
        return "inf"
    return f"{v:.{digits}f}"


def json_number(v: float):
    """A JSON-safe number: inf -> "inf", NaN -> None (JSON has neither)."""
    if v is None or math.isnan(v):
        return None
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return float(v)
