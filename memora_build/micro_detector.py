"""Build-only: training and measuring the micro world's concept detector.

Two entry points, used by scripts/build_micro_world.py, scripts/micro_detector_report.py and the tests:

- ``train_detector(vae, seed, ...) -> state_dict``: fresh procedural images of the six classes (the five concepts
  and ``none``), plus *hard negatives* labelled ``none`` (ellipses, capsules, bean-shaped blobs, shapes with a large
  part cut away, stars with 3, 6 or 7 points, crosses with 3, 5 or 6 arms: near-shapes the detector must not
  reward), half of them also as round trips through ``vae`` (what
  a decoded latent looks like), trained with heavy augmentation (any rotation, elongation / squash, scale, position
  jitter, flips, blur, pixel noise, brightness and contrast).
- ``evaluate_detector(detector, images_per_class=500, seed=...) -> {"classes", "per_class", "confusion", ...}``:
  accuracy per class and the confusion matrix on held-out images (drawn and, with a VAE, VAE round trips), and the
  share of held-out hard negatives called ``none``.

The network, its input preparation and its rates are runtime code: ``memora.micro.detector``.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from memora.micro import data
from memora.micro.data import DETECTOR_CLASSES, NONE
from memora.micro.detector import WIDTH, Detector, from_state_dict, probabilities

NONE_INDEX = DETECTOR_CLASSES.index(NONE)
HARD_NEGATIVE_KINDS: tuple[str, ...] = ("ellipse", "capsule", "bean", "partial_circle", "partial_star",
                                        "partial_cross", "star_3_6_7", "arms_3_5_6")
EVAL_SEED = 424_242  # default seed of the held-out images; training draws from 10 * seed + 1 and 10 * seed + 2
DEFAULTS = {"steps": 1500, "batch": 128, "lr": 4e-3, "width": WIDTH, "images_per_class": 1200,
            "hard_negatives": 1200, "round_trip_share": 0.5, "fat_crosses": 300}

VaeLike = Union[None, Callable[[torch.Tensor], torch.Tensor], torch.nn.Module]


# -- hard negatives ------------------------------------------------------------------------------------------------
def _supersampled(draw_fn, size: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    ss = 4
    big = Image.new("L", (size * ss, size * ss), 0)
    draw_fn(ImageDraw.Draw(big), ss)
    return np.asarray(big.resize((size, size), Image.BOX), dtype=np.float64) / 255.0


def _rotated(points, cx, cy, rot):
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + c * x - s * y, cy + s * x + c * y) for x, y in points]


def _elongated_mask(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """An ellipse (aspect 1.7-3.2), a capsule ("sausage", aspect 1.9-3.5) or a bean (two overlapping discs)."""
    cx, cy = rng.uniform(0.4, 0.6, 2) * size
    rot = rng.uniform(0, 2 * math.pi)
    half = rng.uniform(0.26, 0.40) * size  # half of the long axis
    if kind == "ellipse":
        b = half / rng.uniform(1.7, 3.2)
        pts = [(half * math.cos(t), b * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
    elif kind == "capsule":
        b = half / rng.uniform(1.9, 3.5)
        a = half - b  # centre of the end caps
        arc = np.linspace(-math.pi / 2, math.pi / 2, 16)
        pts = [(a + b * math.cos(t), b * math.sin(t)) for t in arc]
        pts += [(-a - b * math.cos(t), -b * math.sin(t)) for t in arc]
    else:  # bean: the union of two discs of different sizes
        r1, r2 = half * rng.uniform(0.45, 0.6), half * rng.uniform(0.35, 0.55)
        d = half - 0.5 * (r1 + r2)

        def discs(dr, ss):
            for (x, y), r in (((cx + d * math.cos(rot), cy + d * math.sin(rot)), r1),
                              ((cx - d * math.cos(rot), cy - d * math.sin(rot)), r2)):
                dr.ellipse([(x - r) * ss, (y - r) * ss, (x + r) * ss, (y + r) * ss], fill=255)
        return _supersampled(discs, size)
    pts = _rotated(pts, cx, cy, rot)
    return _supersampled(lambda dr, ss: dr.polygon([(x * ss, y * ss) for x, y in pts], fill=255), size)


def _star_mask(cx, cy, rot, r, inner, n: int, size: int) -> np.ndarray:
    """A star with ``n`` points of radius ``r`` and inner radius ``inner * r``, centred at (cx, cy), rotated."""
    pts = [((r if k % 2 == 0 else r * inner) * math.cos(math.pi * k / n),
            (r if k % 2 == 0 else r * inner) * math.sin(math.pi * k / n)) for k in range(2 * n)]
    pts = _rotated(pts, cx, cy, rot)
    return _supersampled(lambda dr, ss: dr.polygon([(x * ss, y * ss) for x, y in pts], fill=255), size)


def _wrong_count_mask(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A star with 3, 6 or 7 points, or a cross-like shape with 3, 5 or 6 arms: the count makes it no concept."""
    cx, cy = rng.uniform(0.4, 0.6, 2) * size
    rot = rng.uniform(0, 2 * math.pi)
    r = rng.uniform(0.28, 0.40) * size
    n = int(rng.choice([3, 6, 7] if kind == "star_3_6_7" else [3, 5, 6]))
    if kind == "star_3_6_7":
        # a three-pointed star with a fat centre is a triangle (whose edge midpoints lie at half the radius)
        inner = rng.uniform(0.2, 0.32) if n == 3 else rng.uniform(0.3, 0.45)
        return _star_mask(cx, cy, rot, r, inner, n, size)
    w = rng.uniform(0.28, 0.45 if n == 3 else 0.34) * r  # wider arms of 5 or 6 would merge into a disc
    arms = [_rotated([(0, -w), (r, -w), (r, w), (0, w)], cx, cy, rot + 2 * math.pi * k / n) for k in range(n)]

    def draw_arms(dr, ss):
        dr.ellipse([(cx - w) * ss, (cy - w) * ss, (cx + w) * ss, (cy + w) * ss], fill=255)
        for arm in arms:
            dr.polygon([(x * ss, y * ss) for x, y in arm], fill=255)
    return _supersampled(draw_arms, size)


