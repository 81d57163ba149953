"""Unlearned checkpoints from the literature: safe reading, format detection, key matching and the load report.

Torch and safetensors only (no ComfyUI): the ComfyUI node (``nodes/unlearned.py``) supplies the base model's key
names and shapes and applies what this module matched as weight patches.

Formats recognised (docs/unlearned-models.md has the sources and examples):

==========================  ======================================================================================
``diffusers_unet``          diffusers-keyed UNet state dict (``down_blocks.0.attentions.0...``). FULL (UnlearnDiffAtk
                            ``*-UNET-SD.pt``, the AdvUnlearn zoo, ESD ``diffusers-*-UNET.pt``, UCE 2023 ``erased-*.pt``)
                            or PARTIAL (ESD / UCE 2025 ``.safetensors``: only the trained tensors, merged onto the base)
``ldm_checkpoint``          full ldm / CompVis checkpoint (``model.diffusion_model.*``, ``cond_stage_model.*``), e.g. the
                            old ESD ``compvis-*.pt``; UNet and text encoder are taken from it, the VAE from the base
``ldm_unet``                ComfyUI / ldm UNet without the checkpoint prefix (``input_blocks.*``), as in models/unet
``text_encoder``            CLIP text encoder (AdvUnlearn): ``text_model.*`` (Hugging Face ``pytorch_model.bin``) or
                            ``text_encoder.text_model.*`` (AdvUnlearn zoo ``.pt``), full or partial (e.g. layer 0 only)
``ac_delta``                Concept Ablation ``delta.bin``: ``{"unet": partial diffusers UNet, "text_encoder": ...}``
``kohya_lora``              kohya LoRA (SPM): ``lora_unet_*`` / ``lora_te_*`` with ``.lora_down`` / ``.lora_up`` /
                            ``.alpha``; applied as a LoRA, not merged
``lora``                    another LoRA format (diffusers / PEFT / ComfyUI-native): converted to kohya, then as above
``diffusers_pipeline``      a diffusers pipeline folder (MACE, FMN): ``unet/`` and ``text_encoder/`` are used, ``vae/``
                            is not (unlearning methods do not change the VAE; the base checkpoint's VAE is used)
==========================  ======================================================================================

Safety: ``.safetensors`` files are read with safetensors; every other file with ``torch.load(weights_only=True)``,
which only rebuilds tensors and plain containers. A pickle that needs any other Python object (a function such as
``os.system``, a class) is refused with :class:`UnsafePickleError` before anything in it runs.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import torch

from memora import architecture

# -- format names and what they look like -------------------------------------------------------------------------
DIFFUSERS_UNET = "diffusers_unet"
LDM_CHECKPOINT = "ldm_checkpoint"
LDM_UNET = "ldm_unet"
TEXT_ENCODER = "text_encoder"
AC_DELTA = "ac_delta"
KOHYA_LORA = "kohya_lora"
OTHER_LORA = "lora"
DIFFUSERS_PIPELINE = "diffusers_pipeline"
FLUX_TRANSFORMER = "flux_transformer"

FORMATS: dict[str, str] = {
    DIFFUSERS_UNET: "diffusers-keyed UNet (down_blocks.*, mid_block.*, up_blocks.*), full or partial (ESD/UCE 2025: "
                    "only trained tensors, merged onto the base); .pt/.pth/.bin/.ckpt/.safetensors",
    LDM_CHECKPOINT: "full ldm/CompVis checkpoint (model.diffusion_model.*, cond_stage_model.*), e.g. ESD compvis-*.pt",
    LDM_UNET: "ComfyUI/ldm UNet (input_blocks.*, middle_block.*, output_blocks.*, or diffusion_model.*)",
    TEXT_ENCODER: "CLIP text encoder (AdvUnlearn): text_model.* or text_encoder.text_model.*, full or partial",
    AC_DELTA: "Concept Ablation delta.bin: {'unet': partial diffusers UNet, 'text_encoder': optional}",
    KOHYA_LORA: "kohya LoRA (SPM): lora_unet_*/lora_te_* .lora_down.weight/.lora_up.weight/.alpha, applied as a LoRA",
    OTHER_LORA: "diffusers/PEFT/ComfyUI-native LoRA (unet.*.lora.down.weight, *.lora_A.weight, diffusion_model.*"
                ".lora_up.weight): converted to kohya and applied as a LoRA",
    DIFFUSERS_PIPELINE: "diffusers pipeline folder with unet/ and/or text_encoder/ subfolders (MACE, FMN)",
    FLUX_TRANSFORMER: "diffusers-keyed Flux transformer (transformer_blocks.*, single_transformer_blocks.*, optional "
                      "'transformer.' prefix), full or partial (UCE-Flux: only the edited projections, merged onto "
                      "the Flux base); Flux files in BFL/ComfyUI names (double_blocks.*) load as ldm_unet",
}

# Refusal rule (see check_matches): a component is refused when fewer than this share of its tensors land on a
# weight of the base model. The silent failure this guards against is a file that matches nothing (stock loaders
# then return the base model, or an empty text encoder, with a log line at most).
MIN_MATCHED_SHARE = 0.5

_DIFFUSERS_UNET_ROOTS = ("conv_in.", "conv_out.", "conv_norm_out.", "time_embedding.", "down_blocks.", "up_blocks.",
                         "mid_block.", "add_embedding.", "class_embedding.", "encoder_hid_proj.")
_LDM_UNET_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out.", "label_emb.",
                   # Flux in BFL's / ComfyUI's names (its diffusion_model.* keys)
                   "double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.",
                   "final_layer.")
_FLUX_DIFFUSERS_ROOTS = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder.", "context_embedder.",
                         "time_text_embed.", "norm_out.", "proj_out.")
# Non-weight entries of ldm/CompVis checkpoints: the noise schedule and EMA copies (never part of the network).
_LDM_IGNORED_ROOTS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                      "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                      "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                      "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights", "scale_factor")
_LORA_KEY = re.compile(r"(^(lora_unet_|lora_te\d?_|lycoris_))|(\.lora_[AB](\.[^.]+)?\.weight$)|"
                       r"(\.lora\.(down|up)\.weight$)|(_lora\.(down|up)\.weight$)|(\.lora_(down|up)\.weight$)")
_KOHYA_KEY = re.compile(r"^(lora_unet_|lora_te\d?_|lycoris_)")
# Buffers a text encoder state dict may carry that are not weights (ComfyUI's CLIP has no such key).
_TE_BUFFERS = ("text_model.embeddings.position_ids",)

_PICKLE_EXTENSIONS = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pt2")
_SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")


# -- errors -------------------------------------------------------------------------------------------------------
class ZooError(ValueError):
    """Base class: a file this module will not load, with the reason and what was expected."""


class UnsafePickleError(ZooError):
    """A pickle that needs Python code (not just tensors) to load: refused without running it."""


class UnrecognisedWeightsError(ZooError):
    """A file whose keys fit none of the known formats, or that matches (almost) nothing of the base model."""


def known_formats_text() -> str:
    return "\n".join(f"  - {name}: {desc}" for name, desc in FORMATS.items())


# -- reading files safely -----------------------------------------------------------------------------------------
def _sniff(path: Path) -> str:
    """'safetensors', 'zip' (torch >= 1.6 pickle archive) or 'pickle' (legacy torch pickle), from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n < 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    return "pickle"


