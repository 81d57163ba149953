"""LoRA on a ComfyUI model, in one place: the module and key maps of a MODEL, applying a LoRA file with ComfyUI's
own LoRA machinery (comfy.lora key map + load_lora + add_patches, as LoraModelLoader does), installing the one LoRA
weight wrapper (``memora.lora.apply.LoraWeightWrapper``: training, the AutoMemoRa guider), and saving and announcing
a LoRA file in the loras folder. The ComfyUI-free half (layer names, the delta formula, the wrapper, its call
counter) is ``memora.lora.apply``.

Unlike ComfyUI's loaders, which only log "lora key not loaded" or "shape mismatch" and carry on, :func:`apply_lora`
raises a LoraKeyError naming the layers that match nothing in the model (policy: :func:`match_layers`) and a
LoraShapeError naming the layers whose shapes do not fit the weights they name (:func:`check_patches`, also run by
:func:`add_patches`); its report counts as patched only the weights that really change."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import torch

from memora import architecture, contracts
from memora.lora import apply as _apply
from memora.lora import formats
from memora.lora import save as _save
from memora.lora.apply import LoraKeyError

from . import _host

__all__ = ["LoraKeyError", "LoraShapeError", "apply_lora", "match_layers", "add_patches", "check_patches",
           "install_lora_wrappers", "save_lora_file"]


def _unet_config(model) -> dict:
    base = getattr(model, "model", model)
    return dict(base.model_config.unet_config)


def _unet_to_diffusers(unet_config: dict) -> dict[str, str]:
    import comfy.utils

    return comfy.utils.unet_to_diffusers(dict(unet_config))


def ldm_to_diffusers_map(model) -> dict[str, str]:
    """ldm (ComfyUI) module path -> diffusers module path for the MODEL's UNet (``memora.lora.apply.module_map`` of
    comfy.utils.unet_to_diffusers; empty for models that are not UNets)."""
    return _apply.module_map(_unet_to_diffusers(_unet_config(model)))


def diffusers_weight_keys(model) -> dict[str, str]:
    """diffusers UNet weight key -> the MODEL's key ('diffusion_model.<ldm key>'); ValueError for non-UNets."""
    mapping = _unet_to_diffusers(_unet_config(model))
    if not mapping:
        raise ValueError("the base checkpoint's model is not a UNet (no diffusers key map for it); diffusers-named "
                         "weights need a UNet base checkpoint (SD1.x, SD2.x or SDXL)")
    return {d: "diffusion_model." + ldm for d, ldm in mapping.items()}


def diffusers_module_names(model) -> list[str]:
    """The diffusers module paths of the MODEL's UNet layers that have a weight (what kohya names refer to)."""
    return sorted({k[: -len(".weight")] for k in _unet_to_diffusers(_unet_config(model)) if k.endswith(".weight")})


def diffusers_weight_shapes(model) -> dict[str, tuple]:
    """diffusers module path -> weight shape of the MODEL's UNet (to un-flatten ComfyUI-native conv LoRAs)."""
    sd_keys = model.model.diffusion_model.state_dict()
    shapes = {}
    for ldm, diff in ldm_to_diffusers_map(model).items():
        w = sd_keys.get(f"{ldm}.weight")
        if w is not None:
            shapes[diff] = tuple(w.shape)
    return shapes


def attention_module_names(model) -> list[str]:
    """diffusers paths of every to_q, to_k, to_v and to_out.0 projection of the MODEL's UNet (the MemoRa targets)."""
    return [m for m in diffusers_module_names(model)
            if m.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]


def to_kohya_for_model(sd: dict, model=None, fmt: str | None = None, alpha=None) -> dict[str, torch.Tensor]:
    """formats.to_kohya with the model's ldm map and weight shapes (SD1.x's standard map when no model is given)."""
    if model is not None:
        return formats.to_kohya(sd, ldm_to_diffusers_map(model), fmt=fmt, alpha=alpha,
                                weight_shapes=diffusers_weight_shapes(model))
    return formats.to_kohya(sd, sd15_ldm_to_diffusers_map(), fmt=fmt, alpha=alpha)


# The standard SD1.x UNet in unet_to_diffusers' vocabulary (ComfyUI's own SD1.x detection yields these values).
SD15_UNET_LAYOUT = dict(num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1)


