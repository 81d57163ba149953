"""LoRA files: load any common format as a kohya LORA_MODEL, and save a LORA_MODEL safely."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from comfy_api.latest import io

import memora
from memora import zoo
from memora.lora import flux, formats
from memora.lora import metadata as _metadata
from . import _lora_host, _schema


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of a LoRA file, read without running code from it: .safetensors with
    safetensors, every other file with the pack's safe pickle reader (``memora.zoo.read_file``: torch.load with
    weights_only, and the pack's own message naming the file when a pickle needs code to load)."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        except Exception as e:  # safetensors' own error types for corrupt or non-safetensors files
            raise formats.LoraFormatError(f"LoRA file {path.name}: not a readable safetensors file ({e})") from e
    try:
        obj = zoo.read_file(path)
    except zoo.ZooError as e:
        raise type(e)(f"LoRA file {e}") from e
    # What comfy.utils.load_torch_file unwraps: a 'state_dict' entry, or a single entry holding the dict.
    if isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    elif len(obj) == 1 and isinstance(next(iter(obj.values())), dict):
        obj = next(iter(obj.values()))
    return dict(obj), {}


def peft_alpha_from_metadata(meta: dict[str, str]):
    """The lora_alpha diffusers records for the UNet in 'lora_adapter_metadata' (None when absent)."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    for key in ("unet.lora_alpha", "lora_alpha"):
        if key in data and data[key] is not None:
            return float(data[key])
    return None


def load_lora_as_kohya(path: str | Path, model=None) -> tuple[dict[str, torch.Tensor], str, dict]:
    """(kohya LORA_MODEL, format detected, summary) for a file; with a model, ComfyUI-native files use its module map
    and every UNet layer must match one of its weights (LoraKeyError otherwise)."""
    sd, meta = read_lora_file(path)
    formats.check_finite(sd, Path(path).name)  # NaN / inf weights refused, naming the file and the first bad key
    fmt = formats.detect_format(sd)
    alpha = peft_alpha_from_metadata(meta) if fmt == formats.PEFT else None
    if flux.is_flux_lora(sd):  # Flux: the Flux LORA_MODEL (diffusers/PEFT keys), which ComfyUI's Flux key map reads
        lora = flux.to_diffusers(flux.flux_layers(sd, alpha))
        summary = formats.summarize(formats.to_kohya(lora))
        if model is not None:
            _, to_load, _, _ = _lora_host.match_layers(model, lora)
            summary["model_layers"] = len(to_load)
        return lora, fmt, summary
    try:
        kohya = _lora_host.to_kohya_for_model(sd, model, fmt=fmt, alpha=alpha)
    except formats.LoraFormatError as e:
        hint = (" Connect the model input: without it ComfyUI-native files are read with the standard SD1.x UNet "
                "layout." if fmt == formats.COMFY and model is None else "")
        raise formats.LoraFormatError(f"{Path(path).name} ({fmt} format): {e}{hint}") from e
    summary = formats.summarize(kohya)
    if model is not None:
        _, to_load, _, _ = _lora_host.match_layers(model, kohya)  # names and shapes checked against the model
        summary["model_layers"] = len(to_load)
    return kohya, fmt, summary


def report_text(name: str, fmt: str, summary: dict) -> str:
    ranks = ", ".join(str(r) for r in summary["ranks"]) or "-"
    alphas = ", ".join(f"{a:g}" for a in summary["alphas"]) or "-"
    text = (f"{name}: format {fmt} -> kohya; {summary['layers']} layers (UNet {summary['unet_layers']}, text encoder "
            f"{summary['text_encoder_layers']}), {summary['params']:,} parameters; rank {ranks}; alpha {alphas}")
    if summary["full_diffs"]:
        text += f"; {summary['full_diffs']} full-weight diffs"
    if "model_layers" in summary:
        text += f"; checked against the model: {summary['model_layers']} UNet layers fit its weights (names and shapes)"
    return text


class MemoRaLoadLoRA(_schema.MemoRaNode):
    """Reads a LoRA file from the loras folder in any common key format (kohya / lycoris, diffusers '.lora.down',
    diffusers-PEFT 'lora_A/lora_B', ComfyUI-native 'diffusion_model.*' from core TrainLoraNode) and returns it as a
    kohya-format LORA_MODEL, which core LoraModelLoader and the MemoRa nodes apply with every layer loaded. Fails
    with the format's name when keys match nothing."""

    @classmethod
    def define_schema(cls):
        import folder_paths

        return _schema.node(cls, "MemoRa Load LoRA", "LoRA", inputs=[
            io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                           tooltip="A LoRA file from models/loras (any of the formats listed in the description)."),
            io.Model.Input("model", optional=True,
                           tooltip="Optional: the model the LoRA is meant for. Needed for ComfyUI-native files of "
                                   "non-SD1.x UNets; when given, every UNet layer must match one of its weights."),
        ], outputs=[
            _schema.lora_output("The LoRA in kohya SD format (lora_unet_<diffusers path> lora_down / lora_up / "
                                "alpha), for LoraModelLoader and the MemoRa nodes."),
            _schema.report_output("Format detected, number of layers and parameters, ranks and alphas."),
        ])

    @classmethod
    def execute(cls, lora_name, model=None) -> io.NodeOutput:
        import folder_paths

        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        kohya, fmt, summary = load_lora_as_kohya(path, model)
        return io.NodeOutput(kohya, report_text(lora_name, fmt, summary))


class MemoRaSaveLoRA(_schema.MemoRaNode):
    """Saves a LORA_MODEL (kohya format; other formats are converted) as
    models/loras/<save_name>_<counter>_.safetensors: written atomically, never overwriting a file, name checked to
    stay inside the loras folder. Loads in LoraLoader and in diffusers."""

    @classmethod
    def define_schema(cls):
        return _schema.node(cls, "MemoRa Save LoRA", "LoRA", inputs=[
            io.LoraModel.Input("lora", tooltip="The LoRA to save (e.g. from MemoRa LoRA Train or MemoRa Load LoRA)."),
            _schema.save_name_input("memora/lora", "File prefix under models/loras; '/' makes subfolders. A "
                                                   "5-digit counter is added so no file is ever overwritten."),
        ], outputs=[
            _schema.filename_output("The saved file, relative to the loras folder (as LoraLoader lists it)."),
        ], is_output_node=True)

    @classmethod
    def execute(cls, lora, save_name) -> io.NodeOutput:
        if not isinstance(lora, dict) or not lora:
            raise ValueError("lora is empty: expected a LORA_MODEL (a dict of tensors in kohya format)")
        kohya = formats.to_kohya(lora)
        metadata = _metadata.lora_metadata(kohya, formats.summarize(kohya), version=memora.__version__,
                                           title=str(save_name).strip())
        if flux.is_flux_lora(lora):  # a Flux LORA_MODEL is saved in its own keys (kohya names would not load)
            kohya = flux.to_diffusers(flux.flux_layers(lora))
            metadata["memora.format"] = "diffusers-flux"
            metadata.pop("ss_network_module", None)
        filename = _lora_host.save_lora_file(kohya, save_name, metadata)
        return io.NodeOutput(filename, ui=_lora_host.saved_ui(filename))


NODES = [MemoRaLoadLoRA, MemoRaSaveLoRA]