def read_file(path: Union[str, Path]) -> dict:
    """The raw content of a weights file (a possibly nested dict of tensors), read without executing code.

    Raises UnsafePickleError for a pickle that needs globals beyond tensors and containers, ZooError for files that
    are not weights at all."""
    path = Path(path)
    if not path.is_file():
        raise ZooError(f"{path}: no such file")
    kind = _sniff(path)
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ZooError(f"{path.name}: not a readable safetensors file ({e})") from e
    try:
        if path.suffix.lower() in _SAFETENSORS_EXTENSIONS:
            # A pickle named .safetensors: newer torch dispatches torch.load on that suffix to safetensors, so hand
            # it an open file instead (no mmap then).
            with open(path, "rb") as f:
                obj = torch.load(f, map_location="cpu", weights_only=True)
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=(kind == "zip"))
    except pickle.UnpicklingError as e:
        detail = str(e).strip().splitlines()
        glob = next((ln.strip() for ln in detail if "GLOBAL" in ln), "")
        if not glob:  # not a refusal of a global: the bytes are just not a pickle weights_only understands
            raise ZooError(f"{path.name}: not a readable torch or safetensors weights file "
                           f"({detail[0] if detail else e})") from e
        raise UnsafePickleError(
            f"{path.name}: refused: this pickle needs Python code to load, not only tensors ({glob}). MemoRa loads "
            f"pickles with torch.load(weights_only=True) and never runs code from a file. If you trust the file, "
            f"convert it to .safetensors in a separate, trusted environment.") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ZooError(f"{path.name}: not a readable torch or safetensors weights file ({e})") from e
    if not isinstance(obj, Mapping):
        raise ZooError(f"{path.name}: contains a {type(obj).__name__}, expected a dict of tensors (a state dict)")
    return dict(obj)