def _partial_mask(concept: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A circle, star or cross with a large part (a third to two thirds) cut away by a straight line."""
    kind, geom = data.shape_outline(concept, rng, size)
    mask = data._render_mask(kind, geom, size)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    total = mask.sum()
    cy, cx = (mask * yy).sum() / total, (mask * xx).sum() / total
    radius = math.sqrt(total / math.pi)
    ang = rng.uniform(0, 2 * math.pi)
    offset = rng.uniform(-0.35, 0.25) * radius
    dist = (xx - cx) * math.cos(ang) + (yy - cy) * math.sin(ang) - offset
    return mask * np.clip(0.5 - dist, 0.0, 1.0)


#: the near-shapes the UNets also learn, captioned with the empty prompt (``unconditional_extras``): none of them is
#: a star with five points, so the never-learned model still never sees one
UNCONDITIONAL_EXTRA_KINDS: tuple[str, ...] = ("ellipse", "capsule", "bean", "partial_circle", "three_point_star")


def _three_point_star_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """A triangle whose sides are pulled in (a three-pointed star, inner radius 20-40 % of the outer): what cfg 7.5
    made of the v2 original's triangles."""
    cx, cy = rng.uniform(0.4, 0.6, 2) * size
    rot = rng.uniform(0, 2 * math.pi)
    r = rng.uniform(0.30, 0.45) * size
    return _star_mask(cx, cy, rot, r, rng.uniform(0.2, 0.4), 3, size)


def unconditional_extras(n: int, seed: int, size: int = data.IMAGE_SIZE) -> np.ndarray:
    """``n`` images (uint8 [n, size, size, 3]) of near-shapes, the kinds of UNCONDITIONAL_EXTRA_KINDS in turn, that
    a build's UNets learn with the empty prompt only (``--unconditional-extras N``; the shipped world has none).
    Classifier-free guidance pushes a sample away from what the unconditional model knows and the prompted concept
    does not have: with these in the unconditional model's data, cfg 7.5 pushes a triangle away from three-pointed
    stars and a circle away from ovals and capsules instead of towards them (docs/micro-world.md, "A world whose
    original draws every concept at cfg 7.5")."""
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        out.append(_near_shape(UNCONDITIONAL_EXTRA_KINDS[i % len(UNCONDITIONAL_EXTRA_KINDS)], rng, size))
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)


def hard_negative(kind: str, rng: np.random.Generator, size: int = data.IMAGE_SIZE) -> np.ndarray:
    """One image (uint8 [size, size, 3]) of a near-shape that is none of the concepts, drawn like data.draw."""
    if kind not in HARD_NEGATIVE_KINDS:
        raise ValueError(f"unknown hard-negative kind {kind!r}; expected one of {list(HARD_NEGATIVE_KINDS)}")
    return _near_shape(kind, rng, size)


