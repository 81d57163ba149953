"""Flux LoRAs (torch only, no ComfyUI): which layers MemoRa trains, their sizes, and the file formats.

Layers are named by diffusers' ``FluxTransformer2DModel`` module paths, the names diffusers, ai-toolkit and
EraseAnything write and ComfyUI's LoRA loader reads (``comfy.utils.flux_to_diffusers`` maps them onto ComfyUI's fused
weights: ``transformer_blocks.N.attn.to_q`` is rows [0, h) of ``double_blocks.N.img_attn.qkv``, ...):

- double (MM-DiT) blocks ``transformer_blocks.N``: image-stream attention ``attn.to_q / to_k / to_v / to_out.0``,
  text-stream attention ``attn.add_q_proj / add_k_proj / add_v_proj / to_add_out``, feed-forwards ``ff.net.0.proj,
  ff.net.2, ff_context.net.0.proj, ff_context.net.2``, modulations ``norm1.linear, norm1_context.linear``;
- single blocks ``single_transformer_blocks.N``: ``attn.to_q / to_k / to_v`` (rows of ComfyUI's ``linear1``),
  ``proj_mlp`` (the MLP rows of ``linear1``), ``proj_out`` (``linear2``: attention output and MLP output together),
  ``norm.linear``.

Targets (the training recipe's ``targets``): ``attention`` = the attention projections of both block kinds (8 per
double block, 3 per single block: a single block's output projection ``proj_out`` also carries its MLP, so it is
not an attention layer); ``attention+feedforward`` adds the feed-forwards (and ``proj_mlp``, ``proj_out``); ``all
linear+conv`` adds the modulations.

The pack's LORA_MODEL for Flux is the diffusers/PEFT state dict (``transformer.<module>.lora_A.weight`` [r, in],
``.lora_B.weight`` [out, r], the scale alpha / r folded into lora_B, as diffusers' ``save_lora_weights`` writes it):
the one format both ComfyUI's LoraLoader and diffusers' ``FluxPipeline.load_lora_weights`` read in full."""

from __future__ import annotations

import re
from typing import Mapping

import torch

from .formats import LoraFormatError, LoraLayer, kohya_layers

DOUBLE_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                    "attn.add_v_proj", "attn.to_add_out")
SINGLE_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v")
DOUBLE_FEEDFORWARD = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
SINGLE_FEEDFORWARD = ("proj_mlp", "proj_out")
DOUBLE_MODULATION = ("norm1.linear", "norm1_context.linear")
SINGLE_MODULATION = ("norm.linear",)
DOUBLE, SINGLE = "transformer_blocks", "single_transformer_blocks"
PEFT_PREFIX = "transformer."

# Flux.1 dev / schnell (BFL's released configuration; the same numbers as diffusers' FluxTransformer2DModel config:
# 19 double, 38 single blocks, 24 heads of 128, MLP ratio 4, T5 context 4096, CLIP pooled 768, 64 packed channels)
FLUX_DEV = dict(hidden_size=3072, num_heads=24, depth=19, depth_single_blocks=38, mlp_ratio=4.0, context_in_dim=4096,
                vec_in_dim=768, in_channels=64, guidance_embed=True)

_BLOCK_RE = re.compile(rf"^({SINGLE}|{DOUBLE})\.(\d+)\.(.+)$")
_ATTENTION_FF = "attention+feedforward"


def block_leaves(kind: str, targets: str) -> tuple[str, ...]:
    """The module names inside one block of ``kind`` (DOUBLE or SINGLE) that ``targets`` selects."""
    from .recipe import ALL_LINEAR_CONV, ATTENTION, TARGETS

    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {list(TARGETS)}, got {targets!r}")
    double = kind == DOUBLE
    out = DOUBLE_ATTENTION if double else SINGLE_ATTENTION
    if targets != ATTENTION:
        out += DOUBLE_FEEDFORWARD if double else SINGLE_FEEDFORWARD
    if targets == ALL_LINEAR_CONV:
        out += DOUBLE_MODULATION if double else SINGLE_MODULATION
    return out


def is_target(module: str, targets: str) -> bool:
    """Whether the Flux module (diffusers path, no prefix) gets a LoRA under ``targets``."""
    m = _BLOCK_RE.match(module)
    return bool(m) and m.group(3) in block_leaves(m.group(1), targets)


