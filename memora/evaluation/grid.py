"""A captioned comparison grid: the same prompt and seed under several models, side by side.

One column per model (its label on top: original | unlearned | recovered), one row per image index of the batches
(image i of every batch comes from the same prompt and noise), a caption above. The MemoRa Comparison Grid node and
memora-batch's report.html both draw their grids here (PIL; no ComfyUI)."""

from __future__ import annotations

import textwrap
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ImageLike = Union[Image.Image, np.ndarray]

MAX_COLUMNS = 4
MIN_COLUMNS = 2
PAD = 6
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


class GridInputError(ValueError):
    """Columns, labels or images a comparison grid cannot be drawn from."""


def to_pil(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a PIL image or an H x W (x C) array (float in 0..1, or uint8)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4) or a.shape[0] < 1 or a.shape[1] < 1:
        raise GridInputError(f"an image must be H x W x C with C = 1, 3 or 4, got shape {tuple(a.shape)}")
    if a.dtype != np.uint8:
        a = np.asarray(a, dtype=np.float64)
        if not np.all(np.isfinite(a)):
            raise GridInputError("an image holds NaN or infinite values")
        a = np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(a[..., :3]), "RGB")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _fit(image: Image.Image, cell: int) -> Image.Image:
    """The image scaled to fit a cell x cell square (nearest neighbour when enlarging: small images stay crisp)."""
    w, h = image.size
    scale = cell / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(size, Image.NEAREST if scale >= 1 else Image.LANCZOS)


def _text_height(draw: ImageDraw.ImageDraw, font, text: str) -> int:
    box = draw.multiline_textbbox((0, 0), text or " ", font=font)
    return box[3] - box[1]


def check_columns(columns: Sequence[tuple[str, Sequence[ImageLike]]]) -> None:
    if not (MIN_COLUMNS <= len(columns) <= MAX_COLUMNS):
        raise GridInputError(f"a comparison grid takes {MIN_COLUMNS} to {MAX_COLUMNS} image batches, got "
                             f"{len(columns)}")
    for i, (label, images) in enumerate(columns, start=1):
        if not isinstance(label, str):
            raise GridInputError(f"column {i}: the label must be text, got {type(label).__name__}")
        if len(images) == 0:
            raise GridInputError(f"column {i} ({label!r}) has no images")


def comparison_grid(columns: Sequence[tuple[str, Sequence[ImageLike]]], caption: str = "", rows: int = 4,
                    cell: int = 192, row_labels: Sequence[str] = ()) -> Image.Image:
    """The grid as an RGB PIL image: ``columns`` = [(label, images)], 2 to 4 of them; the first ``rows`` images of
    each (fewer when a batch is shorter: every row has an image in every column); ``row_labels[i]`` on the left of
    row i (default 'image i'); ``caption`` wrapped above, followed by a line saying how many images are shown."""
    check_columns(columns)
    if int(rows) < 1 or int(cell) < 8:
        raise GridInputError(f"rows must be >= 1 and the cell size >= 8 pixels, got rows={rows}, cell={cell}")
    rows, cell = int(rows), int(cell)
    available = min(len(images) for _, images in columns)
    shown = min(rows, available)
    longest = max(len(images) for _, images in columns)
    font = _font(max(12, cell // 10))
    small = _font(max(11, cell // 14))
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = [str(row_labels[i]) if i < len(row_labels) else f"image {i}" for i in range(shown)]
    label_w = max(scratch.textbbox((0, 0), t, font=small)[2] for t in labels) + 2 * PAD
    width = label_w + len(columns) * (cell + PAD) + PAD
    note = (f"image 0-{shown - 1} of each batch" if shown > 1 else "image 0 of each batch") + \
        (f" (of {longest})" if longest > shown else "")
    chars = max(20, int(width / max(1, scratch.textbbox((0, 0), "n", font=small)[2])))
    text = "\n".join(textwrap.fill(part, chars) for part in [caption.strip(), note] if part)
    caption_h = _text_height(scratch, small, text) + 2 * PAD
    header_h = max(_text_height(scratch, font, lbl) for lbl, _ in columns) + 2 * PAD
    height = caption_h + header_h + shown * (cell + PAD) + PAD
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.multiline_text((PAD, PAD), text, fill=INK, font=small)
    for j, (label, images) in enumerate(columns):
        x = label_w + j * (cell + PAD)
        tw = draw.textbbox((0, 0), label, font=font)[2]
        draw.text((x + max(0, (cell - tw) // 2), caption_h + PAD // 2), label, fill=INK, font=font)
        for i in range(shown):
            tile = _fit(to_pil(images[i]), cell)
            y = caption_h + header_h + i * (cell + PAD)
            canvas.paste(tile, (x + (cell - tile.width) // 2, y + (cell - tile.height) // 2))
    for i, lbl in enumerate(labels):
        y = caption_h + header_h + i * (cell + PAD) + cell // 2
        draw.text((PAD, y), lbl, fill=INK, font=small, anchor="lm")
    return canvas
