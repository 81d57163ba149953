"""How closely recovered images match the original model's images (same prompts and seeds): SSIM, PSNR, cosine.

SSIM is the standard one (Wang, Bovik, Sheikh, Simoncelli 2004): an 11x11 Gaussian window with sigma 1.5,
K1 = 0.01, K2 = 0.03, data range L = 1 (images in 0..1), population (not sample) covariances, computed per colour
channel over the 'valid' region (every position where the whole window fits, as the reference MATLAB code and
scikit-image do) and averaged over channels and positions. Images smaller than the window (11 px in height or
width) are refused: a smaller window is another measure, not comparable with published SSIM values. PSNR = 10 log10(L^2 / MSE), infinite for identical images. Cosine similarity compares embeddings (the
node feeds it CLIP-vision image embeddings).

Tensors are [B, C, H, W] here (``from_comfy`` converts ComfyUI's [B, H, W, C]). Comparisons pair image i with image
i; a batch of 1 on either side is compared with every image of the other."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03


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


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA, dtype=torch.float64) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)


def check_ssim_size(height: int, width: int, window_size: int = WINDOW) -> None:
    """ValueError unless an image of height x width holds the whole SSIM window at least once."""
    if window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"SSIM window size must be a positive odd number, got {window_size}")
    if height < window_size or width < window_size:
        raise ValueError(f"images of {height}x{width} pixels (height x width) are smaller than SSIM's "
                         f"{window_size}x{window_size} Gaussian window: SSIM is not defined for them (a smaller window "
                         f"would give a number not comparable with standard SSIM). Compare images of at least "
                         f"{window_size}x{window_size} pixels (PSNR has no minimum size).")


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window_size: int = WINDOW,
         sigma: float = SIGMA) -> torch.Tensor:
    """Per-image SSIM [B] of two [B, C, H, W] batches (see the module docstring for the definition)."""
    a, b = pair(a, b)
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    check_ssim_size(a.shape[-2], a.shape[-1], window_size)
    size = window_size
    C = a.shape[1]
    w = gaussian_window(size, sigma).to(a.dtype).expand(C, 1, size, size)

    def filt(x):
        return F.conv2d(x, w, groups=C)

    mu_a, mu_b = filt(a), filt(b)
    saa = filt(a * a) - mu_a ** 2
    sbb = filt(b * b) - mu_b ** 2
    sab = filt(a * b) - mu_a * mu_b
    c1 = (K1 * data_range) ** 2
    c2 = (K2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
    return s.mean(dim=(1, 2, 3))


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR [B] in dB; +inf where the images are identical."""
    a, b = pair(a, b)
    mse = ((a.to(torch.float64) - b.to(torch.float64)) ** 2).mean(dim=(1, 2, 3))
    out = torch.full_like(mse, math.inf)
    nz = mse > 0
    out[nz] = 10 * torch.log10(data_range ** 2 / mse[nz])
    return out


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
