"""LoRA state-dict formats: detection, and conversion to and from the kohya SD convention (the pack's LORA_MODEL).

The pack's LORA_MODEL is a plain ``dict[str, Tensor]`` in kohya SD format::

    lora_unet_<diffusers module path, '.' -> '_'>.lora_down.weight   Linear [r, in];  Conv [r, in, kh, kw]
    lora_unet_<...>.lora_up.weight                                   Linear [out, r]; Conv [out, r, 1, 1]
    lora_unet_<...>.alpha                                            0-dim; scale = alpha / r
    lora_te_text_model_encoder_layers_<i>_<...>                      text encoder, same three keys

It is the one format that loads fully both in ComfyUI's LoraLoader and in diffusers. Formats read here:

- ``kohya``: the above (also the ``lycoris_`` prefix, and ``lora_unet_<ldm path>`` when an ldm->diffusers map is given).
- ``diffusers-old``: ``unet.<path>.lora.down.weight`` / ``.lora.up.weight`` (what the MemoRa reference writes; also the
  attention-processor spelling ``unet.<path>.processor.to_q_lora.down.weight``), no alpha: scale 1.
- ``peft``: ``unet.<path>.lora_A.weight`` / ``lora_B`` (also ``base_model.model.`` prefixes, bare module paths and
  ``text_encoder.`` keys), as diffusers' ``save_lora_weights`` and peft save them; no alpha in the tensors: scale 1
  unless an alpha is given (e.g. from the file's ``lora_adapter_metadata``).
- ``comfy``: ``diffusion_model.<ldm path>.lora_up.weight`` / ``lora_down`` / ``alpha`` as core TrainLoraNode and
  SaveLoRA write (conv downs flattened to [r, in*kh*kw]; full-weight ``.diff`` / ``.diff_b`` keys possible); needs the
  ldm -> diffusers module-name map of the model (``nodes/_lora_host.ldm_to_diffusers_map``).

Torch only: no ComfyUI import. Key munging reuses diffusers' ``state_dict_utils`` where it fits."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

KOHYA = "kohya"
DIFFUSERS_OLD = "diffusers-old"
PEFT = "peft"
COMFY = "comfy"
FORMATS = (KOHYA, DIFFUSERS_OLD, PEFT, COMFY)

_FORMAT_HELP = {
    KOHYA: "lora_unet_<module>.lora_down.weight / .lora_up.weight / .alpha (also lycoris_, lora_te_)",
    DIFFUSERS_OLD: "unet.<module>.lora.down.weight / .lora.up.weight (or .processor.to_q_lora.down.weight)",
    PEFT: "unet.<module>.lora_A.weight / .lora_B.weight (or base_model.model.<module>..., text_encoder....)",
    COMFY: "diffusion_model.<ldm module>.lora_up.weight / .lora_down.weight / .alpha (core TrainLoraNode, SaveLoRA)",
}

UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"
_KOHYA_PREFIXES = ("lora_unet_", "lycoris_", "lora_te_", "lora_te1_", "lora_te2_")
_KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha", ".diff", ".diff_b", ".dora_scale")


class LoraFormatError(ValueError):
    """A LoRA state dict that is not in any known format, or is inconsistent within its format."""


@dataclass
class LoraLayer:
    """One low-rank layer: delta W = (alpha / rank) * up @ down, shaped like the module's weight.

    ``down``: [r, in] (Linear) or [r, in, kh, kw] (Conv); ``up``: [out, r] or [out, r, 1, 1]."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight delta, shaped like the module weight (Linear [out, in]; Conv [out, in, kh, kw])."""
        from .apply import lora_delta

        return lora_delta(self.up.to(dtype), self.down.to(dtype), self.scale, (self.up.shape[0], *self.down.shape[1:]))

    @property
    def num_params(self) -> int:
        return self.down.numel() + self.up.numel()


# --------------------------------------------------------------------------------------------------------------------
# kohya prefix <-> module path

