"""Applying a LoRA to a model's weights, the ComfyUI-free half: layer names, the ldm -> diffusers module map, the
delta formula, the one weight wrapper and its call counter, and the error raised when a wrapper did not run.

The ComfyUI half (key maps read from a MODEL or CLIP, ``apply_lora`` through ComfyUI's LoRA patches, installing
wrappers on a ModelPatcher, saving and announcing a LoRA file) is ``nodes/_lora_host.py``; every LoRA the pack puts
on a ComfyUI model goes through one of the two.

The delta of one layer, everywhere in the pack (training, the guider, the formats module)::

    delta W = (alpha / rank) * up.flatten(1) @ down.flatten(1), reshaped like the module weight

computed in fp32. A wrapper adds it to the weight in fp32 and casts the sum back to the weight's dtype, as ComfyUI's
own LoRA patching does, so a LoRA applied by a wrapper equals the same LoRA applied by LoraLoader (bit for bit on
fp32 weights). Torch only: no ComfyUI import."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

import torch

# Every per-layer key suffix a LoRA file may carry (kohya, lycoris, ComfyUI-native, DoRA, full diffs): the layer's
# name is the key without it.
LAYER_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".lora_mid.weight", ".alpha", ".dora_scale", ".diff",
                  ".diff_b", ".set_weight", ".reshape_weight", ".w_norm", ".b_norm", ".lora_A.weight",
                  ".lora_B.weight")
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder")
# the diffusers spelling kept when ComfyUI names one ldm module twice (see module_map)
PREFERRED_DIFFUSERS_PREFIXES = ("add_embedding.",)


class LoraKeyError(ValueError):
    """LoRA layers that match no weight of the model they are applied to."""


class LoraNotAppliedError(RuntimeError):
    """LoRA weight wrappers that did not run during a forward pass: the LoRA would silently be missing."""


def layer_names(keys: Iterable[str]) -> list[str]:
    """The sorted layer names of a LoRA's keys (each key less its suffix from ``LAYER_SUFFIXES``)."""
    names = set()
    for k in keys:
        for suffix in LAYER_SUFFIXES:
            if k.endswith(suffix):
                names.add(k[: -len(suffix)])
                break
        else:
            names.add(k)
    return sorted(names)


def is_text_encoder_layer(name: str) -> bool:
    return name.startswith(TEXT_ENCODER_PREFIXES)


def module_map(diffusers_to_ldm_keys: Mapping[str, str]) -> dict[str, str]:
    """ldm module path -> diffusers module path, from a diffusers -> ldm WEIGHT-key map (what
    ``comfy.utils.unet_to_diffusers`` returns): 'input_blocks.1.1.transformer_blocks.0.attn1.to_q' ->
    'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q'. Only .weight / .bias pairs are modules.

    Deterministic: where the map names one ldm module under two diffusers names (ComfyUI lists SDXL's
    ``label_emb.0.0``/``.2`` as both ``class_embedding.linear_1/2`` and ``add_embedding.linear_1/2``, from a set whose
    order follows PYTHONHASHSEED), the name in ``PREFERRED_DIFFUSERS_PREFIXES`` wins (``add_embedding``: the
    diffusers SDXL UNet's), else the alphabetically first."""
    out: dict[str, str] = {}
    for diff_key, ldm_key in sorted(diffusers_to_ldm_keys.items()):
        for suffix in (".weight", ".bias"):
            if diff_key.endswith(suffix) and ldm_key.endswith(suffix):
                ldm, diff = ldm_key[: -len(suffix)], diff_key[: -len(suffix)]
                if ldm not in out or (diff.startswith(PREFERRED_DIFFUSERS_PREFIXES)
                                      and not out[ldm].startswith(PREFERRED_DIFFUSERS_PREFIXES)):
                    out[ldm] = diff
                break
    return out


def lora_delta(up: torch.Tensor, down: torch.Tensor, scale: float, shape) -> torch.Tensor:
    """THE delta formula: ``scale * up.flatten(1) @ down.flatten(1)`` reshaped to ``shape``, in the factors' dtype
    (callers pass fp32 factors). Differentiable (training passes its parameters)."""
    return ((up.flatten(1) @ down.flatten(1)) * scale).reshape(tuple(shape))


@dataclass
class CallCounter:
    """How often each installed wrapper ran (while applied), by key: proves that every LoRA layer was used."""

    calls: dict = field(default_factory=dict)

    def snapshot(self) -> dict:
        return dict(self.calls)

    def not_run_since(self, before: Optional[dict] = None) -> list:
        """Keys whose wrapper did not run since ``before`` was taken (since installation when None)."""
        before = before or {}
        return sorted(k for k, n in self.calls.items() if n == before.get(k, 0))

    def check(self, before: Optional[dict], context: str) -> None:
        """LoraNotAppliedError when some wrapper did not run since ``before``."""
        idle = self.not_run_since(before)
        if idle:
            raise LoraNotAppliedError(
                f"{context}: the LoRA was not applied to {len(idle)} of {len(self.calls)} LoRA layers during the "
                f"forward pass (their weight wrappers did not run; first: {idle[:3]}). This happens with ComfyUI's "
                f"dynamic VRAM loading (0.33+ on NVIDIA GPUs), which skips weight wrappers on small layers: restart "
                f"ComfyUI with --disable-dynamic-vram. Refusing to go on with a silently missing LoRA.")


