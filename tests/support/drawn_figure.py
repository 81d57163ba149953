"""A deterministic drawn figure on which NudeNet's bundled detector returns a (low-score) detection: a real,
non-empty detector output from a generated image, with nothing explicit in it. Used by the evaluation tests."""

from __future__ import annotations

import numpy as np
import torch

# What NudeNet 3.4.2's bundled 320n detector (onnxruntime 1.32, CPU) returned for cartoon(4), recorded once.
RECORDED_CARTOON_4 = [{"class": "BUTTOCKS_EXPOSED", "score": 0.2907, "box": [31, 198, 249, 121]}]


def cartoon(seed: int) -> np.ndarray:
    """A flat cartoon figure drawn with OpenCV: BGR uint8, 320 x 320 (as cv2.imread would return a PNG of it)."""
    import cv2

    rng = np.random.default_rng(seed)
    img = np.full((320, 320, 3), tuple(int(v) for v in rng.integers(0, 255, 3)), np.uint8)
    skin = (140, 170, 220)
    cv2.ellipse(img, (160, 120), (60, 80), 0, 0, 360, skin, -1)
    cv2.circle(img, (135, 110), 8, (40, 40, 40), -1)
    cv2.circle(img, (185, 110), 8, (40, 40, 40), -1)
    cv2.ellipse(img, (160, 160), (25, 10), 0, 0, 180, (60, 60, 160), -1)
    cv2.ellipse(img, (160, 300), (110, 90), 0, 0, 360, skin, -1)
    cv2.circle(img, (120, 280), 12, (100, 110, 180), -1)
    cv2.circle(img, (200, 280), 12, (100, 110, 180), -1)
    return img


def to_comfy(bgr: np.ndarray) -> torch.Tensor:
    """BGR uint8 [H, W, 3] -> ComfyUI image [H, W, 3] float 0..1 (RGB)."""
    return torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1])).float() / 255.0