# Multi-word names of diffusers UNet / CLIP modules, longest first: the tokens a kohya name is rebuilt from when no
# list of module names is given (underscores in the kohya name are ambiguous: 'to_q' vs 'to.q').
_COMPOUND = sorted({
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "proj_in", "proj_out", "to_q", "to_k", "to_v",
    "to_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out", "time_embedding", "linear_1",
    "linear_2", "add_embedding", "class_embedding", "text_model", "self_attn", "q_proj", "k_proj", "v_proj",
    "out_proj", "final_layer_norm", "layer_norm1", "layer_norm2", "token_embedding", "position_embedding",
    "add_k_proj", "add_v_proj", "add_q_proj", "to_add_out", "encoder_hid_proj", "text_projection",
}, key=len, reverse=True)


def module_to_kohya(module: str, prefix: str = UNET_PREFIX) -> str:
    """'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q' -> 'lora_unet_down_blocks_0_..._attn1_to_q'."""
    return prefix + module.replace(".", "_")


def kohya_to_module(name: str, known_modules: Iterable[str] | None = None) -> str:
    """Inverse of :func:`module_to_kohya` (prefix included or not).

    Underscores are ambiguous, so with ``known_modules`` (module paths of the target network) the name is looked up
    exactly and a ``LoraFormatError`` raised when it is not one of them; without, it is rebuilt from the known
    multi-word names of SD UNet/CLIP modules (``to_q``, ``transformer_blocks``, ...)."""
    body = name
    for p in _KOHYA_PREFIXES:
        if body.startswith(p):
            body = body[len(p):]
            break
    if known_modules is not None:
        table = _underscore_table(known_modules)
        if body not in table:
            raise LoraFormatError(f"kohya layer {name!r} matches no module of the model (looked for {body!r})")
        return table[body]
    parts = body.split("_")
    out: list[str] = []
    i = 0
    while i < len(parts):
        for comp in _COMPOUND:
            n = comp.count("_") + 1
            if "_".join(parts[i:i + n]) == comp:
                out.append(comp)
                i += n
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


def _underscore_table(modules: Iterable[str]) -> dict[str, str]:
    table: dict[str, str] = {}
    for m in modules:
        u = m.replace(".", "_")
        if u in table and table[u] != m:
            raise LoraFormatError(f"module names {table[u]!r} and {m!r} have the same kohya name {u!r}")
        table[u] = m
    return table


# --------------------------------------------------------------------------------------------------------------------
# detection

def _strip_adapter_name(key: str) -> str:
    # peft can save 'x.lora_A.<adapter>.weight'
    return re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", key) if not key.endswith(
        (".lora_A.weight", ".lora_B.weight")) else key


def _sample(sd: Mapping[str, object], n: int = 5) -> list[str]:
    return sorted(sd)[:n]


def detect_format(sd: Mapping[str, torch.Tensor]) -> str:
    """One of ``FORMATS`` for a LoRA state dict; ``LoraFormatError`` (a ValueError) naming the known formats and a few
    sample keys when it is none of them or mixes several."""
    if not sd:
        raise LoraFormatError("the LoRA state dict is empty (no keys)")
    keys = list(sd)
    found = []
    if any(k.startswith(_KOHYA_PREFIXES) and k.endswith(_KOHYA_SUFFIXES) for k in keys):
        found.append(KOHYA)
    if any(k.startswith("diffusion_model.") and k.endswith((".lora_up.weight", ".lora_down.weight")) for k in keys):
        found.append(COMFY)
    if any(re.search(r"\.lora_[AB](\.[^.]+)?\.weight$", k) for k in keys):
        found.append(PEFT)
    if any(re.search(r"(\.lora\.(down|up)\.weight|_lora\.(down|up)\.weight|lora_linear_layer\.(down|up)\.weight)$", k)
           for k in keys):
        found.append(DIFFUSERS_OLD)
    if len(found) == 1:
        return found[0]
    known = "; ".join(f"{f}: {h}" for f, h in _FORMAT_HELP.items())
    if not found:
        raise LoraFormatError(f"unknown LoRA format: no key matches a known format ({known}). "
                              f"Sample keys: {_sample(sd)}")
    raise LoraFormatError(f"LoRA state dict mixes formats {found}; expected exactly one of ({known}). "
                          f"Sample keys: {_sample(sd)}")


