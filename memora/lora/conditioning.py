"""The training conditioning and its concept prompt (no ComfyUI import; ComfyUI's data shapes only).

A CONDITIONING is a list of ``[tensor, dict]`` pairs; the API prompt ComfyUI hands a node (its hidden ``prompt``) is
``{node id: {"class_type": ..., "inputs": {name: literal or [source node id, output index]}}}``."""

from __future__ import annotations

from typing import Any

import torch

def clone_tree(value: Any) -> Any:
    """Copy of a conditioning structure with every tensor cloned (outside inference mode -> trainable-safe); the
    input is not modified; non-tensor objects (control nets, hooks) are shared."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: clone_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clone_tree(v) for v in value]
    if isinstance(value, tuple):
        return tuple(clone_tree(v) for v in value)
    return value


def check_training_conditioning(positive: Any) -> None:
    """The structure training needs (a non-empty list of [tensor, dict], one prompt); what a model can read of it is
    the host's check (nodes/_host.check_conditioning)."""
    if not isinstance(positive, list) or len(positive) == 0:
        raise ValueError("positive: expected a CONDITIONING (a non-empty list of [tensor, dict]), e.g. from "
                         "CLIPTextEncode with the concept prompt")
    for i, c in enumerate(positive):
        if not (isinstance(c, (list, tuple)) and len(c) >= 2 and isinstance(c[1], dict)):
            raise ValueError(f"positive: entry {i} is not a [tensor, dict] pair")
        if isinstance(c[0], torch.Tensor) and not torch.isfinite(c[0]).all():
            raise ValueError(f"positive: entry {i} contains non-finite values (NaN or inf)")
        if isinstance(c[0], torch.Tensor) and c[0].dim() >= 1 and c[0].shape[0] != 1:
            raise ValueError(f"positive: entry {i} holds a batch of {c[0].shape[0]} prompts; MemoRa trains every "
                             f"latent with the one concept prompt: expected a single prompt's conditioning")


# inputs that hold a prompt's text (CLIPTextEncode: text; SDXL encoders: text_g / text_l; string primitives: value)
_TEXT_INPUTS = ("text", "prompt", "text_g", "text_l", "value", "string")
# inputs through which a conditioning passes unchanged in text (ConditioningSetArea, ...SetTimestepRange, ...)
_CONDITIONING_INPUTS = ("conditioning", "conditioning_to", "conditioning_1")
_MAX_HOPS = 16


def _is_link(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and isinstance(v[1], int)


def _text_of(prompt: dict, node_id: Any, hops: int) -> str | None:
    """The literal text a node's text input holds, following links to string nodes (PrimitiveString[Multiline],
    CLIPTextEncode fed by them) and through conditioning nodes; None when there is none."""
    if hops > _MAX_HOPS:
        return None
    inputs = prompt.get(str(node_id), {}).get("inputs", {})
    for key in _TEXT_INPUTS:
        v = inputs.get(key)
        if isinstance(v, str):
            return v
        if _is_link(v):
            found = _text_of(prompt, v[0], hops + 1)
            if found is not None:
                return found
    for key in _CONDITIONING_INPUTS:
        v = inputs.get(key)
        if _is_link(v):
            return _text_of(prompt, v[0], hops + 1)
    return None


def concept_from_prompt(prompt: Any, node_id: Any, input_name: str = "positive") -> str:
    """The concept prompt text behind a node's conditioning input, read from ComfyUI's API prompt: the text of the
    text-encode node it comes from, whether typed into that node or wired in from a string node (the shipped
    workflows' "Concept prompt" is a PrimitiveStringMultiline), also through conditioning nodes; "" when it cannot
    be known (e.g. text computed by a node)."""
    try:
        link = prompt[str(node_id)]["inputs"][input_name]
        if not _is_link(link):
            return ""
        found = _text_of(prompt, link[0], 0)
    except (KeyError, TypeError, AttributeError):
        return ""
    return found or ""
