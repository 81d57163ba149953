"""The metadata the pack writes into its LoRA files (one dialect), and reading it back (both dialects).

Written (every value a str, deterministic for the same inputs and day):

- ``memora.*``: ``memora.format`` ("kohya"), ``memora.pack_version``, ``memora.layers`` (LoRA layers in the file),
  ``memora.params``, ``memora.ranks`` (JSON list), ``memora.concept`` (the concept prompt, "" when unknown), plus
  what the writer adds (training: recipe, seed, hashes, ...; merge: ``memora.merge_*``);
- ``ss_network_module`` / ``ss_network_dim`` / ``ss_network_alpha`` (kohya's keys, which LoRA tools read);
- ``modelspec.*`` (Stability AI's ModelSpec 1.0.0, which model-sharing sites read) when the architecture is known
  from the LoRA's cross-attention width: ``sai_model_spec``, ``architecture``, ``implementation``, ``title``,
  ``date`` (the day, UTC, or SOURCE_DATE_EPOCH's), and where known ``resolution``, ``prediction_type``,
  ``trigger_phrase`` (the concept prompt), ``merged_from``.

Read (:func:`read`): the same dialect, and the older one of the pack's Save LoRA and Merge nodes (``memora_format``,
``memora_version``, ``memora_layers``, ``memora_merge_method``, ...), mapped onto it. Standard library only."""

from __future__ import annotations

import datetime as _dt
import json
import os
from typing import Mapping, Optional

KOHYA_FORMAT = "kohya"
MODELSPEC_VERSION = "1.0.0"
# cross-attention width of the UNet (the in-features of attn2.to_k) -> ModelSpec architecture of the base model
_ARCHITECTURES = {768: "stable-diffusion-v1", 1024: "stable-diffusion-v2-512", 2048: "stable-diffusion-xl-v1-base"}
_OLD_NAMES = {"memora_version": "memora.pack_version"}


def base_architecture(summary_cross_dims, prediction_type: Optional[str] = None) -> Optional[str]:
    """ModelSpec architecture of the base model from the LoRA's cross-attention widths (None when unknown or
    mixed); SD2 with v-prediction is the 768-v model."""
    dims = set(summary_cross_dims)
    if len(dims) != 1:
        return None
    arch = _ARCHITECTURES.get(dims.pop())
    if arch == "stable-diffusion-v2-512" and prediction_type == "v_prediction":
        arch = "stable-diffusion-v2-768-v"
    return arch


def cross_attention_dims(kohya_sd: Mapping[str, object]) -> list[int]:
    """In-features of every attn2 to_k / to_v LoRA down weight of a kohya state dict (the text-embedding width)."""
    return [int(v.shape[1]) for k, v in kohya_sd.items()
            if k.endswith(("attn2_to_k.lora_down.weight", "attn2_to_v.lora_down.weight")) and v.dim() >= 2]


def creation_date() -> str:
    """Today (UTC) as YYYY-MM-DD, or SOURCE_DATE_EPOCH's day when that is set (reproducible builds)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (_dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc) if epoch and epoch.strip().isdigit()
            else _dt.datetime.now(_dt.timezone.utc))
    return when.date().isoformat()


def lora_metadata(kohya_sd: Mapping[str, object], summary: Mapping, *, version: str, title: str, concept: str = "",
                  prediction_type: Optional[str] = None, resolution: Optional[str] = None,
                  merged_from: Optional[str] = None, extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The metadata of a LoRA file (see the module docstring). ``summary``: ``formats.summarize`` of the state dict;
    ``extra``: the writer's own ``memora.*`` keys (str values)."""
    ranks = list(summary["ranks"])
    alphas = list(summary.get("alphas", []))
    meta = {
        "memora.format": KOHYA_FORMAT,
        "memora.pack_version": version,
        "memora.layers": str(summary["layers"]),
        "memora.params": str(summary["params"]),
        "memora.ranks": json.dumps(ranks),
        "memora.concept": concept or "",
        "ss_network_module": "networks.lora",
    }
    if len(ranks) == 1:
        meta["ss_network_dim"] = str(ranks[0])
    if len(alphas) == 1:
        meta["ss_network_alpha"] = repr(float(alphas[0]))
    arch = base_architecture(cross_attention_dims(kohya_sd), prediction_type)
    if arch is not None:
        meta.update({"modelspec.sai_model_spec": MODELSPEC_VERSION, "modelspec.architecture": f"{arch}-lora",
                     "modelspec.implementation": "diffusers", "modelspec.title": title,
                     "modelspec.date": creation_date()})
        optional = {"modelspec.resolution": resolution, "modelspec.trigger_phrase": concept or None,
                    "modelspec.merged_from": merged_from,
                    "modelspec.prediction_type": {"epsilon": "epsilon", "v_prediction": "v"}.get(prediction_type or "")}
        meta.update({k: v for k, v in optional.items() if v})
    meta.update(dict(extra or {}))
    bad = [k for k, v in meta.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"LoRA metadata values must be str; these are not: {bad}")
    return meta


def read(meta: Mapping[str, str]) -> dict[str, str]:
    """A LoRA file's metadata with the pack's older dialect (``memora_<name>``) mapped onto the current one
    (``memora.<name>``; ``memora_version`` -> ``memora.pack_version``); keys in the current dialect win. Other keys
    are kept as they are."""
    out = dict(meta)
    for k, v in meta.items():
        if k.startswith("memora_"):
            out.pop(k)
            new = _OLD_NAMES.get(k, "memora." + k[len("memora_"):])
            if new not in meta:
                out[new] = v
    fmt = out.get("memora.format", "")
    if fmt.startswith("kohya"):  # older training files described the format in words ("kohya-sd lora (...)")
        out["memora.format"] = KOHYA_FORMAT
    return out
