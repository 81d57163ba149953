"""Which Stable Diffusion architecture a file's UNet tensors were made for, from their names and shapes alone (any
key style: diffusers, ldm, kohya, PEFT, ComfyUI-native). One home for this, used by the unlearned-model loader, the
LoRA loaders and appliers, the merge and AutoMemoRa, so every refusal names architectures the same way. Standard
library only; shapes are plain tuples."""

from __future__ import annotations

import re
from typing import Mapping, Optional

# Cross-attention width (the in-features of every attn2.to_k / to_v: the text encoder's output width) of the public
# Stable Diffusion UNets: what names a file's architecture from its shapes alone.
CONTEXT_WIDTHS = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL", 1280: "SDXL refiner"}
_ATTN2_KV = re.compile(r"attn2[._]to_[kv](?:[._]|$)")
_DOWN_FACTOR = re.compile(r"(lora_down|lora\.down|lora_A|_lora\.down)")
_UP_FACTOR = re.compile(r"(lora_up|lora\.up|lora_B|_lora\.up|\.alpha$)")
_DEEP_TRANSFORMER = re.compile(r"transformer_blocks[._]([1-9]\d*)[._]")
_FIRST_LEVEL_ATTENTION = re.compile(r"(down_blocks[._]0[._]attentions|input_blocks[._][12][._]1[._])")
_ATTENTION = re.compile(r"(attentions[._]\d|_blocks[._]\d+[._]1[._]transformer_blocks|middle_block[._]1[._])")
_ADM = re.compile(r"(^|[._])(add_embedding|label_emb)[._]")


def context_width(shapes: Mapping[str, tuple]) -> Optional[int]:
    """The cross-attention width a file's tensors were made for: the in-features of its attn2.to_k / to_v weights
    (full weights, or the down / lora_A factor of a LoRA); None when the file has none. Several widths: the most
    common one."""
    seen: dict[int, int] = {}
    for k, shape in shapes.items():
        if not _ATTN2_KV.search(k) or _UP_FACTOR.search(k) or len(shape) != 2:
            continue
        if k.endswith(".bias"):
            continue
        seen[int(shape[1])] = seen.get(int(shape[1]), 0) + 1
    return max(seen, key=lambda w: (seen[w], w)) if seen else None


# Flux transformers, in diffusers' names (transformer_blocks.N.attn.add_q_proj, single_transformer_blocks.N...) or
# BFL's / ComfyUI's (double_blocks.N.img_attn.qkv, single_blocks.N.linear1), any LoRA spelling.
_FLUX = re.compile(r"(^|[._])(single_transformer_blocks[._]\d+[._]|double_blocks[._]\d+[._]|single_blocks[._]\d+[._]"
                   r"|transformer_blocks[._]\d+[._]attn[._](add_[qkv]_proj|to_add_out))")
_FLUX_HIDDEN = re.compile(r"(to_[qkv]|add_[qkv]_proj|img_attn[._]proj|txt_attn[._]proj)")


def flux_architecture(shapes: Mapping[str, tuple]) -> Optional[str]:
    """'Flux (hidden size 3072)' when a file's tensors name Flux transformer blocks (hidden size: the in-features of
    an attention projection, or its LoRA down factor, when the file tells); None otherwise."""
    keys = [k for k in shapes if _FLUX.search(k)]
    if not keys:
        return None
    widths = sorted({int(s[1]) for k, s in shapes.items() if _FLUX_HIDDEN.search(k) and len(s) == 2
                     and not _UP_FACTOR.search(k) and not k.endswith(".bias")})
    return f"Flux (hidden size {widths[0]})" if len(widths) == 1 else "Flux"


def guess_architecture(shapes: Mapping[str, tuple]) -> Optional[str]:
    """Which Stable Diffusion architecture a file's UNet tensors (any key style: diffusers, ldm, kohya, PEFT,
    ComfyUI-native; {key: shape}) were made for, e.g. 'SD1.x (cross-attention width 768)'; None when nothing in
    them tells. The width names the public architectures (CONTEXT_WIDTHS); otherwise the layout does: more than one
    transformer block per attention, or SDXL's size embedding -> SDXL; attention at the first level -> SD1.x / SD2.x
    (a conv proj_in: SD1.x, a linear one: SD2.x); attention only at deeper levels -> SDXL."""
    flux = flux_architecture(shapes)
    if flux is not None:
        return flux
    width = context_width(shapes)
    keys = list(shapes)
    name = CONTEXT_WIDTHS.get(width) if width is not None else None
    if name is None:
        layout = _layout_family(keys, shapes)
        if layout is None:
            return None
        name = f"an {layout}-layout UNet"
    return name if width is None else f"{name} (cross-attention width {width})"


def _layout_family(keys: list[str], shapes: Mapping[str, tuple]) -> Optional[str]:
    if any(_DEEP_TRANSFORMER.search(k) or _ADM.search(k) for k in keys):
        return "SDXL"
    if any(_FIRST_LEVEL_ATTENTION.search(k) for k in keys):
        proj = [len(s) for k, s in shapes.items() if "proj_in" in k and not _UP_FACTOR.search(k)
                and (k.endswith("proj_in.weight") or _DOWN_FACTOR.search(k))]
        if proj and all(n == 4 for n in proj):
            return "SD1.x"
        if proj and all(n == 2 for n in proj) and any(k.endswith("proj_in.weight") for k in keys):
            return "SD2.x"
        return "SD1.x/SD2.x"
    if any(_ATTENTION.search(k) for k in keys):
        return "SDXL"
    return None


def made_for_text(shapes: Mapping[str, tuple], base: str = "") -> str:
    """' It was made for X; the base checkpoint is Y.' (or the part that is known; '' when neither is)."""
    made = guess_architecture(shapes)
    parts = []
    if made:
        parts.append(f"it was made for {made}")
    if base:
        parts.append(f"the base checkpoint is {base}")
    text = "; ".join(parts)
    return f" {text[0].upper()}{text[1:]}." if text else ""