def block_module_shapes(hidden_size: int, depth: int, depth_single_blocks: int, mlp_ratio: float = 4.0,
                        **_ignored) -> dict[str, tuple[int, int]]:
    """{diffusers module path: (out, in)} of every Linear layer in the blocks of a Flux transformer of that size."""
    h, m = int(hidden_size), int(hidden_size * mlp_ratio)
    double = {**{leaf: (h, h) for leaf in DOUBLE_ATTENTION}, "ff.net.0.proj": (m, h), "ff.net.2": (h, m),
              "ff_context.net.0.proj": (m, h), "ff_context.net.2": (h, m), "norm1.linear": (6 * h, h),
              "norm1_context.linear": (6 * h, h)}
    single = {**{leaf: (h, h) for leaf in SINGLE_ATTENTION}, "proj_mlp": (m, h), "proj_out": (h, h + m),
              "norm.linear": (3 * h, h)}
    out = {}
    for i in range(int(depth)):
        out.update({f"{DOUBLE}.{i}.{leaf}": s for leaf, s in double.items()})
    for i in range(int(depth_single_blocks)):
        out.update({f"{SINGLE}.{i}.{leaf}": s for leaf, s in single.items()})
    return out


def lora_size(config: Mapping, targets: str, rank: int) -> dict:
    """Layer and parameter counts of a LoRA of ``rank`` on the ``targets`` of a Flux transformer of ``config`` (e.g.
    FLUX_DEV): {'layers', 'params', 'frozen_block_params'}; each layer has rank * (in + out) parameters."""
    shapes = block_module_shapes(**config)
    chosen = {k: s for k, s in shapes.items() if is_target(k, targets)}
    return {"layers": len(chosen), "params": sum(int(rank) * (o + i) for o, i in chosen.values()),
            "frozen_block_params": sum(o * i + o for o, i in shapes.values())}


# -- names ---------------------------------------------------------------------------------------------------------
_LEAF_TABLE = {leaf.replace(".", "_"): leaf for leaf in set(DOUBLE_ATTENTION + SINGLE_ATTENTION + DOUBLE_FEEDFORWARD
                                                            + SINGLE_FEEDFORWARD + DOUBLE_MODULATION
                                                            + SINGLE_MODULATION)}
_LEAVES = frozenset(_LEAF_TABLE.values())
_KOHYA_FLUX_RE = re.compile(rf"^(?:lora_unet_|lora_transformer_|lycoris_)({SINGLE}|{DOUBLE})_(\d+)_(.+)$")


def kohya_name_to_module(name: str) -> str | None:
    """'lora_unet_single_transformer_blocks_3_attn_to_q' (a diffusers Flux module in kohya spelling, as the pack's
    formats module or OneTrainer write it) -> 'single_transformer_blocks.3.attn.to_q'; None when not such a name."""
    m = _KOHYA_FLUX_RE.match(name)
    if not m or m.group(3) not in _LEAF_TABLE:
        return None
    return f"{m.group(1)}.{m.group(2)}.{_LEAF_TABLE[m.group(3)]}"


def is_flux_module(module: str) -> bool:
    """A diffusers Flux block module path (no prefix) whose layer this module knows."""
    m = _BLOCK_RE.match(module)
    return bool(m) and m.group(3) in _LEAVES


def flux_layers(sd: Mapping[str, torch.Tensor], alpha=None) -> dict[str, LoraLayer]:
    """{diffusers module path: LoraLayer} of a Flux LoRA in diffusers/PEFT keys (``transformer.<module>.lora_A`` /
    ``lora_B``, with or without the ``transformer.`` prefix, optional ``.alpha``) or kohya keys naming diffusers
    modules (``lora_unet_`` / ``lora_transformer_`` / ``lycoris_`` + underscored path). LoraFormatError naming the
    keys that are neither. ``alpha``: for PEFT files, which carry none (see ``formats.to_kohya``)."""
    from .formats import to_kohya

    kohya = to_kohya(dict(sd), alpha=alpha)
    out: dict[str, LoraLayer] = {}
    unknown = []
    for name, layer in kohya_layers(kohya).items():
        module = kohya_name_to_module(name)
        if module is None:
            unknown.append(name)
        else:
            out[module] = layer
    if unknown:
        raise LoraFormatError(f"{len(unknown)} LoRA layers name no Flux transformer block module "
                              f"({DOUBLE}.N.* / {SINGLE}.N.* in diffusers' names): {sorted(unknown)[:5]}")
    return out