_PIPELINE_WEIGHT_NAMES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
             "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors", "pytorch_model.fp16.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin"),
}


def is_pipeline_folder(path: Union[str, Path]) -> bool:
    """A diffusers pipeline folder (model_index.json, or unet/ or text_encoder/ weights). A folder whose shard
    index is broken or refused counts as one: loading it then says what is wrong."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / "model_index.json").is_file():
        return True
    for c in ("unet", "text_encoder"):
        try:
            if _component_files(path / c):
                return True
        except ZooError:
            return True
    return False


def _component_files(folder: Path) -> list[Path]:
    """The weight file(s) of one pipeline component: a single file, or the shards its index lists."""
    if not folder.is_dir():
        return []
    # Sharded weights: the index lists the shard files (full-precision index first, then fp16 variants).
    for index in sorted(folder.glob("*.index.json"), key=lambda p: (".fp16." in p.name, p.name)):
        try:
            data = json.loads(index.read_text())
            weight_map = data.get("weight_map", {}) if isinstance(data, dict) else None
        except (OSError, ValueError) as e:
            raise ZooError(f"{index}: unreadable shard index ({e})") from e
        if not isinstance(weight_map, Mapping):
            raise ZooError(f"{index}: 'weight_map' is not a mapping of tensor name -> shard file")
        shards = sorted({folder / _shard_name(index, name) for name in weight_map.values()})
        if shards:
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise ZooError(f"{index}: shard files missing: {missing}")
            return shards
    for name in _PIPELINE_WEIGHT_NAMES.get(folder.name, _PIPELINE_WEIGHT_NAMES["unet"]):
        if (folder / name).is_file():
            return [folder / name]
    return []


def _shard_name(index: Path, name) -> str:
    """A shard file name from an index's weight_map: a plain file name in the index's own folder (diffusers and
    transformers write nothing else). Anything else could make the index read a file outside the model folders."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name or (len(name) > 1 and name[1] == ":")):
        raise ZooError(f"{index}: refused: the shard index names {name!r} as a shard file; shards must be plain file "
                       f"names in the index's own folder ({index.parent}), not paths (an index must not make MemoRa "
                       f"read files outside the model folders)")
    return name


def read_pipeline_folder(path: Union[str, Path]) -> dict[str, dict]:
    """{"unet": state dict, "text_encoder": state dict, "vae_files": [...]} of a diffusers pipeline folder."""
    path = Path(path)
    out: dict[str, dict] = {}
    for comp in ("unet", "text_encoder"):
        files = _component_files(path / comp)
        if files:
            sd: dict = {}
            for f in files:
                sd.update(read_file(f))
            out[comp] = sd
    vae = _component_files(path / "vae")
    if vae:
        out["vae_files"] = {"files": [str(v) for v in vae]}
    if "unet" not in out and "text_encoder" not in out:
        raise UnrecognisedWeightsError(
            f"{path.name}: a folder, but not a diffusers pipeline with weights: expected unet/ and/or text_encoder/ "
            f"subfolders holding diffusion_pytorch_model.safetensors/.bin or model.safetensors/pytorch_model.bin. "
            f"Known formats:\n{known_formats_text()}")
    return out


