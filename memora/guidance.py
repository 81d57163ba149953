"""AutoMemoRa: guidance between an unlearned model ("bad") and the same model plus its MemoRa LoRA ("main").

    eps = eps_bad + w * (eps_main - eps_bad)

where each side is itself a classifier-free-guided prediction. w = 0 gives the bad side, w = 1 the main side (both
returned exactly, not through the formula, so they reproduce plain sampling bit for bit), w > 1 pushes past the main
side. With main = "lora" the push is toward the recovered concept; with main = "unlearned" the roles swap and it
pushes away from it. Because eps = (x - x0) / sigma is affine in x0 and the two weights sum to 1, the same
combination is valid on denoised (x0) predictions, which is what ComfyUI's guiders return.

The two sides share ONE copy of the model weights: the LoRA is added to a weight only while a switch is on
(``memora.lora.apply.LoraSwitch`` and ``LoraWeightWrapper``, installed as per-layer weight functions by the host). This module is torch
only; the ComfyUI host (nodes/automemora.py) maps layers to the model's weights and drives the switch.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from memora.lora.apply import CallCounter, LoraSwitch

MAIN_ROLES = ("lora", "unlearned")


def check_role(main: str) -> str:
    if main not in MAIN_ROLES:
        raise ValueError(f"main must be one of {list(MAIN_ROLES)} (the side the guidance pushes toward), got {main!r}")
    return main


def lora_on_side(main: str) -> tuple[bool, bool]:
    """(LoRA on for the bad side, LoRA on for the main side) for a ``main`` role."""
    check_role(main)
    return (main == "unlearned", main == "lora")


def needed_sides(w: float) -> tuple[bool, bool]:
    """Which predictions the combination needs: (bad, main). w = 0 needs only bad, w = 1 only main."""
    w = float(w)
    return (w != 1.0, w != 0.0)


def combine(bad: torch.Tensor | None, main: torch.Tensor | None, w: float) -> torch.Tensor:
    """bad + w * (main - bad); exactly ``bad`` at w = 0 and exactly ``main`` at w = 1 (no rounding)."""
    w = float(w)
    if w == 0.0:
        if bad is None:
            raise ValueError("w = 0 needs the bad prediction")
        return bad
    if w == 1.0:
        if main is None:
            raise ValueError("w = 1 needs the main prediction")
        return main
    if bad is None or main is None:
        raise ValueError("w outside {0, 1} needs both predictions")
    return bad + w * (main - bad)


def run_with_lora(switch: LoraSwitch, counter: CallCounter, on: bool,
                  fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, Optional[dict]]:
    """Run ``fn`` with the LoRA switched ``on`` (or off); return its result and, when on, the wrappers' call counts
    from before the call (to check with ``counter.check``), else None. The switch is always left off."""
    before = counter.snapshot() if on else None
    switch.on = on
    try:
        out = fn()
    finally:
        switch.on = False
    return out, before