def is_flux_lora(sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether every layer of a LoRA state dict names a diffusers Flux block module (see :func:`flux_layers`)."""
    try:
        return bool(flux_layers(sd))
    except (LoraFormatError, ValueError):
        return False


def to_diffusers(layers: Mapping[str, LoraLayer]) -> dict[str, torch.Tensor]:
    """{diffusers module path: LoraLayer} -> the diffusers/PEFT Flux state dict (``transformer.<module>.lora_A.weight``
    / ``.lora_B.weight``), the scale alpha / r folded into lora_B in fp32 (the weight delta is unchanged; such files
    carry no alpha: diffusers and ComfyUI then use scale 1)."""
    out: dict[str, torch.Tensor] = {}
    for module in sorted(layers):
        if not is_flux_module(module):
            raise LoraFormatError(f"{module!r} is not a Flux transformer block module")
        layer = layers[module]
        up = layer.up.to(torch.float32) * layer.scale if layer.scale != 1.0 else layer.up
        out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = layer.down.contiguous()
        out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = up.to(layer.up.dtype).contiguous()
    return out


def kohya_to_flux_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A kohya state dict whose layers name diffusers Flux modules (e.g. a merge of Flux LoRAs) -> the Flux
    LORA_MODEL (:func:`to_diffusers`)."""
    return to_diffusers(flux_layers(sd))


# -- sd-scripts (kohya) Flux files: ComfyUI's fused layers -------------------------------------------------------
# ComfyUI / BFL module (fused) <- the diffusers modules it holds, in row order, each `hidden` rows
# (the single block's linear1 ends with the MLP's mlp_ratio * hidden rows, proj_mlp).
_FUSED = {
    (DOUBLE, "img_attn.qkv"): ("attn.to_q", "attn.to_k", "attn.to_v"),
    (DOUBLE, "txt_attn.qkv"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    (SINGLE, "linear1"): ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
}
_RENAMED = {(DOUBLE, "attn.to_out.0"): "img_attn.proj", (DOUBLE, "attn.to_add_out"): "txt_attn.proj",
            (DOUBLE, "ff.net.0.proj"): "img_mlp.0", (DOUBLE, "ff.net.2"): "img_mlp.2",
            (DOUBLE, "ff_context.net.0.proj"): "txt_mlp.0", (DOUBLE, "ff_context.net.2"): "txt_mlp.2",
            (DOUBLE, "norm1.linear"): "img_mod.lin", (DOUBLE, "norm1_context.linear"): "txt_mod.lin",
            (SINGLE, "proj_out"): "linear2", (SINGLE, "norm.linear"): "modulation.lin"}
_BFL_BLOCK = {DOUBLE: "double_blocks", SINGLE: "single_blocks"}


def to_kohya_bfl(layers: Mapping[str, LoraLayer], hidden_size: int, mlp_ratio: float = 4.0) -> dict[str, torch.Tensor]:
    """{diffusers module path: LoraLayer} -> kohya sd-scripts' Flux LoRA keys on the original (BFL/ComfyUI) modules
    (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``lora_up`` / ``alpha``), exactly: the LoRAs of
    the parts of a fused weight (to_q, to_k, to_v [, proj_mlp]) become one layer of the summed rank with the downs
    stacked and the ups block-diagonal (rows of parts without a LoRA stay zero), alpha = that rank (scale 1), the
    parts' scales folded into the up rows."""
    h, mlp = int(hidden_size), int(hidden_size * mlp_ratio)
    groups: dict[tuple[str, int, str], dict[str, LoraLayer]] = {}
    out: dict[str, torch.Tensor] = {}
    for module, layer in sorted(layers.items()):
        m = _BLOCK_RE.match(module)
        if not m:
            raise LoraFormatError(f"{module!r} is not a Flux transformer block module")
        kind, idx, leaf = m.group(1), int(m.group(2)), m.group(3)
        fused = next((f for (k, f), parts in _FUSED.items() if k == kind and leaf in parts), None)
        if fused is not None:
            groups.setdefault((kind, idx, fused), {})[leaf] = layer
            continue
        if (kind, leaf) not in _RENAMED:
            raise LoraFormatError(f"{module!r} has no sd-scripts Flux name")
        _put(out, f"lora_unet_{_BFL_BLOCK[kind]}_{idx}_{_RENAMED[(kind, leaf)].replace('.', '_')}",
             layer.down.to(torch.float32), layer.up.to(torch.float32) * layer.scale)
    for (kind, idx, fused), parts in sorted(groups.items()):
        order = _FUSED[(kind, fused)]
        rows = [mlp if leaf == "proj_mlp" else h for leaf in order]
        downs, ups, col = [], [], 0
        rank = sum(p.rank for p in parts.values())
        for leaf, n in zip(order, rows):
            p = parts.get(leaf)
            block = torch.zeros(n, rank)
            if p is not None:
                block[:, col:col + p.rank] = p.up.to(torch.float32).flatten(1) * p.scale
                downs.append(p.down.to(torch.float32).flatten(1))
                col += p.rank
            ups.append(block)
        _put(out, f"lora_unet_{_BFL_BLOCK[kind]}_{idx}_{fused.replace('.', '_')}", torch.cat(downs), torch.cat(ups))
    return out


def _put(out: dict, name: str, down: torch.Tensor, up: torch.Tensor) -> None:
    out[f"{name}.lora_down.weight"] = down.contiguous()
    out[f"{name}.lora_up.weight"] = up.contiguous()
    out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]), dtype=torch.float32)
