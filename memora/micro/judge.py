"""An independent judge for the micro world's shapes: a geometric classifier of the outline, with no learned weights.

The detector (``detector.py``) is a CNN trained on procedural images; on *generated* images it needs a second opinion
that shares none of its failure modes. The judge looks at the shape's outline only:

1. **Segmentation.** The background is the pale, gently graded colour of the image's border: a plane (colour as a
   linear function of x and y) is fitted to the border pixels, and each pixel's colour distance from it is its
   "ink". Otsu's threshold on the ink separates shape from background; the ink image is upsampled 4x (bilinear)
   before thresholding, for a smoother outline. The largest connected region (holes filled) is the shape.
2. **No clear shape -> ``none``:** too little contrast, a region that is too small, or a second region at least a
   quarter of its size (dots, strokes).
3. **Measurements:** the elongation (square root of the ratio of the region's second moments), the solidity
   (area / convex-hull area, scipy.spatial.ConvexHull) and the angular harmonics of the outline's radius about the
   centroid, r(theta) = r0 (1 + sum_k h_k cos(k theta + phi_k)).
4. **Rules** (thresholds set by hand from the shapes' geometry, then checked on procedural images; see
   ``THRESHOLDS``). The dominant harmonic is the largest of h_1..h_6 when it is 1.4 times the runner-up.
   Elongated (> 1.5) -> none; dominant 5 with h_5 >= 0.10 -> star if its tips are pointed (a regular pentagon
   has h_5 = 0.086; five wide, round-ended arms -> none); dominant 4 with h_4 >= 0.08 on a concave region
   (solidity < 0.88), or h_4 >= 0.20, or wide arm ends (tip share >= 0.38) -> cross (squares stay below 0.16
   and 0.35); dominant 3, h_3 >= 0.15 and solidity
   >= 0.85 -> triangle (also, checked first: a convex region, solidity >= 0.90, elongated up to 1.8, whose h_3 >=
   0.15 dominates h_1 and h_4..h_6 only: stretching a triangle adds the second harmonic, which should not count
   against it); otherwise a region that is not convex (solidity < 0.90) -> none; a convex one with h_1,
   h_3..h_6 < 0.05 and h_2 < 0.21 -> circle (a flatter oval -> none), dominant 4 with h_4 >= 0.05 -> square
   (rounded corners included); anything else -> none. A region smaller than 6 % of the image is none (the
   smallest drawn concept covers about 8 %).

numpy and scipy only; deterministic. ``agreement`` compares the detector's labels with the judge's, and
``disagreement_sheet`` draws the images they disagree on, each captioned with both labels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from .data import CONCEPTS, DETECTOR_CLASSES, NONE

UPSAMPLE = 4
N_ANGLES = 96
THRESHOLDS = {
    "min_contrast": 0.10,        # ink (colour distance, 0..1 per channel, Euclidean) of the shape's core
    "min_area": 0.06,            # smallest region, as a share of the image (the smallest drawn concept: ~0.08)
    "second_region": 0.25,       # a second region this large (relative to the largest) -> no single shape
    "max_elongation": 1.5,       # drawn circles reach ~1.25, triangles ~1.33; the hard-negative ellipses >= 1.7
    "concave": 0.88,             # solidity below: four-fold -> a cross (crosses ~0.65-0.87)
    "convex": 0.90,              # solidity above: circle, triangle or square (~0.9-1.0)
    "star": 0.10,                # a dominant fifth harmonic this large: a star (stars ~0.3, blurred ~0.1-0.2;
                                 # a regular pentagon 0.086)
    "star_tips": 0.33,           # ... with pointed tips (tip share: stars 0.04-0.32; five wide arms >= 0.35)
    "cross": 0.20,               # a dominant fourth harmonic this large: a cross even if blurred (squares <= 0.16)
    "cross_tips": 0.38,          # ... or wide arm ends (tip share: wide round-armed crosses >= 0.42, squares,
                                 # rounded or not, <= 0.35)
    "triangle": 0.15,            # a dominant third harmonic this large: a triangle (~0.27; an equilateral 0.275)
    "triangle_solidity": 0.85,   # ... on a region at least this solid (blurred corners fall below "convex")
    "triangle_elongation": 1.8,  # a triangle stretched up to this is still one (drawn: <= 1.33; generated: ~1.5)
    "square": 0.05,              # a dominant fourth harmonic this large on a convex region: a square (rounded
                                 # corners ~0.05-0.09, sharp 0.14; circles <= 0.02)
    "round": 0.05,               # a convex region whose harmonics 1 and 3-6 all stay below this is a circle
    "oval": 0.21,                # ... if its harmonic 2 stays below this (an ellipse of aspect 1.5: ~0.2)
    "dominance": 1.4,            # the winning harmonic must exceed the runner-up among 1..6 by this factor
    "min_harmonic": 0.08,        # ... and, for the concave shapes, be at least this large
}


@dataclass
class Verdict:
    label: str
    reason: str
    elongation: float = float("nan")
    solidity: float = float("nan")
    harmonics: tuple = ()
    contrast: float = float("nan")
    tips: float = float("nan")

    def as_dict(self) -> dict:
        return asdict(self)


def _as_float_image(image) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected one image of shape [height, width, channels] (1, 3 or 4 channels), "
                         f"got {tuple(a.shape)}")
    if min(a.shape[:2]) < 8:
        raise ValueError(f"the image is too small to judge ({a.shape[0]} x {a.shape[1]}; at least 8 x 8)")
    a = a.astype(np.float64)
    if np.issubdtype(np.asarray(image).dtype, np.integer):
        a = a / 255.0
    if not np.all(np.isfinite(a)):
        raise ValueError("the image contains non-finite values (NaN or inf)")
    a = a[..., :3] if a.shape[-1] == 4 else a
    return np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a


def ink(image) -> np.ndarray:
    """Per-pixel colour distance [H, W] from the background plane fitted (robustly) to the border pixels."""
    img = _as_float_image(image)
    h, w, _ = img.shape
    yy, xx = np.mgrid[0:h, 0:w]
    border = np.zeros((h, w), bool)
    border[:2], border[-2:], border[:, :2], border[:, -2:] = True, True, True, True
    design = np.stack([np.ones(h * w), xx.ravel() / w, yy.ravel() / h], 1)
    keep = border.ravel()
    for _ in range(2):  # refit once without the border pixels the shape itself covers
        coef, *_ = np.linalg.lstsq(design[keep], img.reshape(-1, 3)[keep], rcond=None)
        dist = np.linalg.norm(img.reshape(-1, 3) - design @ coef, axis=1)
        keep = border.ravel() & (dist <= max(np.median(dist[border.ravel()]) * 3, 0.03))
    return dist.reshape(h, w)


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=64)
    mids = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * mids) / np.maximum(w0, 1)
    m1 = (np.sum(hist * mids) - np.cumsum(hist * mids)) / np.maximum(w1, 1)
    return float(mids[int(np.argmax(w0 * w1 * (m0 - m1) ** 2))])


def segment(image) -> tuple[Optional[np.ndarray], str, float]:
    """(mask of the shape at UPSAMPLE x resolution or None, why None, contrast)."""
    d = ink(image)
    contrast = float(np.percentile(d, 99))
    if contrast < THRESHOLDS["min_contrast"]:
        return None, "no contrast", contrast
    big = ndimage.zoom(d, UPSAMPLE, order=1)
    mask = big > max(_otsu(big), 0.5 * THRESHOLDS["min_contrast"])
    labels, n = ndimage.label(mask)
    if n == 0:
        return None, "no region", contrast
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(sizes)[::-1]
    if sizes[order[0]] < THRESHOLDS["min_area"] * mask.size:
        return None, "region too small", contrast
    if n > 1 and sizes[order[1]] >= THRESHOLDS["second_region"] * sizes[order[0]]:
        return None, "several regions", contrast
    return ndimage.binary_fill_holes(labels == order[0] + 1), "", contrast


def measure(mask: np.ndarray) -> tuple[float, float, np.ndarray, float]:
    """(elongation, solidity, harmonics h_1..h_8 of the outline's radius about the centroid, tip share) of a region
    mask. The tip share is the share of directions whose radius lies in the top quarter of the radius range: about
    a quarter for pointed tips (a star's), more for wide, rounded arm ends."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    cov = np.cov(np.stack([xs - cx, ys - cy]))
    ev = np.linalg.eigvalsh(cov)
    elongation = float(math.sqrt(ev[1] / max(ev[0], 1e-9)))
    edge = mask & ~ndimage.binary_erosion(mask)
    by, bx = np.nonzero(edge)
    pts = np.stack([bx, by], 1).astype(np.float64)
    try:
        hull = ConvexHull(pts)
        # pixel-count equivalent of the hull (Pick): the polygon through pixel centres misses half a pixel all round
        solidity = float(mask.sum() / (hull.volume + hull.area / 2 + 1))
    except QhullError:
        solidity = 1.0
    ang = np.arctan2(by - cy, bx - cx)
    rad = np.hypot(by - cy, bx - cx) + 0.5
    bins = ((ang + math.pi) / (2 * math.pi) * N_ANGLES).astype(int) % N_ANGLES
    prof = np.full(N_ANGLES, np.nan)
    np.fmax.at(prof, bins, rad)
    ok = np.isfinite(prof)
    idx = np.arange(N_ANGLES)
    prof = np.interp(idx, idx[ok], prof[ok], period=N_ANGLES)
    spec = np.fft.rfft(prof)
    harmonics = 2 * np.abs(spec[1:9]) / np.abs(spec[0])
    lo, hi = prof.min(), prof.max()
    tips = float(np.mean(prof > lo + 0.75 * (hi - lo)))
    return elongation, min(solidity, 1.0), harmonics, tips


def _dominant(h: np.ndarray) -> Optional[int]:
    """The harmonic (1-based) that exceeds every other among 1..6 by the dominance factor, or None."""
    vals = {k: h[k - 1] for k in range(1, 7)}
    best = max(vals, key=vals.get)
    runner = max(v for k, v in vals.items() if k != best)
    return best if vals[best] >= THRESHOLDS["dominance"] * runner else None


def _stretched_triangle(elong: float, sol: float, h: np.ndarray) -> bool:
    """A triangle, stretched or not: a convex region whose third harmonic is large and dominates h1 and h4..h6.
    Stretching is centrally symmetric: it adds the second harmonic (and, through it, little of the first and fifth),
    which is why the second does not count against the third here; ellipses, capsules and rectangles have no odd
    harmonics at all, three-pointed stars are not convex, and the irregular blobs of the ``none`` class that look
    triangular stay under the convexity bar (measured: solidity 0.85-0.90)."""
    t = THRESHOLDS
    return (elong <= t["triangle_elongation"] and sol >= t["convex"] and h[2] >= t["triangle"]
            and h[2] >= t["dominance"] * max(h[0], h[3], h[4], h[5]))


def judge(image) -> Verdict:
    """The judge's label for one image ([H, W, 3] uint8 in 0..255 or floats in 0..1) with its measurements."""
    mask, why, contrast = segment(image)
    if mask is None:
        return Verdict(NONE, why, contrast=contrast)
    elong, sol, h, tips = measure(mask)
    v = dict(elongation=round(elong, 3), solidity=round(sol, 3), harmonics=tuple(round(float(x), 3) for x in h),
             contrast=round(contrast, 3), tips=round(tips, 3))
    t = THRESHOLDS
    if _stretched_triangle(elong, sol, h):
        return Verdict("triangle", "three-fold, convex outline", **v)
    if elong > t["max_elongation"]:
        return Verdict(NONE, "elongated", **v)
    k = _dominant(h)
    if k == 5 and h[4] >= t["star"]:
        if tips <= t["star_tips"]:
            return Verdict("star", "five-fold outline, pointed tips", **v)
        return Verdict(NONE, "five wide arms", **v)
    if k == 4 and h[3] >= t["min_harmonic"] and (sol < t["concave"] or h[3] >= t["cross"]
                                                   or tips >= t["cross_tips"]):
        return Verdict("cross", "four-fold, concave outline", **v)
    if k == 3 and h[2] >= t["triangle"] and sol >= t["triangle_solidity"]:
        return Verdict("triangle", "three-fold, convex outline", **v)
    if sol < t["convex"]:
        return Verdict(NONE, f"not convex (harmonic {k})", **v)
    if max(h[0], h[2:6].max()) < t["round"]:
        if h[1] < t["oval"]:
            return Verdict("circle", "convex and round", **v)
        return Verdict(NONE, "convex oval", **v)
    if k == 4 and h[3] >= t["square"]:
        return Verdict("square", "four-fold, convex outline", **v)
    return Verdict(NONE, f"convex, harmonic {k}", **v)


def judge_batch(images) -> list[str]:
    """Labels for a batch: uint8 [B, H, W, 3] or floats in 0..1 (a ComfyUI IMAGE tensor or a numpy array)."""
    arr = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if arr.ndim != 4:
        raise ValueError(f"expected a batch of images [batch, height, width, channels], got shape {arr.shape}")
    return [judge(a).label for a in arr]


def agreement(detector_labels: Sequence[str], judge_labels: Sequence[str]) -> dict:
    """How often the detector and the judge give the same label: {"k", "n", "rate", "pairs"} where pairs counts
    every (detector, judge) combination that occurred, so disagreements can be read off by kind."""
    d, j = list(detector_labels), list(judge_labels)
    if len(d) != len(j):
        raise ValueError(f"agreement needs one judge label per detector label; got {len(d)} and {len(j)}")
    if not d:
        raise ValueError("agreement needs at least one image; got none")
    for lab in d + j:
        if lab not in DETECTOR_CLASSES:
            raise ValueError(f"unknown label {lab!r}; expected one of {list(DETECTOR_CLASSES)}")
    pairs: dict = {}
    for a, b in zip(d, j):
        pairs[f"{a}/{b}"] = pairs.get(f"{a}/{b}", 0) + 1
    k = sum(a == b for a, b in zip(d, j))
    return {"k": k, "n": len(d), "rate": k / len(d), "pairs": dict(sorted(pairs.items()))}


def disagreement_sheet(images: np.ndarray, detector_labels: Sequence[str], judge_labels: Sequence[str],
                       names: Optional[Sequence[str]] = None, cols: int = 8, scale: int = 4, limit: int = 64):
    """A PIL contact sheet of the images (uint8 [N, H, W, 3]) the detector and the judge label differently, each
    captioned 'D: <detector>' and 'J: <judge>' (and its name, e.g. the model and prompt, when given). None when
    they agree on every image."""
    from PIL import Image, ImageDraw

    if not (len(images) == len(detector_labels) == len(judge_labels)):
        raise ValueError(f"one detector and one judge label per image: {len(images)} images, "
                         f"{len(detector_labels)} and {len(judge_labels)} labels")
    idx = [i for i, (a, b) in enumerate(zip(detector_labels, judge_labels)) if a != b][:limit]
    if not idx:
        return None
    h, w = images.shape[1] * scale, images.shape[2] * scale
    cap = 12 * (3 if names is not None else 2)
    cell_w, cell_h = max(w, 96) + 4, h + cap + 4
    rows = int(math.ceil(len(idx) / cols))
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for n, i in enumerate(idx):
        r, c = divmod(n, cols)
        x0, y0 = c * cell_w + 2, r * cell_h + 2
        sheet.paste(Image.fromarray(np.asarray(images[i], np.uint8)).resize((w, h), Image.NEAREST), (x0, y0))
        lines = [f"D: {detector_labels[i]}", f"J: {judge_labels[i]}"] + ([str(names[i])[:16]] if names else [])
        for li, text in enumerate(lines):
            draw.text((x0, y0 + h + 1 + 12 * li), text, fill=(0, 0, 0))
    return sheet


__all__ = ["THRESHOLDS", "Verdict", "judge", "judge_batch", "agreement", "disagreement_sheet", "segment", "measure",
           "ink", "CONCEPTS"]