def sd15_ldm_to_diffusers_map() -> dict[str, str]:
    """The ldm -> diffusers module map of the standard SD1.x UNet (for files read without a model)."""
    return _apply.module_map(_unet_to_diffusers(SD15_UNET_LAYOUT))


# The SDXL base UNet (ComfyUI's SDXL detection yields these values). The SDXL-family variants ComfyUI knows (SSD-1B,
# Segmind Vega, KOALA) have fewer transformer blocks at the same places: their ldm names are a subset of these.
SDXL_UNET_LAYOUT = dict(num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                        transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10)


def sdxl_ldm_to_diffusers_map() -> dict[str, str]:
    """The ldm -> diffusers module map of the SDXL base UNet (for files read without a model)."""
    return _apply.module_map(_unet_to_diffusers(SDXL_UNET_LAYOUT))


_ARCHITECTURE_NAMES = {"SD15": "SD1.x", "SD20": "SD2.x", "SD21UnclipL": "SD2.x unCLIP", "SD21UnclipH": "SD2.x unCLIP",
                       "SDXL": "SDXL", "SDXLRefiner": "SDXL refiner", "SSD1B": "SDXL-family (SSD-1B)",
                       "Segmind_Vega": "SDXL-family (Segmind Vega)", "KOALA_700M": "SDXL-family (KOALA-700M)",
                       "KOALA_1B": "SDXL-family (KOALA-1B)", "Flux": "Flux dev", "FluxSchnell": "Flux schnell",
                       "FluxInpaint": "Flux fill"}


def base_architecture(model) -> str:
    """The base MODEL's architecture as ComfyUI's model detection found it, e.g. 'SDXL (cross-attention width 2048)':
    the ComfyUI model class of its config (``_host.model_family``: a test kit's subclass of SDXL is SDXL), in words,
    and its cross-attention width."""
    cfg = getattr(getattr(model, "model", None), "model_config", None)
    if cfg is None:
        return ""
    family = _host.model_family(model)
    name = _ARCHITECTURE_NAMES.get(family, family)
    width = dict(getattr(cfg, "unet_config", {}) or {}).get("context_dim")
    return f"{name} (cross-attention width {width})" if width else name


class LoraShapeError(LoraKeyError):
    """LoRA layers whose names match weights of the model but whose shapes do not fit them (ComfyUI would skip
    each such patch with only a log line, leaving the weight unchanged)."""


@dataclass
class ApplyReport:
    """What apply_lora did: the weights whose patch changes the model (``patched``), those whose patch changes
    nothing (``inert``: strength 0 or all-zero factors), the LoRA layers used, those that matched no weight (only
    with a min_share below 1) and the text-encoder layers left out of a MODEL."""

    patched: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    text_encoder_layers: list[str] = field(default_factory=list)
    inert: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        s = f"{len(self.layers)} LoRA layers -> {len(self.patched)} UNet weights patched"
        if self.inert:
            s += f"; {len(self.inert)} patches change nothing (strength 0 or all-zero layers)"
        if self.text_encoder_layers:
            s += f"; {len(self.text_encoder_layers)} text-encoder layers not applied (MODEL only)"
        return s


def match_layers(owner, lora_sd: dict[str, torch.Tensor], *, text_encoder: bool = False, min_share: float = 1.0):
    """(ComfyUI-converted lora dict, {layer name: weight key}, unmatched layer names, text-encoder layer names) for
    a LoRA on a MODEL (or, with ``text_encoder``, on a CLIP).

    The one policy for partial matches: every layer must match a weight of the model (LoraKeyError naming the format
    and the first unmatched layers otherwise), unless the caller states a ``min_share`` below 1: then at least that
    share of the layers must match, and the others are returned as unmatched (to be reported, never silently
    dropped). On a MODEL, text-encoder layers (lora_te*) are set apart, not matched. A layer whose name matches but
    whose shape does not fit the weight is always refused (LoraShapeError naming the layers and both shapes)."""
    return _plan(owner, lora_sd, text_encoder, min_share)[:4]


def _plan(owner, lora_sd, text_encoder: bool, min_share: float):
    """match_layers' four results plus ComfyUI's patches for the matched layers, every one checked to fit; a refusal
    of a UNet LoRA names the architecture the LoRA was made for and the model's (:func:`architecture_note`)."""
    try:
        return _plan_layers(owner, lora_sd, text_encoder, min_share)
    except LoraKeyError as e:
        note = None if text_encoder else architecture_note(owner, lora_sd)
        if note:
            raise type(e)(f"{e} {note}") from e
        raise