# --------------------------------------------------------------------------------------------------------------------
# normalisation to kohya

def _alpha_tensor(alpha: float) -> torch.Tensor:
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise NonFiniteTensorError(f"LoRA alpha must be a finite number, got {alpha!r} (a NaN or inf alpha makes "
                                   f"every patched weight NaN)")
    return torch.tensor(alpha, dtype=torch.float32)


def _peft_module(key: str) -> tuple[str, str]:
    """'unet.down_blocks.0...to_q.lora_A.weight' -> ('unet', 'down_blocks.0...to_q'); prefixes: unet, text_encoder,
    base_model.model (a peft-wrapped UNet), none (a bare UNet adapter)."""
    key = _strip_adapter_name(key)
    mod = key[: -len(".lora_A.weight")]
    for pre in ("base_model.model.", "unet.", "transformer."):
        if mod.startswith(pre):
            mod = mod[len(pre):]
            break
    else:
        if mod.startswith("text_encoder."):
            return "te", _clip_path(mod[len("text_encoder."):])
        if mod.startswith("text_encoder_2."):
            return "te2", _clip_path(mod[len("text_encoder_2."):])
    # 'base_model.model.text_model...' comes from a peft-wrapped CLIP text model
    if mod.startswith("text_model."):
        return "te", mod
    # transformers >= 5 names CLIPTextModel's modules without the 'text_model.' level ('encoder.layers.0...');
    # SD UNets have no such module, and kohya/ComfyUI names keep the level: 'lora_te_text_model_encoder_layers_0_...'
    if mod.startswith(_CLIP_BODY):
        return "te", "text_model." + mod
    return "unet", mod


# Top-level modules of a CLIP text transformer (what transformers >= 5 puts directly under CLIPTextModel).
_CLIP_BODY = ("encoder.layers.", "embeddings.", "final_layer_norm")


def _clip_path(mod: str) -> str:
    """A text encoder's module path in the checkpoints' spelling ('text_model.encoder.layers...')."""
    return "text_model." + mod if mod.startswith(_CLIP_BODY) else mod


def _kohya_prefix(part: str) -> str:
    return {"unet": UNET_PREFIX, "te": TE_PREFIX, "te2": "lora_te2_"}[part]