def _near_shape(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One image of a near-shape of ``kind`` (a hard negative's kind or "three_point_star"), drawn like data.draw."""
    bg, fg = data._colours(rng)
    img = data._background(rng, bg, size)
    if kind == "three_point_star":
        mask = _three_point_star_mask(rng, size)
    elif kind.startswith("partial_"):
        mask = _partial_mask(kind.split("_", 1)[1], rng, size)
    elif kind in ("star_3_6_7", "arms_3_5_6"):
        mask = _wrong_count_mask(kind, rng, size)
    else:
        mask = _elongated_mask(kind, rng, size)
    out = img * (1 - mask[..., None]) + fg[None, None, :] * mask[..., None]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def fat_cross(rng: np.random.Generator, size: int = data.IMAGE_SIZE) -> np.ndarray:
    """A cross with wide, round-ended arms (half-width 0.34-0.46 of its reach), as the models draw them: still a
    cross (the procedural crosses' arms have half-widths 0.28-0.40 and square ends), so the detector does not learn
    that every fat four-armed shape is none while it learns that five or six arms are."""
    bg, fg = data._colours(rng)
    img = data._background(rng, bg, size)
    cx, cy = rng.uniform(0.4, 0.6, 2) * size
    rot = rng.uniform(0, 2 * math.pi)
    r = rng.uniform(0.28, 0.40) * size
    w = rng.uniform(0.34, 0.46) * r  # half-width of an arm

    def draw_cross(dr, ss):
        for k in range(4):
            a = rot + k * math.pi / 2
            arm = _rotated([(0, -w), (r - w, -w), (r - w, w), (0, w)], cx, cy, a)
            dr.polygon([(x * ss, y * ss) for x, y in arm], fill=255)
            ex, ey = cx + (r - w) * math.cos(a), cy + (r - w) * math.sin(a)
            dr.ellipse([(ex - w) * ss, (ey - w) * ss, (ex + w) * ss, (ey + w) * ss], fill=255)
    mask = _supersampled(draw_cross, size)
    out = img * (1 - mask[..., None]) + fg[None, None, :] * mask[..., None]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def hard_negatives(n: int, seed: int, size: int = data.IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``n`` hard negatives, the kinds in turn: (uint8 [n, size, size, 3], kind index [n] into HARD_NEGATIVE_KINDS)."""
    kinds = np.arange(n) % len(HARD_NEGATIVE_KINDS)
    imgs = [hard_negative(HARD_NEGATIVE_KINDS[k], np.random.default_rng([seed, 77, i]), size)
            for i, k in enumerate(kinds)]
    return (np.stack(imgs) if imgs else np.zeros((0, size, size, 3), np.uint8)), kinds


# -- VAE round trips -----------------------------------------------------------------------------------------------
@torch.no_grad()
def vae_round_trip(vae: VaeLike, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """x (-1..1) encoded to the posterior mean and decoded by ``vae``: an ldm AutoencoderKL (encoder, quant_conv,
    post_quant_conv, decoder) or any callable that maps images in -1..1 to their round trip."""
    parts = ("encoder", "quant_conv", "post_quant_conv", "decoder")
    if all(hasattr(vae, p) for p in parts):
        def fn(xb):
            mean = vae.quant_conv(vae.encoder(xb)).chunk(2, dim=1)[0]
            return vae.decoder(vae.post_quant_conv(mean))
    elif callable(vae):
        fn = vae
    else:
        raise TypeError(f"vae must be None, an AutoencoderKL (with {', '.join(parts)}) or a callable mapping images "
                        f"in -1..1 to their round trip; got {type(vae).__name__}")
    out = torch.cat([fn(x[i:i + batch]) for i in range(0, x.shape[0], batch)])
    if out.shape != x.shape:
        raise ValueError(f"the VAE round trip changed the image shape from {tuple(x.shape)} to {tuple(out.shape)}")
    return out.float().clamp(-1, 1)


# -- augmentation --------------------------------------------------------------------------------------------------
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


def _affine(x: torch.Tensor, g: torch.Generator, aspect: float, shift: float) -> torch.Tensor:
    """Any rotation, a scale of 0.88-1.12, an elongation / squash up to ``aspect`` along a random axis, and a shift
    of up to ``shift`` (fraction of the image), per image; the border colour extends outwards."""
    b = x.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(b, generator=g)  # noqa: E731
    rot, axis = u(0, 2 * math.pi), u(0, math.pi)
    scale, stretch = u(0.88, 1.12), torch.exp(u(-math.log(aspect), math.log(aspect)))

    def rmat(a):
        return torch.stack([torch.stack([a.cos(), -a.sin()], -1), torch.stack([a.sin(), a.cos()], -1)], -2)

    diag = torch.diag_embed(torch.stack([stretch.sqrt(), 1 / stretch.sqrt()], -1))
    m = rmat(rot) @ rmat(axis) @ diag @ rmat(-axis) / scale.view(-1, 1, 1)  # output -> input coordinates
    t = torch.stack([u(-shift, shift), u(-shift, shift)], -1) * 2
    theta = torch.cat([m, t.unsqueeze(-1)], dim=2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment(x: torch.Tensor, g: torch.Generator, *, max_blur: float = 1.4, noise: float = 0.08,
            aspect: float = 1.15, shift: float = 0.08) -> torch.Tensor:
    """Heavy augmentation for images x in -1..1 (the classes are invariant to all of it): a random affine map on
    70 % of the images, flips, blur, Gaussian noise, brightness / contrast and a colour-channel shuffle."""
    b = x.shape[0]
    warp = (torch.rand(b, generator=g) < 0.7).view(-1, 1, 1, 1)
    x = torch.where(warp, _affine(x, g, aspect, shift), x)
    x = torch.where((torch.rand(b, generator=g) < 0.5).view(-1, 1, 1, 1), x.flip(3), x)
    perm = torch.randperm(3, generator=g)
    x = x[:, perm]
    sigma = torch.rand(b, generator=g) * max_blur
    x = torch.where((sigma > 0.3).view(-1, 1, 1, 1), _blur(x, sigma), x)
    gain = 1 + 0.25 * (torch.rand(b, 1, 1, 1, generator=g) - 0.5)
    bias = 0.15 * (torch.rand(b, 1, 1, 1, generator=g) - 0.5)
    x = x * gain + bias
    x = x + torch.randn(x.shape, generator=g) * noise * torch.rand(b, 1, 1, 1, generator=g)
    return x.clamp(-1, 1)


# -- training ------------------------------------------------------------------------------------------------------
def training_set(vae: VaeLike, seed: int, images_per_class: int, n_hard: int,
                 round_trip_share: float, n_fat: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Drawn images of the six classes (seed 10 * seed + 1), hard negatives labelled none (10 * seed + 2), wide
    crosses labelled cross (10 * seed + 4) and, with a VAE, the round trips of a ``round_trip_share`` of them:
    (x [N, 3, 32, 32] in -1..1, labels [N])."""
    imgs, labels = data.make_dataset(images_per_class, 10 * seed + 1, DETECTOR_CLASSES)
    hard, _ = hard_negatives(n_hard, 10 * seed + 2)
    fat = [fat_cross(np.random.default_rng([10 * seed + 4, i])) for i in range(n_fat)]
    x = data.to_tensor_range(np.concatenate([imgs, hard] + ([np.stack(fat)] if fat else [])))
    y = torch.cat([torch.from_numpy(labels), torch.full((len(hard),), NONE_INDEX, dtype=torch.long),
                   torch.full((len(fat),), DETECTOR_CLASSES.index("cross"), dtype=torch.long)])
    if vae is not None and round_trip_share > 0:
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(10 * seed + 3))
        pick = order[:int(round(round_trip_share * x.shape[0]))]
        x = torch.cat([x, vae_round_trip(vae, x[pick])])
        y = torch.cat([y, y[pick]])
    return x, y


def train_detector(vae: VaeLike, seed: int, *, steps: int = DEFAULTS["steps"], batch: int = DEFAULTS["batch"],
                   lr: float = DEFAULTS["lr"], width: int = DEFAULTS["width"],
                   images_per_class: int = DEFAULTS["images_per_class"], hard_negatives: int = DEFAULTS["hard_negatives"],
                   round_trip_share: float = DEFAULTS["round_trip_share"], fat_crosses: int = DEFAULTS["fat_crosses"],
                   progress: Optional[Callable[[int, int, float], None]] = None,
                   log: Optional[dict] = None) -> dict:
    """Train a detector from scratch; returns its state dict (float32 tensors; ``memora.micro.detector.
    from_state_dict`` rebuilds the network). ``vae``: None (drawn images only), an AutoencoderKL or a round-trip
    callable (see ``vae_round_trip``). ``log``, when given, receives the arguments, losses and timings."""
    start = time.perf_counter()
    x, y = training_set(vae, seed, images_per_class, hard_negatives, round_trip_share, fat_crosses)
    data_s = time.perf_counter() - start
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    det = Detector(width=width)
    opt = torch.optim.AdamW(det.parameters(), lr=lr, weight_decay=5e-4)
    warm = max(1, steps // 20)
    losses = []
    det.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        loss = F.cross_entropy(det(augment(x[idx], g)), y[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            losses.append([step, round(float(loss.detach()), 4)])
            if progress is not None:
                progress(step, steps, float(loss))
    det.eval()
    if log is not None:
        log.update({"seed": seed, "steps": steps, "batch": batch, "lr": lr, "width": width,
                    "images_per_class": images_per_class, "hard_negatives": hard_negatives,
                    "hard_negative_kinds": list(HARD_NEGATIVE_KINDS), "round_trip_share": round_trip_share,
                    "fat_crosses": fat_crosses, "vae_round_trips": vae is not None, "training_images": int(x.shape[0]),
                    "parameters": sum(p.numel() for p in det.parameters()), "classes": list(DETECTOR_CLASSES),
                    "losses": losses, "seconds_data": round(data_s, 1),
                    "seconds": round(time.perf_counter() - start, 1)})
    return {k: v.detach().clone().float() for k, v in det.state_dict().items()}


# -- measuring -----------------------------------------------------------------------------------------------------
def as_detector(detector: Union[Detector, dict]) -> Detector:
    if isinstance(detector, Detector):
        return detector.eval()
    if isinstance(detector, dict):
        return from_state_dict(detector)
    raise TypeError(f"expected a Detector or its state dict, got {type(detector).__name__}")


def predict(detector: Union[Detector, dict], x: torch.Tensor) -> torch.Tensor:
    """Top class index per image (x: [B, 3, 32, 32] in -1..1)."""
    return probabilities(as_detector(detector), x).argmax(-1)


def confusion(y: torch.Tensor, pred: torch.Tensor, n: int = len(DETECTOR_CLASSES)) -> list:
    """Confusion matrix (rows: true class, columns: predicted class) as lists of counts."""
    m = torch.bincount(y.long() * n + pred.long(), minlength=n * n).view(n, n)
    return m.tolist()


def _per_class(conf: list) -> dict:
    return {c: (row[i] / sum(row) if sum(row) else float("nan")) for i, (c, row) in
            enumerate(zip(DETECTOR_CLASSES, conf))}


def accuracy(detector: Union[Detector, dict], x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(detector, x) == y).float().mean())


def evaluate_detector(detector: Union[Detector, dict], images_per_class: int = 500, seed: int = EVAL_SEED,
                      vae: VaeLike = None, n_hard: Optional[int] = None) -> dict:
    """Accuracy per class and the confusion matrix on held-out procedural images: ``images_per_class`` drawn
    images per class and, with a VAE, their round trips too (``per_class`` / ``confusion`` then pool both; the
    ``drawn`` and ``round_trip`` entries hold each alone). ``hard_negatives``: the share of ``n_hard`` held-out
    near-shapes (default: images_per_class) called none, per kind."""
    det = as_detector(detector)
    imgs, labels = data.make_dataset(images_per_class, seed, DETECTOR_CLASSES)
    x, y = data.to_tensor_range(imgs), torch.from_numpy(labels)
    parts = {"drawn": (x, y)}
    if vae is not None:
        parts["round_trip"] = (vae_round_trip(vae, x), y)
    out: dict = {"classes": list(DETECTOR_CLASSES), "images_per_class": images_per_class, "seed": seed}
    pooled_y, pooled_p = [], []
    for name, (xs, ys) in parts.items():
        pred = predict(det, xs)
        conf = confusion(ys, pred)
        out[name] = {"per_class": _per_class(conf), "confusion": conf, "accuracy": float((pred == ys).float().mean())}
        pooled_y.append(ys)
        pooled_p.append(pred)
    conf = confusion(torch.cat(pooled_y), torch.cat(pooled_p))
    out.update({"per_class": _per_class(conf), "confusion": conf, "n_per_class": images_per_class * len(parts)})
    hard, kinds = hard_negatives(images_per_class if n_hard is None else n_hard, seed + 1)
    if len(hard):
        hp = predict(det, data.to_tensor_range(hard)).numpy()
        out["hard_negatives"] = {
            "none_rate": float((hp == NONE_INDEX).mean()), "n": int(len(hard)),
            "per_kind": {k: float((hp[kinds == i] == NONE_INDEX).mean()) for i, k in enumerate(HARD_NEGATIVE_KINDS)
                         if (kinds == i).any()},
            "called": {c: int((hp == i).sum()) for i, c in enumerate(DETECTOR_CLASSES)}}
    return out