def is_sdxl(model) -> bool:
    """Whether ComfyUI detected the MODEL as SDXL or an SDXL-family model (SSD-1B, Vega, KOALA)."""
    import comfy.supported_models as sm

    return isinstance(getattr(getattr(model, "model", model), "model_config", None), sm.SDXL)


def architecture_note(owner, lora_sd) -> Optional[str]:
    """"It was made for <architecture>; the base checkpoint is <architecture>." for a refusal message
    (``memora.architecture.made_for_text``; None when the LoRA's architecture cannot be told from its layers)."""
    try:
        kohya = formats.to_kohya(lora_sd)
        shapes = {k: tuple(v.shape) for k, v in kohya.items()}
    except (ValueError, TypeError, AttributeError, IndexError):
        return None
    if architecture.guess_architecture(shapes) is None:
        return None
    return architecture.made_for_text(shapes, base_architecture(owner)).strip()


def _plan_layers(owner, lora_sd, text_encoder: bool, min_share: float):
    import comfy.lora
    import comfy.lora_convert

    if not isinstance(lora_sd, dict) or not lora_sd:
        raise LoraKeyError("the LORA_MODEL is empty or not a dict of tensors")
    if text_encoder:
        key_map = comfy.lora.model_lora_keys_clip(owner.cond_stage_model, {})
    else:
        key_map = comfy.lora.model_lora_keys_unet(owner.model, {})
    lora = comfy.lora_convert.convert_lora(lora_sd)
    names = _apply.layer_names(lora)
    te = [] if text_encoder else [n for n in names if _apply.is_text_encoder_layer(n)]
    names = [n for n in names if n not in te]
    unmatched = [n for n in names if n not in key_map]
    if unmatched and (not names or (len(names) - len(unmatched)) / len(names) < min_share):
        raise LoraKeyError(
            f"{len(unmatched)} of {len(names)} LoRA layers (format {_format_or_unknown(lora_sd)}) match no weight of "
            f"this {'text encoder' if text_encoder else 'model'}: {unmatched[:5]}"
            f"{' and more' if len(unmatched) > 5 else ''}. Is the LoRA made for another architecture?")
    to_load = {n: key_map[n] for n in names if n in key_map}
    patches = comfy.lora.load_lora(lora, to_load, log_missing=False)
    missing = [n for n, w in to_load.items() if w not in patches and f"{w[:-len('.weight')]}.bias" not in patches]
    if missing:
        raise LoraKeyError(f"ComfyUI built no patch for LoRA layers {missing[:5]} (keys not understood)")
    check_patches(owner, patches, {w: n for n, w in to_load.items()})
    return lora, to_load, unmatched, te, patches


def apply_lora(owner, lora_sd: dict[str, torch.Tensor], strength: float = 1.0, *, text_encoder: bool = False,
               min_share: float = 1.0):
    """A CLONE of the MODEL (or CLIP, with ``text_encoder``) with the LoRA applied through ComfyUI's own LoRA
    patches; returns (clone, ApplyReport). Partial matches follow :func:`match_layers`'s policy; every patch is
    checked against the weight it targets before the clone is made (LoraShapeError). The input is not modified
    (patches live on the clone); the report counts as patched only the weights the LoRA really changes."""
    _lora, to_load, unmatched, te, patches = _plan(owner, lora_sd, text_encoder, min_share)
    clone = _add_checked(owner, patches, strength)
    inert = {_key_name(k) for k, p in patches.items() if changes_nothing(p, strength)}
    patched = sorted({_key_name(k) for k in patches} - inert)
    return clone, ApplyReport(patched=patched, layers=sorted(to_load), unmatched=unmatched,
                              text_encoder_layers=te, inert=sorted(inert))


def add_patches(owner, patches: dict, strength: float = 1.0):
    """A clone of a MODEL or CLIP with ComfyUI weight patches added; LoraShapeError when a patch does not fit the
    weight it targets, RuntimeError when ComfyUI refuses any (a key the model does not have)."""
    check_patches(owner, patches)
    return _add_checked(owner, patches, strength)


def _add_checked(owner, patches: dict, strength: float):
    clone = owner.clone()
    done = set(clone.add_patches(patches, strength))
    refused = sorted(set(patches) - done, key=str)
    if refused:
        raise RuntimeError(f"ComfyUI refused patches for {refused[:5]} ({len(refused)} keys)")
    return clone