@dataclass
class LoraSwitch:
    """An on/off state shared by wrappers: they add their delta only while it is on (AutoMemoRa's two sides)."""

    on: bool = False


class LoraWeightWrapper:
    """The one LoRA weight wrapper (a ComfyUI weight function): ``W -> (W.float() + delta).to(W.dtype)`` with the
    layer's delta (:func:`lora_delta`), counted in ``counter`` under ``key``; with a ``switch``, only while it is on.

    ``layer`` is anything with ``up``, ``down`` and ``scale`` (a trainable ``LoRALayerParams`` or a file's
    ``LoraLayer``). Trainable factors are used as they are (the delta carries their gradient); fixed factors are
    kept as fp32 copies per device. The input weight is never modified in place."""

    def __init__(self, key: str, layer, counter: CallCounter, switch: Optional[LoraSwitch] = None):
        if layer.down.shape[0] != layer.up.shape[1]:
            raise ValueError(f"{key}: down has rank {layer.down.shape[0]} but up has rank {layer.up.shape[1]}")
        self.key = key
        self.layer = layer
        self.counter = counter
        self.switch = switch
        self._copies: dict = {}
        counter.calls.setdefault(key, 0)

    def _factors(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        up, down = self.layer.up, self.layer.down
        if up.requires_grad or down.requires_grad:
            return up.to(device=device, dtype=torch.float32), down.to(device=device, dtype=torch.float32)
        k = str(device)
        if k not in self._copies:
            self._copies[k] = (up.detach().to(device=device, dtype=torch.float32),
                               down.detach().to(device=device, dtype=torch.float32))
        return self._copies[k]

    def delta(self, shape, device) -> torch.Tensor:
        up, down = self._factors(device)
        with torch.autocast(device_type=torch.device(device).type, enabled=False):
            return lora_delta(up, down, float(self.layer.scale), shape)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        if self.switch is not None and not self.switch.on:
            return weight
        self.counter.calls[self.key] = self.counter.calls.get(self.key, 0) + 1
        return (weight.to(torch.float32) + self.delta(weight.shape, weight.device)).to(weight.dtype)


class SlicedLoraWrapper:
    """LoRA deltas on row blocks of ONE weight (a ComfyUI weight function), for fused weights whose parts carry their
    own LoRAs: Flux's ``img_attn.qkv`` holds diffusers' to_q / to_k / to_v as rows [0, h), [h, 2h), [2h, 3h).
    ``parts``: (first row, row count, layer) each; rows no part covers are unchanged. The sum is formed as
    :class:`LoraWeightWrapper` forms it (fp32, cast back to the weight's dtype), so it equals ComfyUI's own patching
    of the same LoRA (which narrows the weight to each part's rows), counted in ``counter`` under ``key``."""

    def __init__(self, key: str, parts, counter: CallCounter, switch: Optional[LoraSwitch] = None):
        self.key = key
        self.parts = sorted(((int(s), int(n), layer) for s, n, layer in parts), key=lambda p: p[0])
        end = 0
        for start, n, layer in self.parts:
            if start < end:
                raise ValueError(f"{key}: LoRA row blocks overlap at row {start}")
            if layer.down.shape[0] != layer.up.shape[1]:
                raise ValueError(f"{key}: down has rank {layer.down.shape[0]} but up has rank {layer.up.shape[1]}")
            end = start + n
        self.switch = switch
        self.counter = counter
        self._wrappers = [LoraWeightWrapper(f"{key}[{s}:{s + n}]", layer, CallCounter()) for s, n, layer in self.parts]
        counter.calls.setdefault(key, 0)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        if self.switch is not None and not self.switch.on:
            return weight
        self.counter.calls[self.key] = self.counter.calls.get(self.key, 0) + 1
        if self.parts[-1][0] + self.parts[-1][1] > weight.shape[0]:
            raise ValueError(f"{self.key}: LoRA rows up to {self.parts[-1][0] + self.parts[-1][1]} exceed the "
                             f"weight's {weight.shape[0]} rows")
        pieces, row = [], 0
        w = weight.to(torch.float32)
        for (start, n, _layer), wrapper in zip(self.parts, self._wrappers):
            if start > row:
                pieces.append(w[row:start])
            pieces.append(w[start:start + n] + wrapper.delta((n, *weight.shape[1:]), weight.device))
            row = start + n
        if row < weight.shape[0]:
            pieces.append(w[row:])
        return torch.cat(pieces, dim=0).to(weight.dtype)
