"""The micro world's procedural dataset: five shape concepts drawn with real in-class variety, each with a caption.

Every image is a 32 x 32 RGB picture of ONE filled shape on a plain background with a gentle gradient. Per image
the shape's colour, the background colour (with a minimum contrast between the two), the position, the size, the
rotation and a shape-specific proportion (a star's inner radius, a cross's arm width, a triangle's and a circle's
slight squash) are drawn at random; shapes are rendered at 4x resolution and box-filtered down (anti-aliased).
A build may scale some concepts' sizes (``set_size_scale``; the shipped world does not).

The detector (``detector.py``) also learns a ``none`` class: plain backgrounds, strokes, dots and irregular
blobs, so an image with no recognisable concept is not forced into one of the five.

numpy + Pillow only; the same seed always gives the same images (the tests check this).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

CONCEPTS: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
NONE = "none"
DETECTOR_CLASSES: tuple[str, ...] = CONCEPTS + (NONE,)
IMAGE_SIZE = 32
_SS = 4  # supersampling factor for anti-aliased rendering
RADIUS = (0.26, 0.38)  # circumradius range, as a fraction of the image size
POSITION_JITTER = 0.12  # largest offset of the shape centre from the image centre, as a fraction of the size
#: per concept, a factor on the drawn radius; empty in the shipped world. The build's ``--size-scale`` sets it (the
#: v3 candidate of docs/micro-world.md drew triangles 1.25x and circles 0.85x); the other concepts' images do not
#: change (a scaled shape too large to be placed off-centre is centred, which shifts that image's later draws).
SIZE_SCALE: dict[str, float] = {}


def parse_concept_factors(text: str, what: str, unit: str, example: str,
                          check: Callable[[str, float], float]) -> dict[str, float]:
    """``"triangle=1.25,circle=0.85"`` -> {"triangle": 1.25, "circle": 0.85}; "" or None -> {}: a per-concept number
    (the build's --size-scale, --calibrate-size-scale, --calibrate-guidance). Every name must be a concept, given once;
    ``check(name, value)`` validates each value and returns it. ``what`` and ``unit`` name the option and its number
    in the errors, ``example`` is shown when an item has no ``=``."""
    out: dict[str, float] = {}
    for item in (part.strip() for part in str(text or "").split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(f"{what} {item!r}: expected concept={unit} (e.g. {example})")
        check_concept(name)
        if name in out:
            raise ValueError(f"{what}: {name!r} is given twice")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{what} {item!r}: the {unit} {value.strip()!r} is not a number") from None
        out[name] = check(name, number)
    return out


def parse_size_scale(text: str) -> dict[str, float]:
    """``"triangle=1.25,circle=0.85"`` -> {"triangle": 1.25, "circle": 0.85}; "" -> {}. Every name must be a
    concept and every factor a number in (0, 1.3] (beyond 1.3 the largest shapes, centred, leave the image)."""
    return parse_concept_factors(text, "size scale", "factor", "triangle=1.25", _size_factor)


def _size_factor(name: str, factor: float) -> float:
    if not 0.0 < factor <= 1.3:
        raise ValueError(f"size scale {name}={factor:g}: the factor must be in (0, 1.3], got {factor}")
    return factor


def set_size_scale(scale: dict[str, float]) -> None:
    """Make every later drawing scale these concepts' radius (an empty mapping: the shipped world's sizes). Checked
    like ``parse_size_scale``; a refused mapping changes nothing."""
    checked = {check_concept(name): _size_factor(name, float(value)) for name, value in dict(scale).items()}
    SIZE_SCALE.clear()
    SIZE_SCALE.update(checked)


def caption(concept: str) -> str:
    """The prompt a concept is trained and evaluated with."""
    check_concept(concept)
    return f"a photo of a {concept}"


def check_concept(concept: str) -> str:
    if concept not in CONCEPTS:
        raise ValueError(f"unknown micro-world concept {concept!r}; expected one of {list(CONCEPTS)}")
    return concept



def _hsv(h: float, s: float, v: float) -> np.ndarray:
    import colorsys

    return np.asarray(colorsys.hsv_to_rgb(h % 1.0, s, v)) * 255.0


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A pale, slightly tinted background and a saturated shape colour of any hue (0..255 floats): "coloured
    shapes on paper". The shape is always clearly darker or more colourful than the background."""
    bg = _hsv(rng.uniform(0, 1), rng.uniform(0.0, 0.25), rng.uniform(0.78, 0.97))
    fg = _hsv(rng.uniform(0, 1), rng.uniform(0.55, 1.0), rng.uniform(0.35, 0.85))
    return bg, fg


def _background(rng: np.random.Generator, bg: np.ndarray, size: int) -> np.ndarray:
    """Plain colour with a linear gradient of up to +-12 levels in a random direction."""
    ang = rng.uniform(0, 2 * math.pi)
    amp = rng.uniform(0, 12)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    ramp = ((xx - size / 2) * math.cos(ang) + (yy - size / 2) * math.sin(ang)) / (size / 2)
    img = bg[None, None, :] + amp * ramp[..., None]
    return np.clip(img, 0, 255)


def _polygon(cx, cy, radii, angles, rot) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(a + rot), cy + r * math.sin(a + rot)) for r, a in zip(radii, angles)]


