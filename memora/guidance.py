"""AutoMemoRa: guidance between an unlearned model ("bad") and the same model plus its MemoRa LoRA ("main").

    eps = eps_bad + w * (eps_main - eps_bad)

where each side is itself a classifier-free-guided prediction. w = 0 gives the bad side, w = 1 the main side (both
returned exactly, not through the formula, so they reproduce plain sampling bit for bit), w > 1 pushes past the main
side. With main = "lora" the push is toward the recovered concept; with main = "unlearned" the roles swap and it
pushes away from it. Because eps = (x - x0) / sigma is affine in x0 and the two weights sum to 1, the same
combination is valid on denoised (x0) predictions, which is what ComfyUI's guiders return.

The two sides share ONE copy of the model weights: the LoRA is added to a weight only while a switch is on
(``LoraSwitch``/``SwitchableDelta`` below, installed as per-layer weight functions by the host). This module is torch
only; the ComfyUI host (nodes/automemora.py) maps layers to the model's weights and drives the switch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

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


@dataclass
class LoraSwitch:
    """Shared on/off state of every LoRA weight function of one guider, with per-layer call counts.

    ``calls[key]`` counts how often the layer's function ran while the switch was on: the host compares counts
    before and after a LoRA-on forward to prove that every installed delta was applied (some ComfyUI loading modes
    skip weight functions silently)."""

    on: bool = False
    calls: dict = field(default_factory=dict)

    def snapshot(self) -> dict:
        return dict(self.calls)

    def not_run_since(self, before: dict) -> list:
        """Keys whose function did not run (while on) since ``before`` was taken."""
        return sorted(k for k, n in self.calls.items() if n == before.get(k, 0))


class SwitchableDelta:
    """A weight function ``weight -> weight + scale * (up @ down)`` that acts only while its switch is on.

    The input weight is never modified in place (it can be the model's own cached tensor). The delta is rebuilt
    from the low-rank factors at each call (cheap next to the layer's own forward, and no dense copy of every delta
    is kept in memory); the arithmetic mirrors ComfyUI's LoRA patching, (scale * mm(up, down)) added in fp32, so a
    LoRA applied this way equals the same LoRA applied with LoraLoader bit for bit on fp32 weights."""

    def __init__(self, key: str, down: torch.Tensor, up: torch.Tensor, scale: float, switch: LoraSwitch):
        if down.shape[0] != up.shape[1]:
            raise ValueError(f"{key}: down has rank {down.shape[0]} but up has rank {up.shape[1]}")
        self.key = key
        self.down = down.detach().flatten(start_dim=1).to(torch.float32)
        self.up = up.detach().flatten(start_dim=1).to(torch.float32)
        self.scale = float(scale)
        self.switch = switch
        self._device_copies: dict = {}
        switch.calls.setdefault(key, 0)

    @property
    def shape(self) -> tuple:
        return (self.up.shape[0], self.down.shape[1])

    def _factors(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        k = str(device)
        f = self._device_copies.get(k)
        if f is None:
            f = (self.up.to(device), self.down.to(device))
            self._device_copies[k] = f
        return f

    def delta(self, shape, device) -> torch.Tensor:
        up, down = self._factors(device)
        return ((1.0 * self.scale) * torch.mm(up, down)).reshape(shape)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.switch.on:
            return weight
        self.switch.calls[self.key] = self.switch.calls.get(self.key, 0) + 1
        out = weight.to(torch.float32) + self.delta(weight.shape, weight.device)
        return out.to(weight.dtype)


def run_with_lora(switch: LoraSwitch, on: bool, fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, list]:
    """Run ``fn`` with the LoRA switched ``on`` (or off); return its result and, when on, the layers whose delta
    did not run during the call (should be empty). The switch is always left off."""
    before = switch.snapshot() if on else None
    switch.on = on
    try:
        out = fn()
    finally:
        switch.on = False
    return out, (switch.not_run_since(before) if on else [])