# -- detection ----------------------------------------------------------------------------------------------------
@dataclass
class UnlearnedWeights:
    """What a file holds, normalised.

    ``unet``: UNet tensors keyed in ``unet_keys`` space ("diffusers": diffusers parameter names; "ldm": ldm names
    without the ``model.diffusion_model.`` prefix). ``text_encoder``: Hugging Face CLIPTextModel names
    (``text_model.*``). ``lora``: a LoRA state dict (kohya, or another format named by ``lora_format``).
    ``ignored``: file entries deliberately not used, by reason."""

    format: str
    source: str = ""
    unet: Optional[dict[str, torch.Tensor]] = None
    unet_keys: str = "diffusers"
    text_encoder: Optional[dict[str, torch.Tensor]] = None
    lora: Optional[dict[str, torch.Tensor]] = None
    lora_format: str = ""
    ignored: dict[str, list[str]] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _is_tensor(v) -> bool:
    return isinstance(v, torch.Tensor)


def _unwrap(obj: dict, notes: list[str]) -> dict:
    """Peel the containers training scripts wrap state dicts in ({"state_dict": ...}, single-key dicts)."""
    for _ in range(3):
        if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            others = [k for k in obj if k != "state_dict"]
            notes.append("unwrapped 'state_dict'" + (f" (also held {others[:5]}, not used)" if others else ""))
            obj = dict(obj["state_dict"])
            continue
        if len(obj) == 1:
            (k, v), = obj.items()
            if isinstance(v, Mapping) and k not in ("unet", "text_encoder") and any(_is_tensor(x) for x in v.values()):
                notes.append(f"unwrapped {k!r}")
                obj = dict(v)
                continue
        break
    return obj


def _classify(key: str) -> tuple[str, str]:
    """(group, normalised key) for one flat key. Groups: lora, unet_ldm, unet_diffusers, te, te_prefixed, vae,
    schedule, unknown."""
    if _LORA_KEY.search(key):
        return "lora", key
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        if key.startswith(prefix):
            return "unet_ldm", key[len(prefix):]
    if key.startswith("first_stage_model.") or key.startswith("vae."):
        return "vae", key
    if key.startswith("model_ema.") or key.split(".")[0] in _LDM_IGNORED_ROOTS:
        return "schedule", key
    if key.startswith("cond_stage_model.transformer."):
        rest = key[len("cond_stage_model.transformer."):]
        return "te", rest if rest.startswith("text_model.") else "text_model." + rest
    if key.startswith("text_encoder.text_model."):
        return "te_prefixed", key[len("text_encoder."):]
    if key.startswith("text_model."):
        return "te", key
    f = key[len("transformer."):] if key.startswith("transformer.") else key
    if f.startswith(_FLUX_DIFFUSERS_ROOTS):
        return "flux_diffusers", f
    k = key[len("unet."):] if key.startswith("unet.") else key
    if k.startswith(_DIFFUSERS_UNET_ROOTS):
        return "unet_diffusers", k
    if k.startswith(_LDM_UNET_ROOTS):
        return "unet_ldm", k
    return "unknown", key