def _from_peft(sd: Mapping[str, torch.Tensor], alpha: float | Mapping[str, float] | None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    downs = {k for k in sd if _strip_adapter_name(k).endswith(".lora_A.weight")}
    other = [k for k in sd if k not in downs and not _strip_adapter_name(k).endswith(".lora_B.weight")]
    if other:
        raise LoraFormatError(f"peft LoRA has keys that are neither lora_A nor lora_B weights: {other[:5]}")
    for k in sorted(downs):
        up_key = k.replace(".lora_A.", ".lora_B.")
        if up_key not in sd:
            raise LoraFormatError(f"peft LoRA key {k!r} has no matching {up_key!r}")
        part, mod = _peft_module(k)
        down, up = sd[k], sd[up_key]
        rank = down.shape[0]
        if isinstance(alpha, Mapping):
            a = float(alpha.get(mod, rank))
        else:
            a = float(alpha) if alpha is not None else float(rank)
        name = module_to_kohya(mod, _kohya_prefix(part))
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = _alpha_tensor(a)
    ups = [k for k in sd if _strip_adapter_name(k).endswith(".lora_B.weight")]
    if len(ups) != len(downs):
        raise LoraFormatError(f"peft LoRA has {len(downs)} lora_A and {len(ups)} lora_B weights")
    return out


def _from_diffusers_old(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    # diffusers' own mapping: '.lora.down' -> '.lora_A', '.processor.to_q_lora.down' -> '.to_q.lora_A', ...
    sd = {k.replace(".lora_linear_layer.down.", ".lora.down.").replace(".lora_linear_layer.up.", ".lora.up."): v
          for k, v in sd.items()}
    return _from_peft(convert_unet_state_dict_to_peft(dict(sd)), None)


def _from_comfy(sd: Mapping[str, torch.Tensor], ldm_to_diffusers: Mapping[str, str] | None,
                weight_shapes: Mapping[str, tuple] | None) -> dict[str, torch.Tensor]:
    if not ldm_to_diffusers:
        raise LoraFormatError("a ComfyUI-native LoRA (diffusion_model.<ldm path> keys) needs the model's ldm -> "
                              "diffusers module-name map to convert to kohya (ldm_to_diffusers=...)")
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for k, v in sd.items():
        if not k.startswith("diffusion_model."):
            unknown.append(k)
            continue
        body = k[len("diffusion_model."):]
        for suffix in (".lora_up.weight", ".lora_down.weight", ".alpha", ".diff_b", ".diff", ".dora_scale"):
            if body.endswith(suffix):
                ldm = body[: -len(suffix)]
                break
        else:
            unknown.append(k)
            continue
        if ldm not in ldm_to_diffusers:
            unknown.append(k)
            continue
        out[module_to_kohya(ldm_to_diffusers[ldm]) + suffix] = v
    if unknown:
        raise LoraFormatError(f"ComfyUI-native LoRA keys that match no module of the model: {unknown[:5]}"
                              f"{' ...' if len(unknown) > 5 else ''} ({len(unknown)} in all)")
    return _fix_kohya(out, weight_shapes)


def _fix_kohya(sd: dict[str, torch.Tensor], weight_shapes: Mapping[str, tuple] | None) -> dict[str, torch.Tensor]:
    """Add missing alphas (= rank: scale 1, what ComfyUI does without one) and, given the module weight shapes
    (kohya layer name without prefix or diffusers module path -> shape), un-flatten conv downs / ups."""
    shapes = {}
    if weight_shapes:
        shapes = {m.replace(".", "_"): tuple(s) for m, s in weight_shapes.items()}
    out = dict(sd)
    for k in list(sd):
        if not k.endswith(".lora_down.weight"):
            continue
        name = k[: -len(".lora_down.weight")]
        down = sd[k]
        up_key = f"{name}.lora_up.weight"
        if up_key not in sd:
            raise LoraFormatError(f"kohya LoRA key {k!r} has no matching {up_key!r}")
        up = sd[up_key]
        if f"{name}.alpha" not in sd:
            out[f"{name}.alpha"] = _alpha_tensor(down.shape[0])
        body = name
        for p in _KOHYA_PREFIXES:
            if body.startswith(p):
                body = body[len(p):]
                break
        shape = shapes.get(body)
        if shape is not None and len(shape) == 4 and down.dim() == 2:
            r = down.shape[0]
            if down.shape[1] != shape[1] * shape[2] * shape[3]:
                raise LoraFormatError(f"{k}: down {tuple(down.shape)} does not fit conv weight {shape}")
            out[k] = down.reshape(r, shape[1], shape[2], shape[3])
            out[up_key] = up.reshape(shape[0], r, 1, 1)
    ups = [k for k in sd if k.endswith(".lora_up.weight")]
    for k in ups:
        if k[: -len(".lora_up.weight")] + ".lora_down.weight" not in sd:
            raise LoraFormatError(f"kohya LoRA key {k!r} has no matching lora_down weight")
    return out


def to_kohya(sd: Mapping[str, torch.Tensor], ldm_to_diffusers: Mapping[str, str] | None = None, *,
             fmt: str | None = None, alpha: float | Mapping[str, float] | None = None,
             weight_shapes: Mapping[str, tuple] | None = None) -> dict[str, torch.Tensor]:
    """Any supported format -> kohya SD format (the LORA_MODEL convention), tensors shared, not copied.

    ``ldm_to_diffusers``: ldm (ComfyUI) module path -> diffusers module path, needed for ComfyUI-native files and for
    kohya files written with ldm names (``lora_unet_input_blocks_1_1_...``). ``alpha``: for peft/diffusers files,
    which carry none (default: scale 1), one value or {diffusers module path: alpha}. ``weight_shapes``: diffusers
    module path -> weight shape, to un-flatten conv layers stored flattened (ComfyUI-native)."""
    fmt = fmt or detect_format(sd)
    if fmt == KOHYA:
        out = {}
        for k, v in sd.items():
            if k.startswith("lycoris_"):
                k = UNET_PREFIX + k[len("lycoris_"):]
            elif k.startswith("lora_te1_"):
                k = TE_PREFIX + k[len("lora_te1_"):]
            out[k] = v
        if ldm_to_diffusers:
            out = _kohya_ldm_names_to_diffusers(out, ldm_to_diffusers)
        return _fix_kohya(out, weight_shapes)
    if fmt == PEFT:
        return _fix_kohya(_from_peft(sd, alpha), weight_shapes)
    if fmt == DIFFUSERS_OLD:
        return _fix_kohya(_from_diffusers_old(sd), weight_shapes)
    if fmt == COMFY:
        return _from_comfy(sd, ldm_to_diffusers, weight_shapes)
    raise LoraFormatError(f"unknown format {fmt!r}; known: {FORMATS}")


def _kohya_ldm_names_to_diffusers(sd: dict[str, torch.Tensor], ldm_to_diffusers: Mapping[str, str]):
    """'lora_unet_input_blocks_1_1_..._to_q' (ldm names, which ComfyUI also reads) -> diffusers names."""
    table = {ldm.replace(".", "_"): d for ldm, d in ldm_to_diffusers.items()}
    out = {}
    for k, v in sd.items():
        if k.startswith(UNET_PREFIX):
            name, _, suffix = k[len(UNET_PREFIX):].partition(".")
            if name in table:
                k = module_to_kohya(table[name]) + "." + suffix
        out[k] = v
    return out


def kohya_layers(sd: Mapping[str, torch.Tensor]) -> dict[str, LoraLayer]:
    """kohya state dict -> {layer prefix (e.g. 'lora_unet_..._to_q'): LoraLayer}; full-weight diffs are not layers."""
    layers: dict[str, LoraLayer] = {}
    for k in sd:
        if k.endswith(".lora_down.weight"):
            name = k[: -len(".lora_down.weight")]
            up_key = f"{name}.lora_up.weight"
            if up_key not in sd:
                raise LoraFormatError(f"kohya LoRA key {k!r} has no matching {up_key!r}")
            down, up = sd[k], sd[up_key]
            if up.shape[1] != down.shape[0]:
                raise LoraFormatError(f"{name}: lora_up {tuple(up.shape)} and lora_down {tuple(down.shape)} ranks differ")
            a = sd.get(f"{name}.alpha")
            layers[name] = LoraLayer(down=down, up=up, alpha=float(a) if a is not None else float(down.shape[0]))
    return layers


def layers_to_kohya(layers: Mapping[str, LoraLayer]) -> dict[str, torch.Tensor]:
    """{layer prefix or diffusers module path: LoraLayer} -> kohya state dict (contiguous tensors, alpha as fp32)."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        if not name.startswith(_KOHYA_PREFIXES):
            name = module_to_kohya(name)
        out[f"{name}.lora_down.weight"] = layer.down.contiguous()
        out[f"{name}.lora_up.weight"] = layer.up.contiguous()
        out[f"{name}.alpha"] = _alpha_tensor(layer.alpha)
    return out


def kohya_to_diffusers(sd: Mapping[str, torch.Tensor], known_modules: Iterable[str] | None = None,
                       text_known_modules: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """kohya -> diffusers/PEFT keys (``unet.<path>.lora_A.weight`` / ``lora_B``; ``text_encoder.<path>...``), what
    diffusers' ``load_lora_weights`` and ``UNet2DConditionModel.load_lora_adapter(..., prefix='unet')`` read.

    Such files carry no alpha (diffusers would assume lora_alpha = r, scale 1), so the scale alpha / r is folded into
    lora_B: the weight delta is unchanged. ``known_modules``: diffusers UNet module paths, to resolve the ambiguous
    underscores exactly (else the SD module vocabulary is used)."""
    layers = kohya_layers(sd)
    extra = [k for k in sd if k.endswith((".diff", ".diff_b", ".dora_scale"))]
    if extra:
        raise LoraFormatError(f"full-weight diff / DoRA keys cannot be written as a diffusers LoRA: {extra[:5]}")
    unet_mods = list(known_modules) if known_modules is not None else None
    te_mods = list(text_known_modules) if text_known_modules is not None else None
    out: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        if name.startswith((UNET_PREFIX, "lycoris_")):
            key = "unet." + kohya_to_module(name, unet_mods)
        elif name.startswith((TE_PREFIX, "lora_te1_")):
            key = "text_encoder." + kohya_to_module(name, te_mods)
        elif name.startswith("lora_te2_"):
            key = "text_encoder_2." + kohya_to_module(name, te_mods)
        else:
            raise LoraFormatError(f"kohya layer {name!r} has an unknown prefix")
        scale = layer.scale
        up = layer.up.to(torch.float32) * scale if scale != 1.0 else layer.up
        folded = up.to(layer.up.dtype)
        if scale != 1.0 and not bool(torch.isfinite(folded).all()) and bool(torch.isfinite(up).all()):
            raise LoraFormatError(f"{name}: lora_up * alpha / rank (scale {scale:g}) exceeds the range of "
                                  f"{layer.up.dtype}; convert the LoRA to float32 before writing it for diffusers")
        out[f"{key}.lora_A.weight"] = layer.down.contiguous()
        out[f"{key}.lora_B.weight"] = folded.contiguous()
    return out


def summarize(sd: Mapping[str, torch.Tensor]) -> dict:
    """Layer count, parameter count and ranks of a kohya state dict (for reports and metadata)."""
    layers = kohya_layers(sd)
    ranks = sorted({layer.rank for layer in layers.values()})
    alphas = sorted({round(layer.alpha, 6) for layer in layers.values()})
    return {
        "layers": len(layers),
        "unet_layers": sum(1 for n in layers if n.startswith(UNET_PREFIX)),
        "text_encoder_layers": sum(1 for n in layers if n.startswith(("lora_te",))),
        "params": sum(layer.num_params for layer in layers.values()),
        "ranks": ranks,
        "alphas": alphas,
        "full_diffs": sum(1 for k in sd if k.endswith((".diff", ".diff_b"))),
    }


# --------------------------------------------------------------------------------------------------------------------
# finiteness

class NonFiniteTensorError(LoraFormatError):
    """Weights holding NaN or inf: refused when a file is read, since one such value makes every image NaN."""


def first_non_finite(sd: Mapping[str, object]) -> tuple[str, int, int, int] | None:
    """(key, NaN count, inf count, element count) of the first floating-point tensor of ``sd`` (in its order) that
    holds a NaN or an infinity; None when every tensor is finite. Non-tensor values are ignored."""
    for key, t in sd.items():
        if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.is_complex()):
            continue
        if bool(torch.isfinite(t).all()):
            continue
        nan = int(torch.isnan(t).sum())
        return key, nan, int((~torch.isfinite(t)).sum()) - nan, t.numel()
    return None


def check_finite(sd: Mapping[str, object], source: str) -> None:
    """NonFiniteTensorError naming ``source`` (a file name, or the input the tensors came from) and the first key
    whose tensor holds NaN or inf, with how many of its values are bad; nothing when every tensor is finite."""
    bad = first_non_finite(sd)
    if bad is None:
        return
    key, nan, inf, n = bad
    others = sum(1 for k, t in sd.items() if k != key and isinstance(t, torch.Tensor) and t.is_floating_point()
                 and not bool(torch.isfinite(t).all()))
    more = f"; {others} more tensor(s) hold NaN or inf too" if others else ""
    raise NonFiniteTensorError(
        f"{source}: tensor {key!r} holds non-finite values ({nan} NaN, {inf} inf of {n}){more}. Weights with NaN or "
        f"inf make every output NaN (e.g. a black image), so they are refused: re-export or re-train it.")