# -- checking patches against the weights they target ------------------------------------------------------------
def _key_name(key) -> str:
    """The weight key of a patch key (a name, or (name, offset[, function]) for part of a fused weight)."""
    return key if isinstance(key, str) else key[0]


def _target_shape(shapes: Mapping[str, tuple], key) -> Optional[tuple]:
    shape = shapes.get(_key_name(key))
    if shape is not None and not isinstance(key, str) and len(key) > 1 and key[1] is not None:
        dim, _start, length = key[1]
        shape = tuple(length if i == dim else s for i, s in enumerate(shape))
    return shape


def _weight_shapes(owner) -> dict[str, tuple]:
    patcher = getattr(owner, "patcher", owner)  # a CLIP holds its ModelPatcher
    return {k: tuple(v.shape) for k, v in patcher.model.state_dict().items()}


def check_patches(owner, patches: Mapping, layer_of: Optional[Mapping[str, str]] = None) -> None:
    """LoraShapeError unless every ComfyUI weight patch fits the weight it targets (ComfyUI would skip a misfit
    with only a log line). ``layer_of``: weight key -> LoRA layer name, for the message."""
    shapes = _weight_shapes(owner)
    bad = []
    for key, patch in patches.items():
        shape = _target_shape(shapes, key)
        if shape is None:
            continue  # not a weight of the model: add_patches refuses it by name
        why = patch_misfit(patch, shape)
        if why:
            name = _key_name(key)
            layer = (layer_of or {}).get(name) or (layer_of or {}).get(name[: -len(".bias")] + ".weight")
            bad.append(f"{layer + ' -> ' if layer else ''}{name}: {why}, but the weight is {list(shape)}")
    if bad:
        raise LoraShapeError(
            f"{len(bad)} of {len(patches)} LoRA patches do not fit the shape of the model weight they name (the "
            f"names match, the shapes do not: the LoRA was made for another model or architecture): "
            f"{'; '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def patch_misfit(patch, shape: tuple) -> Optional[str]:
    """Why one ComfyUI weight patch cannot change a weight of ``shape`` (None when it fits): plain LoRA factors
    by their shapes, full-weight tensors by theirs, other adapters by computing the patch on a zero weight."""
    import comfy.weight_adapter as wa

    if isinstance(patch, wa.LoRAAdapter) and patch.weights[3] is None and patch.weights[4] is None:
        up, down, reshape = patch.weights[0], patch.weights[1], patch.weights[5]
        target = tuple(reshape) if reshape is not None else tuple(shape)
        if reshape is not None and (len(target) != len(shape) or any(r < s for r, s in zip(target, shape))):
            return f"reshape_weight {list(target)} is smaller than the weight"
        if _numel(up.shape[1:]) != down.shape[0]:
            return f"lora_up {list(up.shape)} and lora_down {list(down.shape)} have different ranks"
        delta = (int(up.shape[0]), _numel(down.shape[1:]))
        if delta != (int(target[0]), _numel(target[1:])):
            return f"the LoRA delta is {list(delta)} (lora_up {list(up.shape)}, lora_down {list(down.shape)})"
        return None
    if isinstance(patch, wa.WeightAdapterBase):
        return _probe_misfit(patch, shape)
    if isinstance(patch, tuple) and patch:
        kind, v = ("diff", patch) if len(patch) == 1 else (patch[0], patch[1])
        if kind in ("diff", "set", "model_as_lora") and isinstance(v, tuple) and isinstance(v[0], torch.Tensor):
            got = tuple(v[0].shape)
            pad = kind == "diff" and len(v) > 1 and isinstance(v[1], dict) and v[1].get("pad_weight")
            if got != tuple(shape) and not (pad and len(got) == len(shape) and all(g >= s for g, s in zip(got, shape))):
                return f"the {kind} tensor is {list(got)}"
    return None


def _probe_misfit(adapter, shape: tuple) -> Optional[str]:
    """Compute an adapter's patch on a zero weight, catching what ComfyUI would only log."""
    import logging

    class _Catch(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    catch = _Catch()
    root = logging.getLogger()
    root.addHandler(catch)
    try:
        out = adapter.calculate_weight(torch.zeros(shape, dtype=torch.float32), "probe", 1.0, 1.0, None,
                                       lambda a: a, torch.float32, None)
    except Exception as e:  # ComfyUI would fail or skip the same way when applying it
        return f"the {getattr(adapter, 'name', type(adapter).__name__)} patch fails ({e})"
    finally:
        root.removeHandler(catch)
    if catch.messages or out is None or tuple(out.shape) != tuple(shape):
        return (f"the {getattr(adapter, 'name', type(adapter).__name__)} patch does not apply "
                f"({catch.messages[0] if catch.messages else 'no weight of that shape computed'})")
    return None


def changes_nothing(patch, strength: float) -> bool:
    """True when a (fitting) patch leaves the weight as it is: strength 0, or a plain LoRA / diff of zeros."""
    import comfy.weight_adapter as wa

    if float(strength) == 0.0:
        return True
    if isinstance(patch, wa.LoRAAdapter) and patch.weights[4] is None:
        return not bool(patch.weights[0].any()) or not bool(patch.weights[1].any())
    if isinstance(patch, tuple) and len(patch) in (1, 2):
        kind, v = ("diff", patch) if len(patch) == 1 else (patch[0], patch[1])
        if kind == "diff" and isinstance(v, tuple) and isinstance(v[0], torch.Tensor):
            return not bool(v[0].any())
    return False


def _format_or_unknown(sd) -> str:
    try:
        return formats.detect_format(sd)
    except ValueError:
        return "unknown"


def loras_root() -> Path:
    """The first (default) folder of ComfyUI's 'loras' search path: where the pack saves LoRA files."""
    import folder_paths

    paths = folder_paths.get_folder_paths("loras")
    if not paths:
        raise RuntimeError("ComfyUI has no 'loras' model folder configured")
    return Path(paths[0])


def relative_to_loras(path: Path) -> str:
    """A file's name as LoraLoader lists it (relative to its loras folder, '/' separated): the path as given first
    (a symlinked subfolder keeps its name, as ComfyUI's listing shows it), then with links resolved."""
    import folder_paths

    roots = folder_paths.get_folder_paths("loras")
    for root in roots:
        try:
            return _save.name_in_root(root, path)
        except ValueError:
            continue
    resolved = Path(path).resolve()
    for root in roots:
        try:
            return resolved.relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            continue
    return resolved.name


# -- weight wrappers ---------------------------------------------------------------------------------------------
def install_lora_wrappers(patcher, layers: Mapping[str, object], switch: Optional[_apply.LoraSwitch] = None
                          ) -> _apply.CallCounter:
    """One ``LoraWeightWrapper`` per {model weight key: layer (up, down, scale)} on the ModelPatcher (a clone the
    caller owns); returns their call counter (``counter.check`` after a forward pass proves every one ran)."""
    counter = _apply.CallCounter()
    for key in sorted(layers):
        patcher.add_weight_wrapper(key, _apply.LoraWeightWrapper(key, layers[key], counter, switch))
    return counter


def layers_to_kohya(model, layers: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """{'diffusion_model.<ldm path>': layer with ``to_layer()``} -> a kohya SD state dict (the pack's LORA_MODEL):
    diffusers module names where the model has a diffusers equivalent (SD UNets), the ldm name otherwise (ComfyUI
    reads both). Flux: {diffusers module path: layer} -> the Flux LORA_MODEL (diffusers/PEFT keys,
    ``memora.lora.flux.to_diffusers``)."""
    if is_flux(model):
        from memora.lora import flux

        return flux.to_diffusers({name: layers[name].to_layer() for name in sorted(layers)})
    ldm_map = ldm_to_diffusers_map(model)
    named = {}
    for name in sorted(layers):
        ldm = name[len("diffusion_model."):]
        named[formats.module_to_kohya(ldm_map.get(ldm, ldm))] = layers[name].to_layer()
    return formats.layers_to_kohya(named)


def sd_scripts_names(model, kohya_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A kohya LORA_MODEL for ``model`` with the UNet layer names kohya sd-scripts writes for that architecture:
    unchanged for SD1.x / SD2.x (diffusers module names, ``lora_unet_down_blocks_0_attentions_0_...``); for
    SDXL-family models the original (SGM/ldm) module names sd-scripts' SDXL UNet has
    (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, ``..._middle_block_1_...``,
    ``..._output_blocks_0_1_...``). ComfyUI and diffusers read both spellings; tensors are shared, not copied."""
    if not is_sdxl(model):
        return dict(kohya_sd)
    to_ldm = {d.replace(".", "_"): ldm.replace(".", "_") for ldm, d in ldm_to_diffusers_map(model).items()}
    out = {}
    for k, v in kohya_sd.items():
        if k.startswith(formats.UNET_PREFIX):
            name, _, suffix = k[len(formats.UNET_PREFIX):].partition(".")
            k = f"{formats.UNET_PREFIX}{to_ldm.get(name, name)}.{suffix}"
        out[k] = v
    return out


# -- saving ------------------------------------------------------------------------------------------------------
def check_save_name(save_name: str) -> Optional[Path]:
    """The loras folder when ``save_name`` (stripped) is not empty, after checking the name and that the folder can
    be written (creating nothing); None for an empty name (do not save)."""
    save_name = (save_name or "").strip()
    if not save_name:
        return None
    root = loras_root()
    _save.check_save_target(root, save_name)
    return root


def save_lora_file(sd: Mapping[str, torch.Tensor], save_name: str, metadata: Mapping[str, str],
                   node_id: Optional[str] = None) -> str:
    """Save a LoRA as loras/<save_name>_<counter>_.safetensors (atomic, never overwriting), announce it with a
    ``memora.lora_saved`` event, and return its name as LoraLoader lists it."""
    root = loras_root()
    path = _save.save_safetensors_atomic(sd, root, save_name.strip(), metadata)
    filename = _save.name_in_root(root, path)
    node = node_id if node_id is not None else _host.current_node_id()
    _host.send_event(contracts.EVENT_LORA_SAVED, {"node": node, "filename": filename})
    return filename


def saved_ui(filename: str) -> Optional[dict]:
    """The UI output that lists a saved LoRA in the front end (None when nothing was saved)."""
    return {contracts.UI_LORA: [filename]} if filename else None


# -- Flux ----------------------------------------------------------------------------------------------------------
def is_flux(model) -> bool:
    """Whether the MODEL is ComfyUI's Flux family (``comfy.model_base.Flux``: dev, schnell and their variants)."""
    import comfy.model_base

    return isinstance(getattr(model, "model", model), comfy.model_base.Flux)


@dataclass(frozen=True)
class FluxSlot:
    """Where a diffusers Flux module's weight lives in ComfyUI's model: rows [start, start + rows) of ``key``."""

    key: str
    start: int
    rows: int
    shape: tuple


def flux_slots(model) -> dict[str, FluxSlot]:
    """{diffusers Flux module path: FluxSlot} for every block Linear of the MODEL that ComfyUI's Flux LoRA key map
    knows (``comfy.utils.flux_to_diffusers``, the map LoraLoader uses), for ``memora.lora.flux``'s modules."""
    import comfy.utils

    from memora.lora import flux

    cfg = _unet_config(model)
    mapping = comfy.utils.flux_to_diffusers(cfg, output_prefix="diffusion_model.")
    shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
    out = {}
    for diff_key, target in mapping.items():
        if not diff_key.endswith(".weight"):
            continue
        module = diff_key[: -len(".weight")]
        if not flux.is_flux_module(module):
            continue
        key, offset = (target, None) if isinstance(target, str) else (target[0], target[1])
        if key not in shapes:
            continue
        shape = shapes[key]
        if offset is None:
            out[module] = FluxSlot(key, 0, shape[0], shape)
        else:
            dim, start, length = offset
            if dim != 0:
                continue
            out[module] = FluxSlot(key, int(start), int(length), (int(length), *shape[1:]))
    return out


def install_flux_wrappers(patcher, layers: Mapping[str, object], slots: Mapping[str, FluxSlot],
                          switch: Optional[_apply.LoraSwitch] = None) -> _apply.CallCounter:
    """One weight wrapper per ComfyUI weight that {diffusers Flux module: layer} touches (a ``SlicedLoraWrapper``
    with the row blocks of every module it holds) on the ModelPatcher (a clone the caller owns); returns their call
    counter."""
    by_key: dict[str, list] = {}
    for module in sorted(layers):
        slot = slots[module]
        by_key.setdefault(slot.key, []).append((slot.start, slot.rows, layers[module]))
    counter = _apply.CallCounter()
    for key in sorted(by_key):
        patcher.add_weight_wrapper(key, _apply.SlicedLoraWrapper(key, by_key[key], counter, switch))
    return counter
