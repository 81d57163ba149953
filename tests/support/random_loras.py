"""Random kohya-format LoRAs for a loaded ComfyUI MODEL (tests of merging and AutoMemoRa).

Layers are named as the pack's LORA_MODEL convention names them (``lora_unet_<diffusers module path>``), with the
factor shapes of the model's weights: Linear down [r, in] / up [out, r]; Conv down [r, in, kh, kw] / up [out, r, 1, 1].
Deltas are made large enough (relative to the tiny model's weights) to change sampling visibly."""

from __future__ import annotations

from pathlib import Path

import torch


def lora_targets(model, attention_only: bool = True, with_conv: bool = False) -> dict[str, tuple]:
    """{diffusers module path: weight shape} of the MODEL's UNet layers a test LoRA covers."""
    host = pack_module("nodes._lora_host")
    shapes = host.diffusers_weight_shapes(model)
    names = set(host.attention_module_names(model)) if attention_only else set(shapes)
    if with_conv:
        names |= {m for m, s in shapes.items() if len(s) == 4 and m.endswith(("proj_in", "proj_out"))}
    return {m: tuple(shapes[m]) for m in sorted(names)}


def random_kohya_lora(targets: dict[str, tuple], rank: int, seed: int, alpha: float | None = None,
                      magnitude: float = 0.3, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for module, shape in sorted(targets.items()):
        out, inn = shape[0], shape[1]
        name = "lora_unet_" + module.replace(".", "_")
        if len(shape) == 4:
            down = torch.randn(rank, inn, shape[2], shape[3], generator=g) / (inn * shape[2] * shape[3]) ** 0.5
            up = torch.randn(out, rank, 1, 1, generator=g) * magnitude / rank ** 0.5
        else:
            down = torch.randn(rank, inn, generator=g) / inn ** 0.5
            up = torch.randn(out, rank, generator=g) * magnitude / rank ** 0.5
        a = float(rank if alpha is None else alpha)
        # undo the alpha / rank scale so every LoRA has deltas of the same size whatever its alpha
        up = up * (rank / a)
        sd[f"{name}.lora_down.weight"] = down.to(dtype)
        sd[f"{name}.lora_up.weight"] = up.to(dtype)
        sd[f"{name}.alpha"] = torch.tensor(a)
    return sd


def write_lora(folder: Path, name: str, sd: dict[str, torch.Tensor]) -> str:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return name


def pack_module(sub: str):
    """A module of the pack as ComfyUI imported it (under a name derived from the pack folder), e.g.
    pack_module('nodes._lora_host')."""
    import importlib

    import nodes

    node_module = nodes.NODE_CLASS_MAPPINGS["MemoRaDDIMInversion"].__module__   # '<pack>.nodes.inversion'
    pack = node_module.rsplit(".", 2)[0]
    return importlib.import_module(f"{pack}.{sub}")


def lora_model_loader_extra() -> dict:
    """Extra inputs the stock LoraModelLoader needs on this ComfyUI (0.33 added a required 'bypass')."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS["LoraModelLoader"]
    required = cls.INPUT_TYPES().get("required", {})
    return {"bypass": False} if "bypass" in required else {}