def shape_outline(concept: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[str, list]:
    """("ellipse", bbox) or ("polygon", points) in image pixels for one random instance of ``concept``."""
    r = rng.uniform(*RADIUS) * size * SIZE_SCALE.get(concept, 1.0)  # circumradius
    margin = r + 1.0
    # the centre: anywhere the shape fits, at most POSITION_JITTER x size from the image centre
    lo = max(margin, size * (0.5 - POSITION_JITTER))
    hi = min(size - margin, size * (0.5 + POSITION_JITTER))
    cx = rng.uniform(lo, hi) if hi > lo else size / 2
    cy = rng.uniform(lo, hi) if hi > lo else size / 2
    rot = rng.uniform(0, 2 * math.pi)
    if concept == "circle":
        rr = r * 0.85
        squash = rng.uniform(0.9, 1.1)
        return "ellipse", [cx - rr * squash, cy - rr / squash, cx + rr * squash, cy + rr / squash]
    if concept == "square":
        angles = [math.pi / 4 + k * math.pi / 2 for k in range(4)]
        return "polygon", _polygon(cx, cy, [r * 0.95] * 4, angles, rot)
    if concept == "triangle":
        stretch = rng.uniform(0.85, 1.15)
        pts = _polygon(cx, cy, [r * 1.05] * 3, [-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)], 0.0)
        # squash along a random axis, then rotate: in-class variety beyond the equilateral triangle
        c, s = math.cos(rot), math.sin(rot)
        out = []
        for x, y in pts:
            dx, dy = (x - cx) * stretch, (y - cy) / stretch
            out.append((cx + c * dx - s * dy, cy + s * dx + c * dy))
        return "polygon", out
    if concept == "star":
        inner = rng.uniform(0.38, 0.5)
        radii = [r * 1.05 if k % 2 == 0 else r * 1.05 * inner for k in range(10)]
        return "polygon", _polygon(cx, cy, radii, [-math.pi / 2 + k * math.pi / 5 for k in range(10)], rot)
    if concept == "cross":
        w = rng.uniform(0.28, 0.40) * r
        a = r
        pts = [(w, a), (w, w), (a, w), (a, -w), (w, -w), (w, -a), (-w, -a), (-w, -w), (-a, -w), (-a, w), (-w, w),
               (-w, a)]
        c, s = math.cos(rot), math.sin(rot)
        return "polygon", [(cx + c * x - s * y, cy + s * x + c * y) for x, y in pts]
    raise ValueError(f"unknown concept {concept!r}")


def _render_mask(kind: str, geom: list, size: int) -> np.ndarray:
    big = Image.new("L", (size * _SS, size * _SS), 0)
    d = ImageDraw.Draw(big)
    if kind == "ellipse":
        d.ellipse([v * _SS for v in geom], fill=255)
    else:
        d.polygon([(x * _SS, y * _SS) for x, y in geom], fill=255)
    small = big.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def _none_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """Something that is none of the concepts: nothing, thin strokes, a few dots, or an irregular blob."""
    kind = rng.integers(0, 4)
    big = Image.new("L", (size * _SS, size * _SS), 0)
    d = ImageDraw.Draw(big)
    S = size * _SS
    if kind == 1:
        for _ in range(int(rng.integers(1, 4))):
            pts = [tuple(rng.uniform(0, S, 2)) for _ in range(int(rng.integers(2, 4)))]
            d.line(pts, fill=255, width=int(rng.integers(3, 9)))
    elif kind == 2:
        for _ in range(int(rng.integers(2, 7))):
            x, y = rng.uniform(0, S, 2)
            rr = rng.uniform(2, 6) * _SS / 2
            d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=255)
    elif kind == 3:
        # an irregular blob: a radial polygon with strongly varying radius (not round, no regular corners)
        n = 14
        cx, cy = rng.uniform(0.3, 0.7, 2) * S
        base = rng.uniform(0.15, 0.3) * S
        radii = base * np.clip(1 + np.convolve(rng.normal(0, 0.6, n + 4), np.ones(3) / 3, "valid")[:n], 0.2, 2.0)
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        d.polygon([(cx + r * math.cos(a), cy + r * math.sin(a)) for r, a in zip(radii, angles)], fill=255)
    small = big.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def draw(concept: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One random image of ``concept`` (or of ``"none"``) as uint8 [size, size, 3]."""
    bg, fg = _colours(rng)
    img = _background(rng, bg, size)
    if concept == NONE:
        mask = _none_mask(rng, size)
    else:
        kind, geom = shape_outline(concept, rng, size)
        mask = _render_mask(kind, geom, size)
    out = img * (1 - mask[..., None]) + fg[None, None, :] * mask[..., None]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def make_dataset(n_per_class: int, seed: int, concepts: Sequence[str] = CONCEPTS,
                 size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``n_per_class`` images of each concept, shuffled: (uint8 [N, size, size, 3], int64 labels into ``concepts``).

    Each image gets its own generator seeded from (seed, class, index), so adding a class does not change the
    images of the others (the never-learned model's data is exactly the original's minus one concept)."""
    images, labels = [], []
    for ci, concept in enumerate(concepts):
        cidx = DETECTOR_CLASSES.index(concept) if concept in DETECTOR_CLASSES else ci
        for i in range(n_per_class):
            rng = np.random.default_rng([seed, cidx, i])
            images.append(draw(concept, rng, size))
            labels.append(ci)
    order = np.random.default_rng([seed, 999]).permutation(len(images))
    return np.stack(images)[order], np.asarray(labels, dtype=np.int64)[order]


def to_tensor_range(images: np.ndarray):
    """uint8 [N, H, W, 3] -> float32 torch tensor [N, 3, H, W] in -1..1 (the VAE's input range)."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def grid(images: np.ndarray, cols: Optional[int] = None, scale: int = 1, pad: int = 1) -> Image.Image:
    """A contact sheet of uint8 [N, H, W, 3] images (for docs and debugging)."""
    n, h, w, _ = images.shape
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    sheet = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        sheet[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = images[i]
    img = Image.fromarray(sheet)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img