def _sample(keys, n: int = 5) -> str:
    keys = list(keys)
    return ", ".join(repr(k) for k in keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


_RECELER_KEYS = {"down.weight", "down.bias", "up.weight", "up.bias"}


def _refuse_adapter_erasers(obj: Mapping, source: str) -> None:
    """Receler's eraser_weights.pt ({'<diffusers attention block>': {'down.weight', 'down.bias', 'up.weight',
    'up.bias'}}) adds NEW modules (Linear -> GELU -> Linear after each attention block): no weight patch of the base
    model can express them, so it is refused by name instead of being reported as an unknown format."""
    inner = [v for v in obj.values() if isinstance(v, Mapping)]
    if obj and len(inner) == len(obj) and all(v and set(v) <= _RECELER_KEYS for v in inner):
        raise UnrecognisedWeightsError(
            f"{source or 'file'}: a Receler eraser (eraser_weights.pt: {len(obj)} adapter modules "
            f"{_sample(obj, 3)}, each down/up Linear layers with a GELU between them). Receler adds new modules to "
            f"the UNet instead of changing its weights, so it cannot be applied as weights on a base checkpoint; "
            f"MemoRa Load Unlearned Model does not load it. Known formats:\n{known_formats_text()}")


def detect(obj: Mapping, source: str = "") -> UnlearnedWeights:
    """Detect the format of an already-read file (a possibly nested dict) and normalise its keys.

    Raises UnrecognisedWeightsError, listing the known formats, when nothing in it is a UNet, a text encoder or a
    LoRA."""
    notes: list[str] = []
    obj = dict(obj)
    _refuse_adapter_erasers(obj, source)
    # Concept Ablation: {"unet": {...}, "text_encoder": {...}, "modifier_token": {...}}
    if isinstance(obj.get("unet"), Mapping) or isinstance(obj.get("text_encoder"), Mapping):
        w = UnlearnedWeights(format=AC_DELTA, source=source, notes=notes)
        for comp in ("unet", "text_encoder"):
            inner = obj.get(comp)
            if inner is None:
                continue
            if not isinstance(inner, Mapping):
                w.unknown.append(comp)
                continue
            part = _detect_flat(dict(inner), source)
            if comp == "unet" and part.unet:
                w.unet, w.unet_keys = part.unet, part.unet_keys
            elif comp == "text_encoder" and part.text_encoder:
                w.text_encoder = part.text_encoder
            else:
                w.unknown.extend(f"{comp}.{k}" for k in inner)
                continue
            w.unknown.extend(f"{comp}.{k}" for k in part.unknown)
            for reason, keys in part.ignored.items():
                w.ignored.setdefault(reason, []).extend(f"{comp}.{k}" for k in keys)
        for k, v in obj.items():
            if k in ("unet", "text_encoder"):
                continue
            if isinstance(v, Mapping) and len(v) == 0:
                continue
            w.ignored.setdefault("other entries of the delta file (not weights of the UNet or text encoder)",
                                 []).append(k)
        if not w.unet and not w.text_encoder:
            raise UnrecognisedWeightsError(
                f"{source or 'file'}: has 'unet'/'text_encoder' entries like a Concept Ablation delta.bin, but "
                f"neither holds UNet or text-encoder tensors. Known formats:\n{known_formats_text()}")
        return w
    return _detect_flat(_unwrap(obj, notes), source, notes)


def _detect_flat(obj: dict, source: str, notes: Optional[list[str]] = None) -> UnlearnedWeights:
    notes = notes if notes is not None else []
    groups: dict[str, dict[str, torch.Tensor]] = {}
    ignored: dict[str, list[str]] = {}
    unknown: list[str] = []
    for k, v in obj.items():
        if not _is_tensor(v):
            ignored.setdefault("entries that are not tensors", []).append(str(k))
            continue
        if not isinstance(k, str):
            unknown.append(str(k))
            continue
        g, nk = _classify(k)
        if g == "unknown":
            unknown.append(k)
        else:
            groups.setdefault(g, {})[nk] = v
    name = source or "file"
    if "lora" in groups:
        lora = groups.pop("lora")
        for g, d in groups.items():  # a LoRA file holds nothing else; anything else is reported, not applied
            unknown.extend(d)
        kohya = all(_KOHYA_KEY.search(k) for k in lora)
        w = UnlearnedWeights(format=KOHYA_LORA if kohya else OTHER_LORA, source=source, lora=lora,
                             lora_format="kohya" if kohya else "", ignored=ignored, unknown=unknown, notes=notes)
        return w
    te = dict(groups.pop("te", {}))
    te_prefixed = groups.pop("te_prefixed", {})
    if te_prefixed:
        notes.append(f"{len(te_prefixed)} text-encoder keys carried the 'text_encoder.' prefix of the AdvUnlearn zoo "
                     f"(stock ComfyUI does not recognise them and silently falls back to an empty CLIP)")
        te.update(te_prefixed)
    for b in _TE_BUFFERS:
        if b in te:
            te.pop(b)
            ignored.setdefault("buffers (not weights)", []).append(b)
    if "vae" in groups:
        ignored["VAE tensors (the base checkpoint's VAE is used: unlearning methods do not train the VAE)"] = \
            list(groups.pop("vae"))
    if "schedule" in groups:
        ignored["noise-schedule buffers and EMA copies of an ldm checkpoint"] = list(groups.pop("schedule"))
    flux_d = groups.pop("flux_diffusers", {})
    if flux_d:
        for d in groups.values():  # a Flux transformer file holds nothing else; anything else is reported
            unknown.extend(d)
        return UnlearnedWeights(format=FLUX_TRANSFORMER, source=source, unet=flux_d, unet_keys="flux_diffusers",
                                text_encoder=te or None, ignored=ignored, unknown=unknown, notes=notes)
    unet_d = groups.pop("unet_diffusers", {})
    unet_l = groups.pop("unet_ldm", {})
    had_ldm_prefix = any(str(k).startswith("model.diffusion_model.") for k in obj)
    if unet_d and unet_l:  # a file is one or the other; the minority is reported
        if len(unet_d) >= len(unet_l):
            unknown.extend(unet_l)
            unet_l = {}
        else:
            unknown.extend(unet_d)
            unet_d = {}
    if not unet_d and not unet_l and not te:
        raise UnrecognisedWeightsError(
            f"{name}: no tensor in this file is a UNet, text-encoder or LoRA weight of a known format "
            f"({len(obj)} entries; sample keys: {_sample(obj)}). Known formats:\n{known_formats_text()}")
    if unet_l:
        fmt = LDM_CHECKPOINT if had_ldm_prefix else LDM_UNET
        unet, unet_keys = unet_l, "ldm"
    elif unet_d:
        fmt, unet, unet_keys = DIFFUSERS_UNET, unet_d, "diffusers"
    else:
        fmt, unet, unet_keys = TEXT_ENCODER, None, "diffusers"
    return UnlearnedWeights(format=fmt, source=source, unet=unet or None, unet_keys=unet_keys,
                            text_encoder=te or None, ignored=ignored, unknown=unknown, notes=notes)


def load_unlearned(path: Union[str, Path]) -> UnlearnedWeights:
    """Read a file or a diffusers pipeline folder safely and detect its format."""
    path = Path(path)
    if path.is_dir():
        comps = read_pipeline_folder(path)
        w = UnlearnedWeights(format=DIFFUSERS_PIPELINE, source=path.name)
        for comp in ("unet", "text_encoder"):
            if comp not in comps:
                continue
            part = _detect_flat(comps[comp], f"{path.name}/{comp}")
            if comp == "unet":
                if not part.unet:
                    raise UnrecognisedWeightsError(f"{path.name}/unet: holds no UNet tensors (sample keys: "
                                                   f"{_sample(comps[comp])})")
                w.unet, w.unet_keys = part.unet, part.unet_keys
            else:
                if not part.text_encoder:
                    raise UnrecognisedWeightsError(f"{path.name}/text_encoder: holds no CLIP text-encoder tensors "
                                                   f"(sample keys: {_sample(comps[comp])})")
                w.text_encoder = part.text_encoder
            w.unknown.extend(f"{comp}/{k}" for k in part.unknown)
            for reason, keys in part.ignored.items():
                w.ignored.setdefault(reason, []).extend(f"{comp}/{k}" for k in keys)
        if "vae_files" in comps:
            w.ignored["vae/ (the base checkpoint's VAE is used: unlearning methods do not train the VAE)"] = \
                [Path(f).name for f in comps["vae_files"]["files"]]
        return w
    return detect(read_file(path), path.name)


# -- matching onto a base model -----------------------------------------------------------------------------------
KeyMap = Union[Mapping[str, str], Callable[[str], Optional[str]]]


@dataclass
class ComponentMatch:
    """How one component of a file lands on the base model: file tensors that map onto a base weight of the same
    shape (``matched``, keyed by the base model's key), file tensors with no such weight (``unexpected``), mapped ones
    whose shape differs (``shape_mismatch``: (file key, file shape, base shape)), and base weights the file does not
    provide (``missing``: kept from the base)."""

    component: str
    matched: dict[str, torch.Tensor]
    unexpected: list[str]
    shape_mismatch: list[tuple[str, tuple, tuple]]
    missing: list[str]
    file_count: int
    target_count: int

    @property
    def matched_share(self) -> float:
        return len(self.matched) / self.file_count if self.file_count else 0.0

    @property
    def coverage(self) -> float:
        return len(self.matched) / self.target_count if self.target_count else 0.0


def match_component(component: str, tensors: Mapping[str, torch.Tensor], key_map: KeyMap,
                    target_shapes: Mapping[str, tuple]) -> ComponentMatch:
    """Map ``tensors`` (file keys) onto base-model keys with ``key_map`` and check shapes against ``target_shapes``."""
    lookup = key_map if callable(key_map) else key_map.get
    matched: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mismatch: list[tuple[str, tuple, tuple]] = []
    for k, v in tensors.items():
        tk = lookup(k)
        if tk is None or tk not in target_shapes:
            unexpected.append(k)
            continue
        if tuple(v.shape) != tuple(target_shapes[tk]):
            mismatch.append((k, tuple(v.shape), tuple(target_shapes[tk])))
            continue
        matched[tk] = v
    missing = [k for k in target_shapes if k not in matched]
    return ComponentMatch(component, matched, unexpected, mismatch, missing, len(tensors), len(target_shapes))


def check_matches(weights: UnlearnedWeights, matches: list[ComponentMatch], base: str = "") -> None:
    """The refusal rule. Refuse (UnrecognisedWeightsError) when

    - any tensor maps onto a base weight of another shape (the file is for another architecture), or
    - nothing at all matches, or
    - fewer than MIN_MATCHED_SHARE (half) of a component's tensors match a base weight ("almost nothing").

    The message says what matched and lists the known formats, and which architecture the file was made for when
    its shapes tell (:func:`memora.architecture.guess_architecture`); ``base`` names the base checkpoint's architecture."""
    name = weights.source or "file"
    made_for = architecture.made_for_text({k: tuple(v.shape) for k, v in (weights.unet or {}).items()}, base)
    lines = [f"  {m.component}: {len(m.matched)} of {m.file_count} file tensors matched the base model"
             + (f"; unmatched e.g. {_sample(m.unexpected, 3)}" if m.unexpected else "") for m in matches]
    summary = "\n".join(lines)
    for m in matches:
        if m.shape_mismatch:
            k, fs, ts = m.shape_mismatch[0]
            raise UnrecognisedWeightsError(
                f"{name} (detected as {weights.format}): {len(m.shape_mismatch)} {m.component} tensors have other "
                f"shapes than the base model's (e.g. {k!r}: file {list(fs)}, base {list(ts)}). The file was made for "
                f"another architecture than the base checkpoint.{made_for} Use the base checkpoint it was unlearned "
                f"from (the SD1.4 zoo: sd-v1-4).\n{summary}")
    total = sum(len(m.matched) for m in matches)
    bad = [m for m in matches if m.file_count and m.matched_share < MIN_MATCHED_SHARE]
    if total == 0 or bad:
        raise UnrecognisedWeightsError(
            f"{name} (detected as {weights.format}) matches {'nothing' if total == 0 else 'almost nothing'} of the "
            f"base model (refused when fewer than {MIN_MATCHED_SHARE:.0%} of a component's tensors match)."
            f"{made_for}\n"
            f"{summary}\nKnown formats:\n{known_formats_text()}")


# -- what changed, and the report ---------------------------------------------------------------------------------
@dataclass
class Change:
    """Set tensors that differ from the base weights they replace."""

    component: str
    set_count: int
    changed: list[str]
    max_abs_diff: float


def compare_to_base(component: str, matched: Mapping[str, torch.Tensor],
                    base: Callable[[str], torch.Tensor]) -> Change:
    """Which matched tensors differ from the base weights (compared in the base weight's dtype). A tensor with NaN or
    infinite values is refused (ZooError)."""
    changed: list[str] = []
    worst = 0.0
    for k, v in matched.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ZooError(f"{component}: tensor for {k!r} contains NaN or infinite values; refusing a broken file")
        b = base(k)
        d = (v.detach().to(device=b.device, dtype=b.dtype) - b).abs()
        m = float(d.max()) if d.numel() else 0.0
        if m > 0:
            changed.append(k)
            worst = max(worst, m)
    return Change(component, len(matched), changed, worst)


def summarize_keys(keys: list[str]) -> str:
    """'attn2.to_k.weight x16, attn2.to_v.weight x16' / text encoder 'layers 0, 1': a compact view of many keys."""
    if not keys:
        return "none"
    keys = [k if isinstance(k, str) else k[0] for k in keys]  # a row block of a fused weight: the weight's name
    layers = sorted({int(m.group(1)) for k in keys if (m := re.search(r"encoder\.layers\.(\d+)\.", k))})
    counts: dict[str, int] = {}
    for k in keys:
        parts = k.split(".")
        tail = ".".join(p for p in parts[-3:] if not p.isdigit()) if len(parts) >= 3 else k
        counts[tail] = counts.get(tail, 0) + 1
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    s = ", ".join(f"{t} x{n}" for t, n in top[:6]) + (f", ... ({len(top)} kinds)" if len(top) > 6 else "")
    if layers:
        s = f"encoder layers {layers}; " + s
    return s


def format_report(weights: UnlearnedWeights, matches: list[ComponentMatch], changes: list[Change],
                  lora_lines: Optional[list[str]] = None, base_name: str = "") -> str:
    """The report string of MemoRa Load Unlearned Model."""
    out = [f"MemoRa unlearned model: {weights.source}" + (f" on base {base_name}" if base_name else ""),
           f"format detected: {weights.format} ({FORMATS.get(weights.format, '')})"]
    for n in weights.notes:
        out.append(f"note: {n}")
    for m in matches:
        kind = ""
        if m.component == "unet" and weights.format in (DIFFUSERS_UNET, AC_DELTA, LDM_UNET, LDM_CHECKPOINT,
                                                        DIFFUSERS_PIPELINE, FLUX_TRANSFORMER):
            kind = " (full: replaces the base UNet)" if not m.missing else " (partial: merged onto the base)"
        if m.component == "text_encoder":
            kind = " (full)" if not m.missing else " (partial: merged onto the base)"
        out.append(f"{m.component}{kind}: {len(m.matched)} tensors matched, {len(m.unexpected)} unexpected, "
                   f"{len(m.missing)} of {m.target_count} base tensors not in the file (kept from the base)")
        if m.unexpected:
            out.append(f"  WARNING: not applied (no matching base weight): {_sample(m.unexpected)}")
    for c in changes:
        if c.changed:
            out.append(f"{c.component} CHANGED: {len(c.changed)} of {c.set_count} set tensors differ from the base "
                       f"(max |diff| {c.max_abs_diff:.3g}): {summarize_keys(c.changed)}")
        else:
            out.append(f"{c.component} unchanged: all {c.set_count} tensors equal the base weights")
    for line in lora_lines or []:
        out.append(line)
    for reason, keys in weights.ignored.items():
        out.append(f"ignored {len(keys)} {reason}")
    if weights.unknown:
        out.append(f"WARNING: {len(weights.unknown)} entries of unknown kind not applied: {_sample(weights.unknown)}")
    out.append("vae: from the base checkpoint")
    return "\n".join(out)
