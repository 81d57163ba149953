"""MemoRa Load Unlearned Model: a base checkpoint plus an unlearned weights file in any of the zoo's formats.

Format detection, safe reading, key matching and the refusal rule live in ``memora.zoo`` (no ComfyUI); this module
maps the file's keys onto the base model's (``comfy.utils.unet_to_diffusers`` for diffusers UNet names, ComfyUI's
CLIP layout ``clip_l.transformer.text_model.*`` for the text encoder) and applies the result as ComfyUI weight
patches on clones of the base: "set" patches for replaced tensors, LoRA patches for LoRA files. Weights are never
written in place: the base model stays intact (other nodes may share it), and on ComfyUI 0.33's dynamic-VRAM path
the weights are memory-mapped from the checkpoint, where an in-place write crashes the process.

Registers the ``models/unlearned`` folder with ComfyUI at import; files from the unet (diffusion_models) and loras
folders, and diffusers pipeline folders in unlearned/ or diffusers/, are offered too."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from comfy_api.latest import io

import comfy.sd
import folder_paths

from memora import zoo
from memora.lora import apply as lora_apply
from memora.lora import formats
from . import _host, _lora_host, _schema

UNLEARNED_FOLDER = "unlearned"
# (prefix shown in the list, ComfyUI folder name)
FILE_SOURCES = (("unlearned", UNLEARNED_FOLDER), ("unet", "diffusion_models"), ("loras", "loras"),
                ("checkpoints", "checkpoints"))
PIPELINE_SOURCES = (("unlearned", UNLEARNED_FOLDER), ("diffusers", "diffusers"))
_PIPELINE_SEARCH_DEPTH = 3


def register_folder() -> None:
    """models/unlearned as a ComfyUI model folder (extra_model_paths.yaml may add more paths to it)."""
    exts = set(folder_paths.supported_pt_extensions)
    if UNLEARNED_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[UNLEARNED_FOLDER] = (
            [os.path.join(folder_paths.models_dir, UNLEARNED_FOLDER)], exts)
    else:
        paths, current = folder_paths.folder_names_and_paths[UNLEARNED_FOLDER]
        if current:  # an empty set means "every file"; otherwise make sure weight files are listed
            folder_paths.folder_names_and_paths[UNLEARNED_FOLDER] = (paths, set(current) | exts)


register_folder()


# -- the file list and resolving a choice ------------------------------------------------------------------------
def _pipeline_dirs(root: Path) -> list[str]:
    out: list[str] = []
    if not root.is_dir():
        return out
    stack = [(root, 0)]
    while stack:
        d, depth = stack.pop()
        try:
            subdirs = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            continue
        for p in subdirs:
            if zoo.is_pipeline_folder(p):
                out.append(p.relative_to(root).as_posix() + "/")
            elif depth + 1 < _PIPELINE_SEARCH_DEPTH:
                stack.append((p, depth + 1))
    return sorted(out)


def weight_choices() -> list[str]:
    """'unlearned/<file>', 'unet/<file>', 'loras/<file>', 'checkpoints/<file>', and pipeline folders 'unlearned/<dir>/', 'diffusers/<dir>/'."""
    out: list[str] = []
    for label, folder in FILE_SOURCES:
        try:
            names = folder_paths.get_filename_list(folder)
        except KeyError:
            continue
        out.extend(f"{label}/{n}" for n in names)
    for label, folder in PIPELINE_SOURCES:
        for root in _host.model_folder_roots(folder):
            out.extend(f"{label}/{d}" for d in _pipeline_dirs(root) if f"{label}/{d}" not in out)
    return out


def resolve_choice(choice: str) -> Path:
    """The file or pipeline folder a list entry names; ValueError for anything outside the model folders."""
    if not isinstance(choice, str) or "/" not in choice:
        raise ValueError(f"unlearned_weights: expected '<folder>/<file>' as the list shows it "
                         f"(folders: unlearned, unet, loras, checkpoints, diffusers), got {choice!r}")
    label, rest = choice.split("/", 1)
    folders = dict(FILE_SOURCES) | dict(PIPELINE_SOURCES)
    if label not in folders:
        raise ValueError(f"unlearned_weights: unknown folder {label!r} in {choice!r}; known: {sorted(folders)}")
    parts = [p for p in rest.replace("\\", "/").split("/") if p]
    if not parts or any(p in ("..", ".") for p in parts) or rest.startswith("/"):
        raise ValueError(f"unlearned_weights: {choice!r} is not a plain path inside the {label} folder")
    if rest.endswith("/"):
        for root in _host.model_folder_roots(folders[label]):
            cand = (root / "/".join(parts)).resolve()
            if cand.is_relative_to(root.resolve()) and zoo.is_pipeline_folder(cand):
                return cand
        raise ValueError(f"unlearned_weights: no diffusers pipeline folder {rest!r} in the {label} folder(s) "
                         f"{[str(r) for r in _host.model_folder_roots(folders[label])]}")
    full = folder_paths.get_full_path(folders[label], "/".join(parts))
    if full is None:
        raise ValueError(f"unlearned_weights: file {rest!r} not found in the {label} folder(s) "
                         f"{[str(r) for r in _host.model_folder_roots(folders[label])]}")
    return Path(full)


# -- mapping keys onto the base model ----------------------------------------------------------------------------
def flux_key_map(model) -> dict:
    """diffusers Flux transformer key -> the MODEL's key: 'diffusion_model.<BFL name>', or (that key, (0, first row,
    rows)) for a part of a fused weight (to_q of img_attn.qkv ...): ComfyUI's own map (comfy.utils.flux_to_diffusers),
    the one its LoRA loader uses. ValueError when the base is not a Flux model."""
    import comfy.utils

    if not _lora_host.is_flux(model):
        raise ValueError(f"diffusers-named Flux transformer weights need a Flux base checkpoint; the base is "
                         f"{_lora_host.base_architecture(model) or type(model.model).__name__}")
    return dict(comfy.utils.flux_to_diffusers(dict(model.model.model_config.unet_config),
                                              output_prefix="diffusion_model."))


def _part(base_sd: dict, key):
    """The base tensor a (possibly row-sliced) model key names."""
    if isinstance(key, str):
        return base_sd[key]
    name, (dim, start, length) = key
    return base_sd[name].narrow(dim, start, length)


def unet_key_map(model, unet_keys: str):
    """file UNet key -> ComfyUI model key ('diffusion_model.<ldm name>'; Flux: see :func:`flux_key_map`)."""
    if unet_keys == "flux_diffusers":
        return flux_key_map(model)
    if unet_keys == "ldm":
        return lambda k: "diffusion_model." + k
    return _lora_host.diffusers_weight_keys(model)


def clip_key_map(clip_sd_keys) -> dict[str, str]:
    """Hugging Face CLIPTextModel key ('text_model.*') -> ComfyUI CLIP key ('clip_l.transformer.text_model.*').

    SD1.x has one text encoder (clip_l), SD2.x one (clip_h); with several (SDXL: clip_l and clip_g), clip_l wins
    (the Hugging Face 'text_model.*' names of a single-encoder file are those of SD1.x's CLIP-L, which is also
    SDXL's first text encoder)."""
    out: dict[str, str] = {}
    marker = ".transformer.text_model."
    keys = sorted(clip_sd_keys, key=lambda k: (not k.startswith("clip_l."), k))
    for k in keys:
        i = k.find(marker)
        if i < 0:
            continue
        hf = "text_model." + k[i + len(marker):]
        out.setdefault(hf, k)
    return out


def _storage_dtype(file_tensor: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    # Store the replacement in the base weight's dtype (what applying it produces anyway) to halve the memory a fp32
    # zoo file costs next to a fp16 base; 8-bit float bases keep the file's precision (ComfyUI rounds on patching).
    if base.dtype.is_floating_point and base.element_size() >= 2:
        return file_tensor.detach().to(dtype=base.dtype)
    return file_tensor.detach()


def _set_patches(matched: dict, base_sd: dict[str, torch.Tensor]) -> dict:
    return {k: ("set", (_storage_dtype(v, _part(base_sd, k)),)) for k, v in matched.items()}


# -- LoRA files ---------------------------------------------------------------------------------------------------
def _apply_part(owner, part: dict, strength: float, source: str, text_encoder: bool):
    """(clone, report line, warning line or None) for the UNet or text-encoder layers of a LoRA file, applied with
    the pack's one LoRA apply step and its partial-match policy at zoo.MIN_MATCHED_SHARE."""
    what = "text_encoder" if text_encoder else "unet"
    try:
        clone, rep = _lora_host.apply_lora(owner, part, strength, text_encoder=text_encoder,
                                           min_share=zoo.MIN_MATCHED_SHARE)
    except _lora_host.LoraKeyError as e:  # the message names both architectures where the shapes tell
        raise zoo.UnrecognisedWeightsError(f"{source}: {what} LoRA layers do not fit the base model: "
                                           f"{str(e).rstrip('.')}. Known formats:\n{zoo.known_formats_text()}") from e
    n = len(rep.layers) + len(rep.unmatched)
    if rep.patched:
        line = f"{what} CHANGED by LoRA: {len(rep.layers)} of {n} layers matched, {len(rep.patched)} weights patched"
        if not text_encoder:
            line += f" ({zoo.summarize_keys(rep.patched)})"
    else:
        line = f"{what} UNCHANGED: {len(rep.layers)} of {n} layers matched, 0 weights patched"
    if rep.inert:
        line += (f"; {len(rep.inert)} patches change nothing ("
                 f"{'strength 0' if strength == 0 else 'all-zero LoRA factors'})")
    warning = (f"  WARNING: LoRA layers not applied (no matching weight): {rep.unmatched[:5]}" if rep.unmatched
               else None)
    return clone, line, warning


def apply_lora_file(model, clip, weights: zoo.UnlearnedWeights, strength: float):
    """(model, clip, report lines) with the file's LoRA applied: UNet layers on MODEL, lora_te layers on CLIP."""
    lora = weights.lora
    # Flux: ComfyUI's loader reads every Flux LoRA spelling itself (diffusers/PEFT as EraseAnything ships them,
    # sd-scripts, OneTrainer); the kohya conversion is for UNet names
    if weights.format == zoo.OTHER_LORA and not _lora_host.is_flux(model):
        try:
            lora = _lora_host.to_kohya_for_model(lora, model)
        except ValueError as e:
            raise zoo.UnrecognisedWeightsError(f"{weights.source}: a LoRA, but not one MemoRa can convert: {e}") from e
    te_part = {k: v for k, v in lora.items() if k.startswith(lora_apply.TEXT_ENCODER_PREFIXES)}
    unet_part = {k: v for k, v in lora.items() if k not in te_part}
    lines = [f"LoRA applied at strength {strength:g} (not merged: it is a patch on the base weights)"]
    if te_part and clip is None:
        raise ValueError(f"{weights.source}: the LoRA has text-encoder layers but the base checkpoint has no "
                         f"text encoder")
    for part, text_encoder in ((unet_part, False), (te_part, True)):
        if not part:
            continue
        owner = clip if text_encoder else model
        owner, line, warning = _apply_part(owner, part, strength, weights.source, text_encoder)
        lines += [line] + ([warning] if warning else [])
        if text_encoder:
            clip = owner
        else:
            model = owner
    if not te_part:
        lines.append("text_encoder unchanged (the LoRA has no text-encoder layers)")
    return model, clip, lines


# -- the whole load -----------------------------------------------------------------------------------------------
def apply_unlearned(model, clip, weights: zoo.UnlearnedWeights, lora_strength: float = 1.0,
                    base_name: str = "") -> tuple:
    """(MODEL, CLIP, report) = the base with the unlearned weights applied as patches on clones.

    Everything is matched and checked (zoo.check_matches) before any patch is added: a refused file leaves nothing
    modified. Reusable outside the node (e.g. by a batch runner) with any ModelPatcher / CLIP pair."""
    if weights.lora is not None:
        model, clip, lines = apply_lora_file(model, clip, weights, lora_strength)
        return model, clip, zoo.format_report(weights, [], [], lines, base_name)

    matches: list[zoo.ComponentMatch] = []
    base_unet: dict[str, torch.Tensor] = {}
    base_clip: dict[str, torch.Tensor] = {}
    if weights.unet:
        base_unet = {k: v for k, v in model.model.state_dict().items() if k.startswith("diffusion_model.")}
        key_map = unet_key_map(model, weights.unet_keys)
        shapes = {k: tuple(v.shape) for k, v in base_unet.items()}
        if weights.unet_keys == "flux_diffusers":  # row blocks of fused weights are targets of their own
            # (targets that need a conversion function, like final_layer's swapped scale/shift, are not loaded)
            shapes = {t: tuple(_part(base_unet, t).shape) for t in key_map.values()
                      if (isinstance(t, str) or (len(t) == 2 and t[1] is not None))
                      and (t if isinstance(t, str) else t[0]) in base_unet}
        matches.append(zoo.match_component("unet", weights.unet, key_map, shapes))
    if weights.text_encoder:
        if clip is None:
            raise ValueError(f"{weights.source}: holds text-encoder weights but the base checkpoint has no text "
                             f"encoder (CLIP)")
        base_clip = clip.cond_stage_model.state_dict()
        te_map = clip_key_map(base_clip.keys())
        shapes = {v: tuple(base_clip[v].shape) for v in te_map.values()}
        matches.append(zoo.match_component("text_encoder", weights.text_encoder, te_map, shapes))
    zoo.check_matches(weights, matches, _lora_host.base_architecture(model))

    changes: list[zoo.Change] = []
    for m in matches:
        base_sd = base_unet if m.component == "unet" else base_clip
        change = zoo.compare_to_base(m.component, m.matched, lambda k, sd=base_sd: _part(sd, k))
        changes.append(change)
        # Only tensors that differ from the base (compared in the base's dtype) need a patch: a full zoo UNet where
        # ESD trained 32 tensors costs 32 patches, not 686, and the result is the same.
        patches = _set_patches({k: m.matched[k] for k in change.changed}, base_sd)
        if not patches:
            continue
        if m.component == "unet":
            model = _lora_host.add_patches(model, patches)
        else:
            clip = _lora_host.add_patches(clip, patches)
    return model, clip, zoo.format_report(weights, matches, changes, None, base_name)


def load_base_checkpoint(ckpt_name: str):
    """(MODEL, CLIP, VAE) of a checkpoint from the checkpoints folder, as CheckpointLoaderSimple loads it."""
    path = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
    out = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True,
                                                embedding_directory=folder_paths.get_folder_paths("embeddings"))
    return out[:3]


class MemoRaLoadUnlearnedModel(_schema.MemoRaNode):
    """Load a base checkpoint and an unlearned model's weights in any of the formats the unlearning literature ships
    (full or partial diffusers UNet, ldm checkpoint, AdvUnlearn text encoder with or without its 'text_encoder.'
    prefix, Concept Ablation delta.bin, SPM kohya LoRA, diffusers pipeline folder). The format is detected; partial
    files are merged onto the base through weight patches (the base is never modified in place); loads that match
    nothing or almost nothing of the base are refused instead of silently returning the base model. Pickles load
    with weights_only: a file that needs code to load is refused. Files: models/unlearned, models/unet,
    models/loras, models/checkpoints (a full unlearned checkpoint), and pipeline folders in models/unlearned or
    models/diffusers. The report is also the node's UI text, so batch runs record it with their results."""

    @classmethod
    def define_schema(cls):
        return _schema.node(cls, "MemoRa Load Unlearned Model", "loaders", inputs=[
            io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("checkpoints"),
                           tooltip="The base checkpoint the model was unlearned from (the zoo: Stable "
                                   "Diffusion 1.4). Partial files are merged onto it; its VAE is used."),
            io.Combo.Input("unlearned_weights", options=weight_choices(),
                           tooltip="The unlearned weights: a file from models/unlearned, models/unet, "
                                   "models/loras or models/checkpoints (a full checkpoint), or a diffusers "
                                   "pipeline folder (entries ending in '/')."),
            io.Float.Input("lora_strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                           tooltip="Strength for LoRA-format files (SPM); ignored for every other format."),
        ], outputs=[
            io.Model.Output(display_name="MODEL", tooltip="The unlearned UNet (the base with the file applied)."),
            io.Clip.Output(display_name="CLIP", tooltip="The text encoder (changed only if the file holds one)."),
            io.Vae.Output(display_name="VAE", tooltip="The base checkpoint's VAE."),
            _schema.report_output("Format detected; tensors matched / unexpected / missing per component; which "
                                  "component changed and how much; what was ignored."),
        ])

    @classmethod
    def execute(cls, ckpt_name, unlearned_weights, lora_strength) -> io.NodeOutput:
        path = resolve_choice(unlearned_weights)
        weights = zoo.load_unlearned(path)  # refuses unreadable / unsafe / unrecognised files before any loading
        for part in (weights.lora, weights.unet, weights.text_encoder):  # NaN / inf refused (file, first bad key)
            formats.check_finite(part or {}, weights.source)
        model, clip, vae = load_base_checkpoint(ckpt_name)
        model, clip, report = apply_unlearned(model, clip, weights, float(lora_strength), base_name=ckpt_name)
        return io.NodeOutput(model, clip, vae, report, ui={"text": [report]})


NODES = [MemoRaLoadUnlearnedModel]
